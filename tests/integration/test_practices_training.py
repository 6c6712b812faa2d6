"""The practice flags reach the training step: the loss trained on is the one asked for."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.train import load_data, train


def test_the_first_step_trains_on_the_loss_the_flags_ask_for(tmp_path: Path) -> None:
    cfg = TrainConfig(
        dataset="synthetic",
        synthetic={"n_users": 120, "seed": 1},
        max_len=6,
        max_steps=1,  # one step from the same initial parameters on the same batch: only the loss differs
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "bce"),
    )
    data = load_data(cfg)

    def first_loss(**change: float) -> float:
        run = replace(cfg, out=str(tmp_path / "_".join(change) or "bce"), **change)
        return float(train(run, data=data).history[0]["train_loss"])

    bce = first_loss()
    assert first_loss(focal_gamma=0.0) == pytest.approx(bce, rel=1e-6)
    assert first_loss(focal_gamma=2.0) < 0.5 * bce  # at initialisation p ≈ ½: (1 − p_t)² ≈ ¼
    assert first_loss(pos_weight=3.0) > bce  # the positives' part counts three times
