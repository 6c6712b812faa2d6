from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.datasets import BehaviourLog
from training.regularization import (
    MiniBatchAwareL2,
    add_mba_gradients,
    history_counts,
    mba_penalty,
    occurrence_counts,
)
from training.samples import prepare


def test_mba_penalises_only_rows_present_in_the_batch_scaled_by_frequency() -> None:
    table = nn.Embedding(6, 3, padding_idx=0)
    counts = occurrence_counts([np.array([1, 2, 2, 3, 3, 3, 5])], 6)
    np.testing.assert_array_equal(counts, [0, 1, 2, 3, 0, 1])
    reg = MiniBatchAwareL2(table, counts, lam=0.5)
    batch = torch.tensor([[0, 2, 3, 3]])  # padding, item 2, item 3 twice
    loss = reg(batch)
    w = table.weight.detach()
    expected = 0.5 * (w[2].pow(2).sum() / 2 + w[3].pow(2).sum() / 3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    grad = table.weight.grad
    assert grad is not None
    touched = grad.abs().sum(-1) > 0
    assert touched.tolist() == [False, False, True, True, False, False]
    torch.testing.assert_close(grad[2], 0.5 * 2 * w[2] / 2)


def test_mba_counts_rows_across_several_index_tensors() -> None:
    table = nn.Embedding(4, 2)
    reg = MiniBatchAwareL2(table, np.ones(4), lam=1.0)
    both = reg(torch.tensor([1]), torch.tensor([[2, 2]]))
    w = table.weight.detach()
    assert both.item() == pytest.approx((w[1].pow(2).sum() + w[2].pow(2).sum()).item(), rel=1e-6)


def _mba_by_hand(weight: torch.Tensor, counts: torch.Tensor, lam: float, *indices: torch.Tensor) -> torch.Tensor:
    """Eq. 4 written out: λ Σ ||w_j||² / n_j over the distinct rows j of the batch, padding left out."""
    rows = sorted({int(i) for idx in indices for i in idx.reshape(-1)} - {0})
    return lam * torch.stack([weight[j].pow(2).sum() / counts[j] for j in rows]).sum()


@pytest.mark.parametrize("sparse", [False, True])
def test_mba_equals_the_dense_formula_in_value_and_gradient(sparse: bool) -> None:
    """Over many random batches (duplicates, padding, reused scratch slots): the same value, the same
    gradient on the present rows, and none elsewhere; a sparse table (penalised on its unique rows) gets a
    sparse gradient, a dense one (penalised by a presence vector) a dense gradient."""
    torch.manual_seed(0)
    table = nn.Embedding(500, 8, padding_idx=0, sparse=sparse)
    counts = np.random.default_rng(0).integers(0, 30, 500).astype(np.float64)
    reg = MiniBatchAwareL2(table, counts, lam=0.3)
    for _ in range(20):
        hist = torch.randint(0, 500, (16, 10)) * (torch.rand(16, 10) > 0.3)  # (B, L) with padding
        cand = torch.randint(2, 500, (16,))
        loss = reg(hist, cand)
        (grad,) = torch.autograd.grad(loss, table.weight)
        weight = table.weight.detach().clone().requires_grad_(True)
        ref = _mba_by_hand(weight, reg.counts, 0.3, hist, cand)
        (grad_ref,) = torch.autograd.grad(ref, weight)
        torch.testing.assert_close(loss, ref)
        assert grad.is_sparse == sparse
        dense = grad.to_dense() if sparse else grad
        torch.testing.assert_close(dense, grad_ref)
        present = torch.zeros(500, dtype=torch.bool)
        present[hist.reshape(-1)] = True
        present[cand] = True
        present[0] = False
        if sparse:  # only the present rows are in the sparse gradient, each once
            rows = grad.coalesce().indices()[0]
            assert sorted(rows.tolist()) == present.nonzero().squeeze(1).tolist()


def test_mba_penalty_sums_the_terms_with_the_dense_ones_stacked() -> None:
    """Dense tables of several widths and a sparse one, a padding index in each: the sum of the terms
    written out, and each table's gradient that of its own term."""
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    tables = [nn.Embedding(9, 4, padding_idx=0), nn.Embedding(3, 1, padding_idx=0), nn.Embedding(12, 2, sparse=True)]
    terms = [
        MiniBatchAwareL2(t, rng.integers(1, 9, t.num_embeddings).astype(np.float64), lam)
        for t, lam in zip(tables, [0.3, 0.3, 0.1], strict=True)
    ]
    rows = [torch.tensor([0, 3, 3, 8, 1]), torch.tensor([2, 0]), torch.tensor([0, 5, 11, 5])]
    got = mba_penalty(terms, rows)
    by_hand = [_mba_by_hand(t.table.weight, t.counts, t.lam, r) for t, r in zip(terms, rows, strict=True)]
    torch.testing.assert_close(got, sum(by_hand))
    weights = [t.weight for t in tables]
    for g_got, g_want in zip(
        torch.autograd.grad(got, weights), torch.autograd.grad(sum(by_hand), weights), strict=True
    ):
        torch.testing.assert_close(g_got.to_dense(), g_want.to_dense())


@pytest.mark.parametrize("had_grad", [False, True])
def test_mba_gradients_of_the_dense_tables_are_the_penalty_gradients(had_grad: bool) -> None:
    """add_mba_gradients (training's form) adds to each table's gradient what autograd gives for the
    penalty, padding rows and absent rows nothing; a sparse table's as sparse rows (padding and a repeated
    row included in its batch rows, each counted once)."""
    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    tables = [nn.Embedding(9, 4, padding_idx=0), nn.Embedding(3, 1, padding_idx=0), nn.Embedding(12, 2, sparse=True)]
    terms = [MiniBatchAwareL2(t, rng.integers(1, 9, t.num_embeddings).astype(np.float64), 0.2) for t in tables]
    rows = [torch.tensor([0, 3, 3, 8, 1]), torch.tensor([2, 0]), torch.tensor([0, 5, 11, 5])]
    weights = [t.weight for t in tables]
    want = [g.to_dense() for g in torch.autograd.grad(mba_penalty(terms, rows), weights)]
    earlier = [torch.randn_like(w) for w in weights]
    earlier[2] = torch.sparse_coo_tensor(
        torch.tensor([[5, 1, 5]]), torch.randn(3, 2), (12, 2), check_invariants=True
    )  # uncoalesced
    for w, g in zip(weights, earlier, strict=True):
        w.grad = g.clone() if had_grad else None
    add_mba_gradients(terms, rows)
    for w, g_want, g in zip(weights, want, earlier, strict=True):
        torch.testing.assert_close(w.grad.to_dense(), g_want + g.to_dense() if had_grad else g_want)
    assert tables[2].weight.grad.is_sparse  # a sparse table's gradient stays sparse


@pytest.mark.parametrize("protocol", ["din-movielens", "implicit"])
@pytest.mark.parametrize("max_len", [5, 20])
def test_history_counts_equal_counting_every_gathered_history(
    small_log: BehaviourLog, protocol: str, max_len: int
) -> None:
    """n_j from the events in O(events) equals gathering every sample's (max_len,) history and counting,
    padding included, for both protocols and a max_len shorter than the prepared one."""
    train = prepare(small_log, protocol, max_len=20, seed=0).train
    items, cats, _ = train.history(np.arange(len(train)), max_len)
    n_items, n_cats = int(train.event_item.max()) + 3, int(train.event_cat.max()) + 3
    np.testing.assert_array_equal(
        history_counts(train, max_len, train.event_item, n_items), occurrence_counts([items], n_items)
    )
    np.testing.assert_array_equal(
        history_counts(train, max_len, train.event_cat, n_cats), occurrence_counts([cats], n_cats)
    )
