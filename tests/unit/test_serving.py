from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models import ModelConfig, build_model
from models.config import FEEDBACK_POSITIVE, FEEDBACK_UNKNOWN
from models.layers import Dice, InterestEvolution, masked_softmax
from models.serving import FoldedDice, NaiveServing, fold_dice, serving_module, shared_input_recurrence
from training.export import OUTPUT_NAMES, GraphSpec, cpu_session, export_graph, random_inputs, torch_reference

CFG = ModelConfig(
    n_items=40,
    n_categories=6,
    user_feature_cardinalities=(5,),
    item_dim=8,
    category_dim=4,
    mlp_hidden=(12, 6),
    attention_hidden=(10, 5),
    aux_hidden=(8,),
)


def test_folded_dice_equals_dice_in_eval() -> None:
    dice = Dice(5)
    for _ in range(20):
        dice(torch.randn(32, 5) * 2 + 0.5)
    dice.eval()
    x = torch.randn(7, 3, 5)
    torch.testing.assert_close(FoldedDice(dice)(x), dice(x))
    folded = fold_dice(torch.nn.Sequential(torch.nn.Linear(5, 5), dice))
    assert isinstance(folded[1], FoldedDice) and isinstance(dice, Dice)  # the original is untouched


Batch = dict[str, torch.Tensor]


def _trained_and_a_batch(model: torch.nn.Module, feedback: bool = False) -> tuple[Batch, torch.Tensor]:
    """A few training-mode passes (batch-norm statistics move off their start), then eval mode and a serving
    batch of 3 users (one with an empty history) and 25 candidates; returns the batch and its history mask."""
    model.train()
    for _ in range(3):
        mask = torch.rand(16, 9) > 0.3
        extra = {"hist_feedback": torch.randint(2, 4, (16, 9)) * mask} if feedback else {}
        items, cats = torch.randint(2, 40, (16, 9)) * mask, torch.randint(2, 6, (16, 9)) * mask
        model(
            items,
            cats,
            mask,
            torch.randint(2, 40, (16,)),
            torch.randint(2, 6, (16,)),
            torch.randint(1, 5, (16, 1)),
            **extra,
        )
    model.eval()
    lengths = torch.tensor([0, 9, 4])
    mask = torch.arange(9) < lengths[:, None]
    feed = {
        "hist_items": torch.randint(2, 40, (3, 9)) * mask,
        "hist_cats": torch.randint(2, 6, (3, 9)) * mask,
        "hist_mask": mask,
        "user_feats": torch.randint(1, 5, (3, 1)),
        "cand_items": torch.randint(1, 40, (25,)),
        "cand_cats": torch.randint(1, 6, (25,)),
        "cand_user": torch.randint(0, 3, (25,)),
    }
    return feed, mask


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("base", {}),
        ("din", {}),
        ("din", {"attention_softmax": True}),
        ("dien", {}),
        ("dien", {"evolution": "agru"}),
        ("dien", {"evolution": "aigru"}),
        ("dien", {"dien_pooling": "attention"}),
    ],
)
def test_serving_form_equals_the_training_form(kind: str, options: dict[str, object]) -> None:
    model = build_model(kind, ModelConfig(**{**CFG.to_dict(), **options}))
    feed, mask = _trained_and_a_batch(model)
    with torch.no_grad():
        p, a = serving_module(model)(**feed)
        p_ref, a_ref = NaiveServing(model)(**feed)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
    assert (a[~mask[feed["cand_user"]]] == 0).all()


@pytest.mark.parametrize(
    ("candidates", "options", "slope"),
    [
        ((100, 100, 100), {}, 0.25),  # enough candidates per user: the per-user (U, C_max) grid
        ((100, 100, 100), {"attention_softmax": True}, 0.25),
        ((200, 190, 195), {}, 1.5),  # uneven counts (empty grid slots); a slope > 1 keeps the 4-op PReLU
        ((3, 200, 7), {}, 0.25),  # too uneven for the grid: per candidate
    ],
)
def test_din_serving_layouts_equal_the_training_form(
    candidates: tuple[int, ...], options: dict[str, object], slope: float
) -> None:
    """Both layouts of DIN's first attention layer (chosen from the batch's shape) match the training form,
    including a user with an empty history and candidates in no particular order."""
    model = build_model("din", ModelConfig(**{**CFG.to_dict(), **options})).eval()
    with torch.no_grad():
        model.activation_unit.first_activation.weight[0] = slope  # type: ignore[index]
    lengths = torch.tensor([0, 9, 4])
    mask = torch.arange(9) < lengths[:, None]
    n = sum(candidates)
    feed = {
        "hist_items": torch.randint(2, 40, (3, 9)) * mask,
        "hist_cats": torch.randint(2, 6, (3, 9)) * mask,
        "hist_mask": mask,
        "user_feats": torch.randint(1, 5, (3, 1)),
        "cand_items": torch.randint(1, 40, (n,)),
        "cand_cats": torch.randint(1, 6, (n,)),
        "cand_user": torch.repeat_interleave(torch.arange(3), torch.tensor(candidates))[torch.randperm(n)],
    }
    for device in ("cpu", "cuda"):  # the CUDA form is the per-candidate layout alone, whatever the shape
        with torch.no_grad():
            p, a = serving_module(model, device)(**feed)
            p_ref, a_ref = NaiveServing(model)(**feed)
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
        assert (a[~mask[feed["cand_user"]]] == 0).all()


@pytest.mark.parametrize("kind", ["base", "din", "dien"])
def test_history_feedback_in_the_serving_form(kind: str) -> None:
    """With history feedback the serving form still equals the training form; the feedback changes the
    scores, and "unknown" feedback scores like no feedback at all."""
    model = build_model(kind, ModelConfig(**{**CFG.to_dict(), "history_feedback": True}))
    feed, mask = _trained_and_a_batch(model, feedback=True)
    feedback = torch.randint(1, 4, (3, 9)) * mask
    for device in ("cpu", "cuda"):
        serving = serving_module(model, device)
        with torch.no_grad():
            p, a = serving(**feed, hist_feedback=feedback)
            p_ref, a_ref = NaiveServing(model)(**feed, hist_feedback=feedback)
            p_liked, _ = serving(**feed, hist_feedback=torch.full((3, 9), FEEDBACK_POSITIVE) * mask)
            p_unknown, _ = serving(**feed, hist_feedback=torch.full((3, 9), FEEDBACK_UNKNOWN) * mask)
            p_none, _ = serving(**feed)
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p_unknown, p_none)
        with_history = feed["cand_user"] != 0
        assert (p_liked[with_history] - p_none[with_history]).abs().min() > 0


@pytest.mark.parametrize(
    ("kind", "options"),
    [("base", {}), ("din", {}), ("dien", {}), ("dien", {"evolution": "aigru"}), ("dien", {"history_feedback": True})],
)
def test_a_masked_behaviour_is_absent_in_the_serving_form_too(kind: str, options: dict[str, object]) -> None:
    """A hole in a history's mask means the same in the serving graph as in the paper form: the behaviour
    is not there (the service sends right-padded histories; a caller of the graph may not)."""
    model = build_model(kind, ModelConfig(**{**CFG.to_dict(), **options}))
    feedback = bool(options.get("history_feedback"))
    feed, mask = _trained_and_a_batch(model, feedback=feedback)
    holes = mask & (
        torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1, 1, 1, 1]]) > 0
    )
    feed["hist_mask"] = holes
    if feedback:
        feed["hist_feedback"] = torch.randint(1, 4, (3, 9)) * holes
    with torch.no_grad():
        p, a = serving_module(model)(**feed)
        p_ref, a_ref = NaiveServing(model)(**feed)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
    assert (a[~holes[feed["cand_user"]]] == 0).all()


@pytest.mark.parametrize("kind", ["augru", "agru", "aigru"])
def test_shared_input_recurrence_equals_the_paper_recurrence(kind: str) -> None:
    """The serving recurrence (inputs kept per user, gathered per step, split gate weights) computes the
    paper form's ``InterestEvolution`` for candidates of several users, padded steps included."""
    torch.manual_seed(0)
    users, steps, hidden = 3, 7, 6
    evolution = InterestEvolution(hidden, kind)  # type: ignore[arg-type]
    states = torch.randn(users, steps, hidden)  # (U, S, H)
    cand_user = torch.tensor([2, 0, 1, 1, 2, 0, 0])  # (N,)
    mask = (torch.arange(steps) < torch.tensor([7, 3, 5])[:, None]).index_select(0, cand_user)  # (N, S)
    weights = masked_softmax(torch.randn(cand_user.size(0), steps), mask)  # (N, S)
    expected = evolution(states.index_select(0, cand_user), weights, mask)  # (N, H)

    w_in, b_in, w_hidden = evolution.input_proj.weight, evolution.input_proj.bias, evolution.hidden_proj.weight
    proj = states.transpose(0, 1) @ w_in.t()  # (S, U, 3H)
    if kind != "aigru":
        proj = proj + b_in
    got = shared_input_recurrence(
        proj[:, :, : 2 * hidden].contiguous(),
        proj[:, :, 2 * hidden :].contiguous(),
        cand_user,
        weights.t().unsqueeze(-1),
        mask.t().unsqueeze(-1).float(),
        w_hidden[: 2 * hidden].t().contiguous(),
        w_hidden[2 * hidden :].t().contiguous(),
        b_in[: 2 * hidden],
        b_in[2 * hidden :],
        hidden,
        kind == "aigru",
        kind != "agru",
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("evolution", ["augru", "aigru"])
def test_dien_serving_graph_skips_the_padded_tail_and_matches_the_paper_form(evolution: str, tmp_path: Path) -> None:
    """Histories padded far past the longest one (the evolution runs only as many steps as that history
    holds) and an all-empty call give the paper form's answers, in PyTorch and in the exported ONNX graph."""
    model = build_model("dien", ModelConfig(**{**CFG.to_dict(), "evolution": evolution}))
    _trained_and_a_batch(model)
    spec = GraphSpec(n_items=40, n_categories=6, feature_cardinalities=(5,))
    path = tmp_path / "dien.onnx"
    export_graph(serving_module(model), path, spec)
    session = cpu_session(path)
    rng = np.random.default_rng(0)
    for lengths, counts in (([3, 0, 5], [4, 2, 9]), ([0, 0], [3, 1]), ([1], [6])):
        feed = random_inputs(rng, spec, lengths, counts, width=12)
        prob, att = session.run(list(OUTPUT_NAMES), feed)
        with torch.no_grad():
            p_serving, a_serving = serving_module(model)(**{k: torch.from_numpy(v) for k, v in feed.items()})
        p_ref, a_ref = torch_reference(model, feed)
        assert att.shape == a_ref.shape == (sum(counts), 12)
        np.testing.assert_allclose(prob, p_ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(att, a_ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(p_serving.numpy(), p_ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a_serving.numpy(), a_ref, rtol=0, atol=1e-6)
        assert (att[~feed["hist_mask"][feed["cand_user"]]] == 0).all()
