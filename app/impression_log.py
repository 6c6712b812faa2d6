"""The impression log (issue 20): every answered /score request as one ``impressions.Impression`` record, and every
/events entry that names an impression as one ``impressions.Outcome``, for training on exactly what was served.

Impressions are written off the request path: the route hands a ``Served`` (references to what it already
built, nothing copied) to a bounded queue; a background task turns them into records and writes them in batches,
one pipeline of single-key XADDs per batch (Redis Streams, trimmed by length or age), or lines of rotating
JSON-lines files with the embedded store. A log that is down or slow costs a request nothing: a full queue drops
the new impression, a failed batch drops its records, and both are counted (``ctr_impressions_dropped_total``).

Outcomes are written before the behaviours they come with, and /events acknowledges only when both were
(a single-key XADD each, so a Redis Cluster takes them as they are). The record shapes, stream names and field
are ``impressions.py``'s, which ``training.served`` reads.

An impression id is ``<model>.<version>.<24 hex digits>``: random (96 bits), and carrying the version that
answered, so an outcome is attributed to its version (``ctr_outcomes_total``) in any worker or replica without
a lookup. Callers treat it as opaque.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler
from typing import Any, Protocol

import orjson

import impressions
from app.metrics import IMPRESSION_DROP_REASONS, IMPRESSION_LOGS, Metrics
from app.scorer import LoadedModel
from app.settings import Settings
from app.store import REDIS_FAILURES, Behaviour, BehaviourStore, RedisStore, connect

log = logging.getLogger(__name__)

ID_HEX_DIGITS = 24  # app/schemas.py's IMPRESSION_ID_PATTERN
# a batch is written this long after its first impression arrives: at one request at a time, one round trip per
# request would cost more CPU than the records themselves (bench/README.md, issue 20)
FLUSH_INTERVAL_S = 0.1


class LogError(RuntimeError):
    """The log could not be written."""


def new_impression_id(model: str, version: str) -> str:
    return f"{model}.{version}.{os.urandom(ID_HEX_DIGITS // 2).hex()}"


def attribution(impression_id: str) -> tuple[str, str]:
    """The (model, version) that served an impression, from its id (validated by the schema's pattern)."""
    model, version, _ = impression_id.split(".")
    return model, version


def sampled(impression_id: str, rate: float) -> bool:
    """Whether this impression is logged: decided by its id's random digits, the same wherever it is asked."""
    if rate >= 1.0:
        return True
    return int(impression_id[-8:], 16) < rate * 0x1_0000_0000


@dataclass(slots=True)
class Served:
    """One answered /score request, as the route built it (the lists are the answer's own, not copies)."""

    impression_id: str
    time_ms: int
    user_id: str
    model: LoadedModel
    history_source: str
    history: list[Any]  # the answer's history items: {"item_id", "category_id", "label"}, most recent first
    timestamps: list[int] | None  # per history item (the store's, or the request's); None: a request history without
    user_features: dict[str, str] | None
    candidates: list[tuple[str, str | None]]  # as requested: (item id, category id or None)
    probabilities: list[float]


def impression_record(s: Served) -> bytes:
    """``impressions.Impression`` as JSON, written directly in its columns layout: building the dataclasses and
    ``asdict`` took several times longer per record, and rows (a dict per candidate) 2.4× as long as columns
    (tests/unit/test_impression_log.py proves the record equal to ``Impression.to_json``'s)."""
    model = s.model
    history = s.history
    stamps = s.timestamps if s.timestamps is not None else [None] * len(history)
    category_of = model.category_of
    features = s.user_features or {}
    if len(s.probabilities) != len(s.candidates) or len(stamps) != len(history):
        raise ValueError("a record's columns must have one value per candidate and per history item")
    record = {
        "impression_id": s.impression_id,
        "time_ms": s.time_ms,
        "user_id": s.user_id,
        "model": model.name,
        "version": model.version,
        "history_source": s.history_source,
        "history": {
            "item_id": [h["item_id"] for h in history],
            "category_id": [h["category_id"] for h in history],
            "timestamp": stamps,
            "label": [h["label"] for h in history],
        },
        "candidates": {
            "item_id": [i for i, _ in s.candidates],
            "category_id": [c or category_of(i) for i, c in s.candidates],
            "probability": s.probabilities,
        },
        "user_features": {n: features[n] for n in model.feature_names if n in features},
        "record_version": impressions.RECORD_VERSION,
    }
    return orjson.dumps(record)


class Sink(Protocol):
    async def write(self, records: list[bytes]) -> int:
        """Append impression records; returns how many were written (the others failed), or raises LogError."""
        ...

    async def append_outcomes(self, records: list[bytes]) -> None:
        """Append outcome records, all of them before returning, or raise LogError."""
        ...

    async def close(self) -> None: ...


class RedisStreams:
    """Both logs as Redis Streams, each entry one record under ``impressions.RECORD_FIELD``, trimmed approximately
    by length (``MAXLEN ~``) or by age (``MINID ~``). Every command names one key: Redis Cluster ready."""

    def __init__(self, url: str, settings: Settings) -> None:
        # a client of its own: a batch of impressions (hundreds of kB) may take longer than STORE_TIMEOUT_MS, the
        # store's bound on one round trip, allows
        timeout_s = settings.impression_log_timeout_ms / 1e3
        # on a Redis Cluster each stream is one key, so it lives on one master (its slot's)
        self.client = connect(url, settings.redis_cluster, timeout_s)
        self.impressions, self.outcomes = settings.impression_stream, settings.outcome_stream
        self.maxlen, self.max_age_s = settings.impression_log_maxlen, settings.impression_log_max_age_s

    def _trim(self) -> dict[str, Any]:
        if self.max_age_s is None:
            return {"maxlen": self.maxlen, "minid": None}
        return {"maxlen": None, "minid": str(int((time.time() - self.max_age_s) * 1000))}

    async def write(self, records: list[bytes]) -> int:
        pipe = self.client.pipeline(transaction=False)
        trim = self._trim()
        for r in records:
            pipe.xadd(self.impressions, {impressions.RECORD_FIELD: r}, approximate=True, **trim)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except REDIS_FAILURES as e:
            raise LogError(f"redis stream write failed: {e!r}") from e
        failed = [r for r in replies if isinstance(r, Exception)]
        if len(failed) == len(records):
            raise LogError(f"redis stream write failed: {failed[0]!r}")
        return len(records) - len(failed)

    async def append_outcomes(self, records: list[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        trim = self._trim()
        for r in records:
            pipe.xadd(self.outcomes, {impressions.RECORD_FIELD: r}, approximate=True, **trim)
        try:
            await pipe.execute()  # raises on the first entry refused
        except REDIS_FAILURES as e:
            raise LogError(f"redis outcome stream write failed: {e!r}") from e

    async def close(self) -> None:
        await self.client.aclose()


class _StrictRotatingFile(RotatingFileHandler):
    """A rotating file that raises its write errors: logging's handlers print them and carry on, and a record
    that was not written must be counted, and an outcome not acknowledged."""

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # called inside the except block of emit(): the write's own error


class JsonLinesFiles:
    """Both logs as JSON-lines files in one directory (``impressions.jsonl``, ``outcomes.jsonl``), one record per
    line, each rotated by size (``.1`` the newest rotated, as logging's RotatingFileHandler names them)."""

    def __init__(self, settings: Settings) -> None:
        folder = settings.impression_log_dir
        folder.mkdir(parents=True, exist_ok=True)
        self.files = {
            name: _StrictRotatingFile(
                folder / f"{name}.jsonl",
                maxBytes=settings.impression_log_file_bytes,
                backupCount=settings.impression_log_file_backups,
                encoding="utf-8",
            )
            for name in IMPRESSION_LOGS
        }
        for handler in self.files.values():
            handler.setFormatter(logging.Formatter("%(message)s"))

    def _append(self, name: str, records: list[bytes]) -> None:
        handler = self.files[name]
        try:
            for r in records:
                handler.emit(logging.makeLogRecord({"msg": r.decode()}))
        except (OSError, ValueError) as e:
            raise LogError(f"{name} file write failed: {e!r}") from e

    async def write(self, records: list[bytes]) -> int:
        await asyncio.to_thread(self._append, "impressions", records)  # a slow disk holds no request
        return len(records)

    async def append_outcomes(self, records: list[bytes]) -> None:
        self._append("outcomes", records)  # flushed before /events answers (a few lines: not worth a thread hop)

    async def close(self) -> None:
        for handler in self.files.values():
            handler.close()


class ImpressionLog:
    """The bounded queue and its background writer; ``served`` is the only call on the request path."""

    def __init__(
        self, sink: Sink, metrics: Metrics, sample: float, queue_size: int, batch_size: int, timeout_s: float
    ) -> None:
        self.sink, self.metrics, self.sample = sink, metrics, sample
        self.batch_size, self.timeout_s = batch_size, timeout_s
        self.queue: asyncio.Queue[Served] = asyncio.Queue(queue_size)
        self.closing = False
        self._ready = asyncio.Event()  # something was queued since the last write
        self._writing = False
        self.failing = False  # the last batch failed: logged once, until one succeeds again
        self._task: asyncio.Task[None] | None = None
        self._depth = metrics.impression_queue_depth
        self._dropped = {reason: metrics.impressions_dropped.labels(reason) for reason in IMPRESSION_DROP_REASONS}

    @classmethod
    def build(cls, settings: Settings, store: BehaviourStore, metrics: Metrics) -> ImpressionLog | None:
        """The log the settings ask for (Redis Streams with a Redis store, files without), or None when off."""
        if not settings.logs_impressions:
            return None
        sink: Sink
        if settings.redis_url and isinstance(store, RedisStore):
            sink = RedisStreams(settings.redis_url, settings)
            log.info("impression log: streams %s, %s", settings.impression_stream, settings.outcome_stream)
        else:
            sink = JsonLinesFiles(settings)
            log.info("impression log: JSON-lines files in %s", settings.impression_log_dir)
        return cls(
            sink,
            metrics,
            settings.impression_log_sample,
            settings.impression_log_queue,
            settings.impression_log_batch,
            settings.impression_log_timeout_ms / 1e3,
        )

    def served(self, s: Served) -> None:
        """Queue one impression (if sampled); never blocks, never raises: a full queue drops it (counted)."""
        if not sampled(s.impression_id, self.sample) or self.closing:
            return
        try:
            self.queue.put_nowait(s)
        except asyncio.QueueFull:
            self._dropped["queue_full"].inc()
            return
        self._depth.inc()
        self._ready.set()

    async def store_with_outcomes(
        self, store: BehaviourStore, events: list[tuple[str, Behaviour]], outcomes: list[impressions.Outcome]
    ) -> int:
        """Append the outcomes, then store the behaviours: acknowledged only if both succeeded (LogError or
        StoreError otherwise). Outcomes first: a failure in between leaves an outcome that the caller's retry
        writes again (the consumer keeps one per impression and item), rather than a behaviour stored twice
        in the user's history that /score reads."""
        if outcomes:
            try:
                await self.sink.append_outcomes([o.to_json().encode() for o in outcomes])
            except LogError:
                self.metrics.impression_log_errors.labels("outcomes").inc()
                raise
        return await store.append(events)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="impression-log")

    async def _loop(self) -> None:
        # nothing leaves the queue before the write that takes it: close() cancels only a loop that waits, so
        # no impression is lost between the queue and the log (nor written twice by close's last flush)
        while not self.closing:
            await self._ready.wait()
            await asyncio.sleep(FLUSH_INTERVAL_S)  # let a batch gather
            self._ready.clear()
            self._writing = True
            try:
                await self._write_queued()
            finally:
                self._writing = False

    async def _write_queued(self) -> None:
        """Write everything queued, ``batch_size`` records a round trip."""
        while not self.queue.empty():
            batch = [self.queue.get_nowait() for _ in range(min(self.batch_size, self.queue.qsize()))]
            self._depth.dec(len(batch))
            await self._write(batch)

    async def _write(self, batch: list[Served]) -> None:
        records = []
        for s in batch:
            try:
                records.append(impression_record(s))
            except Exception as e:  # a record that cannot be built is dropped alone; the writer goes on
                log.exception("impression log: record %s could not be built", s.impression_id)
                self._failed(1, e)
        if not records:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                written = await self.sink.write(records)
        except (LogError, TimeoutError) as e:
            self._failed(len(records), e)
            return
        except asyncio.CancelledError:  # close()'s last flush ran out of time
            self._dropped["shutdown"].inc(len(records))
            raise
        self.metrics.impressions_logged.inc(written)
        if written < len(records):
            self._failed(len(records) - written, LogError(f"{len(records) - written} of {len(records)} refused"))
        elif self.failing:
            self.failing = False
            log.warning("impression log: writing again")

    def _failed(self, dropped: int, error: BaseException) -> None:
        self.metrics.impression_log_errors.labels("impressions").inc()
        self._dropped["write_error"].inc(dropped)
        if not self.failing:
            self.failing = True
            log.error("impression log: writes fail, impressions are dropped (counted) until they work: %r", error)

    async def close(self) -> None:
        """Write what is queued (bounded by the write timeout), then stop; what is left is counted as dropped."""
        self.closing = True
        if self._task is not None:
            if not self._writing:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # a write in flight ends within its timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout_s):
                await self._write_queued()
        left = self.queue.qsize()
        if left:
            self._dropped["shutdown"].inc(left)
            self._depth.dec(left)
        await self.sink.close()
