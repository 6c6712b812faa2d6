"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.schemas import ReadyResponse
from app.state import StateDep
from app.store import StoreError

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(state: StateDep, response: Response) -> ReadyResponse:
    reasons = []
    default = state.registry.models.get(state.settings.default_model)
    if default is None or default.primary is None:
        reasons.append(f"default model {state.settings.default_model!r} not loaded")
    if not state.warmed:
        reasons.append("models not warmed up yet")
    try:
        await state.store.ping()
    except StoreError as e:
        reasons.append(f"behaviour store: {e}")
    if reasons:
        response.status_code = 503
    return ReadyResponse(ready=not reasons, reasons=reasons)


@router.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.expose(), media_type=CONTENT_TYPE_LATEST)
