"""The docker-compose stack, natively, with the commands its containers run: redis-server, the trainer
script, the scorer (`python -m app`), and a real Prometheus scraping it with the repository's config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.conftest import RedisServer, free_port, service_env, start_service, stop_process

ROOT = Path(__file__).resolve().parents[2]


def _wait_for(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, ValueError, KeyError):  # Prometheus answers plain text until it is ready
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_trainer_scorer_and_prometheus(tmp_path: Path, redis_server: RedisServer) -> None:
    if redis_server.proc is None:
        redis_server.start()
    models = tmp_path / "models"
    env = {**os.environ, "MODEL_REPOSITORY": str(models), "MODEL_NAME": "din", "EPOCHS": "1",
           "RUN_DIR": str(tmp_path / "run"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    first = subprocess.run(["sh", "deploy/trainer.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (models / "din" / "1" / "model.onnx").exists()
    again = subprocess.run(["sh", "deploy/trainer.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to do" in again.stdout  # one-shot: a filled volume is kept

    scorer, url = start_service(service_env(models, redis_server.url), ROOT)
    prom_port = free_port()
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [url.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ROOT / "deploy" / "alerts.yml", tmp_path / "alerts.yml")  # rule_files is relative to the config
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (.ci/run installs Debian's package)"
    prometheus = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    prom = f"http://127.0.0.1:{prom_port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            events = [
                {"user_id": f"s{u}", "item_id": f"i{i}", "timestamp": 1000 + i} for u in range(5) for i in range(30)
            ]
            assert client.post("/events", json={"events": events}).json() == {"stored": 150}
            for u in range(5):
                r = client.post(
                    "/score", json={"user_id": f"s{u}", "candidates": [{"item_id": f"i{j}"} for j in range(40)]}
                )
                assert r.status_code == 200 and r.json()["history_source"] == "store"

        def target_up() -> bool:
            targets = httpx.get(f"{prom}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
            return bool(targets) and targets[0]["health"] == "up"

        _wait_for(target_up, 60, "Prometheus to scrape the scorer")

        def query(expr: str) -> float:
            result = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=2).json()["data"]["result"]
            return float(result[0]["value"][1]) if result else 0.0

        assert _wait_for(lambda: query('sum(ctr_requests_total{endpoint="/score",status="200"})') >= 5, 30, "requests")
        assert _wait_for(lambda: query('sum(ctr_batch_requests_count{model="din"})') >= 1, 30, "batch metrics")
        assert query('sum(ctr_candidates_scored_total{model="din"})') == 200
        assert query('ctr_model_info{provider="CPUExecutionProvider"}') == 1
        # the alert rules are loaded and evaluate against the real series; a healthy service fires none
        (group,) = httpx.get(f"{prom}/api/v1/rules", timeout=2).json()["data"]["groups"]
        assert group["name"] == "ctr-scoring" and len(group["rules"]) >= 8
        assert _wait_for(lambda: all(r.get("lastEvaluation", "").startswith("20") and r["health"] == "ok"
                                     for r in httpx.get(f"{prom}/api/v1/rules", timeout=2).json()["data"]["groups"][0]
                                     ["rules"]), 30, "rules evaluated")  # fmt: skip
        assert httpx.get(f"{prom}/api/v1/alerts", timeout=2).json()["data"]["alerts"] == []
    finally:
        stop_process(prometheus)
        stop_process(scorer)
