"""The README's main command, `make demo`, run for real: it trains, exports, serves and prints a curl."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


# `make demo` trains three epochs before it serves (≈ 35 s idle): the timeout allows that on a loaded two-core machine
@pytest.mark.timeout(900)
def test_make_demo_serves_what_it_trained(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # the embedded store, as for a newcomer
    cmd = ["make", "demo", f"PORT={port}", f"RUN_DIR={tmp_path / 'run'}", f"REPOSITORY={tmp_path / 'repo'}"]
    # a session of its own: make, the demo script and the server it starts are stopped together
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 600
        curl = None
        while time.monotonic() < deadline and curl is None:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if line.startswith("curl "):
                curl = line
        assert curl is not None, "".join(lines[-40:])
        args = shlex.split(curl)
        url, body = args[args.index("POST") + 1], args[args.index("-d") + 1]
        assert url == f"http://127.0.0.1:{port}/score"
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["history_source"] == "store" and len(answer["history"]) == 20
        probs = [s["probability"] for s in answer["scores"]]
        assert all(0 < p < 1 for p in probs) and len(probs) == 4
        assert re.search(r"published .*/repo/din/1", "".join(lines))
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to make and everything it started; SIGKILL to whatever is left of the group after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            proc.poll()  # reap make, the group's leader, so its pid stops counting as a member
            os.killpg(proc.pid, 0)  # ProcessLookupError once no member is left
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
