"""The service's components, built once at start-up and handed to routes through a dependency."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
from fastapi import Depends, Request

from app.batcher import BatchStats, DynamicBatcher
from app.metrics import Metrics
from app.scorer import Encoded, LoadedModel, ModelLoadError, discover, latest_version
from app.settings import Settings
from app.store import BehaviourStore, MemoryStore, RedisStore

log = logging.getLogger(__name__)

Result = tuple[np.ndarray, np.ndarray]


@dataclass
class ModelSlot:
    model: LoadedModel
    batcher: DynamicBatcher[Encoded, Result]


@dataclass
class AppState:
    settings: Settings
    store: BehaviourStore
    metrics: Metrics
    models: dict[str, ModelSlot] = field(default_factory=dict)
    warmed: bool = False

    @classmethod
    def build(cls, settings: Settings, metrics: Metrics) -> AppState:
        """Load and warm every model of the repository; fail with a precise message if that cannot be done."""
        store = cls._store(settings)
        state = cls(settings, store, metrics)
        names = discover(settings.model_repository)
        if settings.default_model not in names:
            raise ModelLoadError(
                f"default model {settings.default_model!r} not in repository {settings.model_repository} "
                f"(found: {names or 'nothing'}); export one with python -m training.export"
            )
        for name in names:
            try:
                folder = latest_version(settings.model_repository, name)
                state.models[name] = state._slot(
                    LoadedModel(folder, settings.provider, settings.intra_op_threads, settings.intra_op_spinning)
                )
            except ModelLoadError:
                if name == settings.default_model:
                    raise
                log.exception("model %s not loaded; serving the others", name)
        for slot in state.models.values():
            slot.model.warm_up()
            m = slot.model
            metrics.model_info.labels(m.name, m.version, m.provider).set(1)
        state.warmed = True
        return state

    @staticmethod
    def _store(settings: Settings) -> BehaviourStore:
        if settings.redis_url:
            log.info("behaviour store: redis at %s", settings.redis_url.split("@")[-1])
            return RedisStore(settings.redis_url, settings.redis_key_prefix, settings.history_cap,
                              settings.history_ttl_s, settings.store_timeout_ms / 1e3)  # fmt: skip
        log.warning("REDIS_URL is unset: behaviours live in this process's memory and are lost on restart")
        return MemoryStore(settings.history_cap, settings.history_ttl_s)

    def _slot(self, model: LoadedModel) -> ModelSlot:
        s = self.settings
        metrics = self.metrics

        def on_batch(stats: BatchStats) -> None:
            metrics.inference.labels(model.name).observe(stats.run_seconds)
            metrics.batch_requests.labels(model.name).observe(stats.requests)
            metrics.batch_candidates.labels(model.name).observe(stats.candidates)
            metrics.candidates.labels(model.name).inc(stats.candidates)
            for wait in stats.queue_waits:
                metrics.queue_wait.observe(wait)

        batcher: DynamicBatcher[Encoded, Result] = DynamicBatcher(
            model.run,
            max_candidates=s.max_batch_candidates,
            max_delay_s=s.max_queue_delay_ms / 1e3,
            queue_limit=s.queue_limit,
            workers=s.inference_workers,
            on_batch=on_batch,
        )
        metrics.queue_depth.labels(model.name).set_function(lambda: batcher.depth)
        return ModelSlot(model, batcher)

    def start(self) -> None:
        for slot in self.models.values():
            slot.batcher.start()

    async def close(self) -> None:
        for slot in self.models.values():
            await slot.batcher.stop()
        await self.store.close()


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.components
    return state


StateDep = Annotated[AppState, Depends(get_state)]
