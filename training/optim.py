"""The optimisers a run trains with, built from its configuration.

With ``embedding_optimiser="sparse-adam"`` (the default) the vocabulary-sized tables (items, categories,
user features and the first-order biases) produce sparse gradients and are updated by ``SparseAdam``, which
touches only the rows a batch used: a step costs what the batch costs, whatever the vocabulary. Dense Adam
updates every other parameter. ``"adam"`` is the earlier behaviour: one dense Adam over everything, every
row moved every step (its moments keep moving rows the batch did not use)."""

from __future__ import annotations

import torch
from torch import nn

from models import CTRModel
from training.config import EMBEDDING_OPTIMISERS, TrainConfig


def vocabulary_tables(model: CTRModel) -> list[nn.Embedding]:
    """The embedding tables whose size follows the data's vocabularies (the feedback table does not)."""
    emb = model.embedding
    tables = [emb.item, emb.category, *emb.user_features, emb.item_bias, emb.category_bias]
    return [t for t in tables if t is not None]


def build_optimisers(model: CTRModel, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimisers the loop steps, each over its own parameters. For ``sparse-adam`` this switches the
    model's vocabulary tables to sparse gradients (``nn.Embedding.sparse``): a training setting only, the
    values are the same and a checkpoint rebuilt for export has the paper form's dense tables."""
    if cfg.embedding_optimiser == "adam":
        return [torch.optim.Adam(model.parameters(), lr=cfg.lr)]
    if cfg.embedding_optimiser != "sparse-adam":
        raise ValueError(f"unknown embedding optimiser {cfg.embedding_optimiser!r}: one of {EMBEDDING_OPTIMISERS}")
    tables = vocabulary_tables(model)
    for table in tables:
        table.sparse = True
    sparse_ids = {id(t.weight) for t in tables}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    return [torch.optim.Adam(dense, lr=cfg.lr), torch.optim.SparseAdam([t.weight for t in tables], lr=cfg.lr)]
