"""bench.load against a real service process: it seeds, sweeps, reads the server's metrics and writes
its JSON, markdown and PNG (figures themselves are not asserted: these machines are shared)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import redis

from app.store import decode_stored
from tests.conftest import run_command, service, service_env

ROOT = Path(__file__).resolve().parents[2]
SIZES = ["--candidates", "50", "--history", "20", "--users", "20"]


def test_load_benchmark_runs_end_to_end(model_repository: Path, redis_url: str, tmp_path: Path) -> None:
    with service(service_env(model_repository / "repo", redis_url), ROOT) as url:
        out = tmp_path / "load"
        repo = str(model_repository / "repo")
        steps = ["--concurrency", "1,4", "--rates", "40", "--window", "0.5", "--max-windows", "2", "--processes", "2"]
        target = ["--url", url, "--repository", repo, "--name", "din"]
        cmd = [sys.executable, "-m", "bench.load", *target, *SIZES, *steps, "--profile", "--out", str(out)]
        done = run_command(cmd, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((out / "load.json").read_text())
        assert [(s["mode"], s["level"]) for s in report["steps"]] == [("closed", 1.0), ("closed", 4.0), ("open", 40.0)]
        for step in report["steps"]:
            assert step["requests_per_second"] > 0 and step["errors"] == {}
            assert step["p50_ms"] <= step["p99_ms"] and step["fraction_of_ceiling"] > 0
            # every window set against the ceilings measured just before and after it; the step is its last
            last = step["window_detail"][-1]
            assert len(step["window_detail"]) == step["windows"] and all(
                w["ceiling_candidates_per_second"] > 0 for w in step["window_detail"]
            )
            assert step["fraction_of_ceiling"] == last["fraction_of_ceiling"]
            assert step["fraction_of_ceiling"] == last["candidates_per_second"] / last["ceiling_candidates_per_second"]
            assert step["server"]["cpu_ms_per_request"] > 0
            assert (
                step["fraction_of_best_ceiling"]
                == step["candidates_per_second"] / report["best_ceiling_candidates_per_second"]
            )
            assert step["server"]["mean_requests_per_batch"] >= 1 and step["client_cpu"] > 0
            stages = step["server"]["stages_ms"]
            assert all(stages[k] > 0 for k in ("parse", "store", "encode", "queue", "inference", "serialize"))
            assert stages["server_total"] >= stages["inference"] and stages["other"] >= 0
        assert report["best_ceiling_candidates_per_second"] >= report["ceiling_candidates_per_second"] > 0
        for step in report["steps"][:2]:  # closed-loop steps carry py-spy's view of the server's CPU
            cpu = step["profile"]["cpu_ms_per_request"]
            assert step["profile"]["requests"] > 0 and cpu["inference (ONNX Runtime)"] > 0
            assert (out / step["profile"]["raw"]).stat().st_size > 0
        assert "profile" not in report["steps"][2]
        assert "| inference (ONNX Runtime) |" in (out / "load.md").read_text()
        assert "| closed | 4 |" in (out / "load.md").read_text() and "| parse |" in (out / "load.md").read_text()
        assert (out / "load.png").read_bytes()[:4] == b"\x89PNG"
        with redis.Redis.from_url(redis_url) as client:
            # seeded through /events with the requested history length
            assert len(decode_stored(client.get("ctr:hist:load-3"))) == 20


def test_load_benchmark_spreads_over_replicas(model_repository: Path, redis_url: str, tmp_path: Path) -> None:
    """Two scorer processes sharing one Redis: the load reaches both and the server's view sums them."""
    env = service_env(model_repository / "repo", redis_url)
    with service(env, ROOT) as u1, service(env, ROOT) as u2:
        out, repo = tmp_path / "load", str(model_repository / "repo")
        steps = ["--concurrency", "2", "--window", "0.5", "--max-windows", "2"]
        target = ["--url", f"{u1},{u2}", "--repository", repo, "--name", "din"]
        cmd = [sys.executable, "-m", "bench.load", *target, *SIZES, *steps, "--processes", "2", "--out", str(out)]
        done = run_command(cmd, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((out / "load.json").read_text())
        (step,) = report["steps"]
        assert report["replicas"] == 2 and step["errors"] == {} and step["server"]["cpu_ms_per_request"] > 0
        for url in (u1, u2):  # both replicas scored requests (users were seeded through the first only)
            metrics = httpx.get(f"{url}/metrics").text
            din = 'ctr_scored_requests_total{model="din",version="1"} '  # dien's series exists too, at 0
            (scored,) = [line for line in metrics.splitlines() if line.startswith(din)]
            assert float(scored.split()[-1]) > 0
        odd = run_command([*cmd[:-2], "--processes", "3", "--out", str(out)], timeout=120, cwd=ROOT)
        assert odd.returncode != 0 and "multiple of the 2 replicas" in odd.stderr
