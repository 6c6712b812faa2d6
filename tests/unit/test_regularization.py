from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.regularization import MiniBatchAwareL2, occurrence_counts


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
