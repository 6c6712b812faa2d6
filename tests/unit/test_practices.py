"""The seed's training practices: focal loss and positive weighting, popularity-sampled negatives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.batches import add_negatives
from training.config import TrainConfig
from training.datasets import SyntheticConfig, generate_synthetic
from training.losses import click_loss
from training.negatives import behaviour_counts, popularity
from training.samples import prepare
from training.train import train_ensemble


def test_focal_loss_with_gamma_zero_is_cross_entropy() -> None:
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    labels = (torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    expected = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    assert torch.equal(click_loss(logits, labels, gamma=0.0), expected)
    # positive weighting is BCE's pos_weight: positives count that many times, negatives once
    weighted = click_loss(logits, labels, pos_weight=3.0)
    assert torch.allclose(weighted, torch.where(labels > 0, 3 * expected, expected))


def test_focal_loss_against_hand_computed_values() -> None:
    logits = torch.tensor([2.0, -1.0, 0.0])
    labels = torch.tensor([1.0, 1.0, 0.0])
    p = torch.sigmoid(logits)
    p_t = torch.tensor([p[0], p[1], 1 - p[2]])
    expected = -((1 - p_t) ** 2) * torch.log(p_t)  # γ = 2
    assert torch.allclose(click_loss(logits, labels, gamma=2.0), expected)
    # the easy sample (p_t ≈ 0.88) loses far more of its loss than the hard one (p_t ≈ 0.27)
    ratio = click_loss(logits, labels, gamma=2.0) / click_loss(logits, labels)
    assert ratio[0] < 0.02 < 0.5 < ratio[1]
    with pytest.raises(ValueError, match="gamma"):
        click_loss(logits, labels, gamma=-1.0)


def test_popularity_sampler_frequencies_follow_count_to_the_alpha() -> None:
    counts = np.array([50, 70, 1, 10, 100, 1000, 0])  # PAD and OOV first: never drawn, nor unseen item 6
    probs = popularity(counts, 0.75)
    expected = np.array([0, 0, 1, 10, 100, 1000, 0]) ** 0.75
    np.testing.assert_allclose(probs, expected / expected.sum())
    # DIEN's auxiliary negatives drawn with it: empirical frequencies match, within sampling error
    batch = {"hist_items": torch.zeros((400, 500), dtype=torch.long)}
    add_negatives(batch, 7, torch.arange(7), torch.Generator().manual_seed(0), torch.as_tensor(probs).float())
    freq = np.bincount(batch["neg_items"].reshape(-1).numpy(), minlength=7) / 200_000
    np.testing.assert_allclose(freq, probs, atol=0.003)
    assert freq[[0, 1, 6]].sum() == 0
    assert np.array_equal(batch["neg_cats"], batch["neg_items"])  # each negative's category looked up
    np.testing.assert_allclose(popularity(counts, 0.0)[2:6], 0.25)  # α = 0: uniform over the seen items


def test_the_implicit_protocol_draws_popular_training_negatives_and_keeps_test_negatives_uniform() -> None:
    # items of skewed popularity inside their categories, as in real logs
    blog = generate_synthetic(SyntheticConfig(n_users=300, n_items=400, n_categories=8, zipf=1.2, seed=4))
    uniform = prepare(blog, "implicit", 10, seed=0, negatives="uniform")
    popular = prepare(blog, "implicit", 10, seed=0, negatives="popularity", negative_alpha=0.75)
    counts = behaviour_counts(popular.train, popular.vocab.n_items, implicit=True)

    def mean_count_of_negatives(split) -> float:  # type: ignore[no-untyped-def]
        return float(counts[split.cand_item[split.label == 0]].mean())

    # popular negatives are items with many more training behaviours than uniform ones
    assert mean_count_of_negatives(popular.train) > 1.5 * mean_count_of_negatives(uniform.train)
    for name in ("valid", "test"):  # the same test set judges both samplers
        assert np.array_equal(getattr(popular, name).cand_item, getattr(uniform, name).cand_item)
    assert popular.info["negatives"] == {"sampler": "popularity", "alpha": 0.75}
    with pytest.raises(ValueError, match="unknown negative sampler"):
        prepare(blog, "implicit", 10, seed=0, negatives="hard")


def test_an_ensemble_of_dsin_models_is_refused_before_any_training(tmp_path: Path) -> None:
    """DSIN's graph has a third output (session weights) that an ensemble does not average: said at once."""
    cfg = TrainConfig(dataset="synthetic", model="dsin", out=str(tmp_path / "run"), ensemble=2)
    with pytest.raises(ValueError, match="DSIN ensembles"):
        train_ensemble(cfg)
    assert not (tmp_path / "run").exists()
