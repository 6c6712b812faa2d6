"""POST /events appends behaviours; GET /users/{user_id}/history reads them back."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Path

from app.auth import require_key
from app.impression_log import LogError, attribution
from app.schemas import (
    BAD_BODY,
    MAX_ID_LENGTH,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    HistoryResponse,
    StoredBehaviour,
)
from app.state import AppState, StateDep
from app.store import Behaviour, StoreError
from impressions import Outcome

# writes and per-user reads: behind the API key whenever one is configured
router = APIRouter(tags=["behaviours"], dependencies=[Depends(require_key)], responses=BAD_BODY)
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    503: {"model": ErrorResponse, "description": "the behaviour store is unavailable; retry"},
}


@router.post("/events", response_model=EventsResponse, responses=UNAVAILABLE)
async def append_events(req: EventsRequest, state: StateDep) -> EventsResponse:
    """Append behaviours; an entry naming an ``impression_id`` is also that impression's outcome, written in
    the same store transaction (with the impression log on): both are acknowledged, or neither."""
    now = int(time.time())
    events = [
        (e.user_id, Behaviour(e.item_id, e.category_id, e.timestamp if e.timestamp is not None else now, e.label))
        for e in req.events
    ]
    time_ms = int(time.time() * 1000)
    outcomes = [
        Outcome(e.impression_id, e.user_id, e.item_id, e.label, time_ms)
        for e in req.events
        if e.impression_id is not None and e.label is not None  # the schema requires the label with the id
    ]
    try:
        if state.impressions is not None and outcomes:
            stored = await state.impressions.store_with_outcomes(state.store, events, outcomes)
        else:
            stored = await state.store.append(events)
    except StoreError as e:
        state.metrics.store_errors.labels("write").inc()
        raise HTTPException(
            503, f"behaviour store unavailable, nothing stored: {e}", headers={"Retry-After": "1"}
        ) from e
    except LogError as e:
        raise HTTPException(503, f"outcome log unavailable, nothing stored: {e}", headers={"Retry-After": "1"}) from e
    state.metrics.events.inc(stored)
    for o in outcomes:
        _count_outcome(state, o)
    return EventsResponse(stored=stored)


def _count_outcome(state: AppState, outcome: Outcome) -> None:
    """Counted per version that served the impression (online CTR on the dashboard); only for models this service
    knows, so a caller cannot create series at will."""
    model, version = attribution(outcome.impression_id)
    if model in state.registry.models:
        state.metrics.outcomes.labels(model, version, str(outcome.label)).inc()


@router.get("/users/{user_id}/history", response_model=HistoryResponse, responses=UNAVAILABLE)
async def user_history(state: StateDep, user_id: str = Path(min_length=1, max_length=MAX_ID_LENGTH)) -> HistoryResponse:
    try:
        behaviours = await state.store.recent(user_id, state.settings.history_cap)
    except StoreError as e:
        state.metrics.store_errors.labels("read").inc()
        raise HTTPException(503, f"behaviour store unavailable: {e}", headers={"Retry-After": "1"}) from e
    return HistoryResponse(
        user_id=user_id,
        history=[
            StoredBehaviour(item_id=b.item_id, category_id=b.category_id, timestamp=b.timestamp, label=b.label)
            for b in behaviours
        ],
    )
