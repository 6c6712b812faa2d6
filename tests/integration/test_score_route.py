"""POST /score, one FastAPI route reading its own body: what it accepts, how it refuses, and its answer's bytes.

The route validates the raw body with ``ScoreRequest.model_validate_json`` and raises FastAPI's
RequestValidationError, so its 422s have FastAPI's shape (``detail``: errors located in the body); the API
key is FastAPI's dependency; the answer is the ``ScoreResponse`` schema written by orjson.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import TypeAdapter

from app.main import create_app
from app.schemas import ScoreRequest, ScoreResponse
from app.scorer import LoadedModel
from app.settings import Settings

KEY = "the-key"
AS_JSON = {"content-type": "application/json"}


def _items(model_repository: Path) -> list[str]:
    items: list[str] = json.loads((model_repository / "repo" / "din" / "1" / "vocab.json").read_text())["items"]
    return items


def _client(model_repository: Path, redis_url: str, **extra: Any) -> TestClient:
    settings = Settings(
        model_repository=model_repository / "repo",
        default_model="din",
        redis_url=redis_url,
        max_body_bytes=200_000,
        **extra,
    )
    return TestClient(create_app(settings))


@pytest.fixture
def client(model_repository: Path, redis_url: str) -> Iterator[TestClient]:
    with _client(model_repository, redis_url) as c:
        yield c


def _body(items: list[str], **extra: Any) -> bytes:
    return json.dumps({"user_id": "u", "candidates": [{"item_id": i} for i in items[:20]], **extra}).encode()


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.api+json"],
)
def test_json_content_types_are_scored(client: TestClient, model_repository: Path, content_type: str) -> None:
    r = client.post("/score", content=_body(_items(model_repository)), headers={"content-type": content_type})
    assert r.status_code == 200, r.text
    assert len(r.json()["scores"]) == 20


@pytest.mark.parametrize(
    "content_type",
    ["", "text/plain", "text/json", "application/jsonl", "application/json-seq", "application/json, text/plain"],
)
def test_other_content_types_are_one_error_at_the_header(
    client: TestClient, model_repository: Path, content_type: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/score", content=_body(_items(model_repository)), headers=headers)
    assert r.status_code == 422
    error = {"type": "content_type", "loc": ["header", "content-type"], "msg": "expected application/json"}
    assert r.json() == {"detail": [{**error, "input": content_type}]}


@pytest.mark.parametrize(
    ("content", "loc", "kind"),
    [
        (b'{"user_id": "u", "candidates": [', ["body"], "json_invalid"),
        (b"", ["body"], "json_invalid"),
        (b"\xff\xfe", ["body"], "json_invalid"),  # not even UTF-8
        (b"[1, 2]", ["body"], "model_type"),
        (b'{"user_id": "u"}', ["body", "candidates"], "missing"),
        (b'{"user_id": "u", "candidates": []}', ["body", "candidates"], "too_short"),
        (b'{"user_id": true, "candidates": [{"item_id": "a"}]}', ["body", "user_id"], "id_type"),
        (
            b'{"user_id": "u", "candidates": [{"item_id": "a"}], "version": "01"}',
            ["body", "version"],
            "string_pattern_mismatch",
        ),
    ],
)
def test_invalid_bodies_are_fastapis_422_located_in_the_body(
    client: TestClient, content: bytes, loc: list[Any], kind: str
) -> None:
    r = client.post("/score", content=content, headers=AS_JSON)
    assert r.status_code == 422, r.text
    error = r.json()["detail"][0]
    assert (error["loc"], error["type"]) == (loc, kind), error
    if kind == "json_invalid":
        assert error["input"] == {} and error["msg"].startswith("Invalid JSON")  # the body is not echoed


def test_the_body_is_parsed_once_from_its_bytes(
    client: TestClient, model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[bytes] = []
    original = ScoreRequest.model_validate_json

    def spy(data: bytes, **kwargs: Any) -> ScoreRequest:
        parsed.append(data)
        return original(data, **kwargs)

    monkeypatch.setattr(ScoreRequest, "model_validate_json", spy)
    body = _body(_items(model_repository))
    assert client.post("/score", content=body, headers=AS_JSON).status_code == 200
    assert parsed == [body]


def test_the_answer_is_the_response_schema_with_the_graphs_float32_values(
    client: TestClient, model_repository: Path
) -> None:
    """The bytes validate as ScoreResponse; probabilities and attention read back as float32 are exactly what
    the version's graph computed for the request, most recent history first."""
    items = _items(model_repository)
    history = [{"item_id": i, "label": k % 2} for k, i in enumerate(items[40:45])]
    r = client.post("/score", content=_body(items, history=history), headers=AS_JSON)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    answer = TypeAdapter(ScoreResponse).validate_json(r.content)
    assert (answer["model"], answer["version"], answer["history_source"], answer["degraded"]) == (
        "din",
        "1",
        "request",
        False,
    )
    assert [h["item_id"] for h in answer["history"]] == items[40:45] and [h["label"] for h in answer["history"]] == [
        0,
        1,
        0,
        1,
        0,
    ]
    assert [s["item_id"] for s in answer["scores"]] == items[:20]

    model: LoadedModel = client.app.state.components.registry.resolve("din", None, "u").model  # type: ignore[attr-defined]
    entries = [(h["item_id"], None, h["label"]) for h in history]
    ((prob, att),) = model.run([model.encode(entries, None, [(i, None) for i in items[:20]])])
    assert np.array_equal(np.float32([s["probability"] for s in answer["scores"]]), prob)
    assert np.array_equal(np.stack([s["attention"] for s in answer["scores"]]), att[:, ::-1])

    plain = client.post("/score", content=_body(items, return_attention=False), headers=AS_JSON).json()
    assert all(s["attention"] is None for s in plain["scores"]) and set(plain) == set(answer)


def test_the_key_is_checked_before_the_body_is_read(model_repository: Path, redis_url: str) -> None:
    body = _body(_items(model_repository))
    with _client(model_repository, redis_url, api_key=KEY, score_requires_key=True) as c:
        for authorization in (None, "Bearer wrong", "Bearer ", f"Basic {KEY}"):
            headers = AS_JSON if authorization is None else {**AS_JSON, "authorization": authorization}
            r = c.post("/score", content=body, headers=headers)
            assert (r.status_code, r.json()) == (401, {"detail": "missing or invalid API key"})
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/score", content=b"{", headers=AS_JSON).status_code == 401  # refused unread
        for authorization in (f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} "):  # HTTPBearer strips the key
            assert (
                c.post("/score", content=body, headers={**AS_JSON, "authorization": authorization}).status_code == 200
            )
        assert "ctr_auth_failures_total 5.0" in c.get("/metrics").text


def test_chunked_bodies_within_and_over_the_limit(client: TestClient, model_repository: Path) -> None:
    """No Content-Length: the limit is found while the body is read, and the answer is 413."""
    valid = _body(_items(model_repository))
    big = json.dumps({"user_id": "u", "candidates": [{"item_id": "x" * 100}] * 1000, "pad": "y" * 100_000}).encode()

    def chunks(data: bytes) -> Iterator[bytes]:
        for k in range(0, len(data), 16_384):
            yield data[k : k + 16_384]

    assert client.post("/score", content=chunks(valid), headers=AS_JSON).status_code == 200
    for path in ("/score", "/events"):
        r = client.post(path, content=chunks(big), headers=AS_JSON)
        assert r.status_code == 413 and "200000 bytes" in r.text, (path, r.status_code, r.text)
    assert 'ctr_requests_total{endpoint="/score",status="413"} 1.0' in client.get("/metrics").text


def test_a_failed_inference_run_is_a_500_naming_the_cause(
    client: TestClient, model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(model: LoadedModel, batch: list[Any]) -> Any:
        raise RuntimeError("the graph is gone")

    monkeypatch.setattr(LoadedModel, "_run_users", broken)  # the batchers hold each version's bound run
    r = client.post("/score", content=_body(_items(model_repository)), headers=AS_JSON)
    assert r.status_code == 500
    assert "inference failed" in r.json()["detail"] and "the graph is gone" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200  # the service keeps serving


def test_a_missed_deadline_is_a_504(model_repository: Path, redis_url: str) -> None:
    with _client(model_repository, redis_url, request_timeout_ms=0.001) as c:  # every request misses it
        r = c.post("/score", content=_body(_items(model_repository)), headers=AS_JSON)
        assert (r.status_code, r.json()) == (504, {"detail": "not scored within 0 ms"}), r.text
