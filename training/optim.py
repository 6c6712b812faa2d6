"""The optimisers a run trains with, built from its configuration."""

from __future__ import annotations

import torch

from models import CTRModel
from training.config import TrainConfig


def build_optimisers(model: CTRModel, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Adam over every parameter. The loop steps each optimiser of the list, so parameter groups that need
    another optimiser can have their own. ``cfg.optimiser == "sgd"``: plain SGD over every parameter (the
    exact-equivalence tests of data parallelism and gradient accumulation: its update is linear in the
    gradient)."""
    if cfg.optimiser == "sgd":
        return [torch.optim.SGD(model.parameters(), lr=cfg.lr)]
    return [torch.optim.Adam(model.parameters(), lr=cfg.lr)]
