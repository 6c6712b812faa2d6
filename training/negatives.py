"""Which items stand in as negatives: uniform over the vocabulary, or by popularity.

Popularity sampling draws item i with probability ∝ count_i^α, count_i its number of training behaviours:
α = 1 follows popularity, α = 0 is uniform over the items seen in training, and α = 0.75 (the default, the
value issue 18 asks for; word2vec's unigram^0.75) flattens the head of the distribution. A negative drawn
this way is a popular item the user did not pick, a harder and more realistic negative than a random
catalogue item. PAD and OOV are never drawn."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from contract import FIRST_INDEX

if TYPE_CHECKING:  # training.samples draws its implicit negatives with popularity() from here
    from training.samples import SampleSet

SAMPLERS = ("uniform", "popularity")


def popularity(counts: np.ndarray, alpha: float) -> np.ndarray:
    """counts (n_items,) training behaviours per item index → (n_items,) probabilities ∝ count^α, zero for
    PAD, OOV and items never seen in training."""
    if alpha < 0:
        raise ValueError(f"the popularity exponent must be ≥ 0, got {alpha}")
    weights = np.where(counts > 0, np.asarray(counts, dtype=np.float64) ** alpha, 0.0)
    weights[:FIRST_INDEX] = 0.0
    total = weights.sum()
    if total <= 0:
        raise ValueError("no item has a training behaviour to sample negatives from")
    return weights / total


def behaviour_counts(train: SampleSet, n_items: int, implicit: bool) -> np.ndarray:
    """(n_items,) training behaviours per item: the candidates of the training samples that are behaviours
    (every sample under din-movielens; the positives under implicit, whose negatives are themselves drawn)."""
    items = train.cand_item[train.label == 1] if implicit else train.cand_item
    return np.bincount(np.asarray(items, dtype=np.int64), minlength=n_items)


def draw(probabilities: Tensor, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Item indices of ``shape`` drawn with replacement from (n_items,) probabilities."""
    n = int(np.prod(shape))
    return torch.multinomial(probabilities, n, replacement=True, generator=gen).view(shape)
