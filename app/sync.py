"""Cross-process deployment sync: every process converges on the admin changes shared through Redis.

An admin call is applied by the process it reached (app/registry.py), then published on the board
(app/deployment.py); every process reads the board's revision each DEPLOYMENT_SYNC_INTERVAL_S and, when it
moved, makes itself serve what each model's document says.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from dataclasses import replace

from app.deployment import BoardError, DeploymentBoard, Desired
from app.periodic import Periodic
from app.registry import LoadFailed, ModelRegistry, NotLoaded, NotShared, RegistryError
from app.scorer import ModelLoadError
from app.versions import TrafficSplit, desired_of

log = logging.getLogger(__name__)


class DeploymentSync:
    """The registry's link to the board: publishes its admin changes and applies the other processes'."""

    def __init__(self, registry: ModelRegistry, board: DeploymentBoard, interval_s: float) -> None:
        self.registry, self.board = registry, board
        self.revision: int | None = None  # the board's revision this process has converged on
        self.loop = Periodic("deployment-sync", interval_s, self.sync_once)

    async def publish(self, name: str, desired: Desired) -> None:
        """Share an admin change (already applied here) with the other processes."""
        try:
            self.revision = await self.board.publish(name, desired)
        except BoardError as e:
            self.revision = None  # the next sync round puts this process back on the shared state
            raise NotShared(
                "applied on this process only, the others keep the previous deployment "
                f"and this one returns to it at its next sync: {e}"
            ) from e

    async def shared_deployments(self) -> dict[str, Desired]:
        """Start-up: what the board says (nothing when Redis does not answer)."""
        try:
            self.revision, documents = await self.board.read()
        except BoardError as e:
            log.error("shared deployment state unreadable, starting from the repository alone: %s", e)
            return {}
        return documents

    async def sync_once(self) -> list[str]:
        """Converge on the board if its revision moved since the last round; returns the models changed."""
        if await self.board.revision() == self.revision:
            return []
        revision, documents = await self.board.read()
        changed: list[str] = []
        for name in sorted(documents.keys() | self.registry.models.keys()):
            if self.loop.closing:  # a cancellation redis-py lost during the reads above: no loads while shutting down
                return changed
            try:  # a model without a document was never changed by an admin (or Redis lost it): the newest serves
                if await self.converge(name, documents.get(name, Desired())):
                    changed.append(name)
            except (RegistryError, ModelLoadError) as e:  # logged and recorded by the registry
                log.error("model %s: shared deployment not applied here: %s", name, e)
        self.revision = revision
        return changed

    async def converge(self, name: str, desired: Desired) -> bool:
        """Make this process serve what ``desired`` says (another process's admin call); True if it changed.

        Versions are loaded before anything moves, as for an admin call; when the primary cannot be loaded
        here, this process keeps serving what it had (the failure is in GET /models and the metrics)."""
        registry = self.registry
        if desired.removed:
            registry.removed.add(name)
            entry = registry.models.get(name)
            if entry is None or name == registry.settings.default_model:
                return False
            async with entry.lock:
                registry.remove(entry)
            return True
        registry.removed.discard(name)
        if name not in registry.models and not (registry.settings.model_repository / name).is_dir():
            log.error("shared deployment names model %s, which is not in %s", name, registry.settings.model_repository)
            return False
        entry = registry.new_entry(name)
        async with entry.lock:
            if _applied(desired_of(entry), desired):
                return False
            primary = await registry.version(entry, None if desired.primary is None else int(desired.primary))
            wanted = {primary.version}
            split = None
            if desired.split is not None:
                dep = await registry.version(entry, int(desired.split[0]))
                split, wanted = TrafficSplit(dep.version, desired.split[1]), wanted | {dep.version}
            for version in desired.standby:
                with suppress(LoadFailed, NotLoaded):  # recorded; the rest of the deployment still applies
                    wanted.add((await registry.version(entry, int(version))).version)
            registry.activate(entry, primary.version)
            entry.pinned, entry.split = desired.primary is not None, split
            entry.activations = [v for v in desired.activations if v != primary.version] + [primary.version]
            for version in [v for v in entry.deployments if v not in wanted]:
                registry.retire(entry.deployments.pop(version))
            registry.publish_info()
            log.warning(
                "model %s follows the shared deployment: primary v%s%s",
                name,
                primary.version,
                f", v{split.version} for {split.percent:g}% of users" if split else "",
            )
            return True


def _applied(current: Desired, desired: Desired) -> bool:
    """Whether this process already serves ``desired``; a model without a document (never changed by an admin)
    has no activation history to agree on, so its own does not count as a difference."""
    if not desired.activations:
        current = replace(current, activations=())
    return current == desired
