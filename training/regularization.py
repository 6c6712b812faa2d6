"""Mini-batch aware L2 regularisation (DIN paper §4.1, eq. 4): only the embedding rows that occur in
the mini-batch are penalised, each scaled by 1 / n_j, its number of occurrences in the training set."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def occurrence_counts(index_arrays: list[np.ndarray], size: int) -> np.ndarray:
    """n_j: how many times each index occurs over the given arrays (padding included, never used)."""
    counts = np.zeros(size, dtype=np.float64)
    for arr in index_arrays:
        counts += np.bincount(arr.ravel(), minlength=size)[:size]
    return counts


class MiniBatchAwareL2(nn.Module):
    """λ Σ_{j ∈ batch} ||w_j||² / n_j for one embedding table."""

    counts: Tensor

    def __init__(self, table: nn.Embedding, counts: np.ndarray, lam: float) -> None:
        super().__init__()
        self.table = table
        self.lam = lam
        self.register_buffer("counts", torch.as_tensor(np.maximum(counts, 1.0), dtype=torch.float32))

    def forward(self, *indices: Tensor) -> Tensor:
        present = torch.zeros_like(self.counts)  # (n,) 1 where the row occurs in the batch
        for idx in indices:
            present.index_fill_(0, idx.reshape(-1), 1.0)
        present[0] = 0.0  # padding is not a feature
        # dense over the table but zero-weighted outside the batch: same cost as Adam's dense step,
        # and cheaper than torch.unique's sort; gradients reach only the present rows
        return self.lam * (present / self.counts * self.table.weight.pow(2).sum(-1)).sum()
