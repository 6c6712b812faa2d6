from __future__ import annotations

import itertools

import pytest
import torch

from training.schedule import build_schedulers, lr_factor


def test_warm_up_rises_linearly_then_cosine_decays_to_zero_at_the_last_step() -> None:
    factors = [lr_factor(step, 4, 14, "cosine") for step in range(15)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.5)  # half-way through the decay
    assert factors[14] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))


def test_linear_decay_and_no_decay() -> None:
    assert [lr_factor(s, 0, 4, "linear") for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert [lr_factor(s, 2, 4, "none") for s in range(5)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    assert lr_factor(100, 0, 4, "cosine") == pytest.approx(0.0)  # past the end: stays at 0


def test_an_unknown_decay_fails_before_training() -> None:
    with pytest.raises(ValueError, match="cosine"):
        build_schedulers([], 0, 10, "exponential")


def test_each_optimiser_follows_the_factor_of_its_own_initial_lr() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    e = torch.nn.Parameter(torch.zeros(3))
    optimisers = [torch.optim.SGD([w], lr=1.0), torch.optim.Adam([e], lr=0.1)]
    schedulers = build_schedulers(optimisers, 2, 6, "linear")
    lrs = []
    for _ in range(6):
        lrs.append([opt.param_groups[0]["lr"] for opt in optimisers])
        for opt in optimisers:
            opt.step()
        for sched in schedulers:
            sched.step()
    assert [a for a, _ in lrs] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert [b for _, b in lrs] == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025])
