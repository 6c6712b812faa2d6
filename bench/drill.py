"""The failover drill: a scorer replica, then a Redis master, killed under load, on this machine.

    python -m bench.drill --repository runs/repository [--replicas 3 --concurrency 4 --phase-s 5] \
        --out bench/results/drill

Starts a Redis Cluster (3 masters, a replica each), ``--replicas`` scorers (`python -m app` with
REDIS_CLUSTER=true) and nginx with deploy/nginx/nginx.conf in front of them, all on loopback (bench.stack). Then,
under steady /score load through nginx (bench.load's request bodies and keep-alive client, closed loop) and a
writer posting /events and recording every event acknowledged, it SIGKILLs one scorer replica, waits a phase,
and SIGKILLs the Redis master that holds a probe user's slot. Measured:

- /score requests that failed (all of them: nginx passes a /score the dead replica was handling on to another,
  so none should), against those in flight on the killed replica when it died (from nginx's access log);
- how long nginx kept trying the dead replica (``lb_recovery_s``), and how often it probed it again later;
- the master kill: time until its replica is promoted (``failover_s``), until /score answers the probe user
  with its history again (degraded before: 200 without history, never a 5xx) and until /events is
  acknowledged again (503 before);
- acknowledged events lost: every event the writer saw acknowledged is looked for in the cluster afterwards
  (read with the service's own RedisStore); must be 0.

Writes drill.json and drill.md (--out). Timings on a shared machine are noisy; counts are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.store import RedisStore, user_key
from bench.client import Pool
from bench.inprocess import load_version
from bench.load import Bodies, Job, seed_users, stop_on_sigterm
from bench.stack import LoadBalancer, RedisClusterServers, Scorer, scorer_env

PREFIX = "ctr:hist:"  # the service's default REDIS_KEY_PREFIX
# the access log with the time each request ended (ms resolution) and every upstream tried, in order
LOG_FORMAT = '$msec $request_time $status "$request" $upstream_addr|$upstream_status'
LOG_LINE = re.compile(r'^(\d+\.\d+) (\d+\.\d+) (\d+) "(\S+) (\S+) [^"]*" (.*)\|(.*)$')
FAIL_TIMEOUT_S = 5.0  # deploy/nginx/nginx.conf: `max_fails=1 fail_timeout=5s`


@dataclass
class Records:
    """Everything the clients saw, stamped with wall-clock time (nginx's log uses it too)."""

    score: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, status or error
    events: list[tuple[float, float, str, tuple[str, ...]]] = field(default_factory=list)  # start, end, status, users
    acked: list[tuple[str, str]] = field(default_factory=list)  # (user, item) of every acknowledged event
    probe: list[tuple[float, str, bool, str]] = field(default_factory=list)  # start, status, degraded, source
    errors: list[tuple[float, str]] = field(default_factory=list)  # end, body of each refused /events


async def score_load(url: str, job: Job, stop: asyncio.Event, records: Records) -> None:
    """Closed loop: ``job.level`` connections each sending bench.load's /score bodies back to back."""
    bodies = Bodies(job)
    pool = Pool(url, int(job.level), {"Content-Type": "application/json"}, timeout_s=10.0)

    async def worker() -> None:
        while not stop.is_set():
            t0 = time.time()
            try:
                status = str(await pool.post("/score", bodies()))
            except (OSError, TimeoutError) as e:  # refused, reset, closed early, or no answer in time
                status = type(e).__name__
            records.score.append((t0, time.time(), status))

    try:
        await asyncio.gather(*(worker() for _ in range(int(job.level))))
    finally:
        pool.close()


async def event_writer(
    client: httpx.AsyncClient, users: list[str], batch: int, interval_s: float, stop: asyncio.Event, records: Records
) -> None:
    """Batches of ``batch`` events for random users, each item id unique; what is acknowledged is recorded.
    Nothing is re-sent: an event refused (503) is simply not counted as acknowledged."""
    rng = random.Random(7)
    seq = 0
    while not stop.is_set():
        pairs = [(rng.choice(users), f"w{seq + i}") for i in range(batch)]
        events = [{"user_id": u, "item_id": i, "timestamp": int(time.time())} for u, i in pairs]
        seq += batch
        t0 = time.time()
        try:
            r = await client.post("/events", json={"events": events})
            status = str(r.status_code)
            if r.status_code != 200:
                records.errors.append((time.time(), r.text[:300]))
            if r.status_code == 200 and r.json().get("stored") == len(events):
                records.acked.extend(pairs)
        except httpx.HTTPError as e:
            status = type(e).__name__
        records.events.append((t0, time.time(), status, tuple(u for u, _ in pairs)))
        await asyncio.sleep(interval_s)


async def probe(client: httpx.AsyncClient, user: str, items: list[str], stop: asyncio.Event, records: Records) -> None:
    """/score for one user on the master that is killed, every 50 ms: degraded or not, and where its history
    came from."""
    body = {"user_id": user, "candidates": [{"item_id": i} for i in items[:5]]}
    while not stop.is_set():
        t0 = time.time()  # when it was sent: an answer that started before a kill tells nothing of it
        try:
            r = await client.post("/score", json=body)
            doc = r.json() if r.status_code == 200 else {}
            records.probe.append((t0, str(r.status_code), bool(doc.get("degraded")), doc.get("history_source", "")))
        except httpx.HTTPError as e:
            records.probe.append((t0, type(e).__name__, False, ""))
        await asyncio.sleep(0.05)


def parse_nginx_log(path: Path) -> list[dict[str, Any]]:
    """The access log's /score and /events entries: start, end, status and the upstreams tried in order."""
    out = []
    for line in path.read_text().splitlines():
        m = LOG_LINE.match(line)
        if m is None:
            continue
        end, took, status, _method, uri, addrs, statuses = m.groups()
        out.append(
            {
                "start": float(end) - float(took),
                "end": float(end),
                "status": int(status),
                "uri": uri,
                "upstreams": [a.strip() for a in addrs.split(",") if a.strip() and a.strip() != "-"],
                "upstream_statuses": [s.strip() for s in statuses.split(",")],
            }
        )
    return out


def _failed(statuses: list[str]) -> int:
    return sum(1 for s in statuses if s != "200")


def _latency(rows: list[tuple[float, float, str]], t0: float, t1: float) -> dict[str, float]:
    ms = np.asarray([1e3 * (e - s) for s, e, st in rows if st == "200" and t0 <= s < t1])
    if ms.size == 0:
        return {"requests": 0}
    return {
        "requests": int(ms.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def analyse(
    records: Records, log: list[dict[str, Any]], start: float, kill_scorer: float, kill_master: float, end: float
) -> dict[str, Any]:
    """The drill's figures from what the clients saw and nginx logged (wall-clock seconds)."""
    score_log = [e for e in log if e["uri"] == "/score"]
    return {
        "score": {
            "requests": len(records.score),
            "failed": _failed([s for _, _, s in records.score]),
            "failed_by_status": dict(Counter(s for _, _, s in records.score if s != "200")),
            "failed_in_master_phase": _failed([s for s0, _, s in records.score if s0 >= kill_master]),
            "latency_before": _latency(records.score, start, kill_scorer),
            "latency_after_scorer_kill": _latency(records.score, kill_scorer, kill_master),
            "latency_after_master_kill": _latency(records.score, kill_master, end),
            "nginx_entries": len(score_log),
        },
        "events": {
            "requests": len(records.events),
            "acknowledged_events": len(records.acked),
            "refused_requests": _failed([s for _, _, s, _ in records.events]),
            "refused_by_status": dict(Counter(s for _, _, s, _ in records.events if s != "200")),
            "refused_before_master_kill": _failed([s for s0, _, s, _ in records.events if s0 < kill_master]),
        },
    }


def scorer_kill_figures(log: list[dict[str, Any]], killed: str, at: float) -> dict[str, Any]:
    """What nginx did with the dead replica: requests in flight on it when it died, requests it sent there
    afterwards (each passed on), until when, and its later probes after ``fail_timeout``."""
    touched = [e for e in log if killed in e["upstreams"] and e["end"] >= at]
    in_flight = [e for e in touched if e["upstreams"][0] == killed and e["start"] <= at]
    soon = [e for e in touched if e["start"] < at + FAIL_TIMEOUT_S]
    later = [e for e in touched if e["start"] >= at + FAIL_TIMEOUT_S]
    return {
        "killed": killed,
        "score_in_flight_on_killed": sum(1 for e in in_flight if e["uri"] == "/score"),
        "in_flight_on_killed": len(in_flight),
        "sent_to_killed_after": len(touched) - len(in_flight),
        "passed_on": sum(1 for e in touched if e["upstreams"][-1] != killed),
        "failed_at_nginx": sum(1 for e in touched if e["upstreams"][-1] == killed),
        "lb_recovery_s": max((e["end"] for e in soon), default=at) - at,
        "later_probes_of_killed": len(later),
    }


def master_kill_figures(records: Records, at: float, promoted_at: float | None, on_victim: set[str]) -> dict[str, Any]:
    """``on_victim``: the writer's users whose slot the killed master served."""
    after = [p for p in records.probe if p[0] >= at]
    degraded = [p for p in after if p[2] or p[1] != "200"]
    from_store = [p for p in after if p[1] == "200" and p[3] == "store"]
    refused = [e for e in records.events if e[0] >= at - 0.5 and e[2] != "200"]
    # the first /events for one of the victim's users acknowledged after the kill: the promoted replica written
    victim_acked = [e for e in records.events if e[0] >= at and e[2] == "200" and on_victim.intersection(e[3])]
    return {
        "failover_s": None if promoted_at is None else promoted_at - at,
        "probe_answers": len(after),
        "probe_degraded_answers": len(degraded),
        "probe_failed_answers": sum(1 for p in after if p[1] != "200"),
        # /score for the probe user answered from its history again (degraded answers until then)
        "score_recovery_s": (max(p[0] for p in degraded) - at) if degraded else 0.0,
        # ... and the first answer from its history again (later degraded answers: store timeouts under load)
        "score_first_recovered_s": (min(p[0] for p in from_store) - at) if from_store else None,
        "events_first_recovered_s": (min(e[1] for e in victim_acked) - at) if victim_acked else None,
        "events_refused_requests": len(refused),
        "events_recovery_s": (max(e[1] for e in refused) - at) if refused else 0.0,
        "probe_recovered": bool(after) and after[-1][1] == "200" and not after[-1][2] and after[-1][3] == "store",
    }


async def count_lost(cluster_url: str, acked: list[tuple[str, str]], cap: int) -> dict[str, Any]:
    """Every acknowledged event looked for in the cluster, read with the service's own store (its key
    naming and value format, whatever they are)."""
    store = RedisStore(cluster_url, PREFIX, cap, 3600, 5.0, cluster=True)
    by_user: dict[str, set[str]] = {}
    for user, item in acked:
        by_user.setdefault(user, set()).add(item)
    lost = 0
    try:
        for user, items in by_user.items():
            stored = {b.item_id for b in await store.recent(user, cap)}
            lost += len(items - stored)
    finally:
        await store.close()
    return {"acknowledged": len(acked), "lost": lost, "users": len(by_user)}


class Promotion(threading.Thread):
    """Watches the cluster from the side: when the victim's replica has taken over its slots."""

    def __init__(self, cluster: RedisClusterServers, replica: int) -> None:
        super().__init__(daemon=True)
        self.cluster, self.replica = cluster, replica
        self.at: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while self.at is None and time.monotonic() < deadline and not self.done.is_set():
            try:
                with self.cluster.client(self.replica) as c:
                    if c.info("replication")["role"] == "master":
                        self.at = time.time()
            except Exception:  # a node busy electing: ask again
                pass
            time.sleep(0.05)


def replica_of(cluster: RedisClusterServers, master: int) -> int:
    for port in cluster.alive():
        with cluster.client(port) as c:
            info = c.info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == master:
                return port
    raise RuntimeError(f"no replica of {master}")


async def drive(
    args: argparse.Namespace, cluster: RedisClusterServers, lb: LoadBalancer, scorers: list[Scorer], items: list[str]
) -> dict[str, Any]:
    records = Records()
    stop = asyncio.Event()
    writer_users = [f"drill-w{i}" for i in range(args.writer_users)]
    probe_user = "drill-probe"
    async with httpx.AsyncClient(base_url=lb.url, timeout=10) as client:
        seed = [{"user_id": probe_user, "item_id": items[i], "timestamp": 1_700_000_000 + i} for i in range(5)]
        for attempt in range(10):  # a 503 (the store's bound overrun on a loaded machine) asks for a retry
            r = await client.post("/events", json={"events": seed})
            if r.status_code != 503:
                break
            await asyncio.sleep(0.1 * (attempt + 1))
        r.raise_for_status()
        victim = masters_of(cluster, [probe_user])[probe_user]
        on_victim = {u for u, port in masters_of(cluster, writer_users).items() if port == victim}
        replica = replica_of(cluster, victim)
        job = Job(lb.url, "closed", float(args.concurrency), 0.0, args.users, tuple(items), args.candidates, False, 1)
        tasks = [
            asyncio.create_task(score_load(lb.url, job, stop, records)),
            asyncio.create_task(
                event_writer(client, writer_users, args.writer_batch, args.writer_interval_s, stop, records)
            ),
            asyncio.create_task(probe(client, probe_user, items, stop, records)),
        ]
        start = time.time()
        await asyncio.sleep(args.phase_s)
        killed = scorers[0]
        kill_scorer = time.time()
        killed.kill()
        await asyncio.sleep(args.phase_s)
        promotion = Promotion(cluster, replica)
        kill_master = time.time()
        cluster.kill(victim)
        promotion.start()
        deadline = time.monotonic() + args.recovery_timeout_s
        while time.monotonic() < deadline:
            figures = master_kill_figures(records, kill_master, promotion.at, on_victim)
            last_event = records.events[-1] if records.events else None
            if (
                promotion.at is not None
                and figures["probe_recovered"]
                and last_event is not None
                and last_event[0] > promotion.at
                and last_event[2] == "200"
            ):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(args.phase_s / 2)  # steady again: a tail of the recovered service
        stop.set()
        await asyncio.gather(*tasks)
        promotion.done.set()
        end = time.time()
    log = parse_nginx_log(lb.log_path)
    report = analyse(records, log, start, kill_scorer, kill_master, end)
    report["scorer_kill"] = scorer_kill_figures(log, killed.address, kill_scorer)
    report["scorer_kill"]["at_s"] = kill_scorer - start
    report["master_kill"] = master_kill_figures(records, kill_master, promotion.at, on_victim)
    report["master_kill"].update({"at_s": kill_master - start, "victim_port": victim, "replica_port": replica})
    report["events"].update(await count_lost(cluster.url, records.acked, args.history_cap))
    report["duration_s"] = end - start
    report["events_refusals"] = [(round(t - kill_master, 3), text) for t, text in records.errors]
    return report


def masters_of(cluster: RedisClusterServers, users: list[str]) -> dict[str, int]:
    """The port of the master that holds each user's behaviours (the service's key naming)."""
    out = {}
    with cluster.cluster_client() as c:
        for user in users:
            node = c.get_node_from_key(user_key(PREFIX, user, cluster=True))
            assert node is not None
            out[user] = int(node.port)
    return out


def _pair(figures: dict[str, Any], what: str) -> str:
    first = figures[f"{what}_first_recovered_s"]
    return f"{'-' if first is None else f'{first:.2f}'} / {figures[f'{what}_recovery_s']:.2f}"


def markdown(report: dict[str, Any]) -> str:
    s, e, sk, mk = report["score"], report["events"], report["scorer_kill"], report["master_kill"]
    rows = [
        ("/score requests (through nginx)", f"{s['requests']:,}"),
        ("/score failed (all phases)", f"{s['failed']} {s['failed_by_status'] or ''}".strip()),
        ("/score in flight on the killed replica", str(sk["score_in_flight_on_killed"])),
        (
            "requests nginx sent to the dead replica after its death / passed on",
            f"{sk['sent_to_killed_after']} / {sk['passed_on']}",
        ),
        ("load balancer recovered after (s)", f"{sk['lb_recovery_s']:.2f}"),
        ("Redis master failed over after (s)", "-" if mk["failover_s"] is None else f"{mk['failover_s']:.2f}"),
        (
            "/score for the victim's user: degraded answers / failed",
            f"{mk['probe_degraded_answers']} / {mk['probe_failed_answers']}",
        ),
        ("/score with history again after (s): first answer / last degraded one", _pair(mk, "score")),
        ("/events refused (503) during the failover", str(mk["events_refused_requests"])),
        ("/events for the victim's users acknowledged again after (s): first / last refusal", _pair(mk, "events")),
        ("events acknowledged / lost", f"{e['acknowledged']:,} / {e['lost']}"),
    ]
    lat = [
        (k.removeprefix("latency_").replace("_", " "), s[k])
        for k in ("latency_before", "latency_after_scorer_kill", "latency_after_master_kill")
    ]
    lines = ["| drill | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += ["| /score latency | requests | p50 ms | p99 ms | max ms |", "| --- | --- | --- | --- | --- |"]
    for name, d in lat:
        if d.get("requests"):
            lines.append(f"| {name} | {d['requests']:,} | {d['p50_ms']:.1f} | {d['p99_ms']:.1f} | {d['max_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True, help="an exported model repository")
    p.add_argument("--name", default="din")
    p.add_argument("--replicas", type=int, default=3, help="scorer replicas behind nginx")
    p.add_argument("--concurrency", type=int, default=4, help="/score requests in flight (closed loop)")
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--history", type=int, default=20, help="behaviours seeded per /score user")
    p.add_argument("--users", type=int, default=30, help="seeded /score users")
    p.add_argument("--writer-users", type=int, default=300, help="users the event writer spreads its events over")
    p.add_argument("--writer-batch", type=int, default=4, help="events per /events request")
    p.add_argument("--writer-interval-s", type=float, default=0.02, help="pause between /events requests")
    p.add_argument("--phase-s", type=float, default=5.0, help="load before the first kill and between kills")
    p.add_argument("--recovery-timeout-s", type=float, default=30.0)
    p.add_argument("--history-cap", type=int, default=200, help="HISTORY_CAP of the scorers")
    p.add_argument("--store-timeout-ms", type=float, default=50.0, help="STORE_TIMEOUT_MS of the scorers")
    p.add_argument("--node-timeout-ms", type=int, default=1000, help="cluster-node-timeout of the Redis nodes")
    p.add_argument("--out", type=Path, default=Path("bench/results/drill"))
    args = p.parse_args(argv)
    stop_on_sigterm()

    folder, meta = load_version(args.repository, args.name, None)
    items = json.loads((folder / meta["files"]["vocabulary"]).read_text())["items"]
    work = Path(tempfile.mkdtemp(prefix="drill-"))
    work.chmod(0o755)  # nginx's workers (`nobody` when started as root) buffer large bodies in files under it
    scorers: list[Scorer] = []
    try:
        with RedisClusterServers(work / "cluster", args.node_timeout_ms) as cluster:
            env = scorer_env(
                args.repository,
                cluster.url,
                REDIS_CLUSTER="true",
                DEFAULT_MODEL=args.name,
                HISTORY_CAP=str(args.history_cap),
                STORE_TIMEOUT_MS=str(args.store_timeout_ms),
                INTRA_OP_THREADS="1",  # the replicas share this machine's cores
            )
            scorers = [Scorer(env, work / f"scorer-{i}.log") for i in range(args.replicas)]
            for s in scorers:
                s.launch()
            for s in scorers:
                s.wait_ready()
            with LoadBalancer(work / "nginx", [s.address for s in scorers], LOG_FORMAT) as lb:
                seed_users(lb.url, args.users, args.history, items)
                report = asyncio.run(drive(args, cluster, lb, scorers, items))
        report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    except BaseException:
        for log in sorted(work.glob("*.log")) + sorted(work.glob("nginx/*.log")):  # what the processes said
            print(f"--- {log.name} (end) ---\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
        raise
    finally:
        for s in scorers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drill.json").write_text(json.dumps(report, indent=2))
    (args.out / "drill.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out}/drill.json, drill.md")


if __name__ == "__main__":
    main()
