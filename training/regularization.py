"""Mini-batch aware L2 regularisation (DIN paper §4.1, eq. 4): only the embedding rows that occur in
the mini-batch are penalised, each scaled by 1 / n_j, its number of occurrences in the training set.

The penalty of a table trained with sparse gradients reads and differentiates the batch's unique rows
only, so it costs what the batch costs; a table with a dense gradient (a small one: ``training.optim``)
is penalised through a presence vector over its rows, which costs what its dense gradient and update
already cost every step, in a handful of operations. The counts n_j come from one pass over the events
and one over the samples. ``mba_penalty`` is the penalty as the paper writes it; training adds its
gradient directly after the backward (``add_mba_gradients``, tested equal to autograd's)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contract import PAD
from models import CTRModel
from models.fast_training import distinct_rows
from training.samples import SampleSet

Batch = dict[str, Tensor]


def occurrence_counts(index_arrays: list[np.ndarray], size: int) -> np.ndarray:
    """n_j: how many times each index occurs over the given arrays (padding included, never used)."""
    counts = np.zeros(size, dtype=np.float64)
    for arr in index_arrays:
        counts += np.bincount(arr.ravel(), minlength=size)[:size]
    return counts


def history_coverage(samples: SampleSet, max_len: int) -> np.ndarray:
    """(E,) how many samples' histories, as ``SampleSet.history(rows, max_len)`` gathers them, hold each
    event. O(samples + events), for either protocol: a sample's history is the event range
    [end − length, end − length + min(length, max_len)), so each sample adds 1 at its range's start and
    −1 at its stop in a difference array, and the running sum is the coverage."""
    n_events = samples.event_item.shape[0]
    start = samples.end - samples.length
    stop = start + np.minimum(samples.length, max_len)
    diff = np.bincount(start, minlength=n_events + 1) - np.bincount(stop, minlength=n_events + 1)
    return np.cumsum(diff[:n_events])


def history_counts(samples: SampleSet, max_len: int, events: np.ndarray, size: int) -> np.ndarray:
    """(size,) occurrences of each index of ``events`` (E,) (the event items or categories) over every
    sample's gathered (max_len,) history, padding (PAD) included: what gathering every history and
    counting would give, without the O(samples × max_len) gather."""
    counts = np.bincount(events, weights=history_coverage(samples, max_len), minlength=size)[:size]
    counts[PAD] += float(np.sum(max_len - np.minimum(samples.length, max_len)))
    return counts


class MiniBatchAwareL2(nn.Module):
    """λ Σ_{j ∈ batch} ||w_j||² / n_j for one embedding table.

    A table trained with sparse gradients is penalised on the batch's unique rows, looked up sparsely, so
    its penalty's gradient is sparse too (a dense one would make every row's update dense again). A table
    with dense gradients is penalised by the formula over all its rows with a 0/1 presence weight: the same
    value and gradient, in ≈ 8 operations instead of ≈ 15 (0.16 against 0.43 ms at ml-100k's items and a
    batch's 13k indices, 0.08 against 0.16 ms for a 256-row lookup into a small table); ``mba_penalty``
    does so for all the dense tables' terms at once."""

    counts: Tensor
    row_weight: Tensor
    slot: Tensor

    def __init__(self, table: nn.Embedding, counts: np.ndarray, lam: float) -> None:
        super().__init__()
        self.table = table
        self.lam = lam
        self.register_buffer("counts", torch.as_tensor(np.maximum(counts, 1.0), dtype=torch.float32))
        # λ / n_j, 0 for padding (not a feature): the presence form's weight of each row's ||w_j||²
        row_weight = lam / self.counts
        row_weight[PAD] = 0.0
        self.register_buffer("row_weight", row_weight, persistent=False)
        # scratch for ``unique_rows``: one int32 per row, never read where it was not written this step
        self.register_buffer("slot", torch.zeros(table.num_embeddings, dtype=torch.int32), persistent=False)

    def unique_rows(self, indices: Tensor) -> Tensor:
        """(K,) indices → each distinct index once (order unspecified), in O(K) without a sort."""
        return distinct_rows(indices, self.slot)  # (U,)

    def forward(self, *indices: Tensor) -> Tensor:
        if not self.table.sparse:
            return mba_penalty([self], [torch.cat([idx.reshape(-1) for idx in indices])])
        rows = self.unique_rows(torch.cat([idx.reshape(-1) for idx in indices]))  # (U,)
        rows = rows[rows != PAD]  # padding is not a feature
        w = F.embedding(rows, self.table.weight, sparse=self.table.sparse)  # (U, D)
        return self.lam * (w.pow(2).sum(-1) / self.counts[rows]).sum()


def mba_penalty(terms: list[MiniBatchAwareL2], rows: list[Tensor]) -> Tensor:
    """Σ_t terms[t](rows[t]): the terms' sum, rows[t] (K_t,) the batch's indices into term t's table. The
    terms of tables with dense gradients are computed together, as one presence vector over all their rows
    stacked: ≈ 30 operations (and a short backward) for ml-100k's 7 terms where one term at a time takes
    ≈ 100 (every operation's fixed cost is most of what a term costs here). A sparse table's term is its own."""
    dense = [(term, r) for term, r in zip(terms, rows, strict=True) if not term.table.sparse]
    total = torch.zeros((), device=terms[0].table.weight.device) if terms else torch.zeros(())
    for term, r in zip(terms, rows, strict=True):
        if term.table.sparse:
            total = total + term(r)
    if not dense:
        return total
    starts = np.cumsum([0] + [term.table.num_embeddings for term, _ in dense[:-1]])  # each table's first row
    squares = torch.cat([term.table.weight.pow(2).sum(-1) for term, _ in dense])  # (ΣV,) ||w_j||²
    present = squares.new_zeros(squares.shape)  # (ΣV,) 1 where a row is in the batch
    stacked = [r.reshape(-1) + int(start) for (_, r), start in zip(dense, starts, strict=True)]  # rows of (ΣV,)
    present.index_fill_(0, torch.cat(stacked), 1.0)
    weights = torch.cat([term.row_weight for term, _ in dense])  # (ΣV,) λ / n_j, 0 for padding
    return total + torch.dot(present * weights, squares)


def mba_terms(
    model: CTRModel, train: SampleSet, max_len: int, lam: float
) -> list[tuple[MiniBatchAwareL2, Callable[[Batch], tuple[Tensor, ...]]]]:
    """One MBA term per embedding table (n_j counted over the training samples: candidates and gathered
    histories), each paired with the batch indices that select its rows."""
    if lam <= 0:
        return []
    emb = model.embedding
    n_items, n_cats = emb.item.num_embeddings, emb.category.num_embeddings
    item_counts = history_counts(train, max_len, train.event_item, n_items)
    item_counts += occurrence_counts([train.cand_item], n_items)
    cat_counts = history_counts(train, max_len, train.event_cat, n_cats)
    cat_counts += occurrence_counts([train.cand_cat], n_cats)
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


def add_mba_gradients(terms: list[MiniBatchAwareL2], rows: list[Tensor]) -> None:
    """The gradient of ``mba_penalty(terms, rows)``, added to each table's ``.grad``: 2·λ/n_j·w_j on the rows j
    present in the batch, zero elsewhere. Training adds these after the loss's backward instead of putting
    the terms in the loss: the same gradient without the terms' forward and backward through autograd. The
    dense tables' in one presence vector and one fused update per table (≈ 15 operations for ml-100k's 7
    tables, where autograd takes ≈ 60, most of whose cost is fixed per operation); a sparse table's as
    sparse rows appended to its sparse gradient (its optimiser sums repeated rows). The penalty's value is
    not needed: training reports the click loss."""
    for term, r in zip(terms, rows, strict=True):
        if term.table.sparse:
            _add_sparse_mba_gradient(term, r)
    dense = [(term, r) for term, r in zip(terms, rows, strict=True) if not term.table.sparse]
    if not dense:
        return
    sizes = [term.table.num_embeddings for term, _ in dense]
    starts = np.cumsum([0, *sizes[:-1]])  # each table's first row in the stack
    weights = torch.cat([term.row_weight for term, _ in dense])  # (ΣV,) λ / n_j, 0 for padding
    present = weights.new_zeros(weights.shape)  # (ΣV,)
    present.index_fill_(0, torch.cat([r.reshape(-1) + int(s) for (_, r), s in zip(dense, starts, strict=True)]), 2.0)
    coef = present.mul_(weights)  # (ΣV,) 2·λ/n_j where present, else 0
    for (term, _), c in zip(dense, coef.split(sizes), strict=True):
        w = term.table.weight
        if w.grad is None:
            w.grad = w.detach() * c.unsqueeze(1)
        else:
            w.grad.addcmul_(w.detach(), c.unsqueeze(1))  # (V, E) += 2·λ/n_j·w_j


@torch.no_grad()
def _add_sparse_mba_gradient(term: MiniBatchAwareL2, indices: Tensor) -> None:
    """A sparse table's term's gradient, the batch's distinct non-padding rows, added to its sparse gradient."""
    w = term.table.weight
    rows = term.unique_rows(indices.reshape(-1))  # (U,)
    rows = rows[rows != PAD]
    values = w.index_select(0, rows) * (2 * term.row_weight.index_select(0, rows)).unsqueeze(1)  # (U, E)
    indices = rows.unsqueeze(0)  # (1, U)
    if w.grad is not None:  # appended to its rows and values (a sparse + sparse add costs ≈ 0.3 ms at 10^7 rows)
        indices = torch.cat([w.grad._indices(), indices], dim=1)
        values = torch.cat([w.grad._values(), values])
    w.grad = torch.sparse_coo_tensor(indices, values, w.shape, check_invariants=False)  # rows < V
