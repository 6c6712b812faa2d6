"""Bytes per user in Redis, and the cost of reading them, for the behaviour store's value formats.

    python -m bench.store_memory [--redis-url redis://127.0.0.1:6379/15] [--out bench/results/store_memory]

Writes one user's history of 10, 50, 200 (HISTORY_CAP's default) and 1,000 behaviours in each format and
asks Redis for its ``MEMORY USAGE`` (key, value and their allocations, as jemalloc rounds them):

- ``list``: the format before, a list of ``item SEP category SEP timestamp SEP label`` entries (LPUSH);
- ``list-binary``: a list of binary entries (a flag byte, a 4-byte timestamp, the ids), size only;
- ``string-text``: one string, the entries joined, timestamps as differences, not deflated, size only;
- ``packed``: one string written by ``RedisStore.append`` (``pack_history``: the same text, deflated).

Two histories: ``string`` ids, the shape of training.datasets' synthetic log (``i<k>`` of 1,000 items,
``c<k>`` of 20 categories, a behaviour every 1–60 minutes, labels), whose list at 50 and 200 behaviours
is the 1,432 and 5,272 bytes issue 19 measured; and ``numeric`` ids, the shape of MovieLens-100k (items
1–1682, a genre name as the category, ratings minutes apart), generated, not read from the data set.
Then, side by side in alternated rounds, the CPU to decode 50 behaviours from what Redis returns in each
format, and a read and a one-behaviour append through the client. Without --redis-url it starts a
redis-server of its own on a free port (the database it measures in is flushed). Writes JSON and markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from app.store import RS, SEP, Behaviour, RedisStore, pack_history, unpack_history

SIZES = (10, 50, 200, 1000)
PREFIX = "ctr:hist:"
USER = "load-3"  # bench.load's user names: the key's own bytes count in MEMORY USAGE
GENRES: tuple[str, ...] = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
)
GENRES += ("Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western", "unknown")


def history(ids: str, n: int, seed: int = 0) -> list[Behaviour]:
    """``n`` behaviours, most recent first, of the ``string`` or ``numeric`` shape (module docstring)."""
    rng = random.Random(seed)
    out, t = [], 1_700_000_000 if ids == "string" else 880_000_000
    for _ in range(n):
        if ids == "string":
            t += rng.randint(60, 3599)
            out.append(Behaviour(f"i{rng.randrange(1000)}", f"c{rng.randrange(20)}", t, rng.randint(0, 1)))
        else:
            t += rng.randint(1, 600)
            out.append(Behaviour(str(rng.randint(1, 1682)), rng.choice(GENRES), t, rng.randint(0, 1)))
    return out[::-1]


def binary_entry(b: Behaviour) -> bytes:
    """A list entry as tight as a flat entry gets: flags (label), u32 timestamp, then the ids."""
    flags = 0 if b.label is None else 1 + b.label
    return struct.pack(">BI", flags, b.timestamp) + f"{b.item_id}{SEP}{b.category_id or ''}".encode()


def text_deltas(h: list[Behaviour]) -> bytes:
    """The entries' text one after the other (timestamps as differences), not deflated."""
    parts, previous = [], None
    for b in h:
        t = b.timestamp if previous is None else previous - b.timestamp
        previous = b.timestamp
        parts.append(f"{b.item_id}{SEP}{b.category_id or ''}{SEP}{t}{SEP}{'' if b.label is None else b.label}")
    return RS.join(parts).encode()


def usage(client: redis.Redis, key: str) -> int:
    return int(client.memory_usage(key, samples=0) or 0)


def write_list(client: redis.Redis, key: str, entries: list[bytes], ttl_s: int) -> None:
    """As the store wrote before: LPUSH oldest first (the newest on top), LTRIM, EXPIRE, one transaction."""
    client.delete(key)
    pipe = client.pipeline(transaction=True)
    pipe.lpush(key, *reversed(entries))
    pipe.ltrim(key, 0, max(len(entries), 1) - 1)
    pipe.expire(key, ttl_s)
    pipe.execute()


def measure_memory(url: str, ids: str, n: int) -> dict[str, int]:
    key, h, ttl_s = PREFIX + USER, history(ids, n), 3600
    out: dict[str, int] = {}
    with redis.Redis.from_url(url) as client:
        write_list(client, key, [b.encode().encode() for b in h], ttl_s)
        assert client.llen(key) == n
        out["list"] = usage(client, key)
        write_list(client, key, [binary_entry(b) for b in h], ttl_s)
        out["list-binary"] = usage(client, key)
        client.set(key, text_deltas(h), ex=ttl_s)
        out["string-text"] = usage(client, key)
        client.delete(key)

        async def append() -> None:  # the real write path: one /events batch, oldest first as it arrives
            store = RedisStore(url, PREFIX, cap=n, ttl_s=ttl_s, timeout_s=10.0)
            try:
                await store.append([(USER, b) for b in reversed(h)])
                assert await store.recent(USER, n) == h
            finally:
                await store.close()

        asyncio.run(append())
        out["packed"] = usage(client, key)
        out["packed_value_bytes"] = int(client.strlen(key))
        client.delete(key)
    return out


def alternate(fns: dict[str, Callable[[], Any]], rounds: int, per_round: int) -> dict[str, float]:
    """Median over rounds of µs per call; the rounds alternate the functions, so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[name].append(1e6 * (time.perf_counter() - t) / per_round)
    return {name: statistics.median(v) for name, v in times.items()}


def measure_decode(ids: str, rounds: int) -> dict[str, float]:
    """CPU to turn what Redis returns into 50 Behaviours: the list's 50 entries (str, as the client
    decoded them before) through Behaviour.decode, against the packed value of 50 and of 200 (read 50)."""
    h200 = history(ids, 200)
    h50 = h200[:50]
    entries = [b.encode() for b in h50]
    packed50, packed200 = pack_history(h50), pack_history(h200)
    assert unpack_history(packed200, 50) == h50 == [Behaviour.decode(e) for e in entries]
    return alternate(
        {
            "list_50": lambda: [Behaviour.decode(e) for e in entries],
            "packed_50": lambda: unpack_history(packed50, 50),
            "packed_200_read_50": lambda: unpack_history(packed200, 50),
        },
        10 * rounds,
        20,  # short turns: the machine's speed swings (other processes) hit all three alike
    )


def measure_round_trips(url: str, ids: str, rounds: int) -> dict[str, float]:
    """µs per call through redis-py's asyncio client on one connection: read 50 of a user at 200, and
    append one behaviour to a user at 200 (kept at 200), the list's way against the packed one; and
    (``_server``) the CPU µs the redis-server process spent per call (INFO cpu around each batch)."""
    h = history(ids, 200)

    async def main() -> dict[str, float]:
        legacy = aioredis.Redis.from_url(url, decode_responses=True)  # the client as it was configured
        store = RedisStore(url, PREFIX, cap=200, ttl_s=3600, timeout_s=10.0)
        old_key, new_user = PREFIX + "before", "after"
        with redis.Redis.from_url(url) as client:
            write_list(client, old_key, [b.encode().encode() for b in h], 3600)
        await store.append([(new_user, b) for b in reversed(h)])
        extra = Behaviour("i1", "c1", 1_800_000_000, 1)

        async def server_cpu() -> float:
            """Seconds of CPU the redis-server process used so far (commands, scripts, sockets)."""
            cpu = await legacy.info("cpu")
            return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

        async def read_list() -> None:
            [Behaviour.decode(str(r)) for r in await legacy.lrange(old_key, 0, 49)]  # str already: no copy

        async def read_packed() -> None:
            await store.recent(new_user, 50)

        async def append_list() -> None:
            pipe = legacy.pipeline(transaction=True)
            pipe.lpush(old_key, extra.encode())
            pipe.ltrim(old_key, 0, 199)
            pipe.expire(old_key, 3600)
            await pipe.execute()

        async def append_packed() -> None:
            await store.append([(new_user, extra)])

        fns = {"read_list": read_list, "read_packed": read_packed}
        fns |= {"append_list": append_list, "append_packed": append_packed}
        times: dict[str, list[float]] = {name: [] for name in fns}
        server: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                before = await server_cpu()
                t = time.perf_counter()
                for _ in range(50):
                    await fn()
                times[name].append(1e6 * (time.perf_counter() - t) / 50)
                server[name].append(1e6 * (await server_cpu() - before) / 50)
        await legacy.aclose()
        await store.close()
        out = {name: statistics.median(v) for name, v in times.items()}
        return out | {f"{name}_server": statistics.median(v) for name, v in server.items()}

    return asyncio.run(main())


def run(url: str, sizes: tuple[int, ...] = SIZES, rounds: int = 15) -> dict[str, Any]:
    report: dict[str, Any] = {"memory": {}, "decode_us": {}, "round_trip_us": {}}
    with redis.Redis.from_url(url) as client:
        report["redis_version"] = client.info("server")["redis_version"]
    for ids in ("string", "numeric"):
        report["memory"][ids] = {str(n): measure_memory(url, ids, n) for n in sizes}
        report["decode_us"][ids] = measure_decode(ids, rounds)
        report["round_trip_us"][ids] = measure_round_trips(url, ids, rounds)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"MEMORY USAGE per user, bytes (redis {report['redis_version']}); in brackets, of the list's",
        "",
        "| ids | behaviours | list (before) | list-binary | string-text | packed (now) | packed value |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ids, by_n in report["memory"].items():
        for n, m in by_n.items():
            cells = [f"{m[k]:,} ({m[k] / m['list']:.2f})" for k in ("list-binary", "string-text", "packed")]
            lines.append(f"| {ids} | {int(n):,} | {m['list']:,} | {' | '.join(cells)} | {m['packed_value_bytes']:,} |")
    lines += ["", "| ids | decode 50: list | packed 50 | packed 200, read 50 |", "| --- | ---: | ---: | ---: |"]
    for ids, d in report["decode_us"].items():
        lines.append(
            f"| {ids} | {d['list_50']:.1f} µs | {d['packed_50']:.1f} µs ({d['packed_50'] / d['list_50']:.2f}) | "
            f"{d['packed_200_read_50']:.1f} µs ({d['packed_200_read_50'] / d['list_50']:.2f}) |"
        )
    lines += ["", "| ids | operation | list: client | packed: client | list: Redis | packed: Redis |"]
    lines += ["| --- | --- | ---: | ---: | ---: | ---: |"]
    for ids, r in report["round_trip_us"].items():
        for op, what in (("read", "read 50 of 200"), ("append", "append 1 at 200")):
            old, new = r[f"{op}_list"], r[f"{op}_packed"]
            old_s, new_s = r[f"{op}_list_server"], r[f"{op}_packed_server"]
            lines.append(
                f"| {ids} | {what} | {old:.0f} µs | {new:.0f} µs ({new / old:.2f}) | {old_s:.1f} µs | "
                f"{new_s:.1f} µs ({new_s / old_s:.2f}) |"
            )
    return "\n".join(lines) + "\n"


@contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server of our own on a free loopback port, without persistence; stopped on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (`make tools`), or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 30
            while True:
                try:
                    with redis.Redis.from_url(url) as client:
                        client.ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield url
        finally:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", default=None, help="measure there (its database is flushed); default: our own")
    p.add_argument("--out", type=Path, default=Path("bench/results/store_memory"))
    p.add_argument("--rounds", type=int, default=15, help="alternated timing rounds (medians are reported)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.redis_url:
        with redis.Redis.from_url(args.redis_url) as client:
            client.flushdb()
        report = run(args.redis_url, rounds=args.rounds)
    else:
        with redis_server() as url:
            report = run(url, rounds=args.rounds)
    (args.out / "store_memory.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "store_memory.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
