"""The served loop on this machine, end to end: v1 serves simulated users, its log trains v2, v2 serves a split,
and each version's online CTR is reported (issue 20).

    python -m bench.served_loop --out runs/served-loop [--visits 2000] [--rounds 1] [--percent 50]

Starts its own redis-server and service (``python -m app``, repository polling on) on free loopback ports and
stops them at the end. v1 is DIN trained offline on the synthetic world's log (``--world``, ``--v1-epochs``);
every round then plays ``--visits`` visits (``training.simulate``) and runs ``training.loop`` once (consume,
train warm, export, split). A last round plays and reports only. Prints, per version, the log's clicks per
impression beside the simulator's expected clicks per impression for its ranking, a random one and the best.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.datasets import SyntheticConfig
from training.export import export_run
from training.loop import LoopConfig, format_report, run_round
from training.served import parse_duration_ms
from training.service_client import ServiceClient, ServiceError
from training.simulate import SimulationResult, World, simulate
from training.train import train

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, ServiceError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


@contextmanager
def running(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tally(results: list[SimulationResult]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in results:
        for v, t in r.versions.items():
            d = out.setdefault(v, {"impressions": 0, "expected": 0.0, "random": 0.0, "best": 0.0})
            d["impressions"] += t.impressions
            d["expected"] += t.expected
            d["random"] += t.expected_random
            d["best"] += t.expected_best
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/served-loop")
    p.add_argument("--world", default="{}", help="JSON object of SyntheticConfig fields")
    p.add_argument("--v1-epochs", type=int, default=1)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--visits", type=int, default=2000, help="visits per round")
    p.add_argument("--users", type=int, default=500, help="how many of the world's users play")
    p.add_argument("--rounds", type=int, default=1, help="loop rounds (each: play, retrain, split)")
    p.add_argument("--percent", type=float, default=50.0)
    p.add_argument("--epochs", type=int, default=2, help="training epochs of each retrain")
    p.add_argument("--window", default="2s", help="attribution window (the simulator clicks at once)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    world_cfg = SyntheticConfig(**json.loads(args.world))
    t0 = time.perf_counter()
    v1 = TrainConfig(
        dataset="synthetic",
        synthetic=json.loads(args.world),
        model="din",
        out=str(out / "runs" / "v1"),
        epochs=args.v1_epochs,
        max_len=args.max_len,
        progress=False,
        cache_dir=None,
    )
    train(v1)
    export_run(out / "runs" / "v1", out / "repo", name="din")
    print(f"v1 trained and exported in {time.perf_counter() - t0:.0f} s", flush=True)

    redis_port, port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_cmd = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    env = {
        **os.environ,
        "MODEL_REPOSITORY": str(out / "repo"),
        "DEFAULT_MODEL": "din",
        "REDIS_URL": redis_url,
        "MODEL_POLL_INTERVAL_S": "1",
    }
    service_cmd = [sys.executable, "-m", "app", "--port", str(port), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    world = World(world_cfg)
    results: list[SimulationResult] = []
    redis_log, service_log = out / "redis.log", out / "service.log"
    with running(redis_cmd, env, redis_log), running(service_cmd, env, service_log), ServiceClient(url) as client:
        _wait(lambda: client.request("GET", "/readyz")["ready"], "the service")
        window_ms = parse_duration_ms(args.window)
        for r in range(args.rounds + 1):
            t = time.perf_counter()
            sim = simulate(
                client, world, args.visits, args.users, seed_history=20 if r == 0 else 0, seed=r, answers=None
            )
            results.append(sim)
            print(f"round {r}: {json.dumps(sim.to_dict()['versions'])} ({time.perf_counter() - t:.0f} s)")
            # the log's clock is its records' times: one /score after the window closes every window of
            # this round (its own impression stays pending, never counted)
            time.sleep(window_ms / 1e3 + 0.5)
            client.request("POST", "/score", {"user_id": "clock", "candidates": [{"item_id": str(world.items[0])}]})
            cfg = LoopConfig(
                redis_url,
                url,
                out / "repo",
                "din",
                out / "loop",
                window_ms=window_ms,
                percent=args.percent,
                epochs=args.epochs,
                train=r < args.rounds,
            )
            t = time.perf_counter()
            report = run_round(cfg)
            print(f"loop {r}: new version {report['new_version']} ({time.perf_counter() - t:.0f} s)", flush=True)
    print(format_report(report["online_ctr"]))
    print("\nsince the newest version began serving:")
    print(format_report(report["split_ctr"]["versions"]))
    print("\nsimulator, expected clicks per impression under the planted model:")
    print(f"{'version':>7} {'impressions':>11} {'this ranking':>12} {'random':>7} {'best':>6}")
    for v, d in sorted(_tally(results).items(), key=lambda kv: int(kv[0])):
        n = max(d["impressions"], 1)
        expected, rand, best = d["expected"] / n, d["random"] / n, d["best"] / n
        print(f"{v:>7} {int(d['impressions']):>11} {expected:>12.3f} {rand:>7.3f} {best:>6.3f}")
    (out / "summary.json").write_text(
        json.dumps({"online_ctr": report["online_ctr"], "simulator": _tally(results)}, indent=2)
    )


if __name__ == "__main__":
    main()
