"""The weights' exponential moving average (--ema-decay): the average a hand computation gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.averaging import WeightAverage, ema_step


def test_the_average_is_the_bias_corrected_exponential_average_of_the_weights_after_each_step() -> None:
    decay = 0.5
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    weights = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]]), torch.tensor([[-1.0, 4.0]])]
    average = WeightAverage(model, decay)
    with torch.no_grad():
        model[0].weight.fill_(100.0)  # the initial weights: they must carry no weight in the average
    for w in weights:
        with torch.no_grad():
            model[0].weight.copy_(w)
        model(torch.randn(4, 2))  # training mode: batch norm updates its running statistics and its counter
        average.update(model)
    # Σ_i d^(t−i) w_i / Σ_i d^(t−i), by hand for t = 3, d = 0.5: (0.25 w1 + 0.5 w2 + w3) / 1.75
    expected = (0.25 * weights[0] + 0.5 * weights[1] + weights[2]) / 1.75
    torch.testing.assert_close(average.model[0].weight, expected)
    assert average.model[1].num_batches_tracked.item() == 3  # integer state is copied, not averaged
    assert average.updates == 3 and not average.model.training
    assert not any(p.requires_grad for p in average.model.parameters())


def test_the_first_update_takes_the_current_weights_and_later_ones_move_by_one_minus_decay_at_most() -> None:
    assert ema_step(0.999, 1) == pytest.approx(1.0)
    assert ema_step(0.9, 2) == pytest.approx(0.1 / 0.19)
    assert ema_step(0.999, 100_000) == pytest.approx(0.001)


def test_the_average_resumes_from_its_state() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    first, second = WeightAverage(model, 0.9), WeightAverage(nn.Linear(3, 1), 0.9)
    first.update(model)
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)
    first.update(model)
    second.update(model)
    assert second.updates == 2
    torch.testing.assert_close(second.model.state_dict(), first.model.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_a_decay_outside_0_1_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="ema-decay"):
        WeightAverage(nn.Linear(1, 1), decay)


def test_tables_with_sparse_gradients_are_shared_not_averaged_nor_saved() -> None:
    """A table updated row-wise (sparse gradients) stays the trained one in the average's model, at no memory
    and no cost a step; the dense parameters are averaged; the saved average leaves the table out and loads."""
    torch.manual_seed(1)
    model = nn.ModuleDict({"table": nn.Embedding(50, 4, sparse=True), "dense": nn.Linear(4, 1)})
    average = WeightAverage(model, 0.5)
    assert average.model["table"].weight is model["table"].weight  # shared: one tensor
    assert model["table"].weight.requires_grad  # the trained table keeps training
    with torch.no_grad():
        model["table"].weight.add_(1.0)
        model["dense"].weight.fill_(2.0)
    average.update(model)
    torch.testing.assert_close(average.model["table"].weight, model["table"].weight)
    torch.testing.assert_close(average.model["dense"].weight, torch.full((1, 4), 2.0))
    saved = average.state_dict()
    assert set(saved["weights"]) == {"dense.weight", "dense.bias"}
    again = WeightAverage(model, 0.5)
    again.load_state_dict(saved)
    assert again.updates == 1
    torch.testing.assert_close(again.model["dense"].weight, torch.full((1, 4), 2.0))


def test_an_average_saved_for_another_model_is_refused() -> None:
    """Resuming with a saved average whose tensors are not this model's: an error naming them, not a silent
    half-load (load_state_dict runs non-strict, since the shared tables are left out on purpose)."""
    saved = WeightAverage(nn.Linear(3, 1), 0.9).state_dict()
    other = WeightAverage(nn.Sequential(nn.Linear(3, 1)), 0.9)
    with pytest.raises(RuntimeError, match="does not fit this model"):
        other.load_state_dict(saved)
