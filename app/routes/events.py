"""POST /events appends behaviours; GET /users/{user_id}/history reads them back."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Path

from app.auth import require_key
from app.schemas import (
    BAD_BODY,
    MAX_ID_LENGTH,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    HistoryResponse,
    StoredBehaviour,
)
from app.state import StateDep
from app.store import Behaviour, StoreError

# writes and per-user reads: behind the API key whenever one is configured
router = APIRouter(tags=["behaviours"], dependencies=[Depends(require_key)], responses=BAD_BODY)
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    503: {"model": ErrorResponse, "description": "the behaviour store is unavailable; retry"},
}


@router.post("/events", response_model=EventsResponse, responses=UNAVAILABLE)
async def append_events(req: EventsRequest, state: StateDep) -> EventsResponse:
    now = int(time.time())
    events = [
        (e.user_id, Behaviour(e.item_id, e.category_id, e.timestamp if e.timestamp is not None else now, e.label))
        for e in req.events
    ]
    try:
        stored = await state.store.append(events)
    except StoreError as e:
        state.metrics.store_errors.labels("write").inc()
        raise HTTPException(
            503, f"behaviour store unavailable, nothing stored: {e}", headers={"Retry-After": "1"}
        ) from e
    state.metrics.events.inc(stored)
    return EventsResponse(stored=stored)


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
