"""In-process ONNX Runtime benchmark: the serving graph against the naive (paper-form) graph.

    python -m bench.inprocess --repository DIR --name din,dien --candidates 200 --history 50 [--run RUN_DIR,...]

For each model, in one run: candidates/s and p50/p99 per call for the serving graph (per-user work
shared) and for the naive graph (the paper form, history repeated per candidate), their ratio as
"speedup", the execution provider that actually ran, FLOPs per candidate and the achieved fraction of
this machine's matrix-multiply ceiling (numpy sgemm, measured in the same run). Prints a table and
writes JSON.

Published versions hold no benchmark graphs: the naive graph is exported here, into a temporary folder,
from the checkpoint of the run the version came from (its metadata names the run directory; --run
overrides it), and checked against the serving graph before it is timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.runtime import RuntimeUnavailable, open_session, select_providers
from app.scorer import latest_version
from models.serving import NaiveServing
from training.export import GraphSpec, export_graph, random_inputs
from training.train import CHECKPOINT_NAME, load_checkpoint

DEFAULT_OUT = Path("bench/results")
NAIVE_FILE = "naive.onnx"
NAIVE_TOLERANCE = 1e-4  # the naive graph must answer as the serving graph does (same checkpoint)


def load_version(repository: Path, name: str, version: int | None) -> tuple[Path, dict[str, Any]]:
    """A version folder (the newest when none is given) and its metadata."""
    folder = latest_version(repository, name) if version is None else repository / name / str(version)
    return folder, json.loads((folder / "metadata.json").read_text())


def export_naive_graph(meta: dict[str, Any], run: Path | None, out_dir: Path) -> Path:
    """The version's naive graph, exported into out_dir: the paper form of the checkpoint in ``run`` (by
    default the run directory the version's metadata names) behind the serving interface."""
    run_dir = run if run is not None else Path(meta["training"]["out"])
    if not (run_dir / CHECKPOINT_NAME).is_file():
        raise SystemExit(
            f"{meta['name']} v{meta['version']}: no {CHECKPOINT_NAME} in {run_dir} to build the naive graph "
            "from; pass --run with the run directory it was exported from"
        )
    model, ckpt = load_checkpoint(run_dir)
    same = json.loads(json.dumps([ckpt["model_config"], ckpt["metrics"]])) == [meta["model_config"], meta["metrics"]]
    if not same:
        raise SystemExit(f"{run_dir}: not the run {meta['name']} v{meta['version']} was exported from")
    path = out_dir / NAIVE_FILE
    export_graph(NaiveServing(model), path, GraphSpec.from_metadata(meta))
    return path


def make_session(path: Path, provider: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        providers = select_providers(provider)
    except RuntimeUnavailable as e:
        raise SystemExit(str(e)) from None
    return ort.InferenceSession(str(path), opts, providers=providers)


def time_calls(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], min_seconds: float, min_runs: int
) -> np.ndarray:
    """Seconds per call, after warm-up, repeated for at least min_seconds and min_runs."""
    for _ in range(5):
        session.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def time_device_resident(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], min_seconds: float, min_runs: int
) -> np.ndarray:
    """Seconds per call with inputs already on the GPU and outputs left there (I/O binding): the graph's
    own time without host↔device copies, to set against `time_calls`, which includes them."""
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def call() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    for _ in range(5):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def summarise(times: np.ndarray, candidates: int) -> dict[str, float]:
    return {
        "runs": int(times.size),
        "p50_ms": float(1e3 * np.percentile(times, 50)),
        "p99_ms": float(1e3 * np.percentile(times, 99)),
        "mean_ms": float(1e3 * times.mean()),
        "candidates_per_second": float(candidates / times.mean()),
    }


def flops_per_candidate(meta: dict[str, Any], history: int, candidates_per_user: int) -> float:
    """Multiply-adds ×2 of the serving graph per candidate (per-user work amortised over the user's
    candidates); elementwise ops are left out, being small next to the matrix products."""
    cfg = meta["model_config"]
    d = cfg["item_dim"] + cfg["category_dim"]
    u = cfg["user_dim"] * len(cfg["user_feature_cardinalities"])
    kind = meta["model_type"]
    if kind not in ("base", "din", "dien"):
        return float("nan")  # DSIN (self-attention per session, a Bi-LSTM) is not modelled: no FLOP figure
    mlp_in = u + {"base": 2 * d, "din": 2 * d, "dien": 3 * d}[kind]
    widths = [mlp_in, *cfg["mlp_hidden"], 1]
    macs = sum(a * b for a, b in itertools.pairwise(widths))
    per_user = 0.0
    scorer = cfg.get("attention", "mlp")  # DIN's attention toolbox (models/attention.py)
    if kind == "din" and scorer in ("dot", "bilinear", "multihead"):
        macs += 2 * history * d  # scores and pooling
        macs += d * d if scorer == "multihead" else 0  # the query projection
        per_user = history * d * d * {"dot": 0, "bilinear": 1, "multihead": 2}[scorer]  # W k_l, [W_k; W_v] k_l
    elif kind == "din":
        att = [*cfg["attention_hidden"], 1]
        macs += d * att[0]  # the query part of layer 1
        macs += history * (d * att[0] + sum(a * b for a, b in itertools.pairwise(att)))  # q⊙k part + rest
        macs += history * d  # weighted sum pooling
        per_user = history * d * att[0]  # the key part of layer 1
    elif kind == "dien":
        macs += d * d + 2 * history * d  # attention projection, scores, (pooling is per user)
        macs += history * d * 3 * d  # AUGRU hidden projection per step
        per_user = history * (3 * d * d * 2 + 3 * d * d)  # extractor GRU + AUGRU input projection
    return 2.0 * (macs + per_user / candidates_per_user)


def sgemm_gflops(n: int = 2048, repeats: int = 3) -> float:
    """This machine's matrix-multiply ceiling, numpy float32 (what the CPU can do at best)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(
    repository: Path,
    name: str,
    version: int | None,
    candidates: int,
    history: int,
    users: int,
    threads: int,
    provider: str,
    min_seconds: float,
    min_runs: int,
    run: Path | None = None,
    naive: bool = True,
) -> dict[str, Any]:
    """Times the serving graph and, with ``naive``, the naive graph built from the run's checkpoint."""
    folder, meta = load_version(repository, name, version)
    spec = GraphSpec.from_metadata(meta)
    per_user = [candidates // users + (1 if i < candidates % users else 0) for i in range(users)]
    feed = random_inputs(np.random.default_rng(0), spec, [history] * users, per_user)
    result: dict[str, Any] = {
        "model": name,
        "version": meta["version"],
        "model_type": meta["model_type"],
        "candidates": candidates,
        "history": history,
        "users": users,
        "intra_op_num_threads": threads,
    }
    paths = {"serving": folder / meta["files"]["model"]}
    if provider != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers() and "model_cuda" in meta["files"]:
        # the service runs DIN's CUDA form there; the CPU form is timed beside it
        paths = {"serving": folder / meta["files"]["model_cuda"], "serving_cpu_form": paths["serving"]}
    with tempfile.TemporaryDirectory(prefix="bench-naive-") as tmp:
        if naive:
            paths["naive"] = export_naive_graph(meta, run, Path(tmp))
        answers = {}
        for graph, path in paths.items():
            session = make_session(path, provider, threads)
            times = time_calls(session, feed, min_seconds, min_runs)
            result[graph] = {**summarise(times, candidates), "provider": session.get_providers()[0], "file": path.name}
            answers[graph] = session.run(None, feed)
            if graph == "serving" and session.get_providers()[0] == "CUDAExecutionProvider":
                resident = time_device_resident(session, feed, min_seconds, min_runs)
                result["serving_device_resident"] = {**summarise(resident, candidates), "provider": "CUDA, I/O bound"}
    if naive:
        diff = max(float(np.abs(a - b).max()) for a, b in zip(answers["serving"], answers["naive"], strict=True))
        if diff > NAIVE_TOLERANCE:
            raise SystemExit(f"{name}: the naive graph answers {diff:.1e} away from the serving graph")
        result["naive"]["max_abs_diff_vs_serving"] = diff
        result["speedup"] = result["serving"]["candidates_per_second"] / result["naive"]["candidates_per_second"]
    fpc = flops_per_candidate(meta, history, candidates // users)
    result["flops_per_candidate"] = fpc
    result["serving"]["gflops"] = fpc * result["serving"]["candidates_per_second"] / 1e9
    return result


def alternate(
    repository: Path, names: list[str], candidates: int, history: int, threads: int, provider: str, rounds: int
) -> dict[str, dict[str, float]]:
    """The named models' serving graphs timed call by call in turn (A, B, C, A, B, C, …), so a slow spell of a
    shared machine lands on all of them alike: their ratios are comparable where back-to-back blocks are not.
    Each model gets its own inputs (its vocabulary), one user with ``history`` behaviours and ``candidates``.
    Sessions are opened as the service opens them (``app.runtime``: pool threads that do not spin)."""
    sessions, feeds = {}, {}
    for name in names:
        folder, meta = load_version(repository, name, None)
        try:
            providers = select_providers(provider)
        except RuntimeUnavailable as e:
            raise SystemExit(str(e)) from None
        sessions[name] = open_session(folder / meta["files"]["model"], providers, threads)
        feeds[name] = random_inputs(np.random.default_rng(0), GraphSpec.from_metadata(meta), [history], [candidates])
        for _ in range(5):
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            t0 = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append(time.perf_counter() - t0)
    first = np.median(times[names[0]])
    return {
        name: {**summarise(np.asarray(t), candidates), "p50_ratio_to_first": float(np.median(t) / first)}
        for name, t in times.items()
    }


def parallel_rate(session: ort.InferenceSession, feed: dict[str, np.ndarray], callers: int, seconds: float) -> float:
    """Calls per second of ``callers`` threads calling one session back to back (ONNX Runtime releases the
    GIL while it runs, so the calls overlap)."""
    counts = [0] * callers
    errors: list[BaseException] = []
    end = time.perf_counter() + seconds

    def call(i: int) -> None:
        try:
            while time.perf_counter() < end:
                session.run(None, feed)
                counts[i] += 1
        except BaseException as e:  # a thread that died would only read as a slow machine
            errors.append(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - start)


class CeilingProbe:
    """The serving graph's in-process rate, measured again and again (bench.load times it between its windows:
    this machine's speed halves and recovers within tens of seconds, so a window is only comparable with the
    ceiling measured just before and just after it).

    On CPU, two arrangements of the cores are timed back to back and the faster is the reading: one session
    with ``threads`` intra-op threads and one caller, and one single-threaded session with ``threads`` callers
    at once (how a service of one worker per core runs it). The second was 1.16–1.57× the first on 2 cores,
    whose two ONNX Runtime threads wait for each other at every parallel section (bench/README.md)."""

    def __init__(self, repository: Path, name: str, candidates: int, history: int, threads: int, provider: str) -> None:
        folder, meta = load_version(repository, name, None)
        cuda = provider != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers()
        key = "model_cuda" if cuda and "model_cuda" in meta["files"] else "model"  # what the service runs
        self.session = make_session(folder / meta["files"][key], provider, threads)
        self.feed = random_inputs(np.random.default_rng(0), GraphSpec.from_metadata(meta), [history], [candidates])
        self.candidates, self.threads = candidates, threads
        on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider"
        self.single = make_session(folder / meta["files"][key], "cpu", 1) if on_cpu and threads > 1 else None
        self.readings: list[float] = []  # every measurement (the faster arrangement), in order
        self.by_arrangement: dict[str, list[float]] = {"threads": [], "callers": []}
        time_calls(self.session, self.feed, 0.2, 5)  # warm-up
        if self.single is not None:
            time_calls(self.single, self.feed, 0.2, 5)

    def __call__(self, seconds: float = 1.5) -> float:
        """Candidates per second over at least ``seconds`` of back-to-back calls (each arrangement)."""
        times = time_calls(self.session, self.feed, seconds, 10)
        self.by_arrangement["threads"].append(float(self.candidates / times.mean()))
        if self.single is not None:
            rate = parallel_rate(self.single, self.feed, self.threads, seconds)
            self.by_arrangement["callers"].append(float(self.candidates * rate))
        self.readings.append(max(values[-1] for values in self.by_arrangement.values() if values))
        return self.readings[-1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--name", default="din", help="model name(s), comma-separated")
    p.add_argument("--version", type=int, default=None, help="default: the newest version")
    p.add_argument(
        "--run",
        default=None,
        help="run directories the versions were exported from, comma-separated in --name's order "
        "(default: the one each version's metadata names); the naive graph is built from their checkpoints",
    )
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--users", type=int, default=1, help="users in one call (candidates split among them)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra_op_num_threads")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each graph at least this long")
    p.add_argument("--min-runs", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/inprocess.json)")
    p.add_argument(
        "--alternate",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: time the named models' serving graphs call by call in turn, ROUNDS calls each, and print "
        "their ratios to the first (an old and a new graph compared on a busy machine)",
    )
    args = p.parse_args(argv)
    if args.alternate:
        names = [n for n in args.name.split(",") if n]
        rows = alternate(
            args.repository, names, args.candidates, args.history, args.threads, args.provider, args.alternate
        )
        for name, row in rows.items():
            print(
                f"{name:<12} p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                f"p50 ×{row['p50_ratio_to_first']:.3f} of {names[0]}"
            )
        out = args.out or DEFAULT_OUT / "inprocess-alternate.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))
        return

    ceiling = sgemm_gflops()
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "onnxruntime": ort.__version__,
            "available_providers": ort.get_available_providers(),
            "sgemm_gflops": ceiling,
        },
        "models": [],
    }
    print(f"numpy sgemm ceiling: {ceiling:.0f} GFLOP/s; ONNX Runtime providers: {ort.get_available_providers()}")
    print(f"{'model':<10} {'graph':<24} {'provider':<22} {'cand/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    names = [n for n in args.name.split(",") if n]
    runs: list[Path | None] = [Path(r) for r in args.run.split(",")] if args.run else [None] * len(names)
    if len(runs) != len(names):
        raise SystemExit(f"--run names {len(runs)} run directories for {len(names)} models")
    for name, run in zip(names, runs, strict=True):
        shape = (args.candidates, args.history, args.users, args.threads, args.provider)
        r = bench_model(args.repository, name, args.version, *shape, args.min_seconds, args.min_runs, run)
        on_cpu = r["serving"]["provider"] == "CPUExecutionProvider"
        if on_cpu:  # numpy's sgemm is the CPU's ceiling; it says nothing about a GPU's
            r["serving"]["fraction_of_sgemm_ceiling"] = r["serving"]["gflops"] / ceiling
        report["models"].append(r)
        for graph in ("serving", "serving_device_resident", "serving_cpu_form", "naive"):
            if graph not in r:
                continue
            g = r[graph]
            print(
                f"{name:<10} {graph:<24} {g['provider']:<22} {g['candidates_per_second']:>10,.0f} "
                f"{g['p50_ms']:>8.2f} {g['p99_ms']:>8.2f}"
            )
        ceiling_note = (
            f" = {100 * r['serving']['fraction_of_sgemm_ceiling']:.0f}% of the CPU's sgemm ceiling" if on_cpu else ""
        )
        print(
            f"{name:<10} speedup ×{r['speedup']:.2f} over the paper form; "
            f"{r['flops_per_candidate'] / 1e6:.2f} MFLOP/candidate, "
            f"{r['serving']['gflops']:.1f} GFLOP/s{ceiling_note}"
        )
    out = args.out or DEFAULT_OUT / "inprocess.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
