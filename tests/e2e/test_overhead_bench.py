"""bench.overhead: the app called in-process against a real Redis, this checkout side by side with another
(here itself without its impression log, through --against DIR:impression_log=false); it reports each app's
CPU per request split into inference and the rest (figures are not asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import redis

import impressions
from tests.conftest import run_command, service_env

ROOT = Path(__file__).resolve().parents[2]


def test_overhead_benchmark_splits_each_apps_cpu(model_repository: Path, redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    repo = model_repository / "repo"
    cmd = [sys.executable, "-m", "bench.overhead", "--repository", str(repo), "--name", "din"]
    cmd += ["--candidates", "40", "--history", "10", "--users", "5", "--rounds", "2", "--requests", "10"]
    log_off = f"{ROOT}:impression_log=false"  # a Settings field: set for that app alone
    cmd += ["--against", log_off, "--out", str(out)]
    done = run_command(cmd, timeout=300, cwd=ROOT, env=service_env(repo, redis_url))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["apps"]) == {"this checkout", log_off}
    for app in report["apps"].values():
        assert app["store"] == "redis" and app["checkout"] == str(ROOT)
        assert app["inference_ms_per_request"] > 0 and app["rest_ms_per_request"] > 0
        assert len(app["rest_ms_per_round"]) == 2
        assert app["cpu_ms_per_request"] == pytest.approx(
            app["inference_ms_per_request"] + app["rest_ms_per_request"], rel=0.5
        )
    assert "rest" in done.stdout and "this checkout" in done.stdout
    # only this checkout logged: its 20 warm-up requests and 2 rounds of 10, each one record
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen(impressions.IMPRESSIONS_STREAM) == 40
