"""API keys and input limits on the real app: what is refused, with which status, and what stays open."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import key_matches
from app.main import create_app
from app.schemas import MAX_ID_LENGTH
from app.settings import Settings

KEYS = "first-key, second-key"


def _app(model_repository: Path, **overrides: object) -> TestClient:
    settings = Settings(model_repository=model_repository / "repo", default_model="din", **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


@pytest.fixture
def keyed(model_repository: Path) -> Iterator[TestClient]:
    with _app(model_repository, api_key=KEYS) as c:
        yield c


SCORE = {"user_id": "u", "candidates": [{"item_id": "a"}]}
EVENTS = {"events": [{"user_id": "u", "item_id": "a"}]}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_writes_user_data_and_admin_need_a_key(keyed: TestClient) -> None:
    protected = [
        ("POST", "/events", EVENTS),
        ("GET", "/users/u/history", None),
        ("POST", "/admin/models/din/load", {}),
        ("PUT", "/admin/models/din/split", {"version": 1, "percent": 5}),
    ]
    for method, path, body in protected:
        for headers in ({}, _bearer("wrong"), {"Authorization": "Basic Zmlyc3Qta2V5"}, _bearer("FIRST-KEY")):
            r = keyed.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
    assert keyed.post("/events", json=EVENTS, headers=_bearer("first-key")).status_code == 200
    assert keyed.post("/events", json=EVENTS, headers=_bearer("second-key")).json() == {"stored": 1}
    assert keyed.get("/users/u/history", headers=_bearer("second-key")).status_code == 200
    assert keyed.post("/admin/models/din/load", json={}, headers=_bearer("first-key")).status_code == 200
    # scoring, health and metrics stay open unless SCORE_REQUIRES_KEY
    assert keyed.post("/score", json=SCORE).status_code == 200
    for path in ("/healthz", "/readyz", "/models", "/metrics"):
        assert keyed.get(path).status_code == 200, path
    assert "ctr_auth_failures_total 16.0" in keyed.get("/metrics").text


def test_scoring_can_require_the_key_too(model_repository: Path) -> None:
    with _app(model_repository, api_key="k", score_requires_key=True) as c:
        assert c.post("/score", json=SCORE).status_code == 401
        assert c.post("/score", json=SCORE, headers=_bearer("k")).status_code == 200
        scheme = c.get("/openapi.json").json()["components"]["securitySchemes"]
        assert scheme["HTTPBearer"]["scheme"] == "bearer"


def test_an_open_service_says_so_loudly_at_start_up(model_repository: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="app.auth"), _app(model_repository) as c:
        assert c.post("/events", json=EVENTS).status_code == 200  # no key configured: open, as announced
    assert any("API_KEY is not set" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="app.auth"), _app(model_repository, api_key=" , ") as c:
        assert c.post("/events", json=EVENTS).status_code == 200  # a blank key list is no key


def test_key_comparison_checks_every_key() -> None:
    assert key_matches("b", [b"a", b"b"]) and not key_matches("c", [b"a", b"b"]) and not key_matches("a", [])
    assert not key_matches("", [b"a"]) and not key_matches("aa", [b"a"])


# --- limits: each input that costs memory or CPU, at its limit and one past it ------------------------


@pytest.fixture
def client(model_repository: Path) -> Iterator[TestClient]:
    with _app(model_repository, max_body_bytes=200_000) as c:
        yield c


def _items(n: int) -> list[dict[str, str]]:
    return [{"item_id": f"i{j}"} for j in range(n)]


@pytest.mark.parametrize(
    ("field", "at_limit", "past_limit"),
    [
        ("candidates", _items(1000), _items(1001)),
        ("history", _items(1000), _items(1001)),
        ("user_id", "u" * MAX_ID_LENGTH, "u" * (MAX_ID_LENGTH + 1)),
        ("user_features", {f"f{j}": "v" for j in range(64)}, {f"f{j}": "v" for j in range(65)}),
        ("model", "d" * 64, "d" * 65),
    ],
)
def test_score_limits(client: TestClient, field: str, at_limit: object, past_limit: object) -> None:
    ok = client.post("/score", json={**SCORE, field: at_limit})
    assert ok.status_code in (200, 404), ok.text  # 404: a 64-character model name is valid but not loaded
    refused = client.post("/score", json={**SCORE, field: past_limit})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"][:2] == ["body", field]


def test_a_long_history_is_truncated_to_the_model_not_refused(client: TestClient) -> None:
    body = client.post("/score", json={**SCORE, "history": _items(1000)}).json()
    assert len(body["history"]) == 20 and len(body["scores"][0]["attention"]) == 20  # the model's max_history


def test_event_limits(client: TestClient) -> None:
    events = [{"user_id": "u", "item_id": f"i{j}"} for j in range(1000)]
    assert client.post("/events", json={"events": events}).json() == {"stored": 1000}
    assert client.post("/events", json={"events": [*events, events[0]]}).status_code == 422
    assert client.post("/events", json={"events": []}).status_code == 422
    long_item = {"user_id": "u", "item_id": "i" * (MAX_ID_LENGTH + 1)}
    assert client.post("/events", json={"events": [long_item]}).status_code == 422
    assert client.get(f"/users/{'u' * (MAX_ID_LENGTH + 1)}/history").status_code == 422


def test_body_size_and_malformed_bodies(client: TestClient) -> None:
    big = b'{"user_id": "u", "candidates": [' + b'{"item_id": "a"},' * 20_000 + b'{"item_id": "a"}]}'
    r = client.post("/score", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "200000 bytes" in r.text
    for body in (b"[" * 50_000 + b"]" * 50_000, b'{"user_id": ' * 10_000, b"\xff\xfe", b""):
        r = client.post("/score", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), (body[:20], r.status_code)
    assert client.get("/healthz").status_code == 200
