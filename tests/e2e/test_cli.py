"""The README's offline path through the real command lines: train → export → in-process benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import run_command


def _run(*args: str, cwd: Path) -> str:
    proc = run_command([sys.executable, "-m", *args], timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_export_benchmark(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    run, repo = tmp_path / "run", tmp_path / "repo"
    data = [
        "--dataset",
        "synthetic",
        "--synthetic-users",
        "300",
        "--max-len",
        "20",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    out = _run(
        "training.train", *data, "--model", "dien", "--epochs", "1", "--out", str(run), "--no-progress", cwd=root
    )
    assert "test AUC" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model_config"]["evolution"] == "augru" and metrics["train_samples_per_second"] > 0

    out = _run("training.export", "--run", str(run), "--repository", str(repo), cwd=root)
    assert "published" in out
    meta = json.loads((repo / "dien" / "1" / "metadata.json").read_text())
    assert meta["parity"]["max_abs_diff_probability"] <= 1e-5

    bench_json = tmp_path / "inprocess.json"
    bench_args = ["--repository", str(repo), "--name", "dien", "--candidates", "50", "--history", "20"]
    bench_args += ["--min-seconds", "0.2", "--min-runs", "5", "--out", str(bench_json)]
    out = _run("bench.inprocess", *bench_args, cwd=root)
    assert "speedup" in out and "CPUExecutionProvider" in out
    report = json.loads(bench_json.read_text())
    (model,) = report["models"]
    assert model["serving"]["provider"] == "CPUExecutionProvider" and model["speedup"] > 0
    assert model["serving"]["candidates_per_second"] > 0 and model["flops_per_candidate"] > 0
    assert report["machine"]["sgemm_gflops"] > 0
