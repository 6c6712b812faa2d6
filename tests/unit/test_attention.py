"""DIN's attention toolbox (models/attention.py): each scorer's shapes and masking, its serving form, and its
ONNX export's parity with the paper form on a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import ModelConfig, build_model
from models.attention import MultiHeadTargetAttention, RecencyPositions
from models.din import DIN
from models.fast_training import training_form
from models.serving import NaiveServing, serving_module
from training.export import GraphSpec, check_parity, cpu_session, export_graph

KINDS = ["mlp", "dot", "bilinear", "multihead", "position"]
CFG = ModelConfig(
    n_items=40,
    n_categories=6,
    user_feature_cardinalities=(5,),
    item_dim=8,
    category_dim=4,
    mlp_hidden=(12, 6),
    attention_hidden=(10, 5),
    attention_heads=3,
    attention_positions=6,
)


def din(kind: str, **options: object) -> DIN:
    torch.manual_seed(0)
    model = build_model("din", ModelConfig(**{**CFG.to_dict(), "attention": kind, **options}))
    assert isinstance(model, DIN)
    return model.eval()


def history(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = torch.arange(width) < torch.tensor(lengths)[:, None]  # (B, L)
    gen = torch.Generator().manual_seed(1)
    items = torch.randint(2, 40, (len(lengths), width), generator=gen) * mask
    cats = torch.randint(2, 6, (len(lengths), width), generator=gen) * mask
    return items, cats, mask


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_each_scorer_gives_one_weight_per_behaviour_zero_on_padding(kind: str, softmax: bool) -> None:
    model = din(kind, attention_softmax=softmax)
    items, cats, mask = history([0, 3, 9, 1], 9)
    out = model(items, cats, mask, torch.tensor([3, 4, 5, 6]), torch.tensor([2, 3, 4, 5]), torch.ones(4, 1).long())
    assert out.logits.shape == (4,) and out.attention.shape == (4, 9)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.attention).all()
    assert (out.attention[~mask] == 0).all() and (out.attention[mask] > 0).all()
    if softmax:  # normalised over the valid behaviours; an empty history has no weight at all
        torch.testing.assert_close(out.attention.sum(1), torch.tensor([0.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("kind", KINDS)
def test_padding_does_not_change_the_answer(kind: str) -> None:
    """The same histories padded to another width score the same (positions count valid behaviours only)."""
    model = din(kind)
    items, cats, mask = history([2, 5], 5)
    wide = [torch.nn.functional.pad(x, (0, 4)) for x in (items, cats, mask)]
    args = (torch.tensor([7, 8]), torch.tensor([2, 3]), torch.ones(2, 1).long())
    with torch.no_grad():
        narrow_out, wide_out = model(items, cats, mask, *args), model(*wide, *args)
    torch.testing.assert_close(wide_out.logits, narrow_out.logits)
    torch.testing.assert_close(wide_out.attention[:, :5], narrow_out.attention)


def test_recency_ranks_count_valid_behaviours_from_the_latest() -> None:
    positions = RecencyPositions(3, 2)
    mask = torch.tensor([[True, True, False, True, False], [True, True, True, True, True]])
    table = positions.table.weight
    got = positions(mask)  # (2, 5, 2)
    # ranks: [2, 1, pad, 0, pad] and [4→2, 3→2, 2, 1, 0] (ranks from 3 on share the last embedding)
    expected = torch.stack(
        [
            torch.stack([table[2], table[1], torch.zeros(2), table[0], torch.zeros(2)]),
            torch.stack([table[2], table[2], table[2], table[1], table[0]]),
        ]
    )
    torch.testing.assert_close(got, expected)


def test_multihead_attention_against_a_hand_computation_and_its_bad_configuration() -> None:
    torch.manual_seed(0)
    mha = MultiHeadTargetAttention(4, 2)
    q, k = torch.randn(1, 4), torch.randn(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    weights, interest = mha.attend(
        q, mha.keys_side(k), mask, lambda s, m: torch.softmax(s.masked_fill(~m, -1e9), -1) * m
    )
    w_q, (w_k, w_v) = mha.query_proj.weight, mha.key_value_proj.weight.split(4)
    heads_w, heads_v = [], []
    for i in range(2):
        rows = slice(2 * i, 2 * i + 2)
        s = (k[0, :2] @ w_k[rows].T) @ (w_q[rows] @ q[0]) / 2**0.5  # (2,) the valid behaviours
        a = torch.softmax(s, 0)
        heads_w.append(torch.cat([a, torch.zeros(1)]))
        heads_v.append(a @ (k[0, :2] @ w_v[rows].T))
    torch.testing.assert_close(weights[0], (heads_w[0] + heads_w[1]) / 2)
    torch.testing.assert_close(interest[0], torch.cat(heads_v))
    with pytest.raises(ValueError, match="3 heads do not divide"):
        MultiHeadTargetAttention(4, 3)


@pytest.mark.parametrize("kind", ["dot", "bilinear", "multihead"])
def test_scorers_without_the_activation_unit_carry_no_unit_parameters(kind: str) -> None:
    model = din(kind)
    assert not hasattr(model, "activation_unit")
    assert not any(name.startswith("activation_unit") for name, _ in model.named_parameters())
    assert training_form(model) is model  # no training-speed form: the paper form trains


@pytest.mark.parametrize("feedback", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_serving_form_equals_the_paper_form(kind: str, feedback: bool) -> None:
    model = din(kind, history_feedback=feedback)
    items, cats, mask = history([0, 9, 4], 9)
    cand_user = torch.tensor([1, 0, 2, 1, 1, 2, 0, 1])
    feed = {
        "hist_items": items,
        "hist_cats": cats,
        "hist_mask": mask,
        "user_feats": torch.tensor([[1], [2], [4]]),
        "cand_items": torch.randint(1, 40, (8,)),
        "cand_cats": torch.randint(1, 6, (8,)),
        "cand_user": cand_user,
    }
    if feedback:  # the ml-100k recipe's setting: each behaviour's own label joins its key
        feed["hist_feedback"] = torch.randint(1, 4, (3, 9)) * mask
    with torch.no_grad():
        p, a = serving_module(model)(**feed)
        p_ref, a_ref = NaiveServing(model)(**feed)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_export_parity_of_each_scorer(kind: str, tmp_path: Path) -> None:
    """The export's own parity check (every edge case: empty histories, 500 candidates, several users) on
    the ONNX graph of each scorer, with the graph's inputs and outputs unchanged."""
    model = din(kind, attention_softmax=kind == "multihead")
    spec = GraphSpec(n_items=40, n_categories=6, feature_cardinalities=(5,))
    path = tmp_path / "model.onnx"
    export_graph(serving_module(model), path, spec)
    session = cpu_session(path)
    assert [i.name for i in session.get_inputs()] == list(spec.input_names)
    assert [o.name for o in session.get_outputs()] == ["probability", "attention"]
    report = check_parity(model, session, spec, max_len=9, seed=3)
    assert report["max_abs_diff_probability"] <= 1e-5 and report["max_abs_diff_attention"] <= 1e-5
    assert np.isfinite(report["max_abs_diff_probability"])
