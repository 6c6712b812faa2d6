"""The learning-rate schedule: a linear warm-up, then a constant, cosine or linear decay to 0 at the run's
last optimiser step. One ``LambdaLR`` per optimiser, so every parameter group of every optimiser (dense Adam,
sparse embedding optimisers) follows the same factor of its own initial lr, and its state is saved with them."""

from __future__ import annotations

import math

import torch

DECAYS = ("none", "cosine", "linear")


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str) -> float:
    """The factor of the initial lr that optimiser step ``step`` (0-based) uses: (step + 1) / warmup_steps
    during the warm-up, then 1 (``none``), or from 1 down to 0 at step ``total_steps`` (``cosine``, ``linear``)."""
    if decay not in DECAYS:
        raise ValueError(f"lr decay {decay!r}: expected one of {', '.join(DECAYS)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


def build_schedulers(
    optimisers: list[torch.optim.Optimizer], warmup_steps: int, total_steps: int, decay: str
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One scheduler per optimiser; call each one's ``step()`` after each optimiser step."""
    lr_factor(0, warmup_steps, total_steps, decay)  # an unknown decay fails here, before training starts
    return [
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup_steps, total_steps, decay))
        for opt in optimisers
    ]
