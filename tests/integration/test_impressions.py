"""The impression log through the real app and a real Redis: what /score logs is what it answered, outcomes in
/events land beside their behaviour, a log that cannot be written costs /score nothing, and without Redis the
log is rotating JSON-lines files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import impressions
from app.impression_log import sampled
from app.main import create_app
from app.settings import Settings
from impressions import Impression, Outcome
from tests.conftest import RedisServer, wait_for

KEY = "k"
AUTH = {"authorization": f"Bearer {KEY}"}


def _items(model_repository: Path) -> list[str]:
    items: list[str] = json.loads((model_repository / "repo" / "din" / "1" / "vocab.json").read_text())["items"]
    return items


def _client(model_repository: Path, redis_url: str | None, **extra: Any) -> TestClient:
    settings = Settings(
        model_repository=model_repository / "repo", default_model="din", redis_url=redis_url, api_key=KEY, **extra
    )
    return TestClient(create_app(settings))


@pytest.fixture
def client(model_repository: Path, redis_url: str) -> Iterator[TestClient]:
    with _client(model_repository, redis_url) as c:
        yield c


def _stream(redis_url: str, stream: str) -> list[bytes]:
    with redis.Redis.from_url(redis_url) as r:
        return [fields[impressions.RECORD_FIELD.encode()] for _, fields in r.xrange(stream)]


def _logged(redis_url: str, n: int, stream: str = impressions.IMPRESSIONS_STREAM) -> list[Impression]:
    raw = wait_for(lambda: (lambda rs: rs if len(rs) >= n else None)(_stream(redis_url, stream)), f"{n} records")
    return [Impression.from_json(r) for r in raw]


def _metric(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def test_the_logged_record_is_what_score_answered(client: TestClient, model_repository: Path, redis_url: str) -> None:
    items = _items(model_repository)
    events = [{"user_id": "u1", "item_id": items[k], "timestamp": 1000 + k, "label": k % 2} for k in range(8)]
    assert client.post("/events", json={"events": events}, headers=AUTH).status_code == 200
    body = {"user_id": "u1", "candidates": [{"item_id": i} for i in items[10:30]], "user_features": {"x": "1"}}
    answer = client.post("/score", json=body).json()
    history_body = {**body, "user_id": "u2", "history": [{"item_id": items[3], "label": 1}, {"item_id": items[4]}]}
    answer2 = client.post("/score", json=history_body).json()
    first, second = _logged(redis_url, 2)

    assert first.impression_id == answer["impression_id"] != answer2["impression_id"]
    assert answer["impression_id"].startswith("din.1.")
    assert (first.user_id, first.model, first.version, first.history_source) == ("u1", "din", "1", "store")
    assert [{"item_id": b.item_id, "category_id": b.category_id, "label": b.label} for b in first.history] == answer[
        "history"
    ]
    stored = client.get("/users/u1/history", headers=AUTH).json()["history"]
    assert [b.timestamp for b in first.history] == [b["timestamp"] for b in stored] == list(range(1007, 999, -1))
    assert [(c.item_id, c.probability) for c in first.candidates] == [
        (s["item_id"], s["probability"]) for s in answer["scores"]
    ]
    assert all(c.category_id is not None for c in first.candidates)  # filled in from the model's item table
    assert first.user_features == {}  # the model reads no user features; "x" was not used

    assert second.history_source == "request" and second.user_id == "u2"
    assert [{"item_id": b.item_id, "category_id": b.category_id, "label": b.label} for b in second.history] == answer2[
        "history"
    ]
    assert [b.timestamp for b in second.history] == [None, None]  # a request's history carries no times
    assert _metric(client, "ctr_impressions_logged_total") == 2


def test_the_impression_id_is_in_the_openapi_schema(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert "impression_id" in schemas["ScoreResponse"]["required"]
    assert "impression_id" in schemas["Event"]["properties"]


def test_sampling_logs_the_impressions_its_ids_select(model_repository: Path, redis_url: str) -> None:
    items = _items(model_repository)
    with _client(model_repository, redis_url, impression_log_sample=0.5) as c:
        bodies = [{"user_id": f"s{k}", "candidates": [{"item_id": items[k]}]} for k in range(40)]
        ids = [c.post("/score", json=b).json()["impression_id"] for b in bodies]
        expected = [i for i in ids if sampled(i, 0.5)]
        assert 5 < len(expected) < 35
        logged = _logged(redis_url, len(expected))
        assert [r.impression_id for r in logged] == expected
        assert _metric(c, "ctr_impressions_logged_total") == len(expected)
        assert _metric(c, "ctr_scored_requests_total", model="din", version="1") == 40  # impressions: all of them


def test_outcomes_are_stored_as_behaviours_and_appended_to_the_outcomes_stream(
    client: TestClient, model_repository: Path, redis_url: str
) -> None:
    items = _items(model_repository)
    answer = client.post("/score", json={"user_id": "u", "candidates": [{"item_id": i} for i in items[:3]]}).json()
    iid = answer["impression_id"]
    events = [
        {"user_id": "u", "item_id": items[0], "impression_id": iid, "label": 1, "timestamp": 50},
        {"user_id": "u", "item_id": items[1], "impression_id": iid, "label": 0, "timestamp": 51},
        {"user_id": "u", "item_id": items[5], "timestamp": 52},  # a plain behaviour, as before
    ]
    assert client.post("/events", json={"events": events}, headers=AUTH).json() == {"stored": 3}
    history = client.get("/users/u/history", headers=AUTH).json()["history"]
    assert [(h["item_id"], h["label"]) for h in history] == [(items[5], None), (items[1], 0), (items[0], 1)]
    outcomes = [Outcome.from_json(r) for r in _stream(redis_url, impressions.OUTCOMES_STREAM)]
    assert [(o.impression_id, o.user_id, o.item_id, o.label) for o in outcomes] == [
        (iid, "u", items[0], 1),
        (iid, "u", items[1], 0),
    ]
    assert _metric(client, "ctr_outcomes_total", model="din", version="1", label="1") == 1
    assert _metric(client, "ctr_outcomes_total", model="din", version="1", label="0") == 1

    plain = {"events": [{"user_id": "v", "item_id": items[2]}]}
    assert client.post("/events", json=plain, headers=AUTH).json() == {"stored": 1}
    assert len(_stream(redis_url, impressions.OUTCOMES_STREAM)) == 2  # a plain behaviour is no outcome


@pytest.mark.parametrize(
    "event",
    [
        {"user_id": "u", "item_id": "i", "impression_id": "din.1.0123456789abcdef01234567"},  # no label
        {"user_id": "u", "item_id": "i", "impression_id": "not-an-impression", "label": 1},
        {"user_id": "u", "item_id": "i", "impression_id": "din.1.0123456789abcdef01234567", "label": 2},
    ],
)
def test_a_malformed_outcome_is_a_422_and_nothing_is_stored(client: TestClient, event: dict[str, Any]) -> None:
    r = client.post("/events", json={"events": [event]}, headers=AUTH)
    assert r.status_code == 422, r.text
    assert client.get("/users/u/history", headers=AUTH).json()["history"] == []


def test_a_log_that_cannot_be_written_costs_score_nothing_and_is_counted(
    client: TestClient, model_repository: Path, redis_url: str
) -> None:
    items = _items(model_repository)
    with redis.Redis.from_url(redis_url) as r:  # every XADD to the stream now fails (WRONGTYPE)
        r.set(impressions.IMPRESSIONS_STREAM, "not a stream")
        r.set(impressions.OUTCOMES_STREAM, "not a stream")
    body = {"user_id": "u", "candidates": [{"item_id": i} for i in items[:5]]}
    answers = [client.post("/score", json=body) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    assert all(not a.json()["degraded"] for a in answers)
    wait_for(lambda: _metric(client, "ctr_impressions_dropped_total", reason="write_error") == 5, "5 drops")
    assert _metric(client, "ctr_impression_log_errors_total", log="impressions") >= 1
    assert _metric(client, "ctr_impressions_logged_total") == 0

    # an outcome that cannot be logged is not acknowledged: the caller retries
    outcome = {"user_id": "u", "item_id": items[0], "impression_id": answers[0].json()["impression_id"], "label": 1}
    r = client.post("/events", json={"events": [outcome]}, headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert _metric(client, "ctr_impression_log_errors_total", log="outcomes") == 1
    assert client.get("/users/u/history", headers=AUTH).json()["history"] == []  # the outcome goes first


def test_a_stopped_redis_leaves_score_answering(model_repository: Path, tmp_path: Path) -> None:
    items = _items(model_repository)
    with RedisServer(tmp_path / "redis") as server, _client(model_repository, server.url) as c:
        server.stop()
        body = {"user_id": "u", "candidates": [{"item_id": i} for i in items[:5]]}
        answers = [c.post("/score", json=body) for _ in range(3)]
        assert [a.status_code for a in answers] == [200] * 3  # degraded (no stored history), but answered
        wait_for(lambda: _metric(c, "ctr_impressions_dropped_total", reason="write_error") == 3, "3 drops")
        server.start()
        c.post("/score", json=body)
        wait_for(lambda: _metric(c, "ctr_impressions_logged_total") == 1, "the log to work again")


def test_without_redis_the_log_is_rotating_json_lines_files(model_repository: Path, tmp_path: Path) -> None:
    items = _items(model_repository)
    folder = tmp_path / "log"
    extra = {"impression_log": True, "impression_log_dir": folder, "impression_log_file_bytes": 2048}
    with _client(model_repository, None, impression_log_file_backups=2, **extra) as c:
        body = {"user_id": "u", "candidates": [{"item_id": i} for i in items[:20]]}
        ids = [c.post("/score", json=body).json()["impression_id"] for _ in range(12)]
        wait_for(lambda: _metric(c, "ctr_impressions_logged_total") == 12, "12 records")
        outcome = {"user_id": "u", "item_id": items[0], "impression_id": ids[-1], "label": 1}
        assert c.post("/events", json={"events": [outcome]}, headers=AUTH).json() == {"stored": 1}
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["impressions.jsonl", "impressions.jsonl.1", "impressions.jsonl.2", "outcomes.jsonl"]
    assert all(p.stat().st_size <= 2048 for p in folder.glob("impressions.jsonl*"))
    kept = [
        Impression.from_json(line)
        for name in ("impressions.jsonl.2", "impressions.jsonl.1", "impressions.jsonl")
        for line in (folder / name).read_text().splitlines()
    ]
    assert 0 < len(kept) < 12 and [r.impression_id for r in kept] == ids[-len(kept) :]  # the oldest rotated away
    [line] = (folder / "outcomes.jsonl").read_text().splitlines()
    assert Outcome.from_json(line).impression_id == ids[-1]
