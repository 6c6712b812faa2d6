"""The service's components, built once at start-up and handed to routes through a dependency."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.deployment import DeploymentBoard, Desired
from app.metrics import Metrics
from app.registry import ModelRegistry, RegistryError
from app.scorer import ModelLoadError, discover
from app.settings import Settings
from app.store import BehaviourStore, MemoryStore, RedisStore

log = logging.getLogger(__name__)
BOARD_TIMEOUT_S = 2.0  # the shared deployment is read once a second, off the request path: Redis may be slower


@dataclass
class AppState:
    settings: Settings
    store: BehaviourStore
    metrics: Metrics
    registry: ModelRegistry
    warmed: bool = False

    @classmethod
    async def build(cls, settings: Settings, metrics: Metrics) -> AppState:
        """Load, warm and self-check every model of the repository (the newest version of each that works);
        fail with a precise message if the default model cannot be served."""
        store = cls._store(settings)
        board = None
        if isinstance(store, RedisStore) and settings.deployment_sync_interval_s > 0:
            board = DeploymentBoard(store.client, settings.deployment_key, BOARD_TIMEOUT_S)
        state = cls(settings, store, metrics, ModelRegistry(settings, metrics, board))
        names = discover(settings.model_repository)
        if settings.default_model not in names:
            raise ModelLoadError(
                f"default model {settings.default_model!r} not in repository {settings.model_repository} "
                f"(found: {names or 'nothing'}); export one with python -m training.export"
            )
        shared = await state.registry.shared_deployments()
        for name in names:
            try:
                await state._load(name, shared.get(name))
            except ModelLoadError:
                if name == settings.default_model:
                    await state.close()
                    raise
                log.exception("model %s not loaded; serving the others", name)
        state.warmed = True
        return state

    async def _load(self, name: str, shared: Desired | None) -> None:
        """What the shared deployment says (an admin's rollback survives a restart), else the newest version
        that works; a model an admin unloaded stays unloaded (unless it is the default model)."""
        registry = self.registry
        if shared is not None and shared.removed and name != self.settings.default_model:
            registry.removed.add(name)
            log.info("model %s not loaded: unloaded by an admin (shared deployment)", name)
            return
        if shared is not None and not shared.removed:
            try:
                await registry.converge(name, shared)
                return
            except (RegistryError, ModelLoadError) as e:
                log.error("model %s: shared deployment not applied (%s); serving the newest version that works",
                          name, e)  # fmt: skip
        await registry.load_newest_working(name)

    @staticmethod
    def _store(settings: Settings) -> BehaviourStore:
        if settings.redis_url:
            log.info("behaviour store: redis at %s", settings.redis_url.split("@")[-1])
            return RedisStore(settings.redis_url, settings.redis_key_prefix, settings.history_cap,
                              settings.history_ttl_s, settings.store_timeout_ms / 1e3)  # fmt: skip
        log.warning("REDIS_URL is unset: behaviours live in this process's memory and are lost on restart")
        return MemoryStore(settings.history_cap, settings.history_ttl_s)

    def start(self) -> None:
        if self.settings.model_poll_interval_s > 0:
            self.registry.start_polling(self.settings.model_poll_interval_s)
        if self.registry.board is not None:
            self.registry.start_sync(self.settings.deployment_sync_interval_s)

    async def close(self) -> None:
        await self.registry.close()
        await self.store.close()


async def get_state(request: Request) -> AppState:
    """async although it awaits nothing: FastAPI runs a plain ``def`` dependency in its thread pool, a thread
    hop on every request (≈ 0.1–0.2 ms and a wake-up under load, seen in the /score profile)."""
    state: AppState = request.app.state.components
    return state


StateDep = Annotated[AppState, Depends(get_state)]
