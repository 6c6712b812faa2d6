"""A model's versions in service: each one's loaded model, batcher and leases, and which version answers whom
(the roles: primary, split, standby)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app import interpreter
from app.batcher import BatchStats, DynamicBatcher
from app.deployment import Desired
from app.metrics import Metrics
from app.runtime import inference_threads
from app.scorer import Encoded, LoadedModel
from app.settings import Settings

log = logging.getLogger(__name__)

Result = tuple[np.ndarray, ...]  # probability (c,), attention (c, l), and for DSIN session weights (c, K)
RETIRE_TIMEOUT_S = 60.0  # a retired version whose leases are not all back by then is stopped anyway


@dataclass(eq=False)
class Deployment:
    """One loaded version and its batcher; ``leases`` counts requests using it right now."""

    model: LoadedModel
    batcher: DynamicBatcher[Encoded, Result]
    leases: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    @property
    def version(self) -> str:
        return self.model.version

    @contextmanager
    def lease(self) -> Iterator[LoadedModel]:
        self.leases += 1
        self._idle.clear()
        try:
            yield self.model
        finally:
            self.leases -= 1
            if self.leases == 0:
                self._idle.set()

    async def retire(self, timeout_s: float = RETIRE_TIMEOUT_S) -> None:
        """Stop once every request holding a lease has its answer (the registry no longer hands it out)."""
        if self.leases:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                log.error(
                    "model %s v%s retired with %d requests still on it", self.model.name, self.version, self.leases
                )
        await self.batcher.stop()
        self.model.close()
        interpreter.settle_heap()  # the version's cycles (app/scorer.py) were frozen with the rest


@dataclass
class TrafficSplit:
    """``percent`` of users (by a stable hash of their id) go to ``version`` instead of the primary."""

    version: str
    percent: float


@dataclass
class LoadFailure:
    version: str
    error: str
    at: float


@dataclass
class ModelEntry:
    name: str
    deployments: dict[str, Deployment] = field(default_factory=dict)
    primary: str | None = None
    split: TrafficSplit | None = None
    pinned: bool = False  # an admin chose a version: polling leaves this model alone
    activations: list[str] = field(default_factory=list)  # primary versions, oldest first (for rollback)
    failures: dict[str, LoadFailure] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def last_failure(self) -> LoadFailure | None:
        return max(self.failures.values(), key=lambda f: f.at, default=None)

    def role(self, version: str) -> Literal["primary", "split", "standby"]:
        """primary: answers by default; split: answers the split's users; standby: only requests naming it."""
        if version == self.primary:
            return "primary"
        return "split" if self.split is not None and self.split.version == version else "standby"


def user_bucket(model: str, user_id: str) -> float:
    """A user's stable place in [0, 100) for one model: raising a split's percent only adds users."""
    digest = hashlib.blake2b(f"{model}\x1f{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 / 100


def desired_of(entry: ModelEntry) -> Desired:
    """The entry's deployment as a shareable document (``Desired``)."""
    standby = tuple(sorted((v for v in entry.deployments if entry.role(v) == "standby"), key=int))
    split = None if entry.split is None else (entry.split.version, entry.split.percent)
    return Desired(entry.primary if entry.pinned else None, split, standby, tuple(entry.activations))


def deploy(model: LoadedModel, settings: Settings, metrics: Metrics) -> Deployment:
    """The version's deployment, its batcher started: sized by the settings, reporting to the metrics."""
    s = settings

    def on_batch(stats: BatchStats) -> None:
        metrics.inference.labels(model.name).observe(stats.run_seconds)
        metrics.batch_requests.labels(model.name).observe(stats.requests)
        metrics.batch_candidates.labels(model.name).observe(stats.candidates)
        metrics.candidates.labels(model.name, model.version).inc(stats.candidates)
        for wait in stats.queue_waits:
            metrics.queue_wait.observe(wait)
            metrics.stage.labels("queue").observe(wait)
            metrics.stage.labels("inference").observe(stats.run_seconds)  # each request waits for the whole run

    threads = inference_threads(s.inference_workers, s.workers, model.provider)
    if threads == 0 and model.provider == "CUDAExecutionProvider":
        log.warning(
            "model %s v%s: INFERENCE_WORKERS=0 runs CUDA batches on the event loop, which then waits for the GPU "
            "instead of serving requests; use 1 or more on CUDA",
            model.name,
            model.version,
        )
    batcher: DynamicBatcher[Encoded, Result] = DynamicBatcher(
        model.run,
        max_candidates=s.max_batch_candidates,
        max_delay_s=s.max_queue_delay_ms / 1e3,
        queue_limit=s.queue_limit,
        workers=threads,
        on_batch=on_batch,
        on_depth=metrics.queue_depth.labels(model.name, model.version).set,
    )
    metrics.version_serving(model.name, model.version)
    deployment = Deployment(model, batcher)
    batcher.start()
    return deployment
