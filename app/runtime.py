"""ONNX Runtime for the service: which execution provider, how many threads, one session per version.

Knows nothing of models' inputs: app/scorer.py gives it a graph file and gets a session back.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# TF32 matrix products (ONNX Runtime's CUDA default on Ampere and later) drift ≈ 3e-4 from the float32
# answers the export checked parity against, and the self-check refuses such a version: full float32
CUDA = ("CUDAExecutionProvider", {"use_tf32": "0"})
ProviderList = list[str | tuple[str, dict[str, str]]]

# Pool threads sleep as soon as a parallel section ends: on 2 cores spinning threads took the core the event
# loop needs, for the same latency through the service and more CPU (the measurement is in bench/README.md).
ALLOW_SPINNING = "0"


class RuntimeUnavailable(RuntimeError):
    """The execution provider asked for cannot run on this host; the message says why."""


@functools.cache
def cuda_unavailable() -> str | None:
    """Why CUDA cannot run here (None when it can), found once per process without ONNX Runtime's help.

    ONNX Runtime's own attempt logs an ERROR and a WARNING on every session of a host without CUDA's
    libraries, which reads as a crash; loading the CUDA provider's library the way ONNX Runtime does (its
    shared bridge first) and asking the driver for a device answers the same question silently."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this ONNX Runtime build offers only {ort.get_available_providers()}"
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=os.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as e:  # a library of CUDA's, cuDNN's or the driver's is missing
        return str(e)
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the CUDA driver finds no GPU"
    return None


@functools.cache
def _warn_cpu_fallback(reason: str) -> None:
    """One line per process, not one per version: every later version falls back for the same reason."""
    log.warning("PROVIDER=auto: CUDA is not available (%s); models run on %s", reason, CPU)


def select_providers(choice: str) -> ProviderList:
    """ONNX Runtime's provider list for PROVIDER (auto, cpu, cuda); cuda without a usable GPU is refused."""
    if choice == "cpu":
        return [CPU]
    reason = cuda_unavailable()
    if reason is None:
        return [CUDA, CPU]
    if choice == "cuda":
        raise RuntimeUnavailable(f"PROVIDER=cuda but CUDA is not available: {reason}")
    _warn_cpu_fallback(reason)
    return [CPU]


def session_threads(configured: int, processes: int) -> int:
    """ONNX Runtime's intra-op threads per session: INTRA_OP_THREADS when set. Unset (0), one process keeps
    ONNX Runtime's default (a thread per core); ``processes`` > 1 (WORKERS) share the cores out, else each
    process's pool would start a thread per core and the processes oversubscribe them."""
    if configured or processes == 1:
        return configured
    return max(1, (os.cpu_count() or 1) // processes)


def inference_threads(configured: int | None, processes: int, provider: str) -> int:
    """Threads a version's batcher runs ONNX Runtime on (INFERENCE_WORKERS); 0 means the event loop's own.

    Unset, a CPU model in one of several processes (WORKERS) runs on the loop: with a core per process there
    is nothing to overlap a run with, and the hand-off to a thread and back only cost (c=1 p99 8.9–10.3 against
    10.5–12.5 ms, the same saturation; bench/README.md). One process keeps a thread, so that its loop parses
    the next requests while a run uses the other cores; a CUDA model keeps one, or the loop would wait for the
    GPU."""
    if configured is not None:
        return configured
    return 0 if processes > 1 and provider != "CUDAExecutionProvider" else 1


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", ALLOW_SPINNING)
    return opts


def open_session(graph: Path, providers: ProviderList, intra_op_threads: int) -> ort.InferenceSession:
    """One session of ``graph``; any ONNX Runtime failure (a corrupt graph) is an exception of its own types."""
    return ort.InferenceSession(str(graph), session_options(intra_op_threads), providers=providers)
