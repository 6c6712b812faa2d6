from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model
from models.base import ModelOutput

CFG = ModelConfig(n_items=50, n_categories=7, user_feature_cardinalities=(4, 6), item_dim=8, category_dim=4,
                  user_dim=3, mlp_hidden=(16, 8), attention_hidden=(12, 6), aux_hidden=(10, 5))  # fmt: skip


def _inputs(b: int = 5, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([0, 1, 4, length, 6][:b])
    mask = torch.arange(length) < lengths[:, None]
    return {
        "hist_items": torch.randint(2, 50, (b, length), generator=g) * mask,
        "hist_cats": torch.randint(2, 7, (b, length), generator=g) * mask,
        "hist_mask": mask,
        "cand_item": torch.randint(2, 50, (b,), generator=g),
        "cand_cat": torch.randint(2, 7, (b,), generator=g),
        "user_feats": torch.randint(1, 4, (b, 2), generator=g),
    }


def _warm(model: torch.nn.Module) -> None:
    model.train()
    for _ in range(5):  # move the batch-norm statistics away from their initial values
        model(**_inputs())
    model.eval()


@pytest.mark.parametrize("kind", ["base", "din", "dien"])
def test_shapes_attention_on_padding_and_empty_history(kind: str) -> None:
    model = build_model(kind, CFG)
    _warm(model)
    x = _inputs()
    with torch.no_grad():
        out = model(**x)
    assert out.logits.shape == (5,) and out.attention.shape == (5, 9)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.attention).all()
    assert (out.attention[~x["hist_mask"]] == 0).all()
    assert (out.attention[0] == 0).all()  # the empty history


@pytest.mark.parametrize("kind", ["base", "din", "dien"])
def test_a_rows_score_does_not_depend_on_its_batch_in_eval(kind: str) -> None:
    model = build_model(kind, CFG)
    _warm(model)
    x = _inputs()
    with torch.no_grad():
        together = model(**x).logits
        alone = torch.cat([model(**{k: v[i : i + 1] for k, v in x.items()}).logits for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["din", "dien"])
def test_padding_length_does_not_change_scores(kind: str) -> None:
    model = build_model(kind, CFG)
    _warm(model)
    x = _inputs(length=9)
    longer = {k: (torch.nn.functional.pad(v, (0, 5)) if v.dim() == 2 and k.startswith("hist") else v)
              for k, v in x.items()}  # fmt: skip
    with torch.no_grad():
        a, b = model(**x), model(**longer)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.attention, b.attention[:, :9], rtol=1e-5, atol=1e-6)


def test_din_attention_options() -> None:
    model = build_model("din", ModelConfig(**{**CFG.to_dict(), "attention_softmax": True}))
    _warm(model)
    x = _inputs()
    with torch.no_grad():
        w = model(**x).attention
    torch.testing.assert_close(w.sum(-1)[1:], torch.ones(4))
    plain = build_model("din", CFG).eval()
    with torch.no_grad():
        w2 = plain(**x).attention
    assert ((w2 > 0) & (w2 < 1))[x["hist_mask"]].all()


def test_dien_auxiliary_loss_is_returned_with_negatives() -> None:
    model = build_model("dien", CFG)
    x = _inputs()
    out = model(**x, neg_items=torch.randint(2, 50, (5, 9)), neg_cats=torch.randint(2, 7, (5, 9)))
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert model.extractor.weight_hh_l0.grad is not None


def test_dien_auxiliary_loss_matches_the_literal_masked_form() -> None:
    """Only steps with a real next behaviour are computed; the literal form runs the auxiliary net on
    concat(h_t, e_{t+1}) at every step and masks the loss afterwards. Values and gradients must agree."""
    model = build_model("dien", CFG).double()
    x = _inputs()
    x["hist_mask"][3, 2] = False  # a dropped position inside a history, as history dropout makes
    g = torch.Generator().manual_seed(2)
    neg_items, neg_cats = torch.randint(2, 50, (5, 9), generator=g), torch.randint(2, 7, (5, 9), generator=g)
    behaviours = model.embedding.behaviours(x["hist_items"], x["hist_cats"])  # (B, L, D)
    states = torch.randn(5, 9, behaviours.shape[-1], dtype=torch.double, requires_grad=True)
    params = [states, *model.parameters()]
    got = model.auxiliary_loss(states, behaviours, neg_items, neg_cats, x["hist_mask"])
    g_got = torch.autograd.grad(got, params, allow_unused=True)

    behaviours = model.embedding.behaviours(x["hist_items"], x["hist_cats"])
    negatives = model.embedding.behaviours(neg_items, neg_cats)
    valid = x["hist_mask"][:, 1:].double()  # (B, L-1)

    def aux_logits(e_next: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(model.aux_first(torch.cat([states[:, :-1], e_next[:, 1:]], dim=-1)))
        return model.aux_rest(hidden).squeeze(-1)  # (B, L-1)

    per_step = -torch.log(torch.sigmoid(aux_logits(behaviours))) - torch.log(1 - torch.sigmoid(aux_logits(negatives)))
    want = (per_step * valid).sum() / valid.sum()
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("options", [{}, {"attention_softmax": True}, {"attention_activation": "dice"}])
def test_din_training_runs_the_activation_unit_on_valid_positions_only(options: dict[str, object]) -> None:
    """In training the unit skips padded and dropped positions (packed_scores); the loss and every gradient
    equal the full (B, L) form's. A unit with Dice keeps the full form (its batch statistics would differ)."""
    cfg = ModelConfig(**{**CFG.to_dict(), **options})
    torch.manual_seed(3)
    packed = build_model("din", cfg).train()
    full = build_model("din", cfg).train()
    full.load_state_dict(packed.state_dict())
    full.activation_unit.elementwise = False  # force the (B, L) form
    inputs = _inputs()
    inputs["hist_mask"] = inputs["hist_mask"] & (torch.rand(inputs["hist_mask"].shape) > 0.4)  # history dropout
    outs = []
    for model in (packed, full):
        out = model(**inputs)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, torch.tensor([1.0, 0, 1, 0, 1]))
        loss.backward()
        outs.append((out, loss))
    (p_out, p_loss), (f_out, f_loss) = outs
    assert packed.activation_unit.elementwise == ("attention_activation" not in options)
    torch.testing.assert_close(p_loss, f_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p_out.attention, f_out.attention, rtol=1e-5, atol=1e-7)
    assert (p_out.attention[~inputs["hist_mask"]] == 0).all()
    for (name, a), b in zip(packed.named_parameters(), full.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


DIEN_OPTIONS = [{}, {"evolution": "agru"}, {"evolution": "aigru"}, {"dien_pooling": "attention"},
                {"history_feedback": True}]  # fmt: skip
HISTORY_KEYS = ("hist_items", "hist_cats", "hist_feedback", "neg_items", "neg_cats")


def _dien_training_inputs(holes: bool) -> dict[str, torch.Tensor]:
    """_inputs with feedback and sampled negatives; with ``holes``, history dropout on top of the padding
    (row 1 loses its only behaviour, row 3 its last one)."""
    x = _inputs()
    g = torch.Generator().manual_seed(4)
    mask = x["hist_mask"]
    x["hist_feedback"] = torch.randint(2, 4, mask.shape, generator=g) * mask
    x["neg_items"], x["neg_cats"] = torch.randint(2, 50, mask.shape, generator=g), torch.randint(2, 7, mask.shape)
    if holes:
        kept = torch.rand(mask.shape, generator=g) > 0.4
        kept[1, 0], kept[3, -1], kept[2, 0], kept[4, 2] = False, False, True, True
        x["hist_mask"] = mask & kept
    return x


def _compacted(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each row's kept behaviours (and their feedback and negatives) moved to the front in their order, the
    rest padding: the batch as it would be had the dropped behaviours never been there."""
    mask = x["hist_mask"]
    compact = torch.arange(mask.shape[1]) < mask.sum(1, keepdim=True)  # (B, L) right-padded
    out = {**x, "hist_mask": compact}
    for key in HISTORY_KEYS:
        moved = torch.zeros_like(x[key])
        moved[compact] = x[key][mask]  # boolean indexing keeps each row's order
        out[key] = moved
    return out


def _loss_and_grads(
    model: torch.nn.Module, out: ModelOutput, attention_weights: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Click loss + auxiliary loss + a weighted sum of the attention (so its gradient is checked too)."""
    labels = torch.tensor([1.0, 0, 1, 0, 1], dtype=torch.double)
    assert out.aux_loss is not None
    loss = (
        F.binary_cross_entropy_with_logits(out.logits, labels)
        + out.aux_loss
        + (out.attention * attention_weights).sum()
    )
    return loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def _assert_same_grads(model: torch.nn.Module, got: tuple, want: tuple) -> None:  # type: ignore[type-arg]
    for (name, _), a, b in zip(model.named_parameters(), got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("options", DIEN_OPTIONS)
def test_dien_packed_training_form_equals_the_fixed_shape_form_without_holes(options: dict[str, object]) -> None:
    """On right-padded histories the packed form (S steps) computes what the fixed-shape form (L steps, the
    form eval and export run) does: logits, attention, auxiliary loss and every parameter's gradient."""
    torch.manual_seed(5)
    model = build_model("dien", ModelConfig(**{**CFG.to_dict(), **options})).double().train()
    x = _dien_training_inputs(holes=False)
    w = torch.randn(x["hist_mask"].shape, dtype=torch.double)
    packed = model(**x)  # gradients on: the packed form
    fixed = model.fixed_shape_forward(**x)
    torch.testing.assert_close(packed.logits, fixed.logits)
    torch.testing.assert_close(packed.attention, fixed.attention)
    torch.testing.assert_close(packed.aux_loss, fixed.aux_loss)
    loss, grads = _loss_and_grads(model, packed, w)
    loss_ref, grads_ref = _loss_and_grads(model, fixed, w)
    torch.testing.assert_close(loss, loss_ref)
    _assert_same_grads(model, grads, grads_ref)


@pytest.mark.parametrize("options", DIEN_OPTIONS)
def test_dien_packed_training_form_drops_behaviours_entirely(options: dict[str, object]) -> None:
    """With history dropout's holes, training sees the history without the dropped behaviours (as serving
    would): the same logits, losses and gradients as the fixed-shape form on the compacted batch, and the
    attention at the kept behaviours' own positions (zero elsewhere). The interest extractor no longer reads
    a dropped behaviour, so the fixed-shape form on the holed batch itself gives other logits."""
    torch.manual_seed(6)
    model = build_model("dien", ModelConfig(**{**CFG.to_dict(), **options})).double().train()
    x = _dien_training_inputs(holes=True)
    compact = _compacted(x)
    mask, compact_mask = x["hist_mask"], compact["hist_mask"]
    w = torch.randn(mask.shape, dtype=torch.double)
    w_compact = torch.zeros_like(w)
    w_compact[compact_mask] = w[mask]
    packed = model(**x)
    fixed = model.fixed_shape_forward(**compact)
    torch.testing.assert_close(packed.logits, fixed.logits)
    torch.testing.assert_close(packed.aux_loss, fixed.aux_loss)
    assert (packed.attention[~mask] == 0).all()
    torch.testing.assert_close(packed.attention[mask], fixed.attention[compact_mask])
    loss, grads = _loss_and_grads(model, packed, w)
    loss_ref, grads_ref = _loss_and_grads(model, fixed, w_compact)
    torch.testing.assert_close(loss, loss_ref)
    _assert_same_grads(model, grads, grads_ref)
    with torch.no_grad():
        holed = model.fixed_shape_forward(**x)
    assert not torch.allclose(holed.logits, packed.logits)
