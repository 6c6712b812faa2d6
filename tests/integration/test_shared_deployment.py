"""Admin changes reach every process: two apps (two workers, or two replicas) on one Redis and one repository."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from app.deployment import Desired
from app.main import create_app
from app.settings import Settings
from app.versions import user_bucket
from tests.conftest import RedisServer
from tests.integration.test_lifecycle import _score, _status, _wait, publish

SYNC = 0.05


def _app(repo: Path, redis_url: str, **overrides: object) -> TestClient:
    settings = Settings(
        model_repository=repo,
        default_model="din",
        redis_url=redis_url,  # type: ignore[arg-type]
        deployment_sync_interval_s=SYNC,
        **overrides,
    )
    return TestClient(create_app(settings))


@pytest.fixture
def pair(repo: Path, redis_url: str) -> Iterator[tuple[TestClient, TestClient]]:
    publish(repo, "din", 2)
    with ExitStack() as stack:
        yield stack.enter_context(_app(repo, redis_url)), stack.enter_context(_app(repo, redis_url))


def test_rollback_split_standby_and_unload_on_one_process_reach_the_other(
    pair: tuple[TestClient, TestClient],
) -> None:
    a, b = pair
    assert _score(a)["version"] == _score(b)["version"] == "2"
    assert a.post("/admin/models/din/rollback", json={"version": 1}).status_code == 200
    _wait(lambda: _status(b)["primary"] == "1" and _status(b)["pinned"], "b rolled back")
    assert _score(b)["version"] == "1"

    assert b.put("/admin/models/din/split", json={"version": 2, "percent": 40}).status_code == 200
    _wait(lambda: _status(a)["split"] == {"version": "2", "percent": 40.0}, "a has b's split")
    users = [f"user-{i}" for i in range(60)]
    on_a, on_b = [_score(a, u)["version"] for u in users], [_score(b, u)["version"] for u in users]
    assert on_a == on_b == ["2" if user_bucket("din", u) < 40 else "1" for u in users]  # the same users, both

    assert a.delete("/admin/models/din/split").status_code == 200
    _wait(lambda: _status(b)["split"] is None, "b's split cleared")
    # a rollback without a version goes to the same place on both (the activation history is shared)
    assert b.post("/admin/models/din/load", json={"version": 2}).status_code == 200
    _wait(lambda: _status(a)["primary"] == "2", "a on v2")
    assert a.post("/admin/models/din/rollback").json()["primary"] == "1"
    _wait(lambda: _status(b)["primary"] == "1", "b rolled back to the version before")

    assert a.post("/admin/models/din/load", json={"version": 2, "activate": False}).status_code == 200
    _wait(lambda: [v["role"] for v in _status(b)["versions"]] == ["primary", "standby"], "b has v2 standing by")
    assert _score(b, version="2")["version"] == "2"
    assert b.post("/admin/models/din/unload", json={"version": 2}).status_code == 200
    _wait(lambda: [v["version"] for v in _status(a)["versions"]] == ["1"], "a unloaded v2")

    assert a.post("/admin/models/dien/unload").status_code == 200
    _wait(lambda: "dien" not in {m["name"] for m in b.get("/models").json()["models"]}, "b unloaded dien")
    assert b.post("/admin/models/dien/load").status_code == 200
    _wait(lambda: "dien" in {m["name"] for m in a.get("/models").json()["models"]}, "a has dien again")
    # following the newest again (load without a version) is shared too
    assert a.post("/admin/models/din/load", json={}).json()["pinned"] is False
    _wait(lambda: _status(b)["primary"] == "2" and not _status(b)["pinned"], "b follows the newest")


def test_a_restarted_process_keeps_the_admins_deployment(repo: Path, redis_url: str) -> None:
    publish(repo, "din", 2)
    with _app(repo, redis_url) as a:
        assert a.post("/admin/models/din/rollback", json={"version": 1}).status_code == 200
        assert a.post("/admin/models/dien/unload").status_code == 200
    with _app(repo, redis_url, model_poll_interval_s=SYNC) as restarted:  # polling does not undo either
        assert _status(restarted)["primary"] == "1" and _status(restarted)["pinned"]
        assert _score(restarted)["version"] == "1"
        publish(repo, "din", 3)
        assert {m["name"] for m in restarted.get("/models").json()["models"]} == {"din"}
        assert _status(restarted)["published"] == [1, 2, 3] and _status(restarted)["primary"] == "1"


def test_a_version_that_fails_on_one_process_leaves_it_serving_what_it_had(repo: Path, redis_url: str) -> None:
    publish(repo, "din", 2)
    with _app(repo, redis_url) as a:
        assert a.post("/admin/models/din/rollback", json={"version": 1}).status_code == 200
    # the shared document names a version this host cannot load: the newest that works serves instead
    (repo / "din" / "1" / "model.onnx").write_bytes(b"damaged on this host")
    with _app(repo, redis_url) as b:
        assert _score(b)["version"] == "2"
        assert _status(b)["last_error"]["version"] == "1"


def test_redis_down_during_an_admin_call_is_a_503_and_the_process_returns_to_the_shared_state(
    pair: tuple[TestClient, TestClient], redis_server: RedisServer
) -> None:
    a, b = pair
    redis_server.stop()
    try:
        r = a.post("/admin/models/din/rollback", json={"version": 1})
        assert r.status_code == 503 and "applied on this process only" in r.json()["detail"]
        assert _score(b)["version"] == "2"
    finally:
        redis_server.start()
    _wait(lambda: _status(a)["primary"] == "2", "a back on the shared deployment")


def test_deployment_documents_round_trip_and_bad_ones_are_ignored(redis_url: str, repo: Path) -> None:
    doc = Desired(primary="3", split=("4", 12.5), standby=("2",), activations=("1", "3"))
    assert Desired.from_json(doc.to_json()) == doc
    assert Desired.from_json(Desired(removed=True).to_json()).removed
    with pytest.raises(ValueError, match="unreadable"):
        Desired.from_json('{"split": {"percent": 3}}')
    with redis.Redis.from_url(redis_url) as client:
        client.hset("ctr:deployment:models", "din", "not json")
        client.incr("ctr:deployment:revision")
    with _app(repo, redis_url) as c:  # logged, ignored: the newest version serves
        assert _status(c)["primary"] == "1"
