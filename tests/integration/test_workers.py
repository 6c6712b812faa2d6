"""WORKERS=2: `python -m app` as uvicorn's supervisor and two scorer processes on one port, sharing a real
Redis; /metrics, answered by either, reports both (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
from prometheus_client.mmap_dict import MmapedDict, mmap_key

import impressions
from tests.conftest import RedisServer, failed_start, service_env, start_service, stop_process, wait_for
from tests.integration.test_lifecycle import publish

ROOT = Path(__file__).resolve().parents[2]
SCORED = 'ctr_scored_requests_total{model="din",version="1"}'


@dataclass
class Service:
    url: str
    metrics_dir: Path
    redis_url: str


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


class Worker:
    """A keep-alive connection that one chosen worker accepted: every request on it goes to that worker.

    Each worker listens on a socket of its own (SO_REUSEPORT, app/listener.py) and the kernel picks one by a
    hash of the connection's addresses, so connections are opened until the chosen worker holds one."""

    def __init__(self, service: Service, pid: int) -> None:
        url = httpx.URL(service.url)
        for _ in range(200):
            conn = http.client.HTTPConnection(url.host, url.port, timeout=30)
            conn.connect()
            owner = _accepted_by(conn.sock.getsockname()[1], _worker_pids(service.metrics_dir))
            if owner == pid:
                self.conn = conn
                return
            conn.close()
        raise AssertionError(f"no connection reached worker {pid}")

    def post(self, path: str, body: object) -> tuple[int, Any]:
        self.conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
        r = self.conn.getresponse()
        return r.status, json.loads(r.read())

    def close(self) -> None:
        self.conn.close()


def _accepted_by(client_port: int, workers: set[int], timeout_s: float = 5) -> int:
    """The worker holding the server side of the connection from ``client_port`` (once it has accepted it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in workers:
            with contextlib.suppress(psutil.Error):
                if any(c.raddr and c.raddr.port == client_port for c in psutil.Process(pid).net_connections("tcp")):
                    return pid
        time.sleep(0.01)
    raise AssertionError(f"no worker accepted the connection from port {client_port}")


@contextmanager
def _on(service: Service, pid: int) -> Iterator[Worker]:
    worker = Worker(service, pid)
    try:
        yield worker
    finally:
        worker.close()


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
    stale.write_value(
        mmap_key("ctr_scored_requests", "ctr_scored_requests_total", ("model", "version"), ("din", "1"), "stale"),
        1000.0,
        0.0,
    )
    stale.close()
    env = service_env(
        model_repository / "repo", redis_server.url, WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)
    )
    proc, url = start_service(env, ROOT)
    try:
        _wait_for_workers(url, 2)
        yield Service(url, metrics_dir, redis_server.url)
    finally:
        stop_process(proc)


def test_requests_to_either_worker_are_counted_once(service: Service) -> None:
    workers = sorted(_worker_pids(service.metrics_dir))
    assert len(workers) == 2
    ids = []
    for n, pid in enumerate(workers):
        with _on(service, pid) as worker:
            body = {"user_id": f"w{n}", "candidates": [{"item_id": f"i{j}"} for j in range(20)]}
            answers = [worker.post("/score", body) for _ in range(20)]
            assert [status for status, _ in answers] == [200] * 20
            ids += [a["impression_id"] for _, a in answers]
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
    # each worker logs its own answers to the one stream (impression logging is on with REDIS_URL)
    assert len(set(ids)) == 40
    wait_for(lambda: _metric(_metrics(service.url), "ctr_impressions_logged_total") == 40, "40 records logged")
    with redis.Redis.from_url(service.redis_url) as r:
        logged = [json.loads(f[b"r"])["impression_id"] for _, f in r.xrange(impressions.IMPRESSIONS_STREAM)]
    assert sorted(set(ids) & set(logged)) == sorted(ids)


def test_the_load_benchmark_measures_the_supervisor_and_all_its_workers(service: Service) -> None:
    """The workers listen on sockets of their own: bench.load's CPU figures and py-spy must take their
    supervisor, whose children are every worker, not the one listener it finds first."""
    from bench.load import server_process

    server = server_process(service.url)
    assert server is not None and server.cmdline()[1:3] == ["-m", "app"]
    assert _worker_pids(service.metrics_dir) <= {p.pid for p in server.children()}


def test_behaviours_posted_to_one_worker_are_seen_by_the_other(service: Service) -> None:
    writer, reader = sorted(_worker_pids(service.metrics_dir))
    events = [{"user_id": "shared", "item_id": f"h{i}", "category_id": "c"} for i in range(3)]
    with _on(service, writer) as worker:
        assert worker.post("/events", {"events": events})[0] == 200
    with _on(service, reader) as worker:
        status, answer = worker.post("/score", {"user_id": "shared", "candidates": [{"item_id": "x"}]})
    assert status == 200
    assert [h["item_id"] for h in answer["history"]] == ["h2", "h1", "h0"]  # most recent first


def test_a_killed_worker_is_replaced_and_its_live_gauges_swept(service: Service) -> None:
    victim = min(_worker_pids(service.metrics_dir))
    body = {"user_id": "k", "candidates": [{"item_id": "x"}]}
    with _on(service, victim) as worker:
        assert [worker.post("/score", body)[0] for _ in range(3)] == [200] * 3
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
    proc = failed_start(env)
    assert proc.returncode == 2
    assert "WORKERS=2 needs REDIS_URL" in proc.stderr


def test_a_worker_that_cannot_start_stops_the_service(model_repository: Path, redis_url: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "repo" / "din", repo / "din")
    (repo / "din" / "1" / "model.onnx").write_bytes(b"this is not an onnx graph")  # passes the pre-flight check
    env = service_env(repo, redis_url, WORKERS="2")
    proc = failed_start(env)
    assert proc.returncode == 3  # uvicorn's start-up failure, as with one process
    assert "cannot load the model" in proc.stderr


def test_an_admin_rollback_sent_to_one_worker_reaches_the_other(repo: Path, redis_url: str, tmp_path: Path) -> None:
    publish(repo, "din", 2)
    env = service_env(
        repo,
        redis_url,
        WORKERS="2",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        DEPLOYMENT_SYNC_INTERVAL_S="0.1",
    )
    (tmp_path / "metrics").mkdir()
    proc, url = start_service(env, ROOT)
    try:
        _wait_for_workers(url, 2)
        service = Service(url, tmp_path / "metrics", redis_url)
        admin, other = sorted(_worker_pids(service.metrics_dir))
        body = {"user_id": "r", "candidates": [{"item_id": "x"}]}
        with _on(service, other) as worker:
            assert worker.post("/score", body)[1]["version"] == "2"
        with _on(service, admin) as worker:
            status, answer = worker.post("/admin/models/din/rollback", {"version": 1})
            assert status == 200 and answer["primary"] == "1"
        deadline = time.monotonic() + 30
        with _on(service, other) as worker:
            while worker.post("/score", body)[1]["version"] != "1":
                assert time.monotonic() < deadline, "the other worker never rolled back"
                time.sleep(0.05)
    finally:
        stop_process(proc)
