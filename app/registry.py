"""The models being served: which versions are loaded, which one answers whom, and live swaps.

Every change (admin load, unload, rollback, traffic split, a version noticed by polling) builds the new
version completely, off the event loop: ONNX Runtime session, warm-up, and the self-check stored by the
export. Only then does it become visible, by one assignment on the event loop, so a request sees either
the old version or the new one. A request holds a lease on the version it started with until it has
its answer; a retired version's batcher is stopped only when its last lease is returned. A version that
fails any step is never swapped in: the old one keeps serving, and the failure is logged, counted and
listed by ``/models``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app import interpreter
from app.batcher import BatchStats, DynamicBatcher
from app.deployment import BoardError, DeploymentBoard, Desired
from app.metrics import Metrics
from app.scorer import (
    Encoded,
    LoadedModel,
    ModelLoadError,
    discover,
    inference_threads,
    load_version,
    published_versions,
    session_threads,
)
from app.settings import Settings

log = logging.getLogger(__name__)

Result = tuple[np.ndarray, np.ndarray]
RETIRE_TIMEOUT_S = 60.0  # a retired version whose leases are not all back by then is stopped anyway


class RegistryError(Exception):
    """An admin or scoring request the registry cannot carry out; ``status`` is the HTTP answer."""

    status = 400


class NotLoaded(RegistryError):
    status = 404


class Conflict(RegistryError):
    status = 409


class LoadFailed(RegistryError):
    status = 422


class NotShared(RegistryError):
    """Applied on this process, but the other processes could not be told (Redis down); this one returns
    to the shared state at its next sync."""

    status = 503


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
                log.error("model %s v%s retired with %d requests still on it", self.model.name, self.version,
                          self.leases)  # fmt: skip
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


class ModelRegistry:
    """Every process's registry; with a ``board`` (Redis) the admin changes are shared with the others."""

    def __init__(self, settings: Settings, metrics: Metrics, board: DeploymentBoard | None = None) -> None:
        self.settings, self.metrics, self.board = settings, metrics, board
        self.models: dict[str, ModelEntry] = {}
        self.removed: set[str] = set()  # models unloaded by an admin: polling does not bring them back
        self.revision: int | None = None  # the board's revision this process has converged on
        self._retiring: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # --- serving ---------------------------------------------------------------------------------

    def resolve(self, name: str, version: str | None, user_id: str) -> Deployment:
        """The deployment that answers this request: the named version, the split's, or the primary."""
        entry = self.models.get(name)
        if entry is None:
            raise NotLoaded(f"model: unknown model {name!r}; loaded: {sorted(self.models)}")
        if entry.primary is None:
            raise NotLoaded(f"model: {name!r} has no version serving (loading, or failed: see GET /models)")
        if version is not None:
            dep = entry.deployments.get(version)
            if dep is None:
                raise NotLoaded(f"version: model {name!r} has no loaded version {version!r}; "
                                f"loaded: {sorted(entry.deployments, key=int)}")  # fmt: skip
            return dep
        split = entry.split
        if split is not None and user_bucket(name, user_id) < split.percent:
            return entry.deployments[split.version]
        return entry.deployments[entry.primary]

    # --- changes ---------------------------------------------------------------------------------

    async def load(
        self, name: str, version: int | None = None, activate: bool = True, share: bool = True
    ) -> Deployment:
        """Load (or reuse) a version; with ``activate`` it becomes the primary and the old one retires.

        Without a version: the newest published one, and the model follows new versions again. ``share``:
        publish the change for the other processes (an admin call does; polling, which every process does
        on its own, does not)."""
        if name not in self.models and not (self.settings.model_repository / name).is_dir():
            raise NotLoaded(f"model {name!r} not found in repository {self.settings.model_repository}")
        entry = self.models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            dep = await self._load_locked(entry, version)
            if activate:
                self._activate(entry, dep.version)
                entry.pinned = version is not None
            self.removed.discard(name)
            if share:
                await self._share(entry)
            return dep

    async def load_newest_working(self, name: str) -> Deployment:
        """Start-up: the newest version that loads; broken newer ones are recorded as failures."""
        versions = published_versions(self.settings.model_repository, name)
        if not versions:
            raise ModelLoadError(f"model {name!r} has no published version under {self.settings.model_repository}")
        entry = self.models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            for v in reversed(versions):
                try:
                    dep = await self._load_locked(entry, v)
                except LoadFailed:
                    continue
                self._activate(entry, dep.version)
                entry.pinned = v != versions[-1]  # serving an older version on purpose: do not retry the newer
                return dep
        raise ModelLoadError(f"model {name!r}: no published version loads: {entry.last_failure}")

    async def unload(self, name: str, version: str | None = None) -> None:
        """Unload one version (not the primary), or the whole model (not the default one)."""
        entry = self.entry(name)
        async with entry.lock:
            if version is None:
                if name == self.settings.default_model:
                    raise Conflict(f"{name!r} is the default model (DEFAULT_MODEL); it cannot be unloaded")
                self._remove(entry)
                await self._share(entry, Desired(removed=True))
            else:
                if version not in entry.deployments:
                    raise NotLoaded(f"model {name!r} has no loaded version {version!r}")
                if version == entry.primary:
                    raise Conflict(f"version {version} is the primary of {name!r}: load or roll back to another "
                                   f"version first, or unload the whole model")  # fmt: skip
                if entry.split is not None and entry.split.version == version:
                    entry.split = None
                self._retire(entry.deployments.pop(version))
                log.warning("model %s v%s unloaded", name, version)
                await self._share(entry)
            self._publish_info()

    async def rollback(self, name: str, version: int | None = None) -> Deployment:
        """Make an earlier version the primary again: the one given, else the one before the current.

        Clears any traffic split and pins the model (polling will not move it forward again)."""
        entry = self.entry(name)
        async with entry.lock:
            if version is None:
                earlier = [v for v in entry.activations if v != entry.primary]
                if not earlier:
                    raise Conflict(f"model {name!r} has no earlier version to roll back to")
                version = int(earlier[-1])
            dep = await self._load_locked(entry, version)
            entry.split = None
            self._activate(entry, dep.version)
            entry.pinned = True
            log.warning("model %s rolled back to v%s", name, dep.version)
            await self._share(entry)
            return dep

    async def set_split(self, name: str, version: int, percent: float) -> Deployment:
        """Send ``percent`` of users to ``version`` (loaded first if needed); the rest stay on the primary."""
        entry = self.entry(name)
        async with entry.lock:
            if str(version) == entry.primary:
                raise Conflict(f"version {version} is already the primary of {name!r}")
            dep = await self._load_locked(entry, version)
            entry.split = TrafficSplit(dep.version, percent)
            log.warning("model %s: %.2f%% of users to v%s, the rest to v%s", name, percent, dep.version,
                        entry.primary)  # fmt: skip
            self._publish_info()
            await self._share(entry)
            return dep

    async def clear_split(self, name: str) -> None:
        entry = self.entry(name)
        async with entry.lock:
            entry.split = None
            self._publish_info()
            await self._share(entry)

    # --- polling ---------------------------------------------------------------------------------

    async def poll_once(self) -> list[str]:
        """Load models and versions that appeared in the repository; returns what changed."""
        changes: list[str] = []
        try:
            names = discover(self.settings.model_repository)
        except ModelLoadError as e:
            log.error("polling: %s", e)
            return changes
        for name in names:
            if name in self.removed:
                continue
            entry = self.models.get(name)
            try:
                versions = published_versions(self.settings.model_repository, name)
            except ModelLoadError:
                continue  # removed between listing and reading
            if not versions:
                continue
            newest = versions[-1]
            if entry is None:
                try:
                    dep = await self.load_newest_working(name)
                    changes.append(f"{name} v{dep.version} loaded")
                except ModelLoadError as e:
                    log.error("polling: %s", e)
                continue
            if entry.pinned or entry.lock.locked() or str(newest) in entry.failures:
                continue
            if entry.primary is None or newest > int(entry.primary):
                try:
                    dep = await self.load(name, None, share=False)
                    changes.append(f"{name} v{dep.version} active")
                except LoadFailed:
                    pass  # logged and counted by _load_locked; the old version keeps serving
        return changes

    def start_polling(self, interval_s: float) -> None:
        self._every(interval_s, "model-poller", self.poll_once)

    # --- sharing between processes ---------------------------------------------------------------

    async def converge(self, name: str, desired: Desired) -> bool:
        """Make this process serve what ``desired`` says (another process's admin call); True if it changed.

        Versions are loaded before anything moves, as for an admin call; when the primary cannot be loaded
        here, this process keeps serving what it had (the failure is in GET /models and the metrics)."""
        if desired.removed:
            self.removed.add(name)
            entry = self.models.get(name)
            if entry is None or name == self.settings.default_model:
                return False
            async with entry.lock:
                self._remove(entry)
            self._publish_info()
            return True
        self.removed.discard(name)
        if name not in self.models and not (self.settings.model_repository / name).is_dir():
            log.error("shared deployment names model %s, which is not in %s", name, self.settings.model_repository)
            return False
        entry = self.models.setdefault(name, ModelEntry(name))
        async with entry.lock:
            if desired_of(entry) == desired:
                return False
            primary = await self._load_locked(entry, None if desired.primary is None else int(desired.primary))
            wanted = {primary.version}
            split = None
            if desired.split is not None:
                dep = await self._load_locked(entry, int(desired.split[0]))
                split, wanted = TrafficSplit(dep.version, desired.split[1]), wanted | {dep.version}
            for version in desired.standby:
                with suppress(LoadFailed, NotLoaded):  # recorded; the rest of the deployment still applies
                    wanted.add((await self._load_locked(entry, int(version))).version)
            self._activate(entry, primary.version)
            entry.pinned, entry.split = desired.primary is not None, split
            entry.activations = [v for v in desired.activations if v != primary.version] + [primary.version]
            for version in [v for v in entry.deployments if v not in wanted]:
                self._retire(entry.deployments.pop(version))
            self._publish_info()
            log.warning("model %s follows the shared deployment: primary v%s%s", name, primary.version,
                        f", v{split.version} for {split.percent:g}% of users" if split else "")  # fmt: skip
            return True

    async def sync_once(self) -> list[str]:
        """Converge on the board if its revision moved since the last round; returns the models changed."""
        if self.board is None or await self.board.revision() == self.revision:
            return []
        revision, documents = await self.board.read()
        changed: list[str] = []
        for name in sorted(documents.keys() | self.models.keys()):
            if self._closing:  # a cancellation redis-py lost during the reads above: no loads while shutting down
                return changed
            try:  # a model without a document was never changed by an admin (or Redis lost it): the newest serves
                if await self.converge(name, documents.get(name, Desired())):
                    changed.append(name)
            except (RegistryError, ModelLoadError) as e:  # logged and recorded by _load_locked
                log.error("model %s: shared deployment not applied here: %s", name, e)
        self.revision = revision
        return changed

    async def shared_deployments(self) -> dict[str, Desired]:
        """Start-up: what the board says (nothing when there is no board or Redis does not answer)."""
        if self.board is None:
            return {}
        try:
            self.revision, documents = await self.board.read()
        except BoardError as e:
            log.error("shared deployment state unreadable, starting from the repository alone: %s", e)
            return {}
        return documents

    def start_sync(self, interval_s: float) -> None:
        self._every(interval_s, "deployment-sync", self.sync_once)

    def _every(self, interval_s: float, name: str, job: Callable[[], Awaitable[list[str]]]) -> None:
        async def loop() -> None:
            # the flag as well as the cancellation: redis-py 8 loses a cancellation that arrives during some
            # commands (the command returns normally), and a loop waiting for CancelledError alone ran on while
            # close() waited for it (a hung shutdown, seen in the shared-deployment tests)
            while not self._closing:
                await asyncio.sleep(interval_s)
                try:
                    for change in await job():
                        log.info("%s: %s", name, change)
                except BoardError as e:
                    log.warning("%s: %s", name, e)
                except Exception:  # the loop must outlive any one bad round
                    log.exception("%s round failed", name)

        self._tasks.append(asyncio.create_task(loop(), name=name))

    async def _share(self, entry: ModelEntry, desired: Desired | None = None) -> None:
        """Publish an admin change (already applied here) for the other processes."""
        if self.board is None:
            return
        try:
            self.revision = await self.board.publish(entry.name, desired or desired_of(entry))
        except BoardError as e:
            self.revision = None  # the next sync round puts this process back on the shared state
            raise NotShared(f"applied on this process only, the others keep the previous deployment "
                            f"and this one returns to it at its next sync: {e}") from e  # fmt: skip

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in self.models.values():
            for dep in entry.deployments.values():
                await dep.batcher.stop()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # --- internals -------------------------------------------------------------------------------

    def entry(self, name: str) -> ModelEntry:
        """The model's entry; NotLoaded (404) when the registry has none."""
        entry = self.models.get(name)
        if entry is None:
            raise NotLoaded(f"model {name!r} is not loaded; loaded: {sorted(self.models)}")
        return entry

    async def _load_locked(self, entry: ModelEntry, version: int | None) -> Deployment:
        """The deployment of ``version`` (newest when None), loading it off the event loop if needed."""
        repo = self.settings.model_repository
        if version is None:
            try:
                versions = published_versions(repo, entry.name)
            except ModelLoadError as e:
                raise NotLoaded(str(e)) from e
            if not versions:
                raise NotLoaded(f"model {entry.name!r} has no published version")
            version = versions[-1]
        key = str(version)
        if key in entry.deployments:
            return entry.deployments[key]
        folder = repo / entry.name / key
        if not folder.is_dir():
            raise NotLoaded(f"model {entry.name!r} has no published version {key} in {repo}")
        s = self.settings
        started = time.perf_counter()
        try:
            threads = session_threads(s.intra_op_threads, s.workers)
            model = await asyncio.to_thread(load_version, folder, s.provider, threads, s.intra_op_spinning)
            if model.name != entry.name or model.version != key:
                raise ModelLoadError(f"{folder}: metadata says {model.name!r} v{model.version}")
        except ModelLoadError as e:
            entry.failures[key] = LoadFailure(key, str(e), time.time())
            self.metrics.model_loads.labels(entry.name, "failed").inc()
            fallback = f"v{entry.primary} keeps serving" if entry.primary else "nothing to serve"
            log.error("model %s v%s not loaded, %s: %s", entry.name, key, fallback, e)
            raise LoadFailed(str(e)) from e
        entry.failures.pop(key, None)
        self.metrics.model_loads.labels(entry.name, "loaded").inc()
        dep = Deployment(model, self._batcher(model))
        dep.batcher.start()
        entry.deployments[key] = dep
        interpreter.settle_heap()
        log.info("model %s v%s loaded on %s in %.2f s (self-check diff %s)", entry.name, key, model.provider,
                 time.perf_counter() - started, model.self_check_diff)  # fmt: skip
        self._publish_info()
        return dep

    def _activate(self, entry: ModelEntry, version: str) -> None:
        """The swap: one assignment; the previous primary retires once its requests are answered."""
        previous = entry.primary
        if previous == version:
            return
        entry.primary = version
        entry.activations = [v for v in entry.activations if v != version] + [version]
        if entry.split is not None and entry.split.version == version:
            entry.split = None  # the split's version was promoted: the test is over
        if previous is not None and previous in entry.deployments:
            self._retire(entry.deployments.pop(previous))
        log.warning("model %s: v%s is the primary now (was %s)", entry.name, version,
                    f"v{previous}" if previous else "none")  # fmt: skip
        self._publish_info()

    def _remove(self, entry: ModelEntry) -> None:
        """The whole model goes: its versions retire once their requests are answered."""
        self.models.pop(entry.name, None)
        self.removed.add(entry.name)
        for dep in entry.deployments.values():
            self._retire(dep)
        entry.deployments.clear()
        log.warning("model %s unloaded", entry.name)

    def _retire(self, dep: Deployment) -> None:
        self.metrics.remove(self.metrics.queue_depth, dep.model.name, dep.version)
        task = asyncio.create_task(dep.retire(), name=f"retire-{dep.model.name}-{dep.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _publish_info(self) -> None:
        self.metrics.publish_model_info(
            (entry.name, version, dep.model.provider, entry.role(version))
            for entry in self.models.values()
            for version, dep in entry.deployments.items()
        )

    def _batcher(self, model: LoadedModel) -> DynamicBatcher[Encoded, Result]:
        s, metrics = self.settings, self.metrics

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
                "instead of serving requests; use 1 or more on CUDA", model.name, model.version,
            )  # fmt: skip
        batcher: DynamicBatcher[Encoded, Result] = DynamicBatcher(
            model.run,
            max_candidates=s.max_batch_candidates,
            max_delay_s=s.max_queue_delay_ms / 1e3,
            queue_limit=s.queue_limit,
            workers=threads,
            on_batch=on_batch,
            on_depth=metrics.queue_depth.labels(model.name, model.version).set,
        )
        return batcher
