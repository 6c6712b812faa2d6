"""The /score fast path (app/routes/score.py) answers exactly what FastAPI's own route answers.

Two apps over the same repository and the same Redis database, one with the fast path and one without,
get the same requests; status, the headers a client reads, and the body must be byte for byte the same,
valid requests and every kind of refusal alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.schemas import ScoreRequest
from app.scorer import LoadedModel
from app.settings import Settings

KEY = "the-key"


def _vocab(model_repository: Path) -> list[str]:
    items: list[str] = json.loads((model_repository / "repo" / "din" / "1" / "vocab.json").read_text())["items"]
    return items


def _pair(model_repository: Path, redis_url: str, **extra: Any) -> Iterator[tuple[TestClient, TestClient]]:
    settings = Settings(model_repository=model_repository / "repo", default_model="din", redis_url=redis_url,
                        max_body_bytes=200_000, **extra)  # fmt: skip
    with TestClient(create_app(settings)) as fast, TestClient(create_app(settings, score_fast_path=False)) as slow:
        yield fast, slow


@pytest.fixture
def pair(model_repository: Path, redis_url: str) -> Iterator[tuple[TestClient, TestClient]]:
    yield from _pair(model_repository, redis_url)


def _same(pair: tuple[TestClient, TestClient], content: bytes, headers: dict[str, str]) -> int:
    fast, slow = (c.post("/score", content=content, headers=headers) for c in pair)
    assert fast.status_code == slow.status_code, (content[:80], fast.text[:300], slow.text[:300])
    for name in ("content-type", "content-length", "retry-after", "www-authenticate"):
        assert fast.headers.get(name) == slow.headers.get(name), name
    assert fast.content == slow.content, (content[:80], fast.text[:300], slow.text[:300])
    return fast.status_code


def _cases(items: list[str]) -> list[tuple[bytes, dict[str, str], int]]:
    as_json = {"content-type": "application/json"}
    candidates = [{"item_id": i} for i in items[:30]]
    valid: list[dict[str, Any]] = [
        {"user_id": "stored", "candidates": candidates},
        {"user_id": 7, "candidates": candidates, "return_attention": False},
        {"user_id": "u", "candidates": candidates, "history": [{"item_id": i, "label": 1} for i in items[40:45]]},
        {"user_id": "u", "candidates": [{"item_id": "never-seen", "category_id": "c"}], "history": [], "bid": 3},
        {"user_id": "u", "candidates": candidates[:3], "model": "din", "version": 1, "user_features": {"age": 3}},
    ]
    cases = [(json.dumps(v).encode(), as_json, 200) for v in valid]
    for content_type in ("application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.api+json"):
        cases.append((json.dumps(valid[0]).encode(), {"content-type": content_type}, 200))
    for content_type in ("application/jsonl", "application/json-seq", "application/json, text/plain", "text/json"):
        cases.append((json.dumps(valid[0]).encode(), {"content-type": content_type}, 422))  # FastAPI: not JSON
    invalid = [
        (b'{"user_id": "u", "candidates": [', as_json, 422),  # not JSON
        (b"", as_json, 422),  # no body
        (b"[1, 2]", as_json, 422),
        (json.dumps({"user_id": "u", "candidates": []}).encode(), as_json, 422),
        (json.dumps({"user_id": True, "candidates": candidates}).encode(), as_json, 422),
        (json.dumps({"user_id": "u", "candidates": [{"item_id": "a\u0000"}]}).encode(), as_json, 422),
        (json.dumps({"user_id": "u", "candidates": candidates, "model": "nope"}).encode(), as_json, 404),
        (json.dumps({"user_id": "u", "candidates": candidates, "version": 9}).encode(), as_json, 404),
        (json.dumps(valid[0]).encode(), {"content-type": "text/plain"}, 422),  # FastAPI does not read it as JSON
        (json.dumps(valid[0]).encode(), {}, 422),  # no content type at all
    ]
    return cases + invalid


def test_every_answer_is_fastapis_own(pair: tuple[TestClient, TestClient], model_repository: Path) -> None:
    items = _vocab(model_repository)
    events = [{"user_id": "stored", "item_id": i, "timestamp": t} for t, i in enumerate(items[50:60])]
    assert pair[0].post("/events", json={"events": events}).status_code == 200  # one Redis behind both apps
    for content, headers, status in _cases(items):
        assert _same(pair, content, headers) == status, content[:80]


def test_the_fast_path_is_what_answers_valid_requests(
    pair: tuple[TestClient, TestClient], model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[bytes] = []
    original = ScoreRequest.model_validate_json

    def spy(data: bytes, **kwargs: Any) -> ScoreRequest:
        parsed.append(data)
        return original(data, **kwargs)

    monkeypatch.setattr(ScoreRequest, "model_validate_json", spy)
    body = json.dumps({"user_id": "u", "candidates": [{"item_id": _vocab(model_repository)[0]}]}).encode()
    fast, slow = pair
    assert fast.post("/score", content=body, headers={"content-type": "application/json"}).status_code == 200
    assert parsed == [body]
    assert slow.post("/score", content=body, headers={"content-type": "application/json"}).status_code == 200
    assert parsed == [body]  # FastAPI's route parses with json.loads and validate_python


def test_keys_refusals_and_overload_match_too(model_repository: Path, redis_url: str) -> None:
    items = _vocab(model_repository)
    body = json.dumps({"user_id": "u", "candidates": [{"item_id": i} for i in items[:20]]}).encode()
    as_json = {"content-type": "application/json"}
    for pair in _pair(model_repository, redis_url, api_key=KEY, score_requires_key=True):
        assert _same(pair, body, as_json) == 401
        assert _same(pair, body, {**as_json, "authorization": "Bearer wrong"}) == 401
        assert _same(pair, body, {**as_json, "authorization": "Bearer "}) == 401
        assert _same(pair, body, {**as_json, "authorization": f"Basic {KEY}"}) == 401
        assert _same(pair, body, {**as_json, "authorization": f"bearer {KEY}"}) == 200
        assert _same(pair, body, {**as_json, "authorization": f"Bearer  {KEY} "}) == 200  # HTTPBearer strips the key
        metrics = pair[0].get("/metrics").text
        assert "ctr_auth_failures_total 4.0" in metrics  # the fast path's refusals are counted by FastAPI's
    for pair in _pair(model_repository, redis_url, request_timeout_ms=0.001):  # every request misses its deadline
        assert _same(pair, body, as_json) == 504


def test_chunked_bodies_within_and_over_the_limit(pair: tuple[TestClient, TestClient], model_repository: Path) -> None:
    """No Content-Length: the limit is found while the body is read, and the answer is 413 on every path
    (FastAPI's own reading of a body cut short is a 400 "error parsing the body")."""
    valid = json.dumps({"user_id": "u", "candidates": [{"item_id": i} for i in _vocab(model_repository)[:20]]})
    big = json.dumps({"user_id": "u", "candidates": [{"item_id": "x" * 100}] * 1000, "pad": "y" * 100_000})

    def chunks(text: str) -> Iterator[bytes]:
        data = text.encode()
        for k in range(0, len(data), 16_384):
            yield data[k : k + 16_384]

    as_json = {"content-type": "application/json"}
    for client in pair:
        ok = client.post("/score", content=chunks(valid), headers=as_json)
        assert ok.status_code == 200, ok.text
        for path in ("/score", "/events"):
            r = client.post(path, content=chunks(big), headers=as_json)
            assert r.status_code == 413 and "200000 bytes" in r.text, (path, r.status_code, r.text)
    assert 'ctr_requests_total{endpoint="/score",status="413"} 1.0' in pair[0].get("/metrics").text


def test_a_failed_inference_run_is_the_same_500(
    pair: tuple[TestClient, TestClient], model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batcher's BatchFailed becomes an HTTPException(500) in answer(): the fast path hands it to the same
    handler as the route (Starlette files 500 under ServerErrorMiddleware, not under the HTTPException one)."""

    def broken(model: LoadedModel, batch: list[Any]) -> Any:
        raise RuntimeError("the graph is gone")

    monkeypatch.setattr(LoadedModel, "_run_users", broken)  # the batchers hold each version's bound run
    body = json.dumps({"user_id": "u", "candidates": [{"item_id": _vocab(model_repository)[0]}]}).encode()
    assert _same(pair, body, {"content-type": "application/json"}) == 500
    r = pair[0].post("/score", content=body, headers={"content-type": "application/json"})
    assert "inference failed" in r.json()["detail"] and "the graph is gone" in r.json()["detail"]
    assert pair[0].get("/healthz").status_code == 200  # the service keeps serving
