"""The optimisers a run trains with, built from its configuration."""

from __future__ import annotations

import torch

from models import CTRModel
from training.config import TrainConfig


def build_optimisers(model: CTRModel, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Adam over every parameter. The loop steps each optimiser of the list, so parameter groups that need
    another optimiser can have their own."""
    return [torch.optim.Adam(model.parameters(), lr=cfg.lr)]
