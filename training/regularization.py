"""Mini-batch aware L2 regularisation (DIN paper §4.1, eq. 4): only the embedding rows that occur in
the mini-batch are penalised, each scaled by 1 / n_j, its number of occurrences in the training set."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from models import CTRModel
from training.samples import SampleSet

Batch = dict[str, Tensor]


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


def mba_terms(
    model: CTRModel, train: SampleSet, max_len: int, lam: float
) -> list[tuple[MiniBatchAwareL2, Callable[[Batch], tuple[Tensor, ...]]]]:
    """One MBA term per embedding table (n_j counted over the training samples), each paired with
    the batch indices that select its rows."""
    if lam <= 0:
        return []
    hist_items, hist_cats = [], []
    for chunk in np.array_split(np.arange(len(train)), max(1, len(train) // 20000)):
        items, cats, _ = train.history(chunk, max_len)
        hist_items.append(items)
        hist_cats.append(cats)
    emb = model.embedding
    item_counts = occurrence_counts([train.cand_item, *hist_items], emb.item.num_embeddings)
    cat_counts = occurrence_counts([train.cand_cat, *hist_cats], emb.category.num_embeddings)
    regs: list[tuple[MiniBatchAwareL2, Callable[[Batch], tuple[Tensor, ...]]]] = [
        (MiniBatchAwareL2(emb.item, item_counts, lam), lambda b: (b["hist_items"], b["cand_item"])),
        (MiniBatchAwareL2(emb.category, cat_counts, lam), lambda b: (b["hist_cats"], b["cand_cat"])),
    ]
    if emb.item_bias is not None and emb.category_bias is not None:
        regs.append((MiniBatchAwareL2(emb.item_bias, item_counts, lam), lambda b: (b["cand_item"],)))
        regs.append((MiniBatchAwareL2(emb.category_bias, cat_counts, lam), lambda b: (b["cand_cat"],)))
    for i, table in enumerate(emb.user_features):
        counts = occurrence_counts([train.user_feats[:, i]], table.num_embeddings)
        regs.append((MiniBatchAwareL2(table, counts, lam), _feature_column(i)))
    return regs


def _feature_column(i: int) -> Callable[[Batch], tuple[Tensor, ...]]:
    return lambda b: (b["user_feats"][:, i],)
