"""Served samples: the impression log joined with its outcomes, written as parquet parts.

    python -m training.served --redis-url redis://localhost:6379/0 --out data/served [--window 30m] [--once]

A consumer of the two streams ``impressions.py`` defines, in a Redis consumer group: restartable, and one
consumer at a time (a join needs an impression and its outcomes in one process; a consumer of another name
takes over a dead one's pending entries, it does not share the work). Each impression waits for its
outcomes until its attribution window closes, then becomes one row per candidate: the history exactly as the
model received it, the user features, the candidate, the probability served and the label.

Join rules (by impression id and item id):
- label = the highest label of the candidate's outcomes inside the window: a click stays a click even if an
  explicit negative for the same item follows it; no outcome inside the window → 0.
- the window closes by the records' own times, not the wall clock: an impression closes once a record at
  least ``window`` newer has been read from either stream, so a replay gives the same parts as the live run.
  ``--once`` reads what the streams hold, writes what has closed and stops; impressions whose window is still
  open stay pending in the group (not acknowledged) and are picked up by the next run.
- outcomes for an impression not (or no longer) pending are counted and dropped: ``late`` (after the
  window), ``expired`` (its impression was already written), ``unknown`` (no such impression seen within a
  window of the outcome's time), ``not_candidate`` (an item the impression did not hold).

Exactly once: a part holds the stream entry ids it was built from (parquet key-value metadata, so the ids
and the rows appear together, by one rename). Entries are acknowledged (XACK) only after that rename and
the directory are fsynced. A consumer that restarts reads every part's ids, acknowledges what a crash left
unacknowledged, skips those entries, and re-reads the rest of its pending entries (XREADGROUP from id 0,
after claiming entries idle in dead consumers with XAUTOCLAIM), so nothing is written twice or lost.

``--follow`` writes a part each time it has caught up with both streams (a read returned less than a batch
from each), so an outcome read late never finds its impression already closed by the other stream's clock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from impressions import IMPRESSIONS_STREAM, OUTCOMES_STREAM, RECORD_FIELD, Impression, Outcome

log = logging.getLogger(__name__)

PART_GLOB = "part-*.parquet"
META_IMPRESSION_ENTRIES = b"served.impression_entries"
META_OUTCOME_ENTRIES = b"served.outcome_entries"
CRASH_AFTER_WRITE_ENV = "SERVED_CRASH_AFTER_WRITE"  # tests: SIGKILL this process between a part's rename and its XACK

SCHEMA = pa.schema(
    [
        ("impression_id", pa.string()),
        ("impression_entry", pa.string()),  # the impression's stream entry id
        ("user_id", pa.string()),
        ("time_ms", pa.int64()),
        ("model", pa.string()),
        ("version", pa.string()),
        ("history_source", pa.string()),
        # the served history, most recent first, exactly as the /score answer listed it
        ("hist_items", pa.list_(pa.string())),
        ("hist_cats", pa.list_(pa.string())),
        ("hist_labels", pa.list_(pa.int8())),
        ("hist_timestamps", pa.list_(pa.int64())),
        ("user_features", pa.map_(pa.string(), pa.string())),
        ("position", pa.int32()),  # the candidate's place in the request's list
        ("n_candidates", pa.int32()),
        ("item_id", pa.string()),
        ("category_id", pa.string()),
        ("probability", pa.float64()),
        ("label", pa.int8()),
        ("outcome_time_ms", pa.int64()),  # the time of the outcome that set the label; null: none
    ]
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """'30m', '45s', '2h', '500ms', '1d'; a bare number is seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"duration {text!r}: use a number with ms, s, m, h or d (e.g. 30m)")
    return int(float(m.group(1)) * _UNIT_MS[m.group(2) or "s"])


@dataclass
class _Pending:
    """An impression waiting for its window to close, with the outcomes joined so far."""

    entry: str
    impression: Impression
    labels: dict[str, tuple[int, int]] = field(default_factory=dict)  # item id → (label, outcome time)
    outcome_entries: list[str] = field(default_factory=list)


@dataclass
class Stats:
    impressions_read: int = 0
    outcomes_read: int = 0
    impressions_written: int = 0
    samples_written: int = 0
    clicks_written: int = 0
    outcomes_joined: int = 0
    parts_written: int = 0
    skipped_already_written: int = 0  # pending entries a previous run had written but not acknowledged
    duplicates: int = 0  # a second record for a pending impression id
    dropped: Counter[str] = field(default_factory=Counter)  # outcomes dropped, by reason
    trimmed: int = 0  # pending entries whose record the stream had trimmed away

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "dropped"}
        return {**d, "outcomes_dropped": dict(self.dropped)}


class Joiner:
    """The join of impressions and outcomes by (impression id, item id) inside the window; no I/O.

    ``watermark`` is the newest record time seen: an impression closes once it is ``window_ms`` past the
    impression's time."""

    def __init__(self, window_ms: int, written_impressions: set[str] | None = None) -> None:
        self.window_ms = window_ms
        self.pending: dict[str, _Pending] = {}
        self.orphans: dict[str, list[tuple[str, Outcome]]] = {}  # impression id → outcomes waiting for it
        self.written = written_impressions if written_impressions is not None else set()
        self.watermark = 0
        self.stats = Stats()
        self.to_ack_dropped: list[tuple[str, str]] = []  # ("impression" | "outcome", entry) dropped entries

    def add_impression(self, entry: str, imp: Impression) -> None:
        self.stats.impressions_read += 1
        self.watermark = max(self.watermark, imp.time_ms)
        if imp.impression_id in self.pending or imp.impression_id in self.written:
            self.stats.duplicates += 1
            self.to_ack_dropped.append(("impression", entry))
            return
        p = _Pending(entry, imp)
        self.pending[imp.impression_id] = p
        for o_entry, outcome in self.orphans.pop(imp.impression_id, []):
            self._join(p, o_entry, outcome)

    def add_outcome(self, entry: str, outcome: Outcome) -> None:
        self.stats.outcomes_read += 1
        self.watermark = max(self.watermark, outcome.time_ms)
        p = self.pending.get(outcome.impression_id)
        if p is not None:
            self._join(p, entry, outcome)
        elif outcome.impression_id in self.written:
            self._drop(entry, "expired")
        else:  # its impression may still be on its way (the service writes them in batches)
            self.orphans.setdefault(outcome.impression_id, []).append((entry, outcome))

    def _join(self, p: _Pending, entry: str, outcome: Outcome) -> None:
        if outcome.time_ms > p.impression.time_ms + self.window_ms:
            return self._drop(entry, "late")
        if outcome.item_id not in {c.item_id for c in p.impression.candidates}:
            return self._drop(entry, "not_candidate")
        label = max(outcome.label, p.labels.get(outcome.item_id, (-1, 0))[0])
        if label != p.labels.get(outcome.item_id, (-1, 0))[0]:
            p.labels[outcome.item_id] = (label, outcome.time_ms)
        p.outcome_entries.append(entry)
        self.stats.outcomes_joined += 1

    def _drop(self, entry: str, reason: str) -> None:
        self.stats.dropped[reason] += 1
        self.to_ack_dropped.append(("outcome", entry))

    def close(self) -> list[_Pending]:
        """Impressions whose window has closed (removed from pending, oldest first); outcomes that waited a
        whole window for an impression that never came are dropped as ``unknown``."""
        closed = [p for p in self.pending.values() if p.impression.time_ms + self.window_ms <= self.watermark]
        closed.sort(key=lambda p: (p.impression.time_ms, p.entry))
        for p in closed:
            del self.pending[p.impression.impression_id]
            self.written.add(p.impression.impression_id)
        for imp_id in [i for i, waiting in self.orphans.items() if self._orphan_expired(waiting)]:
            for entry, _ in self.orphans.pop(imp_id):
                self._drop(entry, "unknown")
        return closed

    def _orphan_expired(self, waiting: list[tuple[str, Outcome]]) -> bool:
        return max(o.time_ms for _, o in waiting) + self.window_ms <= self.watermark


def rows_of(closed: Iterable[_Pending]) -> dict[str, list[Any]]:
    """One row per (impression, candidate), in SCHEMA's columns."""
    cols: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for p in closed:
        imp = p.impression
        hist = {
            "hist_items": [b.item_id for b in imp.history],
            "hist_cats": [b.category_id for b in imp.history],
            "hist_labels": [b.label for b in imp.history],
            "hist_timestamps": [b.timestamp for b in imp.history],
        }
        for pos, c in enumerate(imp.candidates):
            label, outcome_time = p.labels.get(c.item_id, (0, None))
            row = {
                "impression_id": imp.impression_id,
                "impression_entry": p.entry,
                "user_id": imp.user_id,
                "time_ms": imp.time_ms,
                "model": imp.model,
                "version": imp.version,
                "history_source": imp.history_source,
                **hist,
                "user_features": list(imp.user_features.items()),
                "position": pos,
                "n_candidates": len(imp.candidates),
                "item_id": c.item_id,
                "category_id": c.category_id,
                "probability": c.probability,
                "label": max(label, 0),
                "outcome_time_ms": outcome_time,
            }
            for k, v in row.items():
                cols[k].append(v)
    return cols


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(out: Path, closed: list[_Pending], outcome_entries: list[str]) -> Path:
    """One durable part: written to a hidden temporary file, fsynced, renamed, the folder fsynced. Its
    metadata lists the impression and outcome entries it was built from."""
    table = pa.table(rows_of(closed), schema=SCHEMA)
    meta = {
        META_IMPRESSION_ENTRIES: json.dumps([p.entry for p in closed]).encode(),
        META_OUTCOME_ENTRIES: json.dumps(outcome_entries).encode(),
    }
    table = table.replace_schema_metadata(meta)
    first = closed[0].entry if closed else "none"
    name = f"part-{time.time_ns():020d}-{first.replace('-', '_')}.parquet"
    tmp = out / f".{name}.tmp"
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    final = out / name
    os.rename(tmp, final)
    _fsync_dir(out)
    return final


def written_entries(out: Path) -> tuple[set[str], set[str], set[str]]:
    """(impression entries, outcome entries, impression ids) held by the parts already in ``out``."""
    imp_entries: set[str] = set()
    out_entries: set[str] = set()
    imp_ids: set[str] = set()
    for part in sorted(out.glob(PART_GLOB)):
        meta = pq.read_schema(part).metadata or {}
        imp_entries.update(json.loads(meta.get(META_IMPRESSION_ENTRIES, b"[]")))
        out_entries.update(json.loads(meta.get(META_OUTCOME_ENTRIES, b"[]")))
        ids = pq.read_table(part, columns=["impression_id"]).column("impression_id").unique()
        imp_ids.update(ids.to_pylist())
    return imp_entries, out_entries, imp_ids


@dataclass(frozen=True)
class ConsumerConfig:
    redis_url: str
    out: Path
    window_ms: int = 30 * 60_000
    impressions_stream: str = IMPRESSIONS_STREAM
    outcomes_stream: str = OUTCOMES_STREAM
    group: str = "served-samples"
    consumer: str = "served-1"
    batch: int = 1000  # entries per stream per read
    claim_idle_ms: int = 60_000  # pending entries of other consumers idle this long are taken over at start
    block_ms: int = 1000  # --follow: how long a read waits for new entries


class Consumer:
    """Reads both streams in one consumer group, joins them (Joiner), writes parts, acknowledges."""

    def __init__(self, cfg: ConsumerConfig, client: redis.Redis | None = None) -> None:
        self.cfg = cfg
        self.client = client or redis.Redis.from_url(cfg.redis_url)
        cfg.out.mkdir(parents=True, exist_ok=True)
        for tmp in cfg.out.glob(".part-*.tmp"):  # a part a crash left half written: its entries are still pending
            tmp.unlink()
        imp_entries, out_entries, imp_ids = written_entries(cfg.out)
        self.done = {cfg.impressions_stream: imp_entries, cfg.outcomes_stream: out_entries}
        self.joiner = Joiner(cfg.window_ms, imp_ids)
        self._already: dict[str, list[str]] = {}  # entries to acknowledge without a part: written before, trimmed
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, cfg.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    @property
    def streams(self) -> tuple[str, str]:
        return (self.cfg.impressions_stream, self.cfg.outcomes_stream)

    @property
    def stats(self) -> Stats:
        return self.joiner.stats

    def recover(self) -> None:
        """Take over entries idle in dead consumers, then re-read this consumer's pending entries (delivered
        before a restart, never acknowledged): those a part already holds are acknowledged and skipped."""
        cfg = self.cfg
        for stream in self.streams:
            cursor = "0-0"
            while True:
                # (not JUSTID: redis-py then drops the cursor); the claimed entries are read below from id 0
                reply = self.client.xautoclaim(
                    stream, cfg.group, cfg.consumer, cfg.claim_idle_ms, cursor, count=cfg.batch
                )
                cursor = _text(reply[0])
                if cursor == "0-0":
                    break
        last = {s: "0-0" for s in self.streams}
        while True:
            got = self._read(last, None)
            for stream, entry, fields in got:
                last[stream] = entry
                self._take(stream, entry, fields)
            if not got:
                break
        self._ack_already_written()

    def _read(self, ids: dict[str, str], block_ms: int | None) -> list[tuple[str, str, dict[bytes, bytes] | None]]:
        """XREADGROUP of both streams from ``ids`` (">": new entries; an id: this consumer's pending ones after
        it), flattened to (stream, entry id, fields) in the reply's order."""
        streams: dict[Any, Any] = dict(ids)
        reply: Any = self.client.xreadgroup(
            self.cfg.group, self.cfg.consumer, streams, count=self.cfg.batch, block=block_ms
        )
        return [
            (_text(stream), _text(entry_id), fields or None)
            for stream, entries in reply or []
            for entry_id, fields in entries
        ]

    def _take(self, stream: str, entry: str, fields: dict[bytes, bytes] | None) -> None:
        if entry in self.done[stream]:
            self.stats.skipped_already_written += 1
            self._already.setdefault(stream, []).append(entry)
            return
        raw = (fields or {}).get(RECORD_FIELD.encode())
        if raw is None:  # trimmed away while pending, or not ours: nothing to join
            self.stats.trimmed += 1
            self._already.setdefault(stream, []).append(entry)
            return
        if stream == self.cfg.impressions_stream:
            self.joiner.add_impression(entry, Impression.from_json(raw))
        else:
            self.joiner.add_outcome(entry, Outcome.from_json(raw))

    def _ack_already_written(self) -> None:
        for stream, entries in self._already.items():
            self._ack(stream, entries)
        self._already = {}

    def _ack(self, stream: str, entries: list[str]) -> None:
        for i in range(0, len(entries), 1000):
            self.client.xack(stream, self.cfg.group, *entries[i : i + 1000])

    def read_new(self, block_ms: int | None = None) -> bool:
        """One read of new entries from both streams; False when neither had a full batch (caught up)."""
        got = self._read({s: ">" for s in self.streams}, block_ms)
        for stream, entry, fields in got:
            self._take(stream, entry, fields)
        self._ack_already_written()
        per_stream = Counter(stream for stream, _, _ in got)
        return any(n >= self.cfg.batch for n in per_stream.values())

    def flush(self) -> Path | None:
        """Write the impressions whose window has closed as one part, then acknowledge what it holds and the
        outcomes dropped meanwhile. Returns the part (None: nothing had closed)."""
        closed = self.joiner.close()
        dropped, self.joiner.to_ack_dropped = self.joiner.to_ack_dropped, []
        part = None
        if closed:
            outcome_entries = [e for p in closed for e in p.outcome_entries]
            part = write_part(self.cfg.out, closed, outcome_entries)
            if os.environ.get(CRASH_AFTER_WRITE_ENV) == "1":
                os.kill(os.getpid(), signal.SIGKILL)  # the crash the restart must survive: written, not acked
            s = self.stats
            s.parts_written += 1
            s.impressions_written += len(closed)
            s.samples_written += sum(len(p.impression.candidates) for p in closed)
            s.clicks_written += sum(1 for p in closed for y, _ in p.labels.values() if y > 0)
            self._ack(self.cfg.impressions_stream, [p.entry for p in closed])
            self._ack(self.cfg.outcomes_stream, outcome_entries)
            log.info("wrote %s: %d impressions", part.name, len(closed))
        # dropped entries are in no part: acknowledged after it, so one read again after a crash is only
        # dropped (and counted) again
        self._ack(self.cfg.impressions_stream, [e for kind, e in dropped if kind == "impression"])
        self._ack(self.cfg.outcomes_stream, [e for kind, e in dropped if kind == "outcome"])
        return part

    def run_once(self) -> Stats:
        """Read everything the streams hold now, write what has closed, stop."""
        self.recover()
        while self.read_new():
            pass
        self.flush()
        return self.stats

    def follow(self, stop_after_s: float | None = None) -> Stats:
        """Keep reading; write a part each time the consumer has caught up and impressions have closed."""
        self.recover()
        started = time.monotonic()
        while stop_after_s is None or time.monotonic() - started < stop_after_s:
            if not self.read_new(self.cfg.block_ms):
                self.flush()
        self.flush()
        return self.stats


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--out", required=True, help="folder of the parquet parts")
    p.add_argument("--window", default="30m", help="attribution window: 30m, 45s, 2h, 500ms (default 30m)")
    p.add_argument("--impressions-stream", default=IMPRESSIONS_STREAM)
    p.add_argument("--outcomes-stream", default=OUTCOMES_STREAM)
    p.add_argument("--group", default=ConsumerConfig.group, help="consumer group (one per set of parts)")
    p.add_argument("--consumer", default=ConsumerConfig.consumer, help="this consumer's name inside the group")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="read what the streams hold, write what closed, stop")
    mode.add_argument("--follow", action="store_true", help="keep reading (the default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ConsumerConfig(
        redis_url=args.redis_url,
        out=Path(args.out),
        window_ms=parse_duration_ms(args.window),
        impressions_stream=args.impressions_stream,
        outcomes_stream=args.outcomes_stream,
        group=args.group,
        consumer=args.consumer,
    )
    consumer = Consumer(cfg)
    stats = consumer.run_once() if args.once else consumer.follow()
    print(json.dumps({**stats.to_dict(), "pending_impressions": len(consumer.joiner.pending)}))


if __name__ == "__main__":
    main()
