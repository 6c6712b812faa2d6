from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.layers import ActivationUnit, AUGRUCell, Dice, InterestEvolution, gru_states, masked_softmax


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


def test_activation_unit_split_first_layer_equals_the_literal_concat() -> None:
    unit = ActivationUnit(6, (5, 3), "prelu")
    q, k = torch.randn(4, 6), torch.randn(4, 7, 6)
    qe = q.unsqueeze(1).expand_as(k)
    literal = torch.cat([qe, k, qe - k, qe * k], dim=-1)  # (B, L, 4D)
    expected = unit.rest(unit.first_activation(unit.first(literal))).squeeze(-1)
    torch.testing.assert_close(unit(q, k), expected, rtol=1e-5, atol=1e-6)


def test_masked_softmax_is_zero_on_padding_and_empty_rows() -> None:
    scores = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    w = masked_softmax(scores, mask)
    assert torch.isfinite(w).all()
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.tensor([1.0, 0.0, 1.0]))


def test_one_augru_step_against_a_hand_computation() -> None:
    cell = AUGRUCell(2, 2, "augru")
    with torch.no_grad():
        cell.input_proj.weight.copy_(torch.tensor([[0.1, 0.2], [0.0, -0.1], [0.3, 0.0], [0.2, 0.2], [-0.2, 0.1],
                                                   [0.05, 0.4]]))  # fmt: skip
        cell.input_proj.bias.copy_(torch.tensor([0.0, 0.1, -0.1, 0.0, 0.2, 0.0]))
        cell.hidden_proj.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.1, 0.1], [-0.3, 0.2], [0.4, -0.4],
                                                    [0.2, 0.3]]))  # fmt: skip
    i = torch.tensor([[1.0, 2.0]])
    h = torch.tensor([[0.5, -0.5]])
    a = torch.tensor([[0.6]])
    # hand computation (paper convention): u, r gates; h̃; ũ = a·u; h' = (1 − ũ) h + ũ h̃
    wi, bi, wh = cell.input_proj.weight, cell.input_proj.bias, cell.hidden_proj.weight
    xi = i @ wi.T + bi
    hh = h @ wh.T
    u = torch.sigmoid(xi[:, 0:2] + hh[:, 0:2])
    r = torch.sigmoid(xi[:, 2:4] + hh[:, 2:4])
    h_tilde = torch.tanh(xi[:, 4:6] + r * hh[:, 4:6])
    u_att = a * u
    expected = (1 - u_att) * h + u_att * h_tilde
    torch.testing.assert_close(cell(cell.input_proj(i), h, a), expected)
    # the same step worked out with scalar arithmetic (math.exp, math.tanh) outside torch
    torch.testing.assert_close(expected, torch.tensor([[0.457976, -0.208458]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["augru", "agru", "aigru"])
def test_fused_training_recurrence_matches_the_cell_loop(kind: str) -> None:
    evo = InterestEvolution(5, kind).double()  # type: ignore[arg-type]
    states = torch.randn(4, 9, 5, dtype=torch.double, requires_grad=True)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, :] = False
    mask[3, [0, 4, 5, 8]] = False  # dropped positions inside a history (history dropout)
    scores = torch.rand(4, 9, dtype=torch.double, requires_grad=True)
    params = [states, scores, *evo.parameters()]
    # attention is zero on padding by construction, as masked_softmax makes it: the fused path skips
    # those steps, so their attention gets no gradient of its own (the mask would zero it anyway)
    fused = evo(states, scores * mask, mask)  # grad enabled → hand-written backward, valid steps only
    g_fused = torch.autograd.grad(fused.pow(2).sum(), params)
    with torch.no_grad():
        loop = evo(states, scores * mask, mask)  # the exported path, all steps
    torch.testing.assert_close(fused, loop)
    # autograd through the cell loop over all steps, the reference for the hand-written backward
    att = scores * mask
    h = states.new_zeros(4, 5)
    x_proj = evo.cell.input_proj(states * att.unsqueeze(-1) if kind == "aigru" else states)
    for t in range(9):
        nxt = evo.cell(x_proj[:, t], h, att[:, t : t + 1])
        h = torch.where(mask[:, t : t + 1], nxt, h) if kind == "aigru" else nxt
    g_ref = torch.autograd.grad(h.pow(2).sum(), params)
    for got, want in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(got, want)


def test_padded_steps_leave_the_augru_state_unchanged() -> None:
    evo = InterestEvolution(4, "augru").eval()
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


def test_fused_gru_matches_torch_gru_values_and_gradients() -> None:
    gru = torch.nn.GRU(5, 4, batch_first=True).double()
    x = torch.randn(3, 8, 5, dtype=torch.double, requires_grad=True)  # (B, L, D)
    ref, _ = gru(x)
    fused = gru_states(gru, x.transpose(0, 1)).transpose(0, 1)  # time-major in and out
    torch.testing.assert_close(fused, ref)
    weights = torch.randn_like(ref)
    params = [x, *gru.parameters()]
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    g_fused = torch.autograd.grad((fused * weights).sum(), params)
    for got, want in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(got, want)
