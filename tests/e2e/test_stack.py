"""The docker-compose stack, natively, with the commands its containers run: redis-server, the trainer
script, the scorer (`python -m app`), and a real Prometheus scraping it with the repository's config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import START_TIMEOUT_S, free_port, run_command, service, service_env, stop_process, wait_for

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def prometheus(workdir: Path, target: str) -> Iterator[str]:
    """A real Prometheus with the repository's config and alert rules, scraping ``target`` every second, for
    the ``with`` block (its URL); stopped on the way out, failure or not."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: `make tools` locates or installs it"
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    # the one scorer here in place of the replicas compose's DNS would name
    job = config["scrape_configs"][0]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [target.removeprefix("http://")]}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ROOT / "deploy" / "alerts.yml", workdir / "alerts.yml")  # rule_files is relative to the config
    port = free_port()
    args = [
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (workdir / "prometheus.log").open("w") as log:
        proc = subprocess.Popen([binary, *args], stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, "Prometheus", START_TIMEOUT_S)
            yield url
        finally:
            stop_process(proc)


def _api(prom: str, path: str, **params: str) -> Any:
    return httpx.get(f"{prom}/api/v1/{path}", params=params, timeout=5).json()["data"]


# the trainer script trains a model before the stack starts: a long timeout for a loaded two-core machine
@pytest.mark.timeout(900)
def test_trainer_scorer_and_prometheus(tmp_path: Path, redis_url: str) -> None:
    models = tmp_path / "models"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the trainer script calls `python`
    env = {**os.environ, "MODEL_REPOSITORY": str(models), "MODEL_NAME": "din", "EPOCHS": "1", "PATH": path}
    env["RUN_DIR"] = str(tmp_path / "run")
    first = run_command(["sh", "deploy/trainer.sh"], timeout=600, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (models / "din" / "1" / "model.onnx").exists()
    again = run_command(["sh", "deploy/trainer.sh"], timeout=120, cwd=ROOT, env=env)
    assert again.returncode == 0 and "nothing to do" in again.stdout  # one-shot: a filled volume is kept

    with service(service_env(models, redis_url), ROOT) as url, prometheus(tmp_path, url) as prom:
        with httpx.Client(base_url=url, timeout=10) as client:
            events = [
                {"user_id": f"s{u}", "item_id": f"i{i}", "timestamp": 1000 + i} for u in range(5) for i in range(30)
            ]
            assert client.post("/events", json={"events": events}).json() == {"stored": 150}
            for u in range(5):
                body = {"user_id": f"s{u}", "candidates": [{"item_id": f"i{j}"} for j in range(40)]}
                r = client.post("/score", json=body)
                assert r.status_code == 200 and r.json()["history_source"] == "store"

        def target_up() -> bool:
            targets = _api(prom, "targets")["activeTargets"]
            return bool(targets) and targets[0]["health"] == "up"

        def query(expr: str) -> float:
            result = _api(prom, "query", query=expr)["result"]
            return float(result[0]["value"][1]) if result else 0.0

        def rules_evaluated() -> bool:
            (group,) = _api(prom, "rules")["groups"]
            return all(r.get("lastEvaluation", "").startswith("20") and r["health"] == "ok" for r in group["rules"])

        wait_for(target_up, "Prometheus to scrape the scorer", 60)
        wait_for(lambda: query('sum(ctr_requests_total{endpoint="/score",status="200"})') >= 5, "requests", 60)
        wait_for(lambda: query('sum(ctr_batch_requests_count{model="din"})') >= 1, "batch metrics", 60)
        assert query('sum(ctr_candidates_scored_total{model="din"})') == 200
        assert query('ctr_model_info{provider="CPUExecutionProvider"}') == 1
        # the alert rules are loaded and evaluate against the real series; a healthy service fires none
        (group,) = _api(prom, "rules")["groups"]
        assert group["name"] == "ctr-scoring" and len(group["rules"]) >= 8
        wait_for(rules_evaluated, "rules evaluated", 60)
        # a rule evaluated before the first scrape sees no `up` series (CTRNoScorerUp goes pending); the next
        # evaluation after a scrape must clear it: a healthy service ends with no alert pending or firing
        wait_for(lambda: _api(prom, "alerts")["alerts"] == [], "no alert pending or firing", 60)
