from __future__ import annotations

import logging

import pytest

from app import runtime
from app.runtime import CUDA, RuntimeUnavailable, select_providers, session_options


@pytest.fixture(autouse=True)
def _fresh_probe() -> None:
    """The CUDA probe and the fallback warning are once per process: each test starts without them."""
    runtime.cuda_unavailable.cache_clear()
    runtime._warn_cpu_fallback.cache_clear()


@pytest.mark.parametrize(
    ("cuda", "choice", "expected"),
    [
        (False, "auto", ["CPUExecutionProvider"]),
        (False, "cpu", ["CPUExecutionProvider"]),
        (True, "cpu", ["CPUExecutionProvider"]),
        (True, "auto", [CUDA, "CPUExecutionProvider"]),
        (True, "cuda", [CUDA, "CPUExecutionProvider"]),
    ],
)
def test_select_providers(cuda: bool, choice: str, expected: list[object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cuda_unavailable", lambda: None if cuda else "libcublasLt.so.13: not found")
    assert select_providers(choice) == expected


def test_cuda_asked_for_without_cuda_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cuda_unavailable", lambda: "libcublasLt.so.13: not found")
    with pytest.raises(RuntimeUnavailable, match=r"PROVIDER=cuda but CUDA is not available: libcublasLt\.so\.13"):
        select_providers("cuda")


def test_the_cpu_fallback_is_one_warning_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime, "cuda_unavailable", lambda: "libcublasLt.so.13: not found")
    with caplog.at_level(logging.WARNING, logger="app.runtime"):
        for _ in range(3):  # three versions loaded
            assert select_providers("auto") == ["CPUExecutionProvider"]
    assert [r.getMessage() for r in caplog.records] == [
        "PROVIDER=auto: CUDA is not available (libcublasLt.so.13: not found); models run on CPUExecutionProvider"
    ]


def test_the_probe_says_why_on_a_host_without_cuda() -> None:
    reason = runtime.cuda_unavailable()
    if reason is None:
        pytest.skip("this host has a working CUDA")
    assert reason and runtime.cuda_unavailable() is reason  # found once, then cached


def test_pool_threads_do_not_spin() -> None:
    opts = session_options(3)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 3
