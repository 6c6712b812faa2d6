from __future__ import annotations

import onnxruntime as ort
import pytest
from pydantic import ValidationError

from app.scorer import select_providers, session_spinning
from app.settings import Settings

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


@pytest.mark.parametrize(
    ("given", "spinning", "entries"),
    [
        (None, "never", {"session.intra_op.allow_spinning": "0"}),
        ("in_run", "in_run", {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}),
        ("always", "always", {"session.intra_op.allow_spinning": "1"}),
        ("never", "never", {"session.intra_op.allow_spinning": "0"}),
        ("true", "always", {"session.intra_op.allow_spinning": "1"}),  # the setting's first, boolean form
        ("False", "never", {"session.intra_op.allow_spinning": "0"}),
        ("on", "always", {"session.intra_op.allow_spinning": "1"}),
        ("no", "never", {"session.intra_op.allow_spinning": "0"}),
    ],
)
def test_spinning_setting_reaches_the_session(
    given: str | None, spinning: str, entries: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """INTRA_OP_SPINNING from the environment → the ONNX Runtime session entries that implement it."""
    if given is not None:
        monkeypatch.setenv("INTRA_OP_SPINNING", given)
    settings = Settings()
    assert settings.intra_op_spinning == spinning
    opts = ort.SessionOptions()
    session_spinning(opts, settings.intra_op_spinning)
    for key, value in entries.items():
        assert opts.get_session_config_entry(key) == value
    if "session.force_spinning_stop" not in entries:
        with pytest.raises(RuntimeError, match="does not have configuration"):
            opts.get_session_config_entry("session.force_spinning_stop")


def test_spinning_setting_rejects_unknown_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTRA_OP_SPINNING", "sometimes")
    with pytest.raises(ValidationError):
        Settings()
