from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model
from models.layers import Dice
from models.serving import FoldedDice, NaiveServing, fold_dice, serving_module

CFG = ModelConfig(n_items=40, n_categories=6, user_feature_cardinalities=(5,), item_dim=8, category_dim=4,
                  mlp_hidden=(12, 6), attention_hidden=(10, 5), aux_hidden=(8,))  # fmt: skip


def test_folded_dice_equals_dice_in_eval() -> None:
    dice = Dice(5)
    for _ in range(20):
        dice(torch.randn(32, 5) * 2 + 0.5)
    dice.eval()
    x = torch.randn(7, 3, 5)
    torch.testing.assert_close(FoldedDice(dice)(x), dice(x))
    folded = fold_dice(torch.nn.Sequential(torch.nn.Linear(5, 5), dice))
    assert isinstance(folded[1], FoldedDice) and isinstance(dice, Dice)  # the original is untouched


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
    model.train()
    for _ in range(3):
        mask = torch.rand(16, 9) > 0.3
        model(torch.randint(2, 40, (16, 9)) * mask, torch.randint(2, 6, (16, 9)) * mask, mask,
              torch.randint(2, 40, (16,)), torch.randint(2, 6, (16,)), torch.randint(1, 5, (16, 1)))  # fmt: skip
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
    with torch.no_grad():
        p, a = serving_module(model)(**feed)
        p_ref, a_ref = NaiveServing(model)(**feed)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
    assert (a[~mask[feed["cand_user"]]] == 0).all()
