"""bench.profile: py-spy's collapsed stacks filed under the service's parts, as CPU-ms per request."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.profile import EVENT_LOOP, NATIVE, categorise, markdown, summarise

LOOP = "Runner.run (asyncio/runners.py:118)"
HANDLER = "score (app/routes/score.py:45)"


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (
            [
                "Thread.run (threading.py:982)",
                "LoadedModel.run (app/scorer.py:190)",
                "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:395)",
            ],
            "inference (ONNX Runtime)",
        ),
        (
            [
                LOOP,
                "solve_dependencies (fastapi/dependencies/utils.py:800)",
                "TypeAdapter.validate_python (pydantic/type_adapter.py:410)",
            ],
            "request validation (pydantic)",
        ),
        (
            [LOOP, HANDLER, "LoadedModel.encode (app/scorer.py:147)", "Lookup.__call__ (app/scorer.py:44)"],
            "feature encoding (id lookup)",
        ),
        (
            [LOOP, HANDLER, "RedisStore.recent (app/store.py:91)", "StreamWriter.writelines (asyncio/streams.py:346)"],
            "store read (redis client, decoding)",
        ),
        ([LOOP, "score (app/routes/score.py:80)"], "answer building and orjson"),
        ([LOOP], EVENT_LOOP),
        ([], NATIVE),
        (["something (elsewhere.py:1)"], "other Python"),
    ],
)
def test_the_innermost_matching_frame_decides(frames: list[str], expected: str) -> None:
    assert categorise(frames) == expected


def test_summarise_turns_samples_into_cpu_ms_per_request(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "thread (1): MainThread;" + LOOP + " 500\n"  # uvloop's C code running under the loop's frame
        "thread (2): inference_0;LoadedModel.run (app/scorer.py:190);Session.run (onnxruntime/x.py:1) 300\n"
        "thread (1): MainThread;" + LOOP + ";TypeAdapter.validate_python (pydantic/type_adapter.py:410) 100\n"
        "thread (3): inference_0 100\n"  # no Python frame at all
        "garbage line\n"
    )
    s = summarise(raw, rate=100, requests=50)  # 100 Hz: a sample is 10 ms
    assert s["samples"] == 1000
    assert s["cpu_ms_per_request"] == pytest.approx(
        {EVENT_LOOP: 100.0, "inference (ONNX Runtime)": 60.0, "request validation (pydantic)": 20.0, NATIVE: 20.0}
    )
    assert s["share"]["inference (ONNX Runtime)"] == pytest.approx(0.3)
    table = markdown({"c=1": s})
    assert "| inference (ONNX Runtime) | 60.00 |" in table and "| total | **200.00** |" in table


def test_samples_of_several_worker_processes_are_filed_the_same_way(tmp_path: Path) -> None:
    """py-spy --subprocesses (a WORKERS supervisor) puts the process chain first; command lines may hold ';'."""
    supervisor = 'process 10:"python -m app --port 8000"'
    worker = 'process 11:"python -B -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5)"'
    raw = tmp_path / "profile.txt"
    raw.write_text(
        f"{supervisor};{worker};thread (11): MainThread;" + LOOP + ";TypeAdapter.validate_python (pydantic/t.py:4) 30\n"
        f"{supervisor};{worker};thread (12): inference_0;LoadedModel.run (app/scorer.py:190) 70\n"
    )
    s = summarise(raw, rate=100, requests=10)
    assert s["cpu_ms_per_request"] == pytest.approx(
        {"request validation (pydantic)": 30.0, "inference (ONNX Runtime)": 70.0}
    )
