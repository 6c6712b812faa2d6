"""Static checks of the containers (no Docker engine here): compose files parse with a real compose
implementation, the Dockerfile passes hadolint, nginx accepts the load balancer's configuration, and the
dashboard only queries metrics the service exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from app.metrics import Metrics
from tests.conftest import nginx_binary, nginx_config

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed: `make tools` locates or installs it"
    return found


def test_compose_files_parse_with_docker_compose() -> None:
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        args = [a for f in files for a in ("-f", f)]
        proc = subprocess.run([tool("docker-compose"), *args, "config"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        config = yaml.safe_load(proc.stdout)
        assert {"redis", "trainer", "scorer", "lb", "prometheus", "grafana"} <= set(config["services"])
    scorer, lb = config["services"]["scorer"], config["services"]["lb"]
    assert scorer["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert scorer["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert "--appendonly" in config["services"]["redis"]["command"]
    # replicas: no host port of their own (they could not share one), ready before the balancer sends them work
    assert scorer["deploy"]["replicas"] >= 2 and "ports" not in scorer
    assert "/readyz" in " ".join(scorer["healthcheck"]["test"])
    assert lb["depends_on"]["scorer"]["condition"] == "service_healthy"
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+-alpine", lb["image"])  # the official image, pinned
    assert lb["volumes"][0].endswith("deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro")
    assert [p["published"] for p in lb["ports"]] == [8000]


def test_nginx_accepts_the_load_balancer_config(tmp_path: Path) -> None:
    config = nginx_config(tmp_path, ["127.0.0.1:18001", "127.0.0.1:18002"], 18080)
    proc = subprocess.run([nginx_binary(), "-t", "-c", str(config)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _location(config: str, path: str) -> str:
    match = re.search(rf"location = {re.escape(path)} \{{(.*?)\}}", config, re.DOTALL)
    assert match, path
    return re.sub(r"#.*", "", match.group(1))  # directives, not the comments that explain them


def test_load_balancer_retries_only_what_is_safe_and_keeps_connections_alive() -> None:
    """/score (a read) is retried on another replica after a timeout; /events (an append) only when its
    connection failed before anything was sent: nginx's `non_idempotent` must stay off there."""
    text = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    directives = re.sub(r"#.*", "", text)
    score, events = _location(text, "/score"), _location(text, "/events")
    assert re.search(r"proxy_next_upstream error timeout non_idempotent;", score)
    assert "proxy_next_upstream error timeout;" in events and "non_idempotent" not in events
    assert directives.count("non_idempotent") == 1
    # keep-alive to the replicas: a pool in the upstream, HTTP/1.1, the client's Connection header cleared
    assert re.search(r"upstream scorer \{[^}]*keepalive \d+;", directives)
    assert "proxy_http_version 1.1;" in directives and 'proxy_set_header Connection "";' in directives
    # the replicas are found through Docker's DNS, re-resolved as they are scaled
    assert "resolver 127.0.0.11" in directives and re.search(r"server scorer:8000 resolve max_fails=\d", directives)


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "USER 10001" in text and "nvidia/cuda" in text
    serve = text.split("AS serve")[1]
    assert "torch" not in serve.replace("no torch", "")  # the serving image carries no torch


def test_prometheus_config_scrapes_every_scorer_replica() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    # each replica by its own address (the service name's A records), never the load balancer
    assert job["dns_sd_configs"] == [{"names": ["scorer"], "type": "A", "port": 8000, "refresh_interval": "10s"}]
    assert job["metrics_path"] == "/metrics"
    promtool = tool("promtool")
    proc = subprocess.run(
        [promtool, "check", "config", "deploy/prometheus.yml"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_are_valid_and_fire_on_what_they_are_written_for() -> None:
    """promtool checks the rules and runs deploy/alerts_test.yml: each alert fires on its failure, none on a
    healthy service; and every series an alert reads is one the service exports."""
    promtool = tool("promtool")
    for args in (["check", "rules", "deploy/alerts.yml"], ["test", "rules", "deploy/alerts_test.yml"]):
        proc = subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = [r for g in yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    used = {m for r in rules for m in re.findall(r"\b(ctr_[a-z_]+)\b", r["expr"])}
    assert used and not used - exported_series(), used - exported_series()
    tested = (ROOT / "deploy" / "alerts_test.yml").read_text()
    for rule in rules:  # every alert has a firing case in the test file
        assert re.search(rf"alertname: {rule['alert']}\n\s+exp_alerts:\n\s+- exp_labels", tested), rule["alert"]


def exported_series() -> set[str]:
    """Series names the service's registry can expose (labelled families have no samples until used)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + s for f in Metrics().registry.collect() for s in suffixes.get(f.type, ("",))}


def test_every_dashboard_query_uses_metrics_the_service_exports() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "ctr-scoring.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    used = {m for e in exprs for m in re.findall(r"\b(ctr_[a-z_]+)\b", e)}
    exported = exported_series()
    missing = used - exported
    assert not missing, f"dashboard queries series the service does not export: {missing}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "latency", "batch", "queue", "errors", "store", "unknown", "provider", "replica"):
        assert topic in titles, topic
    # each replica and their total, side by side
    per_replica = [p for p in dashboard["panels"] if "by replica" in p["title"]]
    assert len(per_replica) >= 2
    for panel in per_replica:
        each, total = (t["expr"] for t in panel["targets"])
        assert "by (instance" in each and "instance" not in total
