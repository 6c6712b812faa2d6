"""The optimisers a run trains with, built from its configuration.

With ``embedding_optimiser="sparse-adam"`` the vocabulary-sized tables (items, categories, user features
and the first-order biases) produce sparse gradients and are updated by lazy Adam (``RowSparseAdam``,
``torch.optim.SparseAdam``'s update in fewer operations), which touches only the rows a batch used: a step
costs what the batch costs, whatever the vocabulary. Dense Adam updates every other parameter. ``"auto"``
(the default) does so for the tables with more rows than a batch looks up and updates the small ones
densely. ``"adam"`` is the earlier behaviour: one dense Adam over everything, every
row moved every step (its moments keep moving rows the batch did not use)."""

from __future__ import annotations

import math

import torch
from torch import nn

from models import CTRModel
from models.fast_training import RowIndex, distinct_rows
from training.config import EMBEDDING_OPTIMISERS, TrainConfig


def vocabulary_tables(model: CTRModel) -> list[nn.Embedding]:
    """The embedding tables whose size follows the data's vocabularies (the feedback table does not)."""
    emb = model.embedding
    tables = [emb.item, emb.category, *emb.user_features, emb.item_bias, emb.category_bias]
    return [t for t in tables if t is not None]


def coalesce_rows(grad: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse row gradient (K rows, repeats allowed) → (rows (U,), values (U, D)), each row once with its
    values summed: what ``coalesce()`` gives, in O(K) without its sort (≈ 0.4 ms for a batch's 13k lookups,
    most of a step's sparse update at 10^7 rows). ``slot``: ``distinct_rows``' scratch vector, whose entries
    are then rewritten with the rows' dense ids so each position's values are summed into its row's."""
    index, values = grad._indices()[0], grad._values()  # (K,), (K, D): uncoalesced, as backward leaves them
    rows = distinct_rows(index, slot)  # (U,) each row once
    slot.scatter_(0, rows, torch.arange(rows.numel(), dtype=torch.int32, device=index.device))
    dense_id = slot.index_select(0, index).long()  # (K,) each position's row in 0..U-1
    return rows, RowIndex(dense_id, rows.numel()).sum_back(values)


class RowSparseAdam(torch.optim.Optimizer):
    """Lazy Adam over rows, for parameters with sparse gradients: ``torch.optim.SparseAdam``'s update
    (tests/unit/test_optim.py checks it against it): the gradient's repeated rows summed by
    ``coalesce_rows``, the rows of the table and its moments gathered, Adam's fused kernel, and copied back.
    SparseAdam builds and adds back a sparse tensor for every moment and the step (≈ 4× the time of this at
    ml-100k's batch, ≈ 5 ms of a 40 ms DIN step); both touch only the rows the gradient holds. Its state,
    like SparseAdam's, is a dense moment pair per table."""

    def __init__(
        self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self._slots: dict[int, torch.Tensor] = {}  # coalesce_rows' scratch per parameter: not state, not saved

    def _slot(self, p: torch.Tensor) -> torch.Tensor:
        if id(p) not in self._slots:
            self._slots[id(p)] = torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)
        return self._slots[id(p)]

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowSparseAdam needs sparse gradients (nn.Embedding(sparse=True))")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                grad = p.grad
                if grad.is_coalesced():
                    rows, g = grad.indices()[0], grad.values()  # (U,), (U, D)
                else:  # duplicate rows summed
                    rows, g = coalesce_rows(grad, self._slot(p))
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # the rows gathered, updated by Adam's fused kernel, copied back (rows are distinct): one pass
                # where the update written out took nine operations. SparseAdam adds ε before the bias
                # correction, (√v + ε)/√(1 − β₂ᵗ), the fused kernel after it: ε/√(1 − β₂ᵗ) makes them one formula
                rows_p, m, v = (t.index_select(0, rows) for t in (p, exp_avg, exp_avg_sq))  # (U, D) each
                torch._fused_adam_(
                    [rows_p],
                    [g.contiguous()],
                    [m],
                    [v],
                    [],
                    [torch.tensor(float(state["step"]), device=p.device)],  # counted already, as Adam counts
                    amsgrad=False,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=0.0,
                    eps=group["eps"] / math.sqrt(1 - beta2 ** state["step"]),
                    maximize=False,
                )
                for table, updated in ((p, rows_p), (exp_avg, m), (exp_avg_sq, v)):
                    table.index_copy_(0, rows, updated)


def sparse_tables(model: CTRModel, cfg: TrainConfig) -> list[nn.Embedding]:
    """The tables whose rows are updated sparsely. ``auto``: those with more rows than one batch looks up
    (batch × (max_len + 1)); a smaller table is cheaper to update densely than to sort the batch's lookups
    into rows (ml-100k's 1,618 items against 13,056 lookups: bench/README.md, "issue 16")."""
    tables = vocabulary_tables(model)
    if cfg.embedding_optimiser == "adam":
        return []
    if cfg.embedding_optimiser == "sparse-adam":
        return tables
    if cfg.embedding_optimiser == "auto":
        lookups = cfg.batch_size * (cfg.max_len + 1)
        return [t for t in tables if t.num_embeddings > lookups]
    raise ValueError(f"unknown embedding optimiser {cfg.embedding_optimiser!r}: one of {EMBEDDING_OPTIMISERS}")


def build_optimisers(model: CTRModel, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimisers the loop steps, each over its own parameters: lazy row-wise Adam for the sparse tables
    (``sparse_tables``), which this switches to sparse gradients (``nn.Embedding.sparse``: a training
    setting only, the values are the same and a checkpoint rebuilt for export has dense tables), and dense
    Adam for every other parameter. ``cfg.optimiser == "sgd"``: plain SGD over every parameter, tables dense
    (the exact-equivalence tests of data parallelism and gradient accumulation: its update is linear in the
    gradient)."""
    if cfg.optimiser == "sgd":
        return [torch.optim.SGD(model.parameters(), lr=cfg.lr)]
    tables = sparse_tables(model, cfg)
    if not tables:
        return [dense_adam(list(model.parameters()), cfg.lr)]
    for table in tables:
        table.sparse = True
    sparse_ids = {id(t.weight) for t in tables}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    return [dense_adam(dense, cfg.lr), RowSparseAdam([t.weight for t in tables], lr=cfg.lr)]


def dense_adam(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam in one fused kernel over every parameter (CPU and CUDA): the update of the default (foreach)
    implementation up to float rounding (tests/unit/test_optim.py), ≈ 0.8 ms less of a 22 ms DIN step at
    ml-100k on one CPU thread, where the default runs a dozen list-wide ops, each with its own overhead."""
    return torch.optim.Adam(params, lr=lr, fused=True)
