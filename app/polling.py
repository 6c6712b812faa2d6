"""Repository polling: versions and models that appear in the model repository are loaded as they come."""

from __future__ import annotations

import logging

from app.periodic import Periodic
from app.registry import LoadFailed, ModelRegistry
from app.scorer import ModelLoadError, discover, published_versions

log = logging.getLogger(__name__)


class RepositoryPoller:
    """Every process polls on its own, so what it loads is not shared (``share=False``): each finds the same."""

    def __init__(self, registry: ModelRegistry, interval_s: float) -> None:
        self.registry = registry
        self.loop = Periodic("model-poller", interval_s, self.poll_once)

    async def poll_once(self) -> list[str]:
        """Load models and versions that appeared in the repository; returns what changed."""
        registry, repository = self.registry, self.registry.settings.model_repository
        changes: list[str] = []
        try:
            names = discover(repository)
        except ModelLoadError as e:
            log.error("polling: %s", e)
            return changes
        for name in names:
            if name in registry.removed:
                continue
            entry = registry.models.get(name)
            try:
                versions = published_versions(repository, name)
            except ModelLoadError:
                continue  # removed between listing and reading
            if not versions:
                continue
            newest = versions[-1]
            if entry is None:
                try:
                    dep = await registry.load_newest_working(name)
                    changes.append(f"{name} v{dep.version} loaded")
                except ModelLoadError as e:
                    log.error("polling: %s", e)
                continue
            if entry.pinned or entry.lock.locked() or str(newest) in entry.failures:
                continue
            if entry.primary is None or newest > int(entry.primary):
                try:
                    dep = await registry.load(name, None, share=False)
                    changes.append(f"{name} v{dep.version} active")
                except LoadFailed:
                    pass  # logged and counted by the registry; the old version keeps serving
        return changes
