from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model

CFG = ModelConfig(
    n_items=50,
    n_categories=7,
    user_feature_cardinalities=(4, 6),
    item_dim=8,
    category_dim=4,
    user_dim=3,
    mlp_hidden=(16, 8),
    attention_hidden=(12, 6),
    aux_hidden=(10, 5),
)


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
    longer = {
        k: (torch.nn.functional.pad(v, (0, 5)) if v.dim() == 2 and k.startswith("hist") else v) for k, v in x.items()
    }
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
    plain = build_model("din", ModelConfig(**{**CFG.to_dict(), "attention_softmax": False})).eval()  # the paper's
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


def _holed(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """x with feedback, sampled negatives and history dropout's holes (row 3 loses its last behaviour)."""
    g = torch.Generator().manual_seed(4)
    mask = x["hist_mask"]
    kept = torch.rand(mask.shape, generator=g) > 0.4
    kept[3, -1], kept[4, 2] = False, True
    return {
        **x,
        "hist_feedback": torch.randint(2, 4, mask.shape, generator=g) * mask,
        "neg_items": torch.randint(2, 50, mask.shape, generator=g),
        "neg_cats": torch.randint(2, 7, mask.shape, generator=g),
        "hist_mask": mask & kept,
    }


def _compacted(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each row's kept behaviours (and their feedback and negatives) moved to the front in their order, the
    rest padding: the batch as it would be had the dropped behaviours never been there."""
    mask = x["hist_mask"]
    compact = torch.arange(mask.shape[1]) < mask.sum(1, keepdim=True)  # (B, L) right-padded
    out = {**x, "hist_mask": compact}
    for key in ("hist_items", "hist_cats", "hist_feedback", "neg_items", "neg_cats"):
        moved = torch.zeros_like(x[key])
        moved[compact] = x[key][mask]  # boolean indexing keeps each row's order
        out[key] = moved
    return out


@pytest.mark.parametrize("options", [{}, {"evolution": "agru"}, {"evolution": "aigru"}, {"history_feedback": True}])
def test_dien_a_masked_behaviour_is_absent(options: dict[str, object]) -> None:
    """A hole in the mask (history dropout) means the behaviour is not there: the paper form gives the
    history with holes the logits and auxiliary loss of the compacted history, and the attention of each
    kept behaviour at its own position (zero on the holes)."""
    torch.manual_seed(6)
    model = build_model("dien", ModelConfig(**{**CFG.to_dict(), **options})).double()
    _warm(model)
    x = _holed(_inputs())
    compact = _compacted(x)
    holed, whole = model(**x), model(**compact)
    torch.testing.assert_close(holed.logits, whole.logits)
    torch.testing.assert_close(holed.aux_loss, whole.aux_loss)
    assert (holed.attention[~x["hist_mask"]] == 0).all()
    torch.testing.assert_close(holed.attention[x["hist_mask"]], whole.attention[compact["hist_mask"]])


@pytest.mark.parametrize("kind", ["base", "din", "dien"])
def test_the_paper_form_does_not_depend_on_grad_mode(kind: str) -> None:
    model = build_model(kind, CFG)
    _warm(model)
    x = _holed(_inputs()) if kind == "dien" else _inputs()
    with_grad = model(**x)
    with torch.no_grad():
        without = model(**x)
    torch.testing.assert_close(with_grad.logits.detach(), without.logits, rtol=0, atol=0)
    torch.testing.assert_close(with_grad.attention.detach(), without.attention, rtol=0, atol=0)
