"""bench.peers: our DIN and DeepCTR-Torch's on the same tiny synthetic split, a few steps each, alternated in
their own processes (figures are not asserted: three steps time start-up, not training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import bench.peers
from tests.conftest import run_command

ROOT = Path(__file__).resolve().parents[2]


def test_peers_benchmark_runs_both_sides_on_the_same_samples(tmp_path: Path) -> None:
    pytest.importorskip("deepctr_torch", reason="the peers extra (make install installs it)")
    out = tmp_path / "peers.json"
    cmd = [sys.executable, "-m", "bench.peers", "--dataset", "synthetic", "--synthetic-users", "200"]
    cmd += ["--max-len", "10", "--max-steps", "3", "--rounds", "2", "--threads", "1", "--batch-size", "64"]
    # --checkout: ours from a checkout's own directory (here this one), the peer from this one
    cmd += ["--cache-dir", str(tmp_path / "cache"), "--checkout", str(ROOT), "--out", str(out)]
    done = run_command(cmd, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 2
    assert list(report["rounds"][0])[:2] == ["ours", "deepctr-torch"]  # alternated: ours first, then second
    assert list(report["rounds"][1])[:2] == ["deepctr-torch", "ours"]
    for row in report["rounds"]:
        assert row["ours"]["steps"] == row["deepctr-torch"]["steps"] == 3
        ours, peer = row["ours"]["samples_per_second"], row["deepctr-torch"]["samples_per_second"]
        assert row["ratio"] == pytest.approx(ours / peer) and len(row["load_average"]) == 2
    assert report["ours_samples_per_second"] > 0 and report["peer_samples_per_second"] > 0
    assert (report["batch_size"], report["threads"], report["ours_checkout"]) == (64, 1, str(ROOT))
    assert "DeepCTR-Torch" in done.stdout and "ratio" in done.stdout


def test_without_deepctr_torch_the_benchmark_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.peers, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"DeepCTR-Torch is not installed.*pip install -e '\.\[peers\]'"):
        bench.peers.main(["--dataset", "synthetic"])
