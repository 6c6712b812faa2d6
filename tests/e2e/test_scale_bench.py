"""bench.scale at toy sizes, in seconds: it generates, prepares and trains in separate processes and
writes its JSON, markdown and PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import run_command

ROOT = Path(__file__).resolve().parents[2]


def test_scale_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scale"
    cmd = [sys.executable, "-m", "bench.scale", "--events", "2e4,5e4", "--steps", "3", "--eval-users", "50"]
    done = run_command([*cmd, "--threads", "1", "--out", str(out)], timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "scale.json").read_text())["rows"]
    assert [round(r["events"], -4) for r in rows] == [20_000, 50_000]  # about the sizes asked for
    for r, tag in zip(rows, ("2e4", "5e4"), strict=True):
        assert r["train_samples"] > 0.5 * r["events"] and r["vocabulary_items"] > 2
        assert 0.05 < r["prepare"]["peak_rss_gb"] < 4 and r["prepare"]["seconds"] > 0
        for model in ("din", "dien"):
            assert r[model]["samples_per_second"] > 0 and 0 <= r[model]["auc"] <= 1
            metrics = json.loads((out / "runs" / tag / model / "metrics.json").read_text())
            assert metrics["train_steps"] == 3 and metrics["data"]["eval_users"] == 50
            # 50 test users, not all 30% of them (whose samples number ≈ 0.47× the training samples')
            assert metrics["samples"]["test"] < 0.3 * r["train_samples"]
    table = (out / "scale.md").read_text()
    assert table.count("\n") == 4 and "DIEN samples/s" in table
    assert (out / "scale.png").read_bytes()[:4] == b"\x89PNG"
