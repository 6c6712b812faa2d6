from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.layers import ActivationUnit, Dice, InterestEvolution, masked_softmax, valid_first


def test_dice_in_eval_mode_is_independent_of_the_batch() -> None:
    dice = Dice(8)
    dice.train()
    for _ in range(50):  # accumulate running statistics
        dice(torch.randn(64, 8) * 3 + 1)
    dice.eval()
    x = torch.randn(16, 8)
    alone = torch.cat([dice(x[i : i + 1]) for i in range(16)])
    together = dice(x)
    with_others = dice(torch.cat([x, torch.randn(100, 8) * 50]))[:16]
    torch.testing.assert_close(alone, together)
    torch.testing.assert_close(together, with_others)


def test_dice_matches_the_paper_formula() -> None:
    dice = Dice(4).eval()
    with torch.no_grad():
        dice.norm.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
        dice.norm.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 1.0]))
        dice.alpha.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    s = torch.tensor([[0.5, -2.0, 1.0, 3.0]])
    p = torch.sigmoid((s - dice.norm.running_mean) / torch.sqrt(dice.norm.running_var + dice.norm.eps))
    torch.testing.assert_close(dice(s), p * s + (1 - p) * dice.alpha * s)


def test_activation_unit_split_weights_compute_the_paper_first_layer() -> None:
    """The serving and training forms' split first layer equals the paper's MLP over [q, k, q − k, q ⊙ k]."""
    unit = ActivationUnit(6, (5, 3), "prelu")
    q, k = torch.randn(4, 6), torch.randn(4, 7, 6)
    w_query, w_key, w_prod = unit.split_weights()
    z = (q @ w_query.T + unit.first.bias).unsqueeze(1) + k @ w_key.T + (q.unsqueeze(1) * k) @ w_prod.T  # (B, L, H)
    split = unit.rest(unit.first_activation(z)).squeeze(-1)
    torch.testing.assert_close(unit(q, k), split, rtol=1e-5, atol=1e-6)


def test_valid_first_is_a_stable_partition() -> None:
    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    order = valid_first(mask)
    assert order.tolist() == [[1, 3, 4, 0, 2], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 2, 4, 1, 3]]
    compact = mask.gather(1, order)
    assert (compact == (torch.arange(5) < mask.sum(1, keepdim=True))).all()  # right-padded


def test_masked_softmax_is_zero_on_padding_and_empty_rows() -> None:
    scores = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    w = masked_softmax(scores, mask)
    assert torch.isfinite(w).all()
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.tensor([1.0, 0.0, 1.0]))


def test_two_augru_steps_against_a_hand_computation() -> None:
    evo = InterestEvolution(2, "augru")
    with torch.no_grad():
        evo.input_proj.weight.copy_(
            torch.tensor([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0], [0.2, 0.2], [-0.2, 0.1], [0.05, 0.4]])
        )
        evo.input_proj.bias.copy_(torch.tensor([0.0, 0.1, -0.1, 0.0, 0.2, 0.0]))
        evo.hidden_proj.weight.copy_(
            torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.1, 0.1], [-0.3, 0.2], [0.4, -0.4], [0.2, 0.3]])
        )
    i = torch.tensor([[[1.0, 2.0], [-1.0, 0.5]]])  # (1, 2, 2): two steps
    a = torch.tensor([[0.6, 0.3]])
    # hand computation (paper convention): u, r gates; h̃; ũ = a·u; h' = (1 − ũ) h + ũ h̃, from h = 0
    wi, bi, wh = evo.input_proj.weight, evo.input_proj.bias, evo.hidden_proj.weight
    h = torch.zeros(1, 2)
    for t in range(2):
        xi, hh = i[:, t] @ wi.T + bi, h @ wh.T
        u = torch.sigmoid(xi[:, 0:2] + hh[:, 0:2])
        r = torch.sigmoid(xi[:, 2:4] + hh[:, 2:4])
        h_tilde = torch.tanh(xi[:, 4:6] + r * hh[:, 4:6])
        u_att = a[:, t : t + 1] * u
        h = (1 - u_att) * h + u_att * h_tilde
    with torch.no_grad():
        got = evo(i, a, torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(got, h)
    # the first step worked out with scalar arithmetic (math.exp, math.tanh) outside torch
    with torch.no_grad():
        first = evo(i[:, :1], a[:, :1], torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(first, torch.tensor([[0.073715, 0.196963]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["augru", "agru", "aigru"])
def test_padded_steps_leave_the_evolution_state_unchanged(kind: str) -> None:
    evo = InterestEvolution(4, kind).eval()  # type: ignore[arg-type]
    states = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    att = torch.rand(2, 6) * mask
    with torch.no_grad():
        full = evo(states, att, mask)
        short = evo(states[:, :3], att[:, :3], mask[:, :3])
    torch.testing.assert_close(full[0], short[0])


def test_config_round_trips() -> None:
    cfg = ModelConfig(n_items=10, n_categories=4, user_feature_cardinalities=(3, 5), mlp_hidden=(8,))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
