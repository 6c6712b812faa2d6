"""POST /score: one user, many candidates."""

from __future__ import annotations

import email.message
import functools
import time
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import authorization_matches
from app.batcher import BatchFailed, DeadlineExceeded, QueueFull
from app.schemas import BAD_BODY, ErrorResponse, ScoreRequest, ScoreResponse
from app.scorer import HistoryEntry
from app.settings import Settings
from app.state import AppState, StateDep
from app.store import StoreError

router = APIRouter(tags=["scoring"], responses=BAD_BODY)  # the API key, when SCORE_REQUIRES_KEY, is added by create_app

RETRY_AFTER_S = "1"


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses={
        401: {"model": ErrorResponse, "description": "missing or invalid API key (when SCORE_REQUIRES_KEY)"},
        404: {"model": ErrorResponse, "description": "unknown model, or a version that is not loaded"},
        500: {"model": ErrorResponse, "description": "the inference run holding this request failed"},
        503: {"model": ErrorResponse, "description": "queue full; retry after Retry-After seconds"},
        504: {"model": ErrorResponse, "description": "not scored before the request timeout"},
    },
)
async def score(req: ScoreRequest, state: StateDep, request: Request) -> Response:
    # FastAPI's path: the contract (OpenAPI) and the answer to every request the fast path passes on
    return Response(await answer(req, state, request.scope), media_type="application/json")


async def answer(req: ScoreRequest, state: AppState, scope: Scope) -> bytes:
    """The /score answer, JSON-encoded; errors are HTTPException (503, 504, 500) or RegistryError (404)."""
    stage = state.metrics.stage
    t = time.perf_counter()
    stage.labels("parse").observe(t - scope.get("state", {}).get("started", t))  # receive, JSON, validation
    name = req.model or state.settings.default_model
    deployment = state.registry.resolve(name, req.version, req.user_id)  # RegistryError → 404 (app/main.py)
    with deployment.lease() as model:  # this request stays on this version even if another is swapped in
        history, source, degraded = await _history(req, state, model.max_history)
        now = time.perf_counter()
        stage.labels("store").observe(now - t)
        t = now
        candidates = [(c["item_id"], c.get("category_id")) for c in req.candidates]
        encoded = model.encode(history, req.user_features, candidates)
        for kind, n in encoded.unknown.items():
            if n:
                state.metrics.unknown_ids.labels(kind).inc(n)
        state.metrics.history_length.observe(len(history))
        stage.labels("encode").observe(time.perf_counter() - t)
        try:
            prob, att = await deployment.batcher.submit(
                encoded, len(candidates), state.settings.request_timeout_ms / 1e3
            )
        except QueueFull as e:
            raise HTTPException(503, f"overloaded: {e}", headers={"Retry-After": RETRY_AFTER_S}) from e
        except DeadlineExceeded as e:
            raise HTTPException(504, str(e)) from e
        except BatchFailed as e:
            raise HTTPException(500, str(e)) from e
    state.metrics.scored.labels(model.name, model.version).inc()
    t = time.perf_counter()
    # the graph's history is oldest first, the API's most recent first; rows go to orjson as float32 arrays
    recent_first = np.ascontiguousarray(att[:, ::-1]) if req.return_attention else [None] * len(prob)
    scores = [
        {"item_id": item, "probability": p, "attention": a}
        for (item, _), p, a in zip(candidates, prob.tolist(), recent_first, strict=True)
    ]
    payload = {
        "model": model.name,
        "version": model.version,
        "user_id": req.user_id,
        "history_source": source,
        "degraded": degraded,
        "history": [{"item_id": i, "category_id": c or model.category_of(i), "label": y} for i, c, y in history],
        "scores": scores,
    }
    # orjson directly: FastAPI's generic encoder walks every float (≈ 18 ms for 200 × 50 attention); numpy
    # rows are written natively, float32 at their shortest repr (≈ 40% fewer bytes than float64 repr)
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    stage.labels("serialize").observe(time.perf_counter() - t)
    return body


class ScoreFastPath:
    """ASGI middleware answering POST /score itself when the request is well-formed JSON that validates, the
    common case: pydantic-core parses and validates the bytes in one pass (``model_validate_json``), and the
    request skips FastAPI's routing, dependency solving and its stdlib ``json.loads``, ≈ 0.2 ms of the
    ≈ 2 ms of Python a request costs (bench/README.md). Everything else (another content type, invalid JSON
    or fields, a missing or wrong API key, any other method or path) goes on to FastAPI with its body
    replayed, so its answers, 422s included, are FastAPI's own; errors raised while scoring go to the app's
    exception handlers, as they would from the route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/score" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, more = await _read_body(receive)
        state: AppState | None = getattr(scope["app"].state, "components", None)  # None: the lifespan never ran
        if state is None or more or (req := _parse(scope, body, state.settings)) is None:
            await self.app(scope, _replay(body, more, receive), send)
            return
        try:
            content = await answer(req, state, scope)
        except Exception as e:
            handler = _handler(scope["app"], e)
            if handler is None:
                raise  # ServerErrorMiddleware answers 500, as for the route
            response = await handler(Request(scope), e)
        else:
            response = Response(content, media_type="application/json")
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole body; ``more`` is true when the client went away before sending all of it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, more: bool, receive: Receive) -> Receive:
    """``receive`` for the next app: the body already read first, then the client's own messages."""
    pending: list[Message] = [] if more else [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _parse(scope: Scope, body: bytes, settings: Settings) -> ScoreRequest | None:
    """The request, or None for FastAPI to answer (not JSON by its content type, invalid, or not allowed)."""
    if not _is_json(_header(scope, b"content-type")):
        return None
    keys = settings.api_keys if settings.score_requires_key else []
    if keys and not authorization_matches(_header(scope, b"authorization").decode("latin-1"), keys):
        return None
    try:
        return ScoreRequest.model_validate_json(body)
    except ValidationError:
        return None


@functools.lru_cache(maxsize=64)
def _is_json(content_type: bytes) -> bool:
    """FastAPI's own test (its default ``strict_content_type``): ``application/json`` or ``application/*+json``,
    parameters allowed; no content type is not JSON."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type.decode("latin-1")
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _header(scope: Scope, name: bytes) -> bytes:
    """The first value of a header (as Starlette's ``Headers.get``), b"" when absent."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


def _handler(app: Any, exc: Exception) -> Any:
    """The app's handler for this exception, looked up as Starlette's ExceptionMiddleware does: an
    HTTPException's status code first, then the nearest class in the exception's MRO. Handlers of 500 and
    ``Exception`` belong to ServerErrorMiddleware, which answers and re-raises: the exception goes there."""
    handlers = app.exception_handlers
    if isinstance(exc, HTTPException) and exc.status_code != 500 and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls is Exception:
            break
        if cls in handlers:
            return handlers[cls]
    return None


async def _history(req: ScoreRequest, state: AppState, max_history: int) -> tuple[list[HistoryEntry], str, bool]:
    """The request's own history, else the store's; a store failure degrades to no history (flagged)."""
    degraded = False
    if req.history is not None:
        history = [(h["item_id"], h.get("category_id"), h.get("label")) for h in req.history[:max_history]]
    else:
        try:
            stored = await state.store.recent(req.user_id, max_history)
        except StoreError:
            state.metrics.store_errors.labels("read").inc()
            state.metrics.degraded.inc()
            stored, degraded = [], True
        history = [(b.item_id, b.category_id, b.label) for b in stored]
    source = "none" if not history else "request" if req.history is not None else "store"
    return history, source, degraded
