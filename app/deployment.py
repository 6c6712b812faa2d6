"""What every scorer process should serve, shared through Redis.

The admin API's decisions (which version is the primary, a traffic split, standby versions, a model
unloaded) are taken by whichever process the call reached. To reach the other worker processes of the
host and the other replicas, and to survive a restart (a rolled-back version must not come back because
the service restarted), each model's decision is one JSON document in a Redis hash, next to a revision
counter bumped on every change. The process that took the call applies it first (load, warm-up,
self-check: a change that fails there is refused and never published), then publishes it; every process
polls the revision and converges on the documents (``DeploymentSync.converge``, app/sync.py).

Without Redis there is one process and nothing to share: the registry works alone, as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from app.store import REDIS_FAILURES, connect

log = logging.getLogger(__name__)


class BoardError(RuntimeError):
    """Redis did not answer: the shared deployment state could not be read or written."""


@dataclass(frozen=True)
class Desired:
    """One model's deployment as the admin API left it.

    ``primary`` None means "the newest published version that works" (the model follows new exports);
    a version there means an admin pinned it. ``activations`` are the primary versions, oldest first, so
    that a rollback without a version goes to the same place on every process.
    """

    primary: str | None = None
    split: tuple[str, float] | None = None
    standby: tuple[str, ...] = ()
    activations: tuple[str, ...] = ()
    removed: bool = False

    def to_json(self) -> str:
        split = None if self.split is None else {"version": self.split[0], "percent": self.split[1]}
        return json.dumps(
            {
                "primary": self.primary,
                "split": split,
                "standby": list(self.standby),
                "activations": list(self.activations),
                "removed": self.removed,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Desired:
        """Raises ValueError on a document this version cannot read (written by hand, or by a newer one)."""
        try:
            doc: dict[str, Any] = json.loads(raw)
            split = doc.get("split")
            return cls(
                primary=None if doc.get("primary") is None else str(doc["primary"]),
                split=None if split is None else (str(split["version"]), float(split["percent"])),
                standby=tuple(str(v) for v in doc.get("standby", ())),
                activations=tuple(str(v) for v in doc.get("activations", ())),
                removed=bool(doc.get("removed", False)),
            )
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"unreadable deployment document {raw!r}: {e}") from e


class DeploymentBoard:
    """The shared documents: ``{key}:models`` (hash: model name → Desired JSON) and ``{key}:revision``.

    On a Redis Cluster the key is a hash tag (``{ctr:deployment}:models``): both keys live on one slot, so the
    transactions below (which read or write both) are allowed there. On a single server the names stay as they
    were, so a deployment shared before (a pinned or rolled-back version) survives the upgrade."""

    def __init__(self, client: aioredis.Redis | RedisCluster, key: str, timeout_s: float) -> None:
        self.client, self.timeout_s = client, timeout_s
        base = f"{{{key}}}" if isinstance(client, RedisCluster) else key
        self.models_key, self.revision_key = f"{base}:models", f"{base}:revision"

    @classmethod
    def connect(cls, url: str, key: str, timeout_s: float, cluster: bool = False) -> DeploymentBoard:
        """A board with a client of its own: the behaviour store's client times out a socket read after
        STORE_TIMEOUT_MS (50 ms), which a version load or a garbage collection holding this process's event
        loop overran, failing admin calls with a 503; here ``timeout_s`` bounds every round trip."""
        return cls(connect(url, cluster, timeout_s), key, timeout_s)

    async def close(self) -> None:
        await self.client.aclose()

    async def revision(self) -> int:
        """Bumped by every publish: a process that saw this number has nothing new to read."""
        try:
            async with asyncio.timeout(self.timeout_s):
                raw = await self.client.get(self.revision_key)
        except REDIS_FAILURES as e:
            raise BoardError(f"redis: {e!r}") from e
        return int(raw or 0)

    async def read(self) -> tuple[int, dict[str, Desired]]:
        """The revision and every model's document, read together (one transaction)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.revision_key)
        pipe.hgetall(self.models_key)
        try:
            async with asyncio.timeout(self.timeout_s):
                raw_revision, docs = await pipe.execute()
        except REDIS_FAILURES as e:
            raise BoardError(f"redis: {e!r}") from e
        models: dict[str, Desired] = {}
        for name, raw in docs.items():
            name = name if isinstance(name, str) else name.decode()
            try:
                models[name] = Desired.from_json(raw)
            except ValueError as e:
                log.error("deployment of model %s ignored: %s", name, e)
        return int(raw_revision or 0), models

    async def publish(self, name: str, desired: Desired) -> int:
        """Store one model's document and bump the revision (one transaction); returns the new revision."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.models_key, name, desired.to_json())
        pipe.incr(self.revision_key)
        try:
            async with asyncio.timeout(self.timeout_s):
                _, revision = await pipe.execute()
        except REDIS_FAILURES as e:
            raise BoardError(f"redis: {e!r}") from e
        return int(revision)
