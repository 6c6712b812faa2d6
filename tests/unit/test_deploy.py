"""Static checks of the containers (no Docker engine here): compose files parse with a real compose
implementation, the Dockerfile passes hadolint, and the dashboard only queries metrics the service exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from app.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed: `make tools` locates or installs it"
    return found


def test_compose_files_parse_with_docker_compose() -> None:
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        args = [a for f in files for a in ("-f", f)]
        proc = subprocess.run([_tool("docker-compose"), *args, "config"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        config = yaml.safe_load(proc.stdout)
        assert {"redis", "trainer", "scorer", "prometheus", "grafana"} <= set(config["services"])
    scorer = config["services"]["scorer"]
    assert scorer["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert scorer["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert "--appendonly" in config["services"]["redis"]["command"]


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "USER 10001" in text and "nvidia/cuda" in text
    serve = text.split("AS serve")[1]
    assert "torch" not in serve.replace("no torch", "")  # the serving image carries no torch


def test_prometheus_config_scrapes_the_scorer() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["scorer:8000"] and job["metrics_path"] == "/metrics"
    promtool = _tool("promtool")
    proc = subprocess.run(
        [promtool, "check", "config", "deploy/prometheus.yml"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_are_valid_and_fire_on_what_they_are_written_for() -> None:
    """promtool checks the rules and runs deploy/alerts_test.yml: each alert fires on its failure, none on a
    healthy service; and every series an alert reads is one the service exports."""
    promtool = _tool("promtool")
    for args in (["check", "rules", "deploy/alerts.yml"], ["test", "rules", "deploy/alerts_test.yml"]):
        proc = subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = [r for g in yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    used = {m for r in rules for m in re.findall(r"\b(ctr_[a-z_]+)\b", r["expr"])}
    assert used and not used - _exported_series(), used - _exported_series()
    tested = (ROOT / "deploy" / "alerts_test.yml").read_text()
    for rule in rules:  # every alert has a firing case in the test file
        assert re.search(rf"alertname: {rule['alert']}\n\s+exp_alerts:\n\s+- exp_labels", tested), rule["alert"]


def _exported_series() -> set[str]:
    """Series names the service's registry can expose (labelled families have no samples until used)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + s for f in Metrics().registry.collect() for s in suffixes.get(f.type, ("",))}


def test_every_dashboard_query_uses_metrics_the_service_exports() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "ctr-scoring.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    used = {m for e in exprs for m in re.findall(r"\b(ctr_[a-z_]+)\b", e)}
    exported = _exported_series()
    missing = used - exported
    assert not missing, f"dashboard queries series the service does not export: {missing}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "latency", "batch", "queue", "errors", "store", "unknown", "provider"):
        assert topic in titles, topic
