"""training.served against a real Redis: the join, the attribution window, and exactly-once parts across a
consumer killed between writing a part and acknowledging it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from impressions import (
    IMPRESSIONS_STREAM,
    OUTCOMES_STREAM,
    RECORD_FIELD,
    Impression,
    Outcome,
    ServedBehaviour,
    ServedCandidate,
)
from training.served import CRASH_AFTER_WRITE_ENV, Consumer, ConsumerConfig, parse_duration_ms

ROOT = Path(__file__).resolve().parents[2]
WINDOW_MS = 10_000


def impression(n: int, time_ms: int, items: tuple[str, ...] = ("a", "b", "c")) -> Impression:
    history = (
        ServedBehaviour(f"h{n}", "c1", 1_700_000_000 + n, 1),
        ServedBehaviour("h0", None, 1_699_999_000, None),
        ServedBehaviour("h9", "c2", 1_699_998_000, 0),
    )
    candidates = tuple(ServedCandidate(i, f"c{k}", 0.1 * (k + 1)) for k, i in enumerate(items))
    return Impression(f"din.1.{n:04x}", time_ms, f"u{n % 7}", "din", "1", "store", history, candidates, {"seg": "s1"})


def add(client: redis.Redis, record: Impression | Outcome) -> None:
    stream = IMPRESSIONS_STREAM if isinstance(record, Impression) else OUTCOMES_STREAM
    client.xadd(stream, {RECORD_FIELD: record.to_json()})


def consume(redis_url: str, out: Path) -> Consumer:
    consumer = Consumer(ConsumerConfig(redis_url, out, window_ms=WINDOW_MS))
    consumer.run_once()
    return consumer


def rows(out: Path) -> list[dict[str, object]]:
    if not list(out.glob("part-*.parquet")):
        return []
    return pq.read_table(out).to_pylist()  # type: ignore[no-any-return]


def test_durations() -> None:
    assert parse_duration_ms("30m") == 1_800_000
    assert parse_duration_ms("45s") == parse_duration_ms("45") == 45_000
    assert parse_duration_ms("500ms") == 500
    with pytest.raises(ValueError, match="duration"):
        parse_duration_ms("soon")


def test_join_and_window(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    add(client, impression(1, 0))
    add(client, Outcome("din.1.0001", "u1", "a", 1, 2_000))  # inside the window: a click
    add(client, Outcome("din.1.0001", "u1", "a", 0, 3_000))  # an explicit negative after it: the click stays
    add(client, Outcome("din.1.0001", "u1", "b", 1, WINDOW_MS + 1))  # after the window: dropped as late
    add(client, Outcome("din.1.0001", "u1", "zz", 1, 1_000))  # not one of its candidates
    add(client, Outcome("din.1.0002", "u2", "c", 1, 500))  # before its impression reaches the stream
    add(client, impression(2, 100))
    add(client, Outcome("nobody", "u3", "a", 1, 1_000))  # no such impression, ever
    add(client, impression(3, 25_000))  # moves the records' clock past the first two windows
    out = tmp_path / "served"
    consumer = consume(redis_url, out)

    got = {(r["impression_id"], r["item_id"]): r for r in rows(out)}
    assert sorted(got) == [("din.1.0001", i) for i in "abc"] + [("din.1.0002", i) for i in "abc"]
    assert {k: r["label"] for k, r in got.items()} == {
        ("din.1.0001", "a"): 1,
        ("din.1.0001", "b"): 0,
        ("din.1.0001", "c"): 0,
        ("din.1.0002", "a"): 0,
        ("din.1.0002", "b"): 0,
        ("din.1.0002", "c"): 1,
    }
    first = got[("din.1.0001", "b")]
    imp = impression(1, 0)
    # the row holds the impression exactly: history most recent first, unknown labels and categories kept
    assert first["hist_items"] == [b.item_id for b in imp.history]
    assert first["hist_cats"] == [b.category_id for b in imp.history]
    assert first["hist_labels"] == [b.label for b in imp.history]
    assert first["hist_timestamps"] == [b.timestamp for b in imp.history]
    assert first["user_features"] == [("seg", "s1")]
    assert (first["model"], first["version"], first["position"], first["probability"]) == ("din", "1", 1, 0.2)
    assert got[("din.1.0001", "a")]["outcome_time_ms"] == 2_000
    s = consumer.stats
    assert dict(s.dropped) == {"late": 1, "not_candidate": 1, "unknown": 1}
    assert (s.impressions_written, s.samples_written, s.clicks_written, s.outcomes_joined) == (2, 6, 2, 3)
    # the third impression's window is still open: pending in the group, not acknowledged, not written
    assert list(consumer.joiner.pending) == ["din.1.0003"]
    assert client.xpending(IMPRESSIONS_STREAM, "served-samples")["pending"] == 1
    assert client.xpending(OUTCOMES_STREAM, "served-samples")["pending"] == 0

    # a later run picks the open impression up again (from the group's pending entries) and writes it once a
    # record past its window arrives; a late outcome for an impression already written is dropped as expired
    add(client, Outcome("din.1.0003", "u3", "b", 1, 26_000))
    add(client, Outcome("din.1.0001", "u1", "c", 1, 27_000))
    add(client, impression(4, 40_000))
    consumer = consume(redis_url, out)
    labels = {(r["impression_id"], r["item_id"]): r["label"] for r in rows(out)}
    assert len(labels) == 9 and len(rows(out)) == 9
    assert [labels[("din.1.0003", i)] for i in "abc"] == [0, 1, 0]
    assert dict(consumer.stats.dropped) == {"expired": 1}


def _consumer_command(redis_url: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "training.served", "--redis-url", redis_url, "--out", str(out)]


def test_killed_between_write_and_ack_loses_nothing_and_duplicates_nothing(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    out = tmp_path / "served"
    cmd = [*_consumer_command(redis_url, out), "--window", f"{WINDOW_MS}ms", "--once"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for n in range(40):
        add(client, impression(n, n * 1_000))
        if n % 3 == 0:
            add(client, Outcome(f"din.1.{n:04x}", "u", "b", 1, n * 1_000 + 500))
    # first run: the part is written and renamed, then the process is SIGKILLed before any XACK
    crashed = subprocess.run(cmd, env={**env, CRASH_AFTER_WRITE_ENV: "1"}, cwd=ROOT, capture_output=True, timeout=60)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    written_before = rows(out)
    assert written_before, "the crash came after the part was durably written"
    assert client.xpending(IMPRESSIONS_STREAM, "served-samples")["pending"] == 40  # nothing acknowledged

    for n in range(40, 60):  # more traffic while the consumer is down
        add(client, impression(n, n * 1_000))
        add(client, Outcome(f"din.1.{n:04x}", "u", "a", 1, n * 1_000 + 100))
    add(client, impression(99, 200_000))  # closes every window above
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    keys = [(r["impression_id"], r["item_id"]) for r in rows(out)]
    assert len(keys) == len(set(keys)), "a candidate was written twice"
    assert {k[0] for k in keys} == {f"din.1.{n:04x}" for n in range(60)}, "an impression was lost"
    assert len(keys) == 60 * 3
    clicks = {k for k, r in zip(keys, rows(out), strict=True) if r["label"] == 1}
    before = {(f"din.1.{n:04x}", "b") for n in range(0, 40, 3)}
    assert clicks == before | {(f"din.1.{n:04x}", "a") for n in range(40, 60)}
    # all that was written is acknowledged; only the still-open impression stays pending
    assert client.xpending(IMPRESSIONS_STREAM, "served-samples")["pending"] == 1
    assert client.xpending(OUTCOMES_STREAM, "served-samples")["pending"] == 0
    assert '"skipped_already_written": ' in done.stdout and '"skipped_already_written": 0' not in done.stdout


def test_another_consumer_takes_over_a_dead_ones_pending_entries(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    out = tmp_path / "served"
    for n in range(5):
        add(client, impression(n, n * 1_000))
    # consumer "a" reads every entry, then dies before any window closes: all five stay pending under "a"
    dead = Consumer(ConsumerConfig(redis_url, out, window_ms=WINDOW_MS, consumer="a"))
    dead.run_once()
    assert client.xpending(IMPRESSIONS_STREAM, "served-samples")["consumers"] == [{"name": b"a", "pending": 5}]
    add(client, impression(9, 60_000))
    # "b" claims what sat idle in "a" (claim_idle_ms=0: at once) and writes it with its own new entry's help
    cfg = ConsumerConfig(redis_url, out, window_ms=WINDOW_MS, consumer="b", claim_idle_ms=0)
    Consumer(cfg).run_once()
    assert sorted({r["impression_id"] for r in rows(out)}) == [f"din.1.{n:04x}" for n in range(5)]
    assert client.xpending(IMPRESSIONS_STREAM, "served-samples")["consumers"] == [{"name": b"b", "pending": 1}]


def test_follow_writes_parts_as_windows_close(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    out = tmp_path / "served"
    for n in range(3):
        add(client, impression(n, n * 1_000))
    add(client, Outcome("din.1.0000", "u0", "c", 1, 1_500))
    add(client, impression(3, 2 * WINDOW_MS))
    consumer = Consumer(ConsumerConfig(redis_url, out, window_ms=WINDOW_MS, block_ms=50))
    stats = consumer.follow(stop_after_s=0.5)
    assert (stats.impressions_written, stats.clicks_written) == (3, 1)
    assert {r["impression_id"] for r in rows(out)} == {f"din.1.{n:04x}" for n in range(3)}
