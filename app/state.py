"""The service's components, built once at start-up and handed to routes through a dependency."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.deployment import DeploymentBoard, Desired
from app.impression_log import ImpressionLog
from app.metrics import Metrics
from app.polling import RepositoryPoller
from app.registry import ModelRegistry, RegistryError
from app.scorer import ModelLoadError, discover
from app.settings import Settings
from app.store import BehaviourStore, MemoryStore, RedisStore
from app.sync import DeploymentSync

log = logging.getLogger(__name__)
# the shared deployment is read off the request path and an admin call can wait: a bound that a loaded host
# (an event loop held by a version load or a garbage collection) does not reach, while a dead Redis still fails
BOARD_TIMEOUT_S = 5.0


@dataclass
class AppState:
    settings: Settings
    store: BehaviourStore
    metrics: Metrics
    registry: ModelRegistry
    sync: DeploymentSync | None = None  # with REDIS_URL and DEPLOYMENT_SYNC_INTERVAL_S > 0
    poller: RepositoryPoller | None = None  # with MODEL_POLL_INTERVAL_S > 0
    impressions: ImpressionLog | None = None  # with IMPRESSION_LOG (on by default with REDIS_URL)
    warmed: bool = False

    @classmethod
    async def build(cls, settings: Settings, metrics: Metrics) -> AppState:
        """Load, warm and self-check every model of the repository (the newest version of each that works);
        fail with a precise message if the default model cannot be served."""
        store = cls._store(settings)
        state = cls(settings, store, metrics, ModelRegistry(settings, metrics))
        state.impressions = ImpressionLog.build(settings, store, metrics)
        if settings.redis_url and settings.deployment_sync_interval_s > 0:
            board = DeploymentBoard.connect(settings.redis_url, settings.deployment_key, BOARD_TIMEOUT_S)
            state.sync = DeploymentSync(state.registry, board, settings.deployment_sync_interval_s)
            state.registry.sharing = state.sync
        if settings.model_poll_interval_s > 0:
            state.poller = RepositoryPoller(state.registry, settings.model_poll_interval_s)
        names = discover(settings.model_repository)
        if settings.default_model not in names:
            raise ModelLoadError(
                f"default model {settings.default_model!r} not in repository {settings.model_repository} "
                f"(found: {names or 'nothing'}); export one with python -m training.export"
            )
        shared = {} if state.sync is None else await state.sync.shared_deployments()
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
        if shared is not None and not shared.removed and self.sync is not None:
            try:
                await self.sync.converge(name, shared)
                return
            except (RegistryError, ModelLoadError) as e:
                log.error(
                    "model %s: shared deployment not applied (%s); serving the newest version that works", name, e
                )
        await registry.load_newest_working(name)

    @staticmethod
    def _store(settings: Settings) -> BehaviourStore:
        if settings.redis_url:
            log.info("behaviour store: redis at %s", settings.redis_url.split("@")[-1])
            return RedisStore(
                settings.redis_url,
                settings.redis_key_prefix,
                settings.history_cap,
                settings.history_ttl_s,
                settings.store_timeout_ms / 1e3,
            )
        log.warning("REDIS_URL is unset: behaviours live in this process's memory and are lost on restart")
        return MemoryStore(settings.history_cap, settings.history_ttl_s)

    def start(self) -> None:
        if self.impressions is not None:
            self.impressions.start()
        if self.poller is not None:
            self.poller.loop.start()
        if self.sync is not None:
            self.sync.loop.start()

    async def close(self) -> None:
        if self.poller is not None:
            await self.poller.loop.close()
        if self.sync is not None:
            await self.sync.loop.close()
        await self.registry.close()
        if self.sync is not None:
            await self.sync.board.close()
        if self.impressions is not None:
            await self.impressions.close()  # what is queued is written before the store goes
        await self.store.close()


async def get_state(request: Request) -> AppState:
    """async although it awaits nothing: FastAPI runs a plain ``def`` dependency in its thread pool, a thread
    hop on every request (≈ 0.1–0.2 ms and a wake-up under load, seen in the /score profile)."""
    state: AppState = request.app.state.components
    return state


StateDep = Annotated[AppState, Depends(get_state)]
