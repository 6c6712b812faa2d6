"""The Kubernetes manifests (deploy/k8s): each overlay rendered by a real kustomize (`kubectl kustomize`),
every object validated against the Kubernetes API schemas of a pinned version (kubernetes-validate, strict,
offline), then checked against the service itself: selectors, ports, probes, environment names, metrics."""

from __future__ import annotations

import functools
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.routing import Match

from app.main import create_app
from app.settings import Settings
from tests.unit.test_deploy import exported_series, tool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31.0"  # the API version the manifests are written for (autoscaling/v2, policy/v1)
OVERLAYS = ("cpu", "gpu", "redis-cluster")
NAMESPACE = "ctr"

Manifest = dict[str, Any]


@functools.cache
def render(overlay: str) -> str:
    proc = subprocess.run(
        [tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def objects(overlay: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(render(overlay)) if doc]


def one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def pod_specs(docs: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    """(workload, its pod template) for every Deployment, StatefulSet, Job and CronJob."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield d, d["spec"]["template"]
        elif d["kind"] == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]


def containers(template: Manifest) -> list[Manifest]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [tool("kubernetes-validate"), "--kubernetes-version", KUBERNETES_VERSION, "--strict", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render(overlay))
    proc = validate(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    # every object was checked against a schema: a kind without one (a CRD) only warns
    assert "WARN" not in output and "ERROR" not in output, output
    assert output.count("passed for resource") == len(objects(overlay))


def test_the_validator_rejects_a_misspelled_field(tmp_path: Path) -> None:
    """The check above can fail: strict validation refuses a field the API does not have."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(render("cpu").replace("  revisionHistoryLimit:", "  revisionHistoryLimt:", 1))
    proc = validate(broken)
    assert proc.returncode != 0 and "revisionHistoryLimt" in proc.stdout + proc.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_between_objects_resolve(overlay: str) -> None:
    docs = objects(overlay)
    for d in docs:  # one namespace for all (kustomize v2.0.3 once dropped it from a merged ConfigMap)
        assert d["kind"] == "Namespace" or d["metadata"].get("namespace") == NAMESPACE, d["metadata"]
    templates = {d["metadata"]["name"]: t for d, t in pod_specs(docs)}
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for d, template in pod_specs(docs):
        if d["kind"] in ("Deployment", "StatefulSet"):
            assert d["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        for c in containers(template):
            # pinned images: a tag, never latest
            assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", c["image"]), c["image"]
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
        if d["kind"] == "StatefulSet":
            assert one(docs, "Service", d["spec"]["serviceName"])
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        (template,) = [t for t in templates.values() if selector.items() <= t["metadata"]["labels"].items()]
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports and ports[port["targetPort"]] == port["port"], port
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= t["metadata"]["labels"].items() for t in templates.values())
    hpa = one(docs, "HorizontalPodAutoscaler", "scorer")
    target = hpa["spec"]["scaleTargetRef"]
    assert one(docs, target["kind"], target["name"])["apiVersion"] == target["apiVersion"]
    assert "replicas" not in one(docs, "Deployment", "scorer")["spec"]  # the autoscaler owns the count


def _scorer(docs: list[Manifest]) -> tuple[Manifest, Manifest, dict[str, str]]:
    """The scorer's pod template, its container and the environment it gets from its ConfigMap."""
    template = one(docs, "Deployment", "scorer")["spec"]["template"]
    (container,) = [c for c in template["spec"]["containers"] if c["name"] == "scorer"]
    (source,) = container["envFrom"]
    env = one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    return template, container, env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_scorer_is_configured_with_what_the_app_reads_and_serves(overlay: str) -> None:
    template, container, env = _scorer(objects(overlay))
    known = {name.upper() for name in Settings.model_fields}
    names = set(env) | {e["name"] for e in container["env"]}
    assert names <= known, names - known  # pydantic-settings would ignore a misspelt name silently
    api_key = {e["name"]: e for e in container["env"]}["API_KEY"]["valueFrom"]["secretKeyRef"]
    assert api_key == {"name": "ctr-api-key", "key": "API_KEY"}
    Settings.model_validate({k.lower(): v for k, v in env.items()})  # the values pass the app's own validation
    assert env["PROVIDER"] == ("cuda" if overlay == "gpu" else "cpu")

    app = create_app(Settings())  # built, not started: nothing loads

    def served(path: str) -> bool:
        """A GET of ``path`` reaches one of the app's routes (what a probe or a scrape sends)."""
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
        return any(route.matches(scope)[0] == Match.FULL for route in app.routes)

    (port,) = container["ports"]
    assert port["containerPort"] == 8000  # the image's CMD (Dockerfile): --port 8000
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert served(http["path"]) and http["port"] == port["name"], probe
    scrape = template["metadata"]["annotations"]
    assert scrape["prometheus.io/scrape"] == "true" and served(scrape["prometheus.io/path"])
    assert int(scrape["prometheus.io/port"]) == port["containerPort"]

    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    assert int(env["INTRA_OP_THREADS"]) <= int(resources["requests"]["cpu"])  # no more threads than cores
    assert ("nvidia.com/gpu" in resources["limits"]) == (overlay == "gpu")
    (term,) = template["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()

    # the model repository: the shared volume, read-only where MODEL_REPOSITORY says, written by the trainer
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["mountPath"] == env["MODEL_REPOSITORY"] and mounts["models"]["readOnly"]
    docs = objects(overlay)
    assert one(docs, "PersistentVolumeClaim", "models")["spec"]["accessModes"] == ["ReadWriteMany"]
    templates = {d["metadata"]["name"]: t for d, t in pod_specs(docs)}
    for name in ("trainer", "retrain"):  # the Job and the CronJob
        (trainer,) = templates[name]["spec"]["containers"]
        trainer_env = one(docs, "ConfigMap", trainer["envFrom"][0]["configMapRef"]["name"])["data"]
        (mount,) = trainer["volumeMounts"]
        assert mount["mountPath"] == trainer_env["MODEL_REPOSITORY"] and not mount.get("readOnly"), name
        assert trainer_env["MODEL_NAME"] == env["DEFAULT_MODEL"]
    assert one(docs, "CronJob", "retrain")["spec"]["concurrencyPolicy"] == "Forbid"


def _adapter_rule() -> Manifest:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def test_the_autoscaler_follows_queue_wait_with_cpu_as_fallback(tmp_path: Path) -> None:
    hpa = one(objects("cpu"), "HorizontalPodAutoscaler", "scorer")
    pods, cpu = hpa["spec"]["metrics"]
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    assert pods["type"] == "Pods" and pods["pods"]["target"]["type"] == "AverageValue"
    assert hpa["spec"]["minReplicas"] >= 2  # the disruption budget lets one go
    # prometheus-adapter serves the metric the autoscaler asks for, from series the service exports
    rule = _adapter_rule()
    assert rule["name"]["as"] == pods["pods"]["metric"]["name"]
    query = rule["metricsQuery"]
    used = set(re.findall(r"\b(ctr_[a-z_]+)\{", query)) | set(re.findall(r"\b(ctr_[a-z_]+)\{", rule["seriesQuery"]))
    assert used and used <= exported_series(), used - exported_series()
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # the query as the adapter sends it for one pod is valid PromQL (promtool parses it in a rule)
    expr = query.replace("<<.LabelMatchers>>", 'namespace="ctr",pod="scorer-0"').replace("<<.GroupBy>>", "pod")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [{"record": "q", "expr": expr}]}]}))
    proc = subprocess.run([tool("promtool"), "check", "rules", str(rules)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_redis_cluster_has_three_masters_with_a_replica_each() -> None:
    docs = objects("redis-cluster")
    statefulset = one(docs, "StatefulSet", "redis-cluster")
    name, replicas = statefulset["metadata"]["name"], statefulset["spec"]["replicas"]
    assert replicas == 6
    headless = one(docs, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    config = one(docs, "ConfigMap", "redis-cluster")["data"]["redis.conf"]
    for line in ("cluster-enabled yes", "appendonly yes", "appendfsync always"):
        assert line in config.splitlines()
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["redis-server", "/etc/redis/redis.conf"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert command[command.index("--dir") + 1] == mounts["data"]  # nodes.conf and the append-only file persist
    assert Path(command[1]).parent == Path(mounts["config"])
    # the Job names every pod of the StatefulSet through the headless Service, 1 replica per master
    (job,) = one(docs, "Job", "redis-cluster-create")["spec"]["template"]["spec"]["containers"]
    script = job["command"][-1]
    assert f"for i in {' '.join(str(i) for i in range(replicas))}; do" in script
    assert f'host="{name}-$i.{headless["metadata"]["name"]}"' in script
    assert "--cluster create $nodes --cluster-replicas 1" in script
    assert job["image"] == container["image"]  # its redis-cli speaks the servers' version
    # the scorer uses the cluster: any node is a seed, reached through the headless Service's name
    _, _, env = _scorer(docs)
    assert env["REDIS_URL"] == f"redis://{headless['metadata']['name']}:6379/0" and env["REDIS_CLUSTER"] == "true"
    for overlay in ("cpu", "gpu"):  # the others keep the single-node Redis
        assert "REDIS_CLUSTER" not in _scorer(objects(overlay))[2]


@pytest.mark.parametrize(("retrain", "trains"), [("0", False), ("1", True)])
def test_trainer_script_retrains_only_when_asked(tmp_path: Path, retrain: str, trains: bool) -> None:
    """deploy/trainer.sh with a version already published: the Job leaves it, the CronJob (RETRAIN=1) trains
    the next one. `python` here is a stand-in that records its arguments (the training itself is tested by
    tests/e2e/test_stack.py)."""
    (tmp_path / "models" / "din" / "1").mkdir(parents=True)
    calls = tmp_path / "calls"
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{python.parent}:{os.environ['PATH']}",
        "MODEL_REPOSITORY": str(tmp_path / "models"),
        "RETRAIN": retrain,
        "RUN_DIR": str(tmp_path / "run"),
    }
    proc = subprocess.run(["sh", "deploy/trainer.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    if trains:
        train, export = calls.read_text().splitlines()
        assert train.startswith("-m training.train --dataset synthetic --model din")
        assert export == f"-m training.export --run {tmp_path / 'run'} --repository {tmp_path / 'models'} --name din"
    else:
        assert "nothing to do" in proc.stdout and not calls.exists()
