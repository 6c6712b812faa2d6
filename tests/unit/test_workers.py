"""Multi-process mode's bookkeeping alone: the metrics directory, dead workers' files, removed series, settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.metrics import reset_multiprocess_dir, sweep_dead_processes
from app.runtime import inference_threads, session_threads
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_reset_empties_an_earlier_runs_metric_files(tmp_path: Path) -> None:
    old = tmp_path / "metrics"
    old.mkdir()
    for name in ("counter_11.db", "histogram_11.db", "gauge_livesum_11.db", "gauge_livemax_12.db", "notes.txt"):
        (old / name).write_bytes(b"x")
    reset_multiprocess_dir(old)
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]  # only prometheus_client's files go
    fresh = tmp_path / "not" / "there"
    reset_multiprocess_dir(fresh)
    assert fresh.is_dir()


def test_sweep_drops_the_live_gauges_of_dead_processes_only(tmp_path: Path) -> None:
    dead, alive = _dead_pid(), os.getpid()
    names = [
        f"{kind}_{pid}.db"
        for pid in (dead, alive)
        for kind in ("counter", "histogram", "gauge_livesum", "gauge_livemax")
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert sweep_dead_processes(tmp_path) == [dead]
    remaining = sorted(p.name for p in tmp_path.iterdir())
    # a dead worker's counts stay in the totals; its queue depth, model info and worker count do not
    assert remaining == sorted(n for n in names if str(alive) in n or not n.startswith("gauge_live"))
    assert sweep_dead_processes(tmp_path) == []


# run in a fresh interpreter: prometheus_client chooses multiprocess mode when it is imported
REMOVALS = """
import warnings
warnings.simplefilter("error")  # prometheus_client warns when remove() or clear() is used in this mode
from app.metrics import Metrics

m = Metrics()
m.publish_model_info([("din", "1", "CPU", "primary"), ("din", "2", "CPU", "standby")])
m.queue_depth.labels("din", "1").set(3)
m.queue_depth.labels("din", "2").set(1)
m.publish_model_info([("din", "2", "CPU", "primary")])  # v2 promoted, v1 retired
m.remove(m.queue_depth, "din", "1")
m.serving()
print(m.expose().decode())
"""


def test_removed_series_are_not_exported_in_multiprocess_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", REMOVALS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    kept = ("ctr_model_info", "ctr_queue_depth", "ctr_workers")
    samples = sorted(line for line in proc.stdout.splitlines() if line.startswith(kept))
    assert samples == [
        'ctr_model_info{model="din",provider="CPU",role="primary",version="2"} 1.0',
        'ctr_queue_depth{model="din",version="2"} 1.0',
        "ctr_workers 1.0",
    ]


ZEROS = """
from app.metrics import Metrics
m = Metrics()
m.model_known("din")
m.version_serving("din", "1")
m.publish_model_info([("din", "1", "CPU", "primary")])
m.serving()
print(m.expose().decode())
"""


def test_labelled_series_exist_at_zero_in_multiprocess_mode(tmp_path: Path) -> None:
    """A worker's series the dashboard reads are in the merged exposition before anything happened."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", ZEROS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = set(proc.stdout.splitlines())
    for series in (
        'ctr_store_errors_total{operation="read"} 0.0',
        'ctr_store_errors_total{operation="write"} 0.0',
        'ctr_unknown_ids_total{kind="item"} 0.0',
        'ctr_requests_total{endpoint="/score",status="503"} 0.0',
        'ctr_model_loads_total{model="din",outcome="failed"} 0.0',
        'ctr_scored_requests_total{model="din",version="1"} 0.0',
        'ctr_queue_depth{model="din",version="1"} 0.0',
    ):
        assert series in lines


def test_workers_need_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert Settings().workers == 1
    with pytest.raises(ValidationError, match="WORKERS=2 needs REDIS_URL"):
        Settings(workers=2)
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    assert Settings().workers == 3


def test_workers_share_the_cores_out_when_onnx_runtime_threads_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert session_threads(0, 1) == 0  # one process: ONNX Runtime's own default, as before
    assert session_threads(0, 2) == 4
    assert session_threads(0, 16) == 1
    assert session_threads(3, 2) == 3  # INTRA_OP_THREADS set: taken as it is


def test_a_worker_runs_cpu_batches_on_its_event_loop_unless_told_otherwise() -> None:
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert inference_threads(None, 1, cpu) == 1  # one process: a thread, the loop parses while a run goes on
    assert inference_threads(None, 2, cpu) == 0  # a core per process: no hand-off
    assert inference_threads(None, 2, cuda) == 1  # the loop must not wait for the GPU
    assert inference_threads(3, 2, cpu) == 3 and inference_threads(0, 1, cpu) == 0  # INFERENCE_WORKERS as set


def test_a_negative_inference_workers_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERENCE_WORKERS", "-1")
    with pytest.raises(ValidationError, match="inference_workers"):
        Settings()
    monkeypatch.setenv("INFERENCE_WORKERS", "0")  # the event loop's own thread: accepted
    assert Settings().inference_workers == 0
