"""bench.soak against a real service process, shortened to seconds: it finds the server's process by its
port, measures saturation, samples RSS and latency, and writes its JSON, markdown and PNG."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tests.conftest import run_command, service, service_env

ROOT = Path(__file__).resolve().parents[2]


def test_soak_benchmark_runs_end_to_end(model_repository: Path, redis_url: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "repo", repo)
    shutil.copytree(repo / "din" / "1", repo / "din" / ".staging")
    meta = json.loads((repo / "din" / ".staging" / "metadata.json").read_text())
    (repo / "din" / ".staging" / "metadata.json").write_text(json.dumps({**meta, "version": 2}))
    (repo / "din" / ".staging").rename(repo / "din" / "2")
    with service(service_env(repo, redis_url, API_KEY="k"), ROOT) as url:
        out = tmp_path / "soak"
        sizes = ["--candidates", "50", "--history", "20", "--users", "20", "--minutes", "0.05", "--sample-seconds", "1"]
        saturation = ["--saturation-concurrency", "4", "--saturation-seconds", "1", "--swap-every", "0.5"]
        target = ["--url", url, "--repository", str(repo), "--name", "din", "--api-key", "k"]
        cmd = [sys.executable, "-m", "bench.soak", *target, *sizes, *saturation, "--out", str(out)]
        done = run_command(cmd, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((out / "soak.json").read_text())
        assert len(report["samples"]) == 3 and report["errors"] == 0
        assert report["swaps"] >= 3 and report["swap_failures"] == 0  # versions swapped under the soak's load
        assert 0 < report["rate"] < report["saturation_requests_per_second"]
        assert all(s["rss_mb"] > 50 and s["requests_per_second"] > 0 for s in report["samples"])
        assert report["verdict"] in ("memory flat", "memory keeps growing")
        assert "MB/min" in (out / "soak.md").read_text()
        assert (out / "soak.png").read_bytes()[:4] == b"\x89PNG"
