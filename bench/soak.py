"""Soak benchmark: a long open-loop run at a fixed share of saturation, with the server's memory and
latency recorded every sample period; it says whether memory keeps growing.

    python -m bench.soak --url http://127.0.0.1:8000 --repository runs/repository --name din \
        --fraction 0.7 --minutes 10 [--rate 100] [--pid PID]

Without --rate, saturation is measured first (closed loop, --saturation-concurrency connections) and
the rate is --fraction of it. The server's process is found by its listening port unless --pid is given;
its RSS (with any child processes) is read at the end of every sample. Memory "keeps growing" when the
least-squares slope of RSS over the second half of the run exceeds --max-growth-mb-per-min. Writes
soak.json, soak.md and soak.png (RSS and latency per sample).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from app.scorer import published_versions
from bench.inprocess import load_version
from bench.load import Job, _window, add_target_arguments, run_step, seed_users, server_process, stop_on_sigterm


def rss_mb(proc: psutil.Process) -> float:
    procs = [proc, *proc.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs) / 2**20


class Swapper(threading.Thread):
    """Every ``period`` seconds, swap the model to another published version through the admin endpoint
    (alternating between the two newest): a service that takes a new version every day must not keep the
    memory of the old ones."""

    def __init__(self, url: str, name: str, versions: list[int], period: float, api_key: str | None) -> None:
        super().__init__(daemon=True)
        self.url, self.name, self.versions, self.period = url, name, versions[-2:], period
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.swaps, self.failures, self.stop = 0, 0, threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120, headers=self.headers) as client:
            while not self.stop.wait(self.period):
                version = self.versions[self.swaps % 2]
                r = client.post(f"/admin/models/{self.name}/load", json={"version": version})
                self.swaps += 1
                self.failures += r.status_code != 200


def growth(samples: list[dict[str, Any]]) -> float:
    """MB per minute: least-squares slope of RSS over the second half of the samples (after warm-up)."""
    half = samples[len(samples) // 2 :]
    if len(half) < 2:
        return 0.0
    t = np.array([s["elapsed_min"] for s in half])
    y = np.array([s["rss_mb"] for s in half])
    return float(np.polyfit(t, y, 1)[0])


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Soak of {report['url']} ({report['model']} v{report['version']}, {report['candidates']} candidates × "
        f"{report['history']} history): {report['rate']:.1f} req/s open loop = {100 * report['fraction']:.0f}% "
        f"of a measured saturation of {report['saturation_requests_per_second']:.1f} req/s, "
        f"{report['minutes']:g} min, {report['swaps']} version swaps ({report['swap_failures']} failed). "
        f"RSS growth over the second half: "
        f"**{report['rss_growth_mb_per_min']:+.2f} MB/min** ({report['verdict']}).",
        "",
        "| minute | RSS MB | req/s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in report["samples"]:
        lines.append(
            f"| {s['elapsed_min']:.1f} | {s['rss_mb']:.1f} | {s['requests_per_second']:.1f} | "
            f"{s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {s['errors'] or '—'} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["elapsed_min"] for s in report["samples"]]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    a.plot(t, [s["rss_mb"] for s in report["samples"]], marker="o")
    a.set_ylabel("server RSS (MB)")
    a.grid(alpha=0.3)
    for q, style in (("p50_ms", "-"), ("p99_ms", "--")):
        b.plot(t, [s[q] for s in report["samples"]], style, marker="o", label=q[:3])
    b.axhline(10, color="grey", lw=0.8, ls=":", label="10 ms")
    b.set_ylabel("latency (ms)")
    b.set_xlabel("minutes")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(p, users=1000)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--sample-seconds", type=float, default=60.0, help="one RSS and latency sample per period")
    p.add_argument("--fraction", type=float, default=0.7, help="share of the measured saturation")
    p.add_argument("--rate", type=float, default=None, help="requests/s; skips the saturation measurement")
    p.add_argument("--saturation-concurrency", type=int, default=16)
    p.add_argument("--saturation-seconds", type=float, default=10.0)
    p.add_argument("--max-growth-mb-per-min", type=float, default=1.0)
    p.add_argument(
        "--swap-every",
        type=float,
        default=0.0,
        help="seconds between version swaps via /admin (0: none; needs two published versions)",
    )
    p.add_argument("--pid", type=int, default=None, help="the server's process id (default: found by port)")
    p.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    args = p.parse_args(argv)
    stop_on_sigterm()

    server = server_process(args.url, args.pid)
    if server is None:
        raise SystemExit(f"no local process listens at {args.url}; pass --pid")
    folder, meta = load_version(args.repository, args.name, None)
    items = tuple(json.loads((folder / meta["files"]["vocabulary"]).read_text())["items"])
    seed_users(args.url, args.users, args.history, list(items), args.api_key)
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.processes) as pool:
        job = Job(
            args.url,
            "closed",
            float(args.saturation_concurrency),
            args.saturation_seconds,
            args.users,
            items,
            args.candidates,
            True,
            seed=1,
            api_key=args.api_key,
        )
        if args.rate is None:
            sat = run_step(pool, job, args.processes, max_windows=3)["requests_per_second"]
            rate = args.fraction * sat
            print(f"saturation {sat:.1f} req/s → soak at {rate:.1f} req/s ({100 * args.fraction:.0f}%)")
        else:
            sat, rate = float("nan"), args.rate
        samples: list[dict[str, Any]] = []
        swapper = None
        if args.swap_every > 0:
            versions = published_versions(args.repository, args.name)
            if len(versions) < 2:
                raise SystemExit(f"--swap-every needs two published versions of {args.name}; found {versions}")
            swapper = Swapper(args.url, args.name, versions, args.swap_every, args.api_key)
            swapper.start()
        start = time.monotonic()
        n = max(1, round(60 * args.minutes / args.sample_seconds))
        for i in range(n):
            w = _window(
                pool,
                Job(**{**job.__dict__, "mode": "open", "level": rate, "seconds": args.sample_seconds, "seed": 100 + i}),
                args.processes,
            )
            sample = {
                "elapsed_min": (time.monotonic() - start) / 60,
                "rss_mb": rss_mb(server),
                **w,
                "swaps": swapper.swaps if swapper else 0,
            }
            samples.append(sample)
            print(
                f"{sample['elapsed_min']:5.1f} min  RSS {sample['rss_mb']:7.1f} MB  {w['requests_per_second']:6.1f} "
                f"req/s  p50 {w['p50_ms']:6.2f}  p99 {w['p99_ms']:6.2f} ms  errors {w['errors'] or '-'}"
            )
    if swapper is not None:
        swapper.stop.set()
        swapper.join()
    slope = growth(samples)
    report: dict[str, Any] = {
        "url": args.url,
        "model": args.name,
        "version": meta["version"],
        "candidates": args.candidates,
        "history": args.history,
        "minutes": args.minutes,
        "fraction": rate / sat if sat == sat else float("nan"),
        "saturation_requests_per_second": sat,
        "rate": rate,
        "samples": samples,
        "rss_start_mb": samples[0]["rss_mb"],
        "rss_end_mb": samples[-1]["rss_mb"],
        "rss_growth_mb_per_min": slope,
        "max_growth_mb_per_min": args.max_growth_mb_per_min,
        "verdict": "memory keeps growing" if slope > args.max_growth_mb_per_min else "memory flat",
        "errors": sum(sum(s["errors"].values()) for s in samples),
        "swaps": swapper.swaps if swapper else 0,
        "swap_failures": swapper.failures if swapper else 0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    (args.out / "soak.md").write_text(markdown(report))
    plot(report, args.out / "soak.png")
    print(
        f"RSS {report['rss_start_mb']:.1f} → {report['rss_end_mb']:.1f} MB; growth over the second half "
        f"{slope:+.2f} MB/min: {report['verdict']}; wrote {args.out}/soak.json, soak.md, soak.png"
    )


if __name__ == "__main__":
    main()
