"""create_app(settings): builds the components in the lifespan and wires the routes. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from app import interpreter
from app.auth import require_key, warn_if_open
from app.metrics import Metrics
from app.middleware import LimitsAndMetrics
from app.registry import RegistryError
from app.routes import events, health, models, score
from app.settings import Settings
from app.state import AppState


def create_app(settings: Settings | None = None, *, score_fast_path: bool = True) -> FastAPI:
    """``score_fast_path=False`` leaves every /score request to FastAPI's route (the reference the fast path is
    tested against, app/routes/score.py)."""
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

    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    if score_fast_path:
        app.add_middleware(score.ScoreFastPath)  # inside LimitsAndMetrics: body limit and request metrics apply
    app.add_middleware(LimitsAndMetrics, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    # added here, not in the router, so the OpenAPI document says whether /score needs the key
    app.include_router(score.router, dependencies=[Depends(require_key)] if settings.score_requires_key else [])
    app.include_router(events.router)
    app.include_router(models.router)
    app.include_router(models.admin)
    app.include_router(health.router)
    return app
