"""A run's resume state: what ``--resume RUN_DIR`` needs to continue a killed run and end where an
uninterrupted one ends, and the atomic writes that keep a kill from leaving a half-written file.

The state (``train_state.pt``) is a file of its own beside ``checkpoint.pt``, the final model that
``training.export`` reads: model, optimisers and lr schedulers, the loop's counters, early stopping's best
state, and every rank's random streams (torch's global one, CUDA's, the run's noise generator)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

STATE_NAME = "train_state.pt"


@dataclass
class Progress:
    """The loop's counters and early stopping's state, as saved and restored."""

    epoch: int = 1  # the epoch in progress, 1-based
    step_in_epoch: int = 0  # optimiser steps done in it
    steps: int = 0  # optimiser steps done in all
    train_samples: int = 0
    train_seconds: float = 0.0
    running_loss: float = 0.0  # the epoch's smoothed training loss (shown, and kept in the history)
    best_gauc: float = -1.0
    best_epoch: int = 0
    stopped: bool = False  # early stopping ended training
    history: list[dict[str, float]] = field(default_factory=list)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file in the same folder and os.replace: a reader (or a resume after a
    kill) sees the previous file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state(noise: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """This process's random streams: torch's global one (model dropout), CUDA's on a GPU, the noise generator
    (history and feedback dropout, DIEN's negatives). numpy's global stream is not used by training."""
    state = {"torch": torch.get_rng_state(), "noise": noise.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], noise: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    noise.set_state(state["noise"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_state(run_dir: Path) -> dict[str, Any] | None:
    """The run's resume state (on the CPU: load_state_dict moves each tensor to its parameter's device), or
    None when it has none yet (killed before its first save)."""
    path = Path(run_dir) / STATE_NAME
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state
