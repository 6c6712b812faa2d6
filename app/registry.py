"""The models being served: which versions are loaded, which one answers whom, and live swaps.

Repository polling (app/polling.py) and the sync with the other processes (app/sync.py) change the
registry through the same steps as the admin API.

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
import logging
import time
from typing import Protocol

from app import interpreter
from app.deployment import Desired
from app.metrics import Metrics
from app.runtime import session_threads
from app.scorer import ModelLoadError, load_version, published_versions
from app.settings import Settings
from app.versions import Deployment, LoadFailure, ModelEntry, TrafficSplit, deploy, desired_of, user_bucket

log = logging.getLogger(__name__)


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


class Sharing(Protocol):
    """Where an admin change goes once applied here (app/sync.py); raises NotShared when it cannot."""

    async def publish(self, name: str, desired: Desired) -> None: ...


class ModelRegistry:
    """Every process's registry; with ``sharing`` set (app/sync.py) the admin changes reach the other processes."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.models: dict[str, ModelEntry] = {}
        self.removed: set[str] = set()  # models unloaded by an admin: polling does not bring them back
        self.sharing: Sharing | None = None
        self._retiring: set[asyncio.Task[None]] = set()

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
                loaded = sorted(entry.deployments, key=int)
                raise NotLoaded(f"version: model {name!r} has no loaded version {version!r}; loaded: {loaded}")
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
        entry = self.new_entry(name)
        async with entry.lock:
            dep = await self.version(entry, version)
            if activate:
                self.activate(entry, dep.version)
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
        entry = self.new_entry(name)
        async with entry.lock:
            for v in reversed(versions):
                try:
                    dep = await self.version(entry, v)
                except LoadFailed:
                    continue
                self.activate(entry, dep.version)
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
                self.remove(entry)
                await self._share(entry, Desired(removed=True))
                return
            if version not in entry.deployments:
                raise NotLoaded(f"model {name!r} has no loaded version {version!r}")
            if version == entry.primary:
                raise Conflict(
                    f"version {version} is the primary of {name!r}: load or roll back to another version first, "
                    "or unload the whole model"
                )
            if entry.split is not None and entry.split.version == version:
                entry.split = None
            self.retire(entry.deployments.pop(version))
            log.warning("model %s v%s unloaded", name, version)
            self.publish_info()
            await self._share(entry)

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
            dep = await self.version(entry, version)
            entry.split = None
            self.activate(entry, dep.version)
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
            dep = await self.version(entry, version)
            entry.split = TrafficSplit(dep.version, percent)
            log.warning("model %s: %.2f%% of users to v%s, the rest to v%s", name, percent, dep.version, entry.primary)
            self.publish_info()
            await self._share(entry)
            return dep

    async def clear_split(self, name: str) -> None:
        entry = self.entry(name)
        async with entry.lock:
            entry.split = None
            self.publish_info()
            await self._share(entry)

    async def close(self) -> None:
        """Stop every batcher; retiring versions finish first."""
        for entry in self.models.values():
            for dep in entry.deployments.values():
                await dep.batcher.stop()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # --- the steps of a change (also app/sync.py's) ----------------------------------------------

    def entry(self, name: str) -> ModelEntry:
        """The model's entry; NotLoaded (404) when the registry has none."""
        entry = self.models.get(name)
        if entry is None:
            raise NotLoaded(f"model {name!r} is not loaded; loaded: {sorted(self.models)}")
        return entry

    def new_entry(self, name: str) -> ModelEntry:
        """The model's entry, created empty if it has none yet."""
        self.metrics.model_known(name)
        return self.models.setdefault(name, ModelEntry(name))

    async def version(self, entry: ModelEntry, version: int | None) -> Deployment:
        """The deployment of ``version`` (newest when None), loaded off the event loop if need be; the caller
        holds ``entry.lock``."""
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
            model = await asyncio.to_thread(load_version, folder, s.provider, threads)
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
        entry.deployments[key] = dep = deploy(model, s, self.metrics)
        interpreter.settle_heap()
        took = time.perf_counter() - started
        log.info("model %s v%s ready in %.2f s (self-check diff %s)", entry.name, key, took, model.self_check_diff)
        self.publish_info()
        return dep

    def activate(self, entry: ModelEntry, version: str) -> None:
        """The swap: one assignment; the previous primary retires once its requests are answered."""
        previous = entry.primary
        if previous == version:
            return
        entry.primary = version
        entry.activations = [v for v in entry.activations if v != version] + [version]
        if entry.split is not None and entry.split.version == version:
            entry.split = None  # the split's version was promoted: the test is over
        if previous is not None and previous in entry.deployments:
            self.retire(entry.deployments.pop(previous))
        was = f"v{previous}" if previous else "none"
        log.warning("model %s: v%s is the primary now (was %s)", entry.name, version, was)
        self.publish_info()

    def remove(self, entry: ModelEntry) -> None:
        """The whole model goes: its versions retire once their requests are answered."""
        self.models.pop(entry.name, None)
        self.removed.add(entry.name)
        for dep in entry.deployments.values():
            self.retire(dep)
        entry.deployments.clear()
        log.warning("model %s unloaded", entry.name)
        self.publish_info()

    def retire(self, dep: Deployment) -> None:
        self.metrics.remove(self.metrics.queue_depth, dep.model.name, dep.version)
        task = asyncio.create_task(dep.retire(), name=f"retire-{dep.model.name}-{dep.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def publish_info(self) -> None:
        self.metrics.publish_model_info(
            (entry.name, version, dep.model.provider, entry.role(version))
            for entry in self.models.values()
            for version, dep in entry.deployments.items()
        )

    async def _share(self, entry: ModelEntry, desired: Desired | None = None) -> None:
        if self.sharing is not None:
            await self.sharing.publish(entry.name, desired or desired_of(entry))
