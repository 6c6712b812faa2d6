"""Where a request's time goes, by sampling the server's stacks with py-spy while load runs.

The per-stage timings of ``/metrics`` (ctr_stage_seconds) say how long each stage took, waiting included;
a sampling profiler says what the CPU was doing. ``record`` samples every thread of the server process
(py-spy's raw "collapsed stacks" format); ``summarise`` files each sample under the part of the service
it belongs to, from the innermost frame outwards, and turns the counts into CPU-ms per request.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# (category, substrings of a frame "function (file:line)"): the innermost frame matching a rule decides
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("inference (ONNX Runtime)", ("onnxruntime", "LoadedModel.run", "LoadedModel._run_users")),
    ("request validation (pydantic)", ("pydantic",)),
    ("JSON parsing (FastAPI's json.loads)", ("json/",)),
    ("store read (redis client, decoding)", ("app/store.py", "redis/")),
    ("feature encoding (id lookup)", ("LoadedModel.encode", "Lookup.", "LoadedModel._categories")),
    ("metrics (prometheus-client)", ("prometheus_client",)),
    ("answer building and orjson", ("app/routes/score.py",)),
    ("batcher and thread hand-off", ("app/batcher.py", "concurrent/futures", "threading.py", "anyio/")),
    ("HTTP (uvicorn, httptools)", ("uvicorn/", "httptools")),
    ("framework (FastAPI, Starlette, middleware)", ("fastapi/", "starlette/", "app/middleware.py")),
)
EVENT_LOOP = "event loop (uvloop's C: sockets, callbacks)"
# the event loop's run call as the innermost Python frame: the thread is in uvloop's C code, and py-spy
# (without --idle) reports only threads that are running, so this is CPU, not waiting
_LOOP_FRAMES = ("Runner.run (", "BaseEventLoop.run_forever", "_run_once")
NATIVE = "native code (no Python frame)"
_PROCESSES = re.compile(r'^(?:process \d+:"[^"]*";)*')


def _binary() -> str | None:
    """py-spy from this environment (its venv's bin/, which need not be on PATH), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return _binary() is not None


def record(pid: int, seconds: float, out: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` and its child processes (a WORKERS supervisor's workers), every thread, without
    pausing them, for ``seconds`` into ``out``."""
    cmd = [
        _binary() or "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, math.ceil(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--threads",
        "--nonblocking",
        "--subprocesses",
        "--output",
        str(out),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def categorise(frames: list[str]) -> str:
    """Frames outermost first (py-spy's order) → the category of the innermost frame that matches."""
    if not frames:
        return NATIVE
    if frames[-1].startswith(_LOOP_FRAMES):
        return EVENT_LOOP
    for frame in reversed(frames):
        for category, needles in RULES:
            if any(n in frame for n in needles):
                return category
    return "other Python"


def summarise(raw: Path, rate: int, requests: int) -> dict[str, Any]:
    """Samples per category → CPU-ms per request and share of the samples (py-spy without --idle samples
    running threads only, so every sample is CPU)."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        # --subprocesses puts the process chain first (its command lines may hold ";"), then the thread
        frames = _PROCESSES.sub("", stack).split(";")[1:]
        counts[categorise(frames)] += int(n)
    total = sum(counts.values())
    return {
        "samples": total,
        "rate_hz": rate,
        "requests": requests,
        "cpu_ms_per_request": {k: 1e3 * v / rate / max(requests, 1) for k, v in counts.most_common()},
        "share": {k: v / max(total, 1) for k, v in counts.most_common()},
    }


def markdown(profiles: dict[str, dict[str, Any]]) -> str:
    """One column per profiled step: CPU-ms per request of each category."""
    steps = list(profiles)
    categories: list[str] = []
    for p in profiles.values():
        categories += [c for c in p["cpu_ms_per_request"] if c not in categories]
    lines = [
        "| where (py-spy samples of the server, CPU-ms per request) | " + " | ".join(steps) + " |",
        "| --- |" + " --- |" * len(steps),
    ]
    for c in categories:
        cells = [f"{profiles[s]['cpu_ms_per_request'].get(c, 0.0):.2f}" for s in steps]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    total = [f"**{sum(profiles[s]['cpu_ms_per_request'].values()):.2f}**" for s in steps]
    lines.append("| total | " + " | ".join(total) + " |")
    return "\n".join(lines) + "\n"
