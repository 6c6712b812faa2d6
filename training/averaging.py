"""An exponential moving average (EMA) of a model's weights, the model that validation, test and the checkpoint
use when ``--ema-decay`` is set (issue 18); training.train updates it from the second epoch on.

Why: with heavy history and user-feature dropout the weights after any one step are a noisy draw, and early
stopping picks among them on a small validation split (66 users on ml-100k, whose GAUC moved by ±0.005 from
epoch to epoch and disagreed with test by up to 0.04). The average of the recent steps' weights is smoother,
so which epoch validation picks matters less.

After optimiser step t (1-based) every floating-point tensor of the model's state (parameters and Dice's
batch-norm running statistics) moves as

    average_t = average_{t-1} + (current_t − average_{t-1}) · (1 − decay) / (1 − decayᵗ),

which is Σ_i decay^(t−i) · current_i / Σ_i decay^(t−i) over the steps so far: the exponential average with
Adam's bias correction, so the random initial weights carry no weight and the first step's average is that
step's weights. Integer tensors (batch-norm's step counter) are copied."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def ema_step(decay: float, updates: int) -> float:
    """How far update ``updates`` (1-based) moves the average towards the current weights."""
    return (1.0 - decay) / (1.0 - decay**updates)


class WeightAverage:
    """The average, held in a copy of the model (eval mode) that evaluation and the checkpoint use."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay {decay}: expected a value in (0, 1), or 0 for no average")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        step = ema_step(self.decay, self.updates)
        current = model.state_dict()
        for name, avg in self.model.state_dict().items():
            if avg.is_floating_point():
                avg.lerp_(current[name].detach(), step)
            else:
                avg.copy_(current[name])

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["weights"])
