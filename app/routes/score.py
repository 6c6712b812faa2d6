"""POST /score: one user, many candidates."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import OpenAPI
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema

from app.batcher import BatchFailed, DeadlineExceeded, QueueFull
from app.impression_log import Served, new_impression_id
from app.schemas import BAD_BODY, ErrorResponse, HistoryItem, HistorySource, Score, ScoreRequest, ScoreResponse
from app.scorer import HistoryEntry
from app.state import AppState, StateDep
from app.store import StoreError

router = APIRouter(tags=["scoring"], responses=BAD_BODY)  # the API key, when SCORE_REQUIRES_KEY, is added by create_app

RETRY_AFTER_S = "1"
REF = "#/components/schemas/{model}"


def _json(model: str) -> dict[str, Any]:
    """An OpenAPI ``content`` holding a JSON body of a component schema."""
    return {"application/json": {"schema": {"$ref": REF.format(model=model)}}}


# The route reads the body itself (validated by pydantic-core straight from the bytes, model_validate_json),
# so FastAPI sees no body parameter: the request body and its 422 are declared here; document() adds the
# schemas they refer to.
@router.post(
    "/score",
    response_model=ScoreResponse,
    responses={
        401: {"model": ErrorResponse, "description": "missing or invalid API key (when SCORE_REQUIRES_KEY)"},
        404: {"model": ErrorResponse, "description": "unknown model, or a version that is not loaded"},
        500: {"model": ErrorResponse, "description": "the inference run holding this request failed"},
        503: {"model": ErrorResponse, "description": "queue full; retry after Retry-After seconds"},
        504: {"model": ErrorResponse, "description": "not scored before the request timeout"},
        422: {"description": "Validation Error", "content": _json("HTTPValidationError")},
    },
    openapi_extra={"requestBody": {"content": _json("ScoreRequest"), "required": True}},
)
async def score(request: Request, state: StateDep) -> Response:
    req = parse(request.headers.get("content-type", ""), await request.body())
    return Response(await answer(req, state, request.state.started), media_type="application/json")


def document(app: FastAPI) -> None:
    """Adds the schemas of the body /score reads itself to the app's OpenAPI document, as FastAPI would
    have generated them from a body parameter (validation mode, the same names)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generate()
        _, defs = models_json_schema([(ScoreRequest, "validation")], ref_template=REF)
        schemas = {**spec["components"]["schemas"], **defs["$defs"]}
        spec["components"]["schemas"] = {k: schemas[k] for k in sorted(schemas)}
        # through FastAPI's own last step, so the additions are written as the rest of the document is
        app.openapi_schema = jsonable_encoder(OpenAPI(**spec), by_alias=True, exclude_none=True)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def is_json(content_type: str) -> bool:
    """``application/json`` or ``application/*+json``, parameters allowed: as FastAPI reads a body as JSON."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse(content_type: str, body: bytes) -> ScoreRequest:
    """The request, or RequestValidationError: FastAPI's 422, each error located in the body."""
    if not is_json(content_type):
        error = {"type": "content_type", "loc": ("header", "content-type"), "msg": "expected application/json"}
        raise RequestValidationError([{**error, "input": content_type}], body=body)
    try:
        return ScoreRequest.model_validate_json(body)
    except ValidationError as e:
        errors: list[Any] = [{**error, "loc": ("body", *error["loc"])} for error in e.errors(include_url=False)]
        if errors[0]["type"] == "json_invalid":
            errors[0]["input"] = {}  # as FastAPI: the body is not echoed back (it may not even be text)
        raise RequestValidationError(errors, body=body) from e


async def answer(req: ScoreRequest, state: AppState, started: float) -> bytes:
    """The /score answer, JSON-encoded; errors are HTTPException (503, 504, 500) or RegistryError (404)."""
    stage = state.metrics.stage
    t = time.perf_counter()
    stage.labels("parse").observe(t - started)  # receive, JSON, validation
    name = req.model or state.settings.default_model
    deployment = state.registry.resolve(name, req.version, req.user_id)  # RegistryError → 404 (app/main.py)
    with deployment.lease() as model:  # this request stays on this version even if another is swapped in
        history, times, source, degraded = await _history(req, state, model.max_history)
        now = time.perf_counter()
        stage.labels("store").observe(now - t)
        t = now
        candidates = [(c["item_id"], c.get("category_id")) for c in req.candidates]
        encoded = model.encode(history, req.user_features, candidates, times)
        for kind, n in encoded.unknown.items():
            if n:
                state.metrics.unknown_ids.labels(kind).inc(n)
        state.metrics.history_length.observe(len(history))
        stage.labels("encode").observe(time.perf_counter() - t)
        try:
            prob, att, *session_weights = await deployment.batcher.submit(
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
    # the graph's history is oldest first, the API's most recent first
    recent_first = np.ascontiguousarray(att[:, ::-1]) if req.return_attention else [None] * len(prob)
    probabilities = prob.tolist()
    scores: list[Score] = [
        {"item_id": item, "probability": p, "attention": a}
        for (item, _), p, a in zip(candidates, probabilities, recent_first, strict=True)
    ]
    history_items: list[HistoryItem] = [
        {"item_id": i, "category_id": c or model.category_of(i), "label": y} for i, c, y in history
    ]
    impression_id = new_impression_id(model.name, model.version)
    response: ScoreResponse = {
        "impression_id": impression_id,
        "model": model.name,
        "version": model.version,
        "user_id": req.user_id,
        "history_source": source,
        "degraded": degraded,
        "history": history_items,
        "scores": scores,
    }
    if session_weights:  # DSIN: the sessions the history was divided into, and each candidate's weight on them
        sessions = encoded.sessions()
        response["sessions"] = sessions
        for s, w in zip(scores, session_weights[0], strict=True):
            s["session_weights"] = w[: len(sessions)] if req.return_attention else None
    # orjson, not FastAPI's generic encoder, which walks every float (≈ 18 ms for 200 × 50 attention)
    body = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if state.impressions is not None:  # the record is built and written off the request path
        state.impressions.served(
            Served(
                impression_id,
                int(time.time() * 1000),
                req.user_id,
                model,
                source,
                history_items,
                times,
                req.user_features,
                candidates,
                probabilities,
            )
        )
    stage.labels("serialize").observe(time.perf_counter() - t)
    return body


async def _history(
    req: ScoreRequest, state: AppState, max_history: int
) -> tuple[list[HistoryEntry], list[int] | None, HistorySource, bool]:
    """The request's own history, else the store's, and each behaviour's timestamp (None: a request history
    without a timestamp on every item); a store failure degrades to no history (flagged)."""
    degraded = False
    times: list[int] | None
    if req.history is not None:
        history = [(h["item_id"], h.get("category_id"), h.get("label")) for h in req.history[:max_history]]
        given = [h.get("timestamp") for h in req.history[:max_history]]
        times = None if None in given else [t for t in given if t is not None]
    else:
        try:
            stored = await state.store.recent(req.user_id, max_history)
        except StoreError:
            state.metrics.store_errors.labels("read").inc()
            state.metrics.degraded.inc()
            stored, degraded = [], True
        history = [(b.item_id, b.category_id, b.label) for b in stored]
        times = [b.timestamp for b in stored]
    source: HistorySource = "none" if not history else "request" if req.history is not None else "store"
    return history, times, source, degraded
