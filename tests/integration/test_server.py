"""The service as a real uvicorn process (`python -m app`): concurrency, batching, start-up failures."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import failed_start, service_env, start_service, stop_process

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server(model_repository: Path, redis_url: str) -> Iterator[str]:
    env = service_env(model_repository / "repo", redis_url, MAX_QUEUE_DELAY_MS="5", INTRA_OP_THREADS="1")
    proc, url = start_service(env, ROOT)
    yield url
    stop_process(proc)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_concurrent_requests_are_merged_into_fewer_runs(server: str) -> None:
    async def fire() -> list[int]:
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            await client.post("/events", json={"events": [{"user_id": f"c{i}", "item_id": "i1"} for i in range(32)]})
            bodies = [{"user_id": f"c{i}", "candidates": [{"item_id": f"i{j}"} for j in range(50)]} for i in range(32)]
            rs = await asyncio.gather(*(client.post("/score", json=b) for b in bodies))
            return [r.status_code for r in rs]

    assert asyncio.run(fire()) == [200] * 32
    text = httpx.get(f"{server}/metrics").text
    runs = _metric(text, 'ctr_batch_requests_count{model="din"}')
    requests = _metric(text, 'ctr_batch_requests_sum{model="din"}')
    assert requests == 32  # warm-up runs go straight to the model, not through the batcher
    assert runs < 32, f"{runs} runs for 32 concurrent requests: nothing was merged"
    assert _metric(text, 'ctr_candidates_scored_total{model="din",version="1"}') == 32 * 50


def test_start_up_fails_loudly_on_an_empty_repository(tmp_path: Path) -> None:
    proc = failed_start(service_env(tmp_path, None))
    assert proc.returncode != 0
    assert "not found in repository" in proc.stderr or "not in repository" in proc.stderr


def test_start_up_fails_loudly_on_a_corrupt_model(model_repository: Path, tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "repo" / "din", repo / "din")
    (repo / "din" / "1" / "model.onnx").write_bytes(b"this is not an onnx graph")
    proc = failed_start(service_env(repo, None))
    assert proc.returncode != 0
    assert "cannot load the model" in proc.stderr


def test_provider_cuda_without_cuda_refuses_to_start(model_repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    from app.scorer import LoadedModel, ModelLoadError

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ModelLoadError, match="PROVIDER=cuda"):
        LoadedModel(model_repository / "repo" / "din" / "1", provider="cuda")


def test_each_provider_runs_its_form_of_the_graph(model_repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DIN's CUDA form runs only where CUDA does: offered CUDA that cannot start (this machine has no GPU),
    ONNX Runtime falls back to the CPU, and so does the graph."""
    import onnxruntime as ort

    from app.scorer import LoadedModel

    folder = model_repository / "repo" / "din" / "1"
    cpu = LoadedModel(folder, provider="cpu")
    assert (cpu.provider, cpu.graph_file) == ("CPUExecutionProvider", "model.onnx")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    offered = LoadedModel(folder, provider="auto")
    on_gpu = offered.provider == "CUDAExecutionProvider"
    assert offered.graph_file == ("model_cuda.onnx" if on_gpu else "model.onnx")
    dien = LoadedModel(model_repository / "repo" / "dien" / "1", provider="auto")
    assert dien.graph_file == "model.onnx"  # DIEN has one form
