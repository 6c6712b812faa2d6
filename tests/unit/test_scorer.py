from __future__ import annotations

import onnxruntime as ort
import pytest

from app.scorer import select_providers

# TF32 products drift ≈ 3e-4 (seen on an H100), beyond the self-check's 1e-4: CUDA is asked for float32
CUDA = ("CUDAExecutionProvider", {"use_tf32": "0"})


@pytest.mark.parametrize(
    ("available", "choice", "expected"),
    [
        (["CPUExecutionProvider"], "auto", ["CPUExecutionProvider"]),
        (["CPUExecutionProvider"], "cpu", ["CPUExecutionProvider"]),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu", ["CPUExecutionProvider"]),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], "auto", [CUDA, "CPUExecutionProvider"]),
        (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "cuda",
         [CUDA, "CPUExecutionProvider"]),
    ],
)  # fmt: skip
def test_select_providers(
    available: list[str], choice: str, expected: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    assert select_providers(choice) == expected
