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
step's weights. Integer tensors (batch-norm's step counter) are copied.

Embedding tables trained with sparse gradients (``training.optim``: those larger than a batch's lookups)
are not averaged: an average moves every row every step, the cost their row-wise update exists to avoid
(a 10^7-row table: ≈ 1.3 GB read and written a step). The average's model shares them with the trained
model, so they cost no memory and are always the trained rows; the checkpoint's average leaves them out."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def ema_step(decay: float, updates: int) -> float:
    """How far update ``updates`` (1-based) moves the average towards the current weights."""
    return (1.0 - decay) / (1.0 - decay**updates)


class WeightAverage:
    """The average, held in a copy of the model (eval mode) that evaluation and the checkpoint use; the
    tables with sparse gradients are ``model``'s own, shared (see above)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay {decay}: expected a value in (0, 1), or 0 for no average")
        self.decay = decay
        self.updates = 0
        tables = {f"{name}.weight": m.weight for name, m in model.named_modules() if _sparse_table(m)}
        self.shared = set(tables)  # state names not averaged
        self.model = copy.deepcopy(model, memo={id(w): w for w in tables.values()}).eval()
        for name, p in self.model.named_parameters():
            if name not in self.shared:
                p.requires_grad_(False)
        self._pair_with(model)

    def _pair_with(self, model: nn.Module) -> None:
        """The (average, trained) tensor pairs, kept: both sides are fixed objects (load_state_dict copies into
        them in place), so a step needs no state_dict walk."""
        own, live = self.model.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        pairs = [(own[k], live[k]) for k in own if k not in self.shared]
        self._source = model
        self._floats = [(a, b) for a, b in pairs if a.is_floating_point()]
        self._others = [(a, b) for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards ``model``'s weights."""
        if model is not self._source:
            self._pair_with(model)
        self.updates += 1
        if self._floats:  # one foreach call: ≈ 30 tensors a step on DIN
            averages, current = zip(*self._floats, strict=True)
            torch._foreach_lerp_(list(averages), [t.detach() for t in current], ema_step(self.decay, self.updates))
        for avg, now in self._others:
            avg.copy_(now)

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v for k, v in self.model.state_dict().items() if k not in self.shared}
        return {"updates": self.updates, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        missing, unexpected = self.model.load_state_dict(state["weights"], strict=False)
        if set(missing) != self.shared or unexpected:
            raise RuntimeError(f"the saved average does not fit this model: missing {missing}, unexpected {unexpected}")


def _sparse_table(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) and module.sparse
