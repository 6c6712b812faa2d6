"""GET /models, and the admin endpoints that change what is served (all behind the API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi import Path as PathParam

from app.auth import require_key
from app.registry import ModelEntry, ModelRegistry
from app.schemas import (
    BAD_BODY,
    ErrorResponse,
    LoadError,
    LoadRequest,
    ModelsResponse,
    ModelStatus,
    RollbackRequest,
    SplitInfo,
    SplitRequest,
    UnloadRequest,
    VersionInfo,
)
from app.scorer import ModelLoadError, published_versions
from app.state import StateDep

router = APIRouter(tags=["models"])
# a RegistryError raised below becomes its HTTP status with the message as detail (app/main.py)
admin = APIRouter(prefix="/admin/models", tags=["admin"], dependencies=[Depends(require_key)], responses=BAD_BODY)

ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "no such model or version"},
    409: {"model": ErrorResponse, "description": "not allowed in the model's current state"},
    422: {"model": ErrorResponse, "description": "invalid request, or the version failed to load (old one serves)"},
}
Name = PathParam(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


def model_status(entry: ModelEntry, registry: ModelRegistry) -> ModelStatus:
    try:
        published = published_versions(registry.settings.model_repository, entry.name)
    except ModelLoadError:
        published = []
    versions = []
    for version, dep in sorted(entry.deployments.items(), key=lambda kv: int(kv[0])):
        m = dep.model
        info = VersionInfo(
            version=version,
            role=entry.role(version),
            model_type=m.metadata["model_type"],
            provider=m.provider,
            graph=m.graph_file,
            max_history=m.max_history,
            loaded_at=m.loaded_at,
            ready_seconds=m.ready_seconds,
            self_check_max_abs_diff=m.self_check_diff,
            in_flight=dep.leases,
            metrics=m.metadata.get("metrics", {}),
        )
        versions.append(info)
    failures = [LoadError(version=f.version, error=f.error, at=f.at) for f in entry.failures.values()]
    last = entry.last_failure
    return ModelStatus(
        name=entry.name,
        primary=entry.primary,
        split=SplitInfo(version=entry.split.version, percent=entry.split.percent) if entry.split else None,
        pinned=entry.pinned,
        versions=versions,
        published=published,
        last_error=LoadError(version=last.version, error=last.error, at=last.at) if last else None,
        failures=failures,
    )


def _status(state: StateDep, name: str) -> ModelStatus:
    return model_status(state.registry.entry(name), state.registry)


@router.get("/models", response_model=ModelsResponse)
async def list_models(state: StateDep) -> ModelsResponse:
    registry = state.registry
    return ModelsResponse(
        default=state.settings.default_model,
        models=[model_status(e, registry) for _, e in sorted(registry.models.items())],
    )


@admin.post("/{name}/load", response_model=ModelStatus, responses=ADMIN_ERRORS)
async def load(state: StateDep, req: LoadRequest | None = None, name: str = Name) -> ModelStatus:
    """Load a version (the newest when none is given), warm it up, self-check it, and swap it in.

    Requests in flight finish on the version they started with. On any failure the old version keeps
    serving and the answer is 422 with the reason (also in GET /models and the metrics)."""
    req = req or LoadRequest()
    await state.registry.load(name, req.version, req.activate)
    return _status(state, name)


@admin.post("/{name}/unload", response_model=ModelsResponse, responses=ADMIN_ERRORS)
async def unload(state: StateDep, req: UnloadRequest | None = None, name: str = Name) -> ModelsResponse:
    """Unload one standby or split version, or (without a version) the whole model; never the default model."""
    req = req or UnloadRequest()
    await state.registry.unload(name, None if req.version is None else str(req.version))
    return await list_models(state)


@admin.post("/{name}/rollback", response_model=ModelStatus, responses=ADMIN_ERRORS)
async def rollback(state: StateDep, req: RollbackRequest | None = None, name: str = Name) -> ModelStatus:
    """Make an earlier version the primary (the previous one by default); clears the split, pins the model."""
    req = req or RollbackRequest()
    await state.registry.rollback(name, req.version)
    return _status(state, name)


@admin.put("/{name}/split", response_model=ModelStatus, responses=ADMIN_ERRORS)
async def set_split(state: StateDep, req: SplitRequest, name: str = Name) -> ModelStatus:
    """Send a stable share of users to another version (an A/B test); the rest stay on the primary."""
    await state.registry.set_split(name, req.version, req.percent)
    return _status(state, name)


@admin.delete("/{name}/split", response_model=ModelStatus, responses=ADMIN_ERRORS)
async def clear_split(state: StateDep, name: str = Name) -> ModelStatus:
    await state.registry.clear_split(name)
    return _status(state, name)
