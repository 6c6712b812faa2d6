"""create_app(settings): builds the components in the lifespan and wires the routes. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app import errors, interpreter
from app.auth import require_key, warn_if_open
from app.metrics import Metrics
from app.middleware import LimitsAndMetrics
from app.routes import events, health, models, score, ui
from app.settings import Settings
from app.state import AppState


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warn_if_open(settings)
        with interpreter.tuned():
            try:
                state = await AppState.build(settings, metrics)  # each version loaded settles the heap
                state.start()
                app.state.components = state
                metrics.serving()
                try:
                    yield
                finally:
                    await state.close()
            finally:
                metrics.stopped()

    app = FastAPI(title="DIN/DIEN CTR scoring", version="1.0", lifespan=lifespan)

    errors.install(app)
    app.add_middleware(LimitsAndMetrics, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    # added here, not in the router, so the OpenAPI document says whether /score needs the key
    app.include_router(score.router, dependencies=[Depends(require_key)] if settings.score_requires_key else [])
    app.include_router(events.router)
    app.include_router(models.router)
    app.include_router(models.admin)
    app.include_router(health.router)
    app.include_router(ui.router)
    score.document(app)
    return app
