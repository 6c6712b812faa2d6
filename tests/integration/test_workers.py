"""WORKERS=2: `python -m app` as uvicorn's supervisor and two scorer processes on one port, sharing a real
Redis; /metrics, answered by either, reports both (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from tests.conftest import RedisServer, free_port, service_env, start_service, stop_process
from tests.integration.test_lifecycle import publish

ROOT = Path(__file__).resolve().parents[2]
SCORED = 'ctr_scored_requests_total{model="din",version="1"}'


@dataclass
class Service:
    url: str
    metrics_dir: Path


def _metric(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{series} not in /metrics"
    return float(m.group(1))


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=5).text


def _worker_pids(metrics_dir: Path) -> set[int]:
    """Processes with live gauges: the workers serving (and any that died unswept)."""
    return {int(f.stem.rsplit("_", 1)[1]) for f in metrics_dir.glob("gauge_livesum_*.db")}


def _scored_in(counter_file: Path) -> float:
    """/score requests one worker answered, from its own file."""
    values = MmapedDict.read_all_values_from_file(str(counter_file))
    return sum(value for key, value, _, _ in values if '"ctr_scored_requests_total"' in key)


@contextmanager
def _only(service: Service, pid: int) -> Iterator[None]:
    """Every new connection goes to worker ``pid`` meanwhile: the others are paused (SIGSTOP). Briefly: uvicorn's
    supervisor kills a worker that leaves its health check unanswered for 5 s."""
    others = _worker_pids(service.metrics_dir) - {pid}
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def _wait_for_workers(url: str, n: int, timeout_s: float = 60) -> None:
    """/readyz answers once one worker serves; the other may still be loading its models."""
    deadline = time.monotonic() + timeout_s
    while _metric(_metrics(url), "ctr_workers") != n:
        assert time.monotonic() < deadline, f"ctr_workers never reached {n}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def service(
    model_repository: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    if redis_server.proc is None:  # an earlier test left it stopped
        redis_server.start()
    metrics_dir = tmp_path_factory.mktemp("metrics")
    # a previous run's counters in the operator's directory: the supervisor must wipe them
    stale = MmapedDict(str(metrics_dir / "counter_4194000.db"))
    stale.write_value(mmap_key("ctr_scored_requests", "ctr_scored_requests_total", ("model", "version"),
                               ("din", "1"), "stale"), 1000.0, 0.0)  # fmt: skip
    stale.close()
    env = service_env(model_repository / "repo", redis_server.url, WORKERS="2",
                      PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))  # fmt: skip
    proc, url = start_service(env, ROOT)
    try:
        _wait_for_workers(url, 2)
        yield Service(url, metrics_dir)
    finally:
        stop_process(proc)


def test_requests_to_either_worker_are_counted_once(service: Service) -> None:
    async def client(n: int) -> list[int]:
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as c:  # one connection each
            body = {"user_id": f"w{n}", "candidates": [{"item_id": f"i{j}"} for j in range(20)]}
            return [(await c.post("/score", json=body)).status_code for _ in range(5)]

    async def fire() -> list[int]:
        return [s for statuses in await asyncio.gather(*(client(n) for n in range(4))) for s in statuses]

    workers = sorted(_worker_pids(service.metrics_dir))
    assert len(workers) == 2
    for pid in workers:
        with _only(service, pid):
            assert asyncio.run(fire()) == [200] * 20
    answered = {pid: _scored_in(service.metrics_dir / f"counter_{pid}.db") for pid in workers}
    assert answered == dict.fromkeys(workers, 20)
    text = _metrics(service.url)
    assert _metric(text, SCORED) == 40  # both workers' files summed; the stale run's 1000 wiped
    assert _metric(text, 'ctr_candidates_scored_total{model="din",version="1"}') == 40 * 20
    assert _metric(text, "ctr_workers") == 2
    info = sorted(re.findall(r"^ctr_model_info(\{.*\}) ([0-9.]+)$", text, re.M))
    assert info == [  # one line per label set, not one per worker
        ('{model="dien",provider="CPUExecutionProvider",role="primary",version="1"}', "1.0"),
        ('{model="din",provider="CPUExecutionProvider",role="primary",version="1"}', "1.0"),
    ]
    assert re.search(r'^ctr_queue_depth\{model="din",version="1"\} 0\.0$', text, re.M)


def test_the_load_benchmark_measures_the_supervisor_and_all_its_workers(service: Service) -> None:
    """The system's socket table names one holder of the shared listening socket, a worker: bench.load's CPU
    figures and py-spy must take the supervisor, whose children are every worker."""
    from bench.load import server_process

    server = server_process(service.url)
    assert server is not None and server.cmdline()[1:3] == ["-m", "app"]
    assert _worker_pids(service.metrics_dir) <= {p.pid for p in server.children()}


def test_behaviours_posted_to_one_worker_are_seen_by_the_other(service: Service) -> None:
    writer, reader = sorted(_worker_pids(service.metrics_dir))
    events = [{"user_id": "shared", "item_id": f"h{i}", "category_id": "c"} for i in range(3)]
    with _only(service, writer):
        assert httpx.post(f"{service.url}/events", json={"events": events}, timeout=10).status_code == 200
    with _only(service, reader):
        r = httpx.post(f"{service.url}/score", json={"user_id": "shared", "candidates": [{"item_id": "x"}]}, timeout=10)
    assert r.status_code == 200
    assert [h["item_id"] for h in r.json()["history"]] == ["h2", "h1", "h0"]  # most recent first


def test_a_killed_worker_is_replaced_and_its_live_gauges_swept(service: Service) -> None:
    victim = min(_worker_pids(service.metrics_dir))
    body = {"user_id": "k", "candidates": [{"item_id": "x"}]}
    with _only(service, victim):
        assert all(httpx.post(f"{service.url}/score", json=body).status_code == 200 for _ in range(3))
    before = _metric(_metrics(service.url), SCORED)
    os.kill(victim, signal.SIGKILL)  # no lifespan end: its files stay until the replacement sweeps them
    deadline = time.monotonic() + 60
    while victim in (pids := _worker_pids(service.metrics_dir)) or len(pids) != 2:
        assert time.monotonic() < deadline, f"no replacement swept worker {victim}: {pids}"
        time.sleep(0.1)
    text = _metrics(service.url)
    assert _metric(text, "ctr_workers") == 2
    assert _metric(text, SCORED) == before  # the dead worker's counts stay in the total


def test_workers_without_redis_refuse_to_start(model_repository: Path) -> None:
    env = service_env(model_repository / "repo", None, WORKERS="2")
    proc = subprocess.run([sys.executable, "-m", "app", "--port", str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "WORKERS=2 needs REDIS_URL" in proc.stderr


def test_a_worker_that_cannot_start_stops_the_service(model_repository: Path, redis_url: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "repo" / "din", repo / "din")
    (repo / "din" / "1" / "model.onnx").write_bytes(b"this is not an onnx graph")  # passes the pre-flight check
    env = service_env(repo, redis_url, WORKERS="2")
    proc = subprocess.run([sys.executable, "-m", "app", "--port", str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 3  # uvicorn's start-up failure, as with one process
    assert "cannot load the model" in proc.stderr


def test_an_admin_rollback_sent_to_one_worker_reaches_the_other(repo: Path, redis_url: str, tmp_path: Path) -> None:
    publish(repo, "din", 2)
    env = service_env(repo, redis_url, WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
                      DEPLOYMENT_SYNC_INTERVAL_S="0.1")  # fmt: skip
    (tmp_path / "metrics").mkdir()
    proc, url = start_service(env, ROOT)
    try:
        _wait_for_workers(url, 2)
        service = Service(url, tmp_path / "metrics")
        admin, other = sorted(_worker_pids(service.metrics_dir))
        body = {"user_id": "r", "candidates": [{"item_id": "x"}]}
        with _only(service, other):
            assert httpx.post(f"{url}/score", json=body, timeout=10).json()["version"] == "2"
        with _only(service, admin):
            r = httpx.post(f"{url}/admin/models/din/rollback", json={"version": 1}, timeout=30)
            assert r.status_code == 200 and r.json()["primary"] == "1"
        deadline = time.monotonic() + 30
        with _only(service, other):
            while httpx.post(f"{url}/score", json=body, timeout=10).json()["version"] != "1":
                assert time.monotonic() < deadline, "the other worker never rolled back"
                time.sleep(0.05)
    finally:
        stop_process(proc)
