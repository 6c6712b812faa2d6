"""Training at scale: synthetic logs of growing size, generated, prepared and trained on, each step in its
own process so its time and peak memory are its own.

    python -m bench.scale --events 1e6,1e7,1e8 --steps 300 --out runs/scale

Per size: generation (``training.synthesize``: seconds, peak RSS), preparation (``training.prepare`` from
the parquet parts into the cache: seconds, peak RSS) and DIN and DIEN training (``training.train --max-steps``
from that cache: the loop's samples/s from metrics.json, and the process's peak RSS). Validation and test
run on ``--eval-users`` users so a 10^8 log's evaluation does not dominate. Writes scale.json, scale.md
(a table) and scale.png (the curves) into --out; the logs stay under --out/logs unless --drop-logs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PNG_NAME, JSON_NAME, MARKDOWN_NAME = "scale.png", "scale.json", "scale.md"


def run_measured(cmd: list[str], log_path: Path) -> dict[str, float]:
    """Run ``cmd`` (output to ``log_path``); its wall seconds, CPU seconds (user + system: the figure that
    survives a shared machine) and peak RSS (GB), from the kernel's accounting of that one child (wait4)."""
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9}  # maxrss: KiB


def measure_size(events: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    py = sys.executable
    tag = f"{events:.0e}".replace("+0", "").replace("+", "")
    logs, cache, runs = out / "logs" / tag, out / "cache" / tag, out / "runs" / tag
    runs.mkdir(parents=True, exist_ok=True)
    gen = run_measured(
        [py, "-m", "training.synthesize", "--events", str(events), "--out", str(logs), "--seed", str(args.seed)],
        runs / "synthesize.log",
    )
    written = json.loads((logs / "synthetic.json").read_text())
    data_flags = ["--dataset", "events", "--data-dir", str(logs), "--cache-dir", str(cache)]
    data_flags += ["--eval-users", str(args.eval_users), "--seed", str(args.seed)]
    if cache.exists():
        shutil.rmtree(cache)
    prep = run_measured([py, "-m", "training.prepare", *data_flags], runs / "prepare.log")
    prepared = json.loads((runs / "prepare.log").read_text().strip().splitlines()[-1])
    row: dict[str, Any] = {
        "events": written["events"],
        "users": written["config"]["n_users"],
        "items": written["config"]["n_items"],
        "vocabulary_items": prepared["vocabulary"]["items"],
        "train_samples": prepared["samples"]["train"],
        "generate": gen,
        "prepare": prep,
    }
    for model in args.models:
        run_dir = runs / model
        flags = ["--model", model, "--out", str(run_dir), "--max-steps", str(args.steps), "--epochs", "1"]
        flags += ["--batch-size", str(args.batch_size), "--no-progress"]
        if args.threads:
            flags += ["--threads", str(args.threads)]
        if args.mba_lambda is not None:
            flags += ["--mba-lambda", str(args.mba_lambda)]
        measured = run_measured([py, "-m", "training.train", *data_flags, *flags], runs / f"{model}.log")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        row[model] = {**measured, "samples_per_second": metrics["train_samples_per_second"], "auc": metrics["auc"]}
    if args.drop_logs:
        shutil.rmtree(logs)
    return row


def markdown(rows: list[dict[str, Any]], models: list[str]) -> str:
    head = "| events | users / items | generation (CPU) | preparation (CPU) | prep. peak RSS |"
    head += "".join(f" {m.upper()} samples/s (RSS) |" for m in models)
    lines = [head, "|" + " --- |" * (5 + len(models))]
    for r in rows:
        cells = [
            f"{r['events']:,}",
            f"{r['users']:,} / {r['items']:,}",
            f"{r['generate']['seconds']:.1f} s ({r['generate']['cpu_seconds']:.1f} s)",
            f"{r['prepare']['seconds']:.1f} s ({r['prepare']['cpu_seconds']:.1f} s)",
            f"{r['prepare']['peak_rss_gb']:.2f} GB",
        ]
        cells += [f"{r[m]['samples_per_second']:,.0f} ({r[m]['peak_rss_gb']:.1f} GB)" for m in models]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [r["events"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    # CPU seconds: wall time on a shared machine measures the other tenants
    axes[0].plot(events, [r["prepare"]["cpu_seconds"] for r in rows], "o-", label="preparation")
    axes[0].plot(events, [r["generate"]["cpu_seconds"] for r in rows], "s--", label="generation")
    axes[0].set_ylabel("CPU seconds")
    axes[0].set_yscale("log")
    axes[1].plot(events, [r["prepare"]["peak_rss_gb"] for r in rows], "o-", label="preparation")
    for m in models:
        axes[1].plot(events, [r[m]["peak_rss_gb"] for r in rows], "s--", label=f"{m.upper()} training")
        axes[2].plot(events, [r[m]["samples_per_second"] for r in rows], "o-", label=m.upper())
    axes[1].set_ylabel("peak RSS (GB)")
    axes[2].set_ylabel("training samples/s")
    for ax, title in zip(axes, ("CPU time", "memory", "training throughput"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("events")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", default="1e6,1e7", help="comma-separated log sizes (1e8 takes ≈ 20 min)")
    p.add_argument("--steps", type=int, default=300, help="training steps timed per model and size")
    p.add_argument("--models", default="din,dien")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-users", type=int, default=1000, help="users validated and tested on per run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mba-lambda", type=float, default=None, help="passed to training (default: its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-logs", action="store_true", help="delete each generated log after its runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    sizes = [int(float(e)) for e in args.events.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for events in sizes:
        rows.append(measure_size(events, args, out))
        print(json.dumps(rows[-1]), flush=True)
        # written after every size: a long run that is stopped keeps what it measured
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        (out / JSON_NAME).write_text(json.dumps({**settings, "rows": rows}, indent=2))
    (out / MARKDOWN_NAME).write_text(markdown(rows, args.models))
    plot(rows, args.models, out / PNG_NAME)
    print(markdown(rows, args.models))


if __name__ == "__main__":
    main()
