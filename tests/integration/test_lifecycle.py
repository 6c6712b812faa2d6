"""Model lifecycle on the real app: versions published while it serves, swaps, failures, rollback, splits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import runtime
from app.main import create_app
from app.settings import Settings
from app.versions import user_bucket
from training.export import export_run


def publish(repo: Path, name: str, version: int, damage: Callable[[Path], None] | None = None) -> Path:
    """Publish a copy of v1 as ``version`` the way the export does: complete in a hidden folder, then rename."""
    staging = repo / name / f".staging-test-{version}"
    shutil.copytree(repo / name / "1", staging)
    meta = json.loads((staging / "metadata.json").read_text())
    meta["version"] = version
    (staging / "metadata.json").write_text(json.dumps(meta))
    if damage is not None:
        damage(staging)
    os.rename(staging, repo / name / str(version))
    return repo / name / str(version)


def corrupt_graph(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"not an onnx graph")


def wrong_answers(folder: Path) -> None:
    """A graph that loads and runs but no longer gives the answers its export recorded."""
    with np.load(folder / "selfcheck.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["probability"] = arrays["probability"] + 0.01
    np.savez(folder / "selfcheck.npz", **arrays)


def _client(repo: Path, **overrides: object) -> TestClient:
    settings = Settings(model_repository=repo, default_model="din", **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def _score(c: TestClient, user: str = "u", **extra: object) -> dict:  # type: ignore[type-arg]
    r = c.post("/score", json={"user_id": user, "candidates": [{"item_id": "a"}], "history": [], **extra})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _status(c: TestClient, name: str = "din") -> dict:  # type: ignore[type-arg]
    return next(m for m in c.get("/models").json()["models"] if m["name"] == name)  # type: ignore[no-any-return]


def _slow_version(c: TestClient, version: str, seconds: float) -> None:
    batcher = c.app.state.components.registry.models["din"].deployments[version].batcher  # type: ignore[attr-defined]
    run = batcher._run

    def slow(items):  # type: ignore[no-untyped-def]
        time.sleep(seconds)
        return run(items)

    batcher._run = slow


def test_admin_load_swaps_without_failing_in_flight_requests(repo: Path) -> None:
    with _client(repo, request_timeout_ms=10_000) as c:
        assert _score(c)["version"] == "1"
        publish(repo, "din", 2)
        _slow_version(c, "1", 0.5)
        retired = c.app.state.components.registry.models["din"].deployments["1"]  # type: ignore[attr-defined]
        with ThreadPoolExecutor(4) as pool:
            in_flight = [pool.submit(_score, c, f"f{i}") for i in range(4)]
            _wait(lambda: retired.leases == 4, "the four requests hold leases on v1 when the swap happens")
            r = c.post("/admin/models/din/load", json={})
            assert r.status_code == 200, r.text
            assert r.json()["primary"] == "2"
            assert [f.result()["version"] for f in in_flight] == ["1"] * 4  # finished on the version they started on
        assert _score(c)["version"] == "2"
        status = _status(c)
        assert [v["version"] for v in status["versions"]] == ["2"] and status["pinned"] is False
        # the retired version's ONNX Runtime session is freed at once (it held ≈ 15 MB per swap otherwise)
        _wait(lambda: not hasattr(retired.model, "session"), "v1's session released")
        metrics = c.get("/metrics").text
        assert 'ctr_model_loads_total{model="din",outcome="loaded"} 2.0' in metrics
        assert 'ctr_scored_requests_total{model="din",version="1"} 5.0' in metrics


@pytest.mark.parametrize(
    ("damage", "reason"), [(corrupt_graph, "ONNX Runtime cannot load"), (wrong_answers, "self-check failed")]
)
def test_a_bad_version_is_refused_and_the_old_one_keeps_serving(
    repo: Path, damage: Callable[[Path], None], reason: str
) -> None:
    with _client(repo) as c:
        publish(repo, "din", 2, damage)
        r = c.post("/admin/models/din/load", json={"version": 2})
        assert r.status_code == 422 and reason in r.json()["detail"]
        assert _score(c)["version"] == "1"
        status = _status(c)
        assert status["primary"] == "1" and status["last_error"]["version"] == "2"
        assert reason in status["last_error"]["error"] and status["published"] == [1, 2]
        assert 'ctr_model_loads_total{model="din",outcome="failed"} 1.0' in c.get("/metrics").text
        assert c.get("/readyz").status_code == 200


def test_rollback_unload_and_version_pinned_requests(repo: Path) -> None:
    publish(repo, "din", 2)
    with _client(repo) as c:
        assert _score(c)["version"] == "2"  # start-up takes the newest
        assert c.post("/admin/models/din/rollback").status_code == 409  # nothing earlier was ever primary
        r = c.post("/admin/models/din/rollback", json={"version": 1})
        assert r.status_code == 200 and r.json()["primary"] == "1" and r.json()["pinned"] is True
        assert _score(c)["version"] == "1"
        r = c.post("/admin/models/din/rollback")  # back to the one before: 2
        assert r.json()["primary"] == "2"
        # a standby version answers only requests that name it
        assert c.post("/admin/models/din/load", json={"version": 1, "activate": False}).status_code == 200
        assert _score(c)["version"] == "2" and _score(c, version="1")["version"] == "1"
        unloaded = c.post("/score", json={"user_id": "u", "candidates": [{"item_id": "a"}], "version": "7"})
        assert unloaded.status_code == 404 and "no loaded version" in unloaded.text
        # unloading: a standby yes, the primary and the default model no, another model yes
        assert c.post("/admin/models/din/unload", json={"version": 2}).status_code == 409
        assert c.post("/admin/models/din/unload", json={"version": 1}).status_code == 200
        assert c.post("/admin/models/din/unload").status_code == 409
        assert c.post("/admin/models/dien/unload").status_code == 200
        r = c.post("/score", json={"user_id": "u", "model": "dien", "candidates": [{"item_id": "a"}]})
        assert r.status_code == 404
        assert c.post("/admin/models/dien/load").status_code == 200
        assert _score(c, model="dien")["model"] == "dien"
        assert c.post("/admin/models/nope/load").status_code == 404


def test_admin_requests_for_what_does_not_exist_say_so(repo: Path) -> None:
    with _client(repo) as c:
        for method, path, body in [
            ("POST", "/admin/models/din/load", {"version": 9}),
            ("POST", "/admin/models/din/rollback", {"version": 9}),
            ("PUT", "/admin/models/din/split", {"version": 9, "percent": 10}),
            ("POST", "/admin/models/din/unload", {"version": 9}),
            ("PUT", "/admin/models/nope/split", {"version": 1, "percent": 10}),
            ("DELETE", "/admin/models/nope/split", None),
            ("POST", "/admin/models/nope/rollback", {}),
        ]:
            r = c.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
            assert ("9" in r.json()["detail"]) or ("nope" in r.json()["detail"])
        assert c.put("/admin/models/din/split", json={"version": 2, "percent": 101}).status_code == 422
        assert c.post("/admin/models/din/load", json={"version": 0}).status_code == 422
        assert c.post("/admin/models/bad name/load").status_code == 422
        assert _status(c)["primary"] == "1" and _status(c)["failures"] == []  # nothing changed, nothing failed


def test_traffic_split_is_stable_per_user_and_counted_per_version(repo: Path) -> None:
    publish(repo, "din", 2)
    with _client(repo) as c:
        c.post("/admin/models/din/rollback", json={"version": 1})
        r = c.put("/admin/models/din/split", json={"version": 2, "percent": 30})
        assert r.status_code == 200 and r.json()["split"] == {"version": "2", "percent": 30.0}
        users = [f"user-{i}" for i in range(200)]
        first = {u: _score(c, u)["version"] for u in users}
        assert all(_score(c, u)["version"] == first[u] for u in users[:50])  # a user does not flip
        assert all((first[u] == "2") == (user_bucket("din", u) < 30) for u in users)
        share = sum(v == "2" for v in first.values()) / len(users)
        assert 0.2 < share < 0.4, share
        metrics = c.get("/metrics").text
        assert 'ctr_model_info{model="din",provider="CPUExecutionProvider",role="split",version="2"} 1.0' in metrics
        on_split = sum(v == "2" for v in first.values()) + sum(first[u] == "2" for u in users[:50])
        assert f'ctr_scored_requests_total{{model="din",version="2"}} {float(on_split)}' in metrics
        assert c.put("/admin/models/din/split", json={"version": 1, "percent": 10}).status_code == 409  # the primary
        assert c.put("/admin/models/din/split", json={"version": 2, "percent": 0}).status_code == 422
        # raising the share only adds users
        c.put("/admin/models/din/split", json={"version": 2, "percent": 60})
        assert all(_score(c, u)["version"] == "2" for u in users if first[u] == "2")
        assert c.delete("/admin/models/din/split").json()["split"] is None
        assert {_score(c, u)["version"] for u in users[:40]} == {"1"}


def test_polling_picks_up_exported_versions_and_never_a_half_written_or_broken_one(
    model_repository: Path, repo: Path
) -> None:
    with _client(repo, model_poll_interval_s=0.05) as c:
        stop = threading.Event()
        failures: list[str] = []

        def steady_load() -> None:
            while not stop.is_set():
                r = c.post("/score", json={"user_id": "p", "candidates": [{"item_id": "a"}], "history": []})
                if r.status_code != 200:
                    failures.append(r.text)

        loader = threading.Thread(target=steady_load)
        loader.start()
        try:
            # the real exporter, racing the poller: it must only ever see complete versions
            folder, _ = export_run(model_repository / "runs" / "din", repo, name="din")
            assert folder.name == "2"
            _wait(lambda: _status(c)["primary"] == "2", "v2 picked up by polling")
            publish(repo, "din", 3, corrupt_graph)
            _wait(lambda: (_status(c)["last_error"] or {}).get("version") == "3", "v3 failure recorded")
            time.sleep(0.3)  # several more polling rounds
        finally:
            stop.set()
            loader.join()
        assert failures == []
        status = _status(c)
        assert status["primary"] == "2" and [f["version"] for f in status["failures"]] == ["3"]
        metrics = c.get("/metrics").text
        assert 'ctr_model_loads_total{model="din",outcome="failed"} 1.0' in metrics  # not retried every round
        # a new model appearing in the repository is loaded too
        shutil.copytree(repo / "din" / "2", repo / ".staging-new")
        (repo / "din2").mkdir()
        meta = json.loads((repo / ".staging-new" / "metadata.json").read_text())
        (repo / ".staging-new" / "metadata.json").write_text(json.dumps({**meta, "name": "din2", "version": 1}))
        os.rename(repo / ".staging-new", repo / "din2" / "1")
        _wait(lambda: any(m["name"] == "din2" and m["primary"] for m in c.get("/models").json()["models"]), "din2")
        assert _score(c, model="din2")["model"] == "din2"


def test_start_up_serves_the_newest_version_that_works(repo: Path) -> None:
    publish(repo, "din", 2)
    publish(repo, "din", 3, corrupt_graph)
    with _client(repo) as c:
        status = _status(c)
        assert status["primary"] == "2" and status["last_error"]["version"] == "3" and status["pinned"] is True


def _wait(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out: {what}")


def test_a_cpu_host_logs_one_clear_line_and_no_onnx_runtime_errors(repo: Path) -> None:
    """PROVIDER=auto without CUDA: one warning per process, however many versions load, and none of ONNX
    Runtime's own ERROR/WARNING lines (its failed CUDA attempt read as a crash)."""
    if runtime.cuda_unavailable() is None:
        pytest.skip("this host has a working CUDA")
    publish(repo, "din", 2)
    script = (
        "import logging, sys; from pathlib import Path; from app.scorer import load_version\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "models = [load_version(Path(sys.argv[1]) / v, 'auto') for v in ('1', '2')]\n"
        "print(*[m.provider for m in models])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", script, str(repo / "din")], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["CPUExecutionProvider", "CPUExecutionProvider"]
    lines = done.stderr.splitlines()
    assert [line for line in lines if "[E:onnxruntime" in line or "[W:onnxruntime" in line or "ERROR" in line] == []
    fallback = [line for line in lines if "CUDA is not available" in line]
    assert len(fallback) == 1 and fallback[0].startswith("WARNING:app.runtime:PROVIDER=auto"), done.stderr
