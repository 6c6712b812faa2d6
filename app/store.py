"""Behaviour store: one history per user, most recent first, capped and expiring.

``RedisStore`` keeps each user's history in Redis, one server or a Redis Cluster, as one packed string
(``pack_history``: its columns' text, timestamps as differences, deflated: 0.26–0.32 of the bytes of a list
of entries at 50 and 200 behaviours, bench/README.md); a read is one GET, an append a read and a
compare-and-set. ``MemoryStore`` has the same interface in-process, for a newcomer without Redis. The store
knows nothing of models: it stores and returns raw ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from itertools import accumulate
from operator import sub
from typing import Any, NamedTuple, Protocol, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

log = logging.getLogger(__name__)
SEP = "\x1f"  # unit separator: cannot appear in ids (they are JSON strings, control characters are rejected)
RS = "\x1e"  # record separator, between the columns of a packed history: no more in an id than SEP
PACKED = b"\x01"  # first byte of a packed history: its format's version


# What a call to Redis raises when it did not work: redis-py's errors, the cluster client's own (not RedisErrors:
# "no node reachable" after every node it knows has gone), the socket's, and our bound on the round trip.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)


class StoreError(RuntimeError):
    """The store could not be read or written in time."""


class Behaviour(NamedTuple):
    """A NamedTuple rather than a frozen dataclass: /score decodes 50 of them per request, in 62–80 µs against
    106–134 µs as frozen dataclasses (which pay an ``object.__setattr__`` per field), measured side by side."""

    item_id: str
    category_id: str | None
    timestamp: int
    label: int | None = None  # the behaviour's outcome (1 liked/clicked, 0 not), when the caller knows it

    def encode(self) -> str:
        """One entry of a Redis list, the format before ``pack_history`` (still read: ``decode``)."""
        head = f"{self.item_id}{SEP}{self.category_id or ''}{SEP}{self.timestamp}"
        return head if self.label is None else f"{head}{SEP}{self.label}"

    @classmethod
    def decode(cls, raw: str) -> Behaviour:
        """Three fields (written before labels were kept, or without one) or four."""
        f = raw.split(SEP)
        return cls(f[0], f[1] or None, int(f[2]), int(f[3]) if len(f) > 3 else None)


_LABEL_CHARS = {None: "-", 0: "0", 1: "1"}
_LABELS = {"-": None, "0": 0, "1": 1}
_behaviour = partial(tuple.__new__, Behaviour)  # C-level construction, without __new__'s Python frame


def _columns(history: Sequence[Behaviour]) -> tuple[list[str], list[str], list[str], str]:
    """Items, categories (empty for none), timestamps (the first, then each one's distance to the one
    before it, ``previous - this``) and labels (one character each) of a history."""
    times, previous = [], None
    for b in history:
        times.append(str(b.timestamp if previous is None else previous - b.timestamp))
        previous = b.timestamp
    try:
        labels = "".join([_LABEL_CHARS[b.label] for b in history])
    except KeyError as e:
        raise ValueError(f"a stored label is 0, 1 or None, not {e.args[0]!r}") from None
    return [b.item_id for b in history], [b.category_id or "" for b in history], times, labels


def _deflate(items: list[str], categories: list[str], times: list[str], labels: str) -> bytes:
    text = RS.join((SEP.join(items), SEP.join(categories), SEP.join(times), labels))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw: no header or checksum on a few hundred bytes
    return PACKED + deflate.compress(text.encode()) + deflate.flush()


def _inflate(value: bytes) -> list[str]:
    if value[:1] != PACKED:
        raise ValueError(f"not a packed history (first byte {value[:1]!r})")
    return zlib.decompress(value[1:], -15).decode().split(RS)


def pack_history(history: Sequence[Behaviour]) -> bytes:
    """A history (most recent first) as one value: a version byte, then the raw deflate of its columns
    joined by RS: the item ids joined by SEP, the category ids (empty for none) joined by SEP, the
    timestamps (the first, then each one's distance to the one before it: a few digits, any sign and
    size) joined by SEP, and one character per label (``-`` for none). Column by column, deflate finds the
    repeated categories, id prefixes and time digits side by side; the value has no per-entry overhead."""
    return _deflate(*_columns(history))


def prepend_packed(value: bytes, new: Sequence[Behaviour], cap: int) -> bytes:
    """``pack_history([*new, *unpack_history(value)][:cap])``, the same bytes, without decoding the stored
    entries: their columns are cut and joined as text, and only the first timestamp, which becomes a
    distance to the last new one, is read. An append does this for every user it writes."""
    keep = cap - len(new)
    if keep <= 0:
        return pack_history(new[:cap])
    items, categories, times, labels = _columns(new)
    old_items, old_categories, old_times, old_labels = _inflate(value)
    old = old_times.split(SEP, keep)[:keep]
    old[0] = str(new[-1].timestamp - int(old[0]))
    return _deflate(
        items + old_items.split(SEP, keep)[:keep],
        categories + old_categories.split(SEP, keep)[:keep],
        times + old,
        labels + old_labels[:keep],
    )


def unpack_history(value: bytes, limit: int | None = None) -> list[Behaviour]:
    """``pack_history``'s inverse, the first ``limit`` entries, decoded a column at a time with C-level
    splits, ``accumulate`` and ``map``: 50 entries in 0.60–0.75 of the time 50 list entries take through
    ``Behaviour.decode``, read from a value of 200 in 0.74–0.93 (bench/README.md)."""
    items_text, categories_text, times_text, labels = _inflate(value)
    if not items_text:  # ids are never empty: an empty history
        return []
    items = items_text.split(SEP) if limit is None else items_text.split(SEP, limit)[:limit]
    n = len(items)
    categories: list[str | None] = [*categories_text.split(SEP, n)[:n]]
    if "" in categories:  # a C-level scan: most histories have a category everywhere
        categories = [c or None for c in categories]
    times = accumulate(map(int, times_text.split(SEP, n)[:n]), sub)
    return list(map(_behaviour, zip(items, categories, times, map(_LABELS.__getitem__, labels[:n]), strict=True)))


StoredValue = bytes | list[bytes] | None  # a user's key: packed, a list of entries (the earlier format), none


def decode_stored(value: StoredValue, limit: int | None = None) -> list[Behaviour]:
    """A user's history from its key's value, in either format."""
    if value is None:
        return []
    if isinstance(value, list):
        return [Behaviour.decode(r.decode()) for r in value[:limit]]
    return unpack_history(value, limit)


class BehaviourStore(Protocol):
    kind: str

    async def append(self, events: list[tuple[str, Behaviour]]) -> int: ...
    async def recent(self, user_id: str, limit: int) -> list[Behaviour]: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


def _by_user(events: list[tuple[str, Behaviour]]) -> dict[str, list[Behaviour]]:
    """Each user's new behaviours in time order (oldest first), so pushing them leaves the newest on top."""
    grouped: dict[str, list[Behaviour]] = defaultdict(list)
    for user, b in events:
        grouped[user].append(b)
    return {u: sorted(bs, key=lambda b: b.timestamp) for u, bs in grouped.items()}


# Replace a user's history (ARGV[3], expiring in ARGV[4] s) if it is still the one the writer read: its
# type ARGV[1] and value ARGV[2] (a list's entries joined by RS); 0 when another writer came in between.
COMPARE_AND_SET = """
local kind = redis.call('TYPE', KEYS[1]).ok
local seen = ''
if kind == 'list' then
  seen = table.concat(redis.call('LRANGE', KEYS[1], 0, -1), '\\30')
elseif kind == 'string' then
  seen = redis.call('GET', KEYS[1])
elseif kind ~= 'none' then
  return redis.error_reply('WRONGTYPE behaviour history key holds a ' .. kind)
end
if kind ~= ARGV[1] or seen ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
return 1
"""


def _is_wrong_type(value: object) -> bool:
    """A GET's answer on a list (the earlier format)."""
    return isinstance(value, ResponseError) and str(value).startswith("WRONGTYPE")


def user_key(prefix: str, user_id: str, cluster: bool) -> str:
    """The name of a user's list (RedisStore.key)."""
    return f"{prefix}{{{user_id}}}" if cluster else f"{prefix}{user_id}"


# how soon a cluster client may re-read the slot map after an error (redis-py's default: 1 s): a failover
# promotes a replica within seconds, and the service answers degraded until the client has seen it
CLUSTER_REFRESH_INTERVAL_S = 0.25


def connect(url: str, cluster: bool, timeout_s: float, **options: Any) -> aioredis.Redis | RedisCluster:
    """A client of the server at ``url``, or of the Redis Cluster that ``url`` is one seed node of.

    The cluster client asks the seed for the slot map, sends each key to its master, and re-reads the map
    when a node fails or answers MOVED: after a failover it finds the promoted replica by itself. Callers bound
    every call with ``timeout_s``, so its retries cost a request at most that, never more."""
    timeouts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if not cluster:
        return aioredis.Redis.from_url(url, **timeouts, **options)
    retry = Retry(ExponentialWithJitterBackoff(base=timeout_s / 8, cap=timeout_s / 2), retries=2)
    return RedisCluster.from_url(
        url, retry=retry, topology_refresh_min_interval=CLUSTER_REFRESH_INTERVAL_S, **timeouts, **options
    )


class RedisStore:
    """Each user's history is one packed string (``pack_history``), rewritten whole by every append: a
    read of the current value, then a compare-and-set (a script, so one key per call, as a Redis Cluster
    wants) that loses to a writer who came in between and is then retried. A user's appends are atomic;
    a list written by an earlier version is read as it is and packed by the user's next append. The
    compare-and-sets of one round go in one MULTI (none applied if the connection drops before EXEC),
    but an append over several users that needs a second round is not all-or-nothing: a failure then
    leaves the first round's users written (the error still acknowledges nothing). On a Redis Cluster no
    MULTI spans the masters, so a round is not all-or-nothing either: acknowledged always means stored,
    and on the replica too (``WAIT 1``, below)."""

    kind = "redis"
    write_rounds = 64  # an append gives up (StoreError) after losing this many compare-and-sets in a row

    def __init__(self, url: str, prefix: str, cap: int, ttl_s: int, timeout_s: float, cluster: bool = False) -> None:
        # bytes, not str: the packed history is binary (the list entries are decoded by Behaviour.decode)
        self.client = connect(url, cluster, timeout_s, decode_responses=False)
        self.prefix, self.cap, self.ttl_s, self.timeout_s = prefix, cap, ttl_s, timeout_s
        self.cluster = cluster
        # a replica on loopback or in the same zone acknowledges in well under a millisecond; the other half
        # of the store's bound is left to the writes themselves
        self.wait_ms = max(1, int(timeout_s * 1000 / 2))
        self.warned_at = -1e9

    def key(self, user_id: str) -> str:
        """On a cluster the user id is a hash tag (``ctr:hist:{u1}``): every key of one user hashes to one slot,
        so a read stays one round trip to one node and a user's writes go to one master. On a single server the
        name stays as it always was, so the users stored before keep their history (no migration, and no second
        read of an old name on every /score)."""
        return user_key(self.prefix, user_id, self.cluster)

    async def append(self, events: list[tuple[str, Behaviour]]) -> int:
        """Rounds of reads and compare-and-sets until every user's write won: of the writers racing on a
        user, one wins each round, so n concurrent appends to one user take n rounds (``write_rounds``
        at most). Each round trip is bounded by the store's timeout, not the packing between them."""
        new = _by_user(events)
        pending = list(new)
        for _ in range(self.write_rounds):
            pending = await self._write(pending, new)
            if not pending:
                return len(events)
        raise StoreError(f"redis write contended: {len(pending)} users rewritten by others {self.write_rounds} times")

    async def _write(self, users: list[str], new: dict[str, list[Behaviour]]) -> list[str]:
        """One round: the users' values read, then compare-and-set in one transaction; those that lost."""
        read = self.client.pipeline(transaction=False)
        for user in users:
            read.get(self.key(user))
        seen: list[StoredValue] = await self._round_trip(read, "read", raise_on_error=False)
        if earlier := [i for i, value in enumerate(seen) if _is_wrong_type(value)]:
            read = self.client.pipeline(transaction=False)
            for i in earlier:
                read.lrange(self.key(users[i]), 0, -1)
            for i, entries in zip(earlier, await self._round_trip(read, "read"), strict=True):
                seen[i] = entries
        for value in seen:
            if isinstance(value, Exception):
                raise StoreError(f"redis read failed: {value!r}")
        # one MULTI on a single server; a cluster has no transaction across masters: its pipeline sends each
        # master its users' compare-and-sets in one round trip (each is atomic on its own, being a script)
        write = self.client.pipeline(transaction=not self.cluster)
        for user, value in zip(users, seen, strict=True):
            newest_first = new[user][::-1]
            try:
                if isinstance(value, bytes):
                    kind, was, packed = "string", value, prepend_packed(value, newest_first, self.cap)
                else:  # no history yet, or a list of the earlier format: packed from here on
                    kind, was = ("none", b"") if value is None else ("list", RS.encode().join(value))
                    packed = pack_history([*newest_first, *decode_stored(value)][: self.cap])
            except (ValueError, zlib.error) as e:  # refused, not overwritten: the value may be another's
                raise StoreError(f"history of user {user!r} cannot be appended to: {e}") from e
            write.eval(COMPARE_AND_SET, 1, self.key(user), kind, was, packed, self.ttl_s)
        waits = 0
        if self.cluster:
            try:
                async with asyncio.timeout(self.timeout_s):  # the slot map may have to be read again
                    waits = await self._wait_for_replicas(write, [self.key(u) for u in users])
            except REDIS_FAILURES as e:
                raise StoreError(f"redis cluster slot map unavailable: {e!r}") from e
        replies = await self._round_trip(write, "write")
        done, waited = replies[: len(users)], replies[len(users) :]
        if waits and min(waited) < 1:
            self._unreplicated()
        return [user for user, ok in zip(users, done, strict=True) if not ok]

    async def _round_trip(self, pipe: Any, what: str, raise_on_error: bool = True) -> list[Any]:
        try:
            async with asyncio.timeout(self.timeout_s):  # wait_for would spawn a task per call
                return list(await pipe.execute(raise_on_error=raise_on_error))
        except REDIS_FAILURES as e:
            raise StoreError(f"redis {what} failed: {e!r}") from e

    async def _wait_for_replicas(self, pipe: Any, keys: list[str]) -> int:
        """Ends the share of the pipeline of each master that has a replica with WAIT 1: its answer comes once the
        replica has the writes. A master answers before it replicates, so one killed right after answering would
        take the writes with it, and the replica promoted in its place would never have had them. WAIT goes on
        the connection that carried the writes, the one it measures. A master without a replica (its replica
        was promoted and the dead master is not back yet: the slot map lists none) is written without WAIT,
        which would only wait out its timeout: kept and acknowledged, as on a single server, and logged.
        Returns how many WAITs were queued (the pipeline's last replies)."""
        assert isinstance(self.client, RedisCluster)
        await self.client.initialize()  # the slot map: read once, then again only after errors
        masters, alone = {}, False
        for key in keys:
            node = self.client.get_node_from_key(key)
            if self.client.get_node_from_key(key, replica=True) is None:
                alone = True
            elif node is not None:
                masters[node.name] = node
        if alone:
            self._unreplicated()
        for node in masters.values():
            pipe.execute_command("WAIT", 1, self.wait_ms, target_nodes=node)
        return len(masters)

    def _unreplicated(self) -> None:
        now = time.monotonic()
        if now - self.warned_at > 10.0:
            self.warned_at = now
            log.warning("writes acknowledged by a cluster master without a replica: one copy until one is back")

    async def recent(self, user_id: str, limit: int) -> list[Behaviour]:
        """One GET: a packed value. A list of the earlier format answers WRONGTYPE and is read with a
        second round trip, until the user's next append packs it (a GET costs Redis and the client less
        than a script or a pipeline that would read both kinds at once, bench/README.md)."""
        key = self.key(user_id)
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    value = cast(StoredValue, await self.client.get(key))  # bytes: decode_responses=False
                except ResponseError as e:
                    if not _is_wrong_type(e):
                        raise
                    value = cast(StoredValue, await self.client.lrange(key, 0, limit - 1))
        except REDIS_FAILURES as e:
            raise StoreError(f"redis read failed: {e!r}") from e
        try:
            return decode_stored(value, limit)
        except (ValueError, zlib.error) as e:  # /score then answers degraded, and counts a store error
            raise StoreError(f"history of user {user_id!r} unreadable: {e}") from e

    async def warm_up(self, timeout_s: float) -> None:
        """A cluster's slot map and a connection to each master, before the first request (which would pay for
        them within STORE_TIMEOUT_MS and, on a loaded host, answer 503 or degraded). A cluster that does not
        answer is logged, not fatal, as a single server down at start-up is: /readyz says so."""
        if not isinstance(self.client, RedisCluster):
            return
        try:
            async with asyncio.timeout(timeout_s):
                await self.client.initialize()
                await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
        except REDIS_FAILURES as e:
            log.warning("redis cluster: slot map not read at start-up (%r); requests will try again", e)

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.ping()
        except REDIS_FAILURES as e:
            raise StoreError(f"redis unreachable: {e!r}") from e

    async def close(self) -> None:
        await self.client.aclose()


class MemoryStore:
    """In-process store with Redis's semantics (cap, TTL refreshed on write); lost on restart."""

    kind = "memory"

    def __init__(self, cap: int, ttl_s: int) -> None:
        self.cap, self.ttl_s = cap, ttl_s
        self.lists: dict[str, list[Behaviour]] = {}
        self.expiry: dict[str, float] = {}

    async def append(self, events: list[tuple[str, Behaviour]]) -> int:
        now = time.monotonic()
        for user, behaviours in _by_user(events).items():
            current = self.lists.get(user, []) if self.expiry.get(user, now) >= now else []
            self.lists[user] = (list(reversed(behaviours)) + current)[: self.cap]
            self.expiry[user] = now + self.ttl_s
        return len(events)

    async def recent(self, user_id: str, limit: int) -> list[Behaviour]:
        if self.expiry.get(user_id, 0.0) < time.monotonic():
            self.lists.pop(user_id, None)
            return []
        return self.lists.get(user_id, [])[:limit]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
