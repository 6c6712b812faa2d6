from __future__ import annotations

import torch

from contract import FIRST_INDEX, OOV
from models.config import FEEDBACK_NEGATIVE, FEEDBACK_PAD, FEEDBACK_POSITIVE, FEEDBACK_UNKNOWN
from training.batches import drop_history, drop_user_features
from training.config import TrainConfig


def _batch() -> dict[str, torch.Tensor]:
    """Three right-padded histories (lengths 0, 6, 3) of liked / not liked behaviours."""
    mask = torch.arange(6) < torch.tensor([0, 6, 3])[:, None]  # (3, 6)
    g = torch.Generator().manual_seed(0)
    feedback = torch.randint(FEEDBACK_NEGATIVE, FEEDBACK_POSITIVE + 1, (3, 6), generator=g) * mask
    return {"hist_mask": mask, "hist_feedback": feedback}


def test_feedback_dropout_one_makes_every_valid_feedback_unknown_and_keeps_padding() -> None:
    batch = _batch()
    mask = batch["hist_mask"].clone()
    drop_history(batch, TrainConfig(history_dropout=0.0, feedback_dropout=1.0), torch.Generator().manual_seed(1))
    assert (batch["hist_feedback"][mask] == FEEDBACK_UNKNOWN).all()
    assert (batch["hist_feedback"][~mask] == FEEDBACK_PAD).all()
    assert torch.equal(batch["hist_mask"], mask)


def test_feedback_dropout_zero_leaves_the_batch_and_the_generator_alone() -> None:
    batch, before = _batch(), _batch()
    gen = torch.Generator().manual_seed(1)
    drop_history(batch, TrainConfig(history_dropout=0.0, feedback_dropout=0.0), gen)
    assert batch.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(batch[key], value), key
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(1).get_state())


def test_feedback_dropout_only_touches_behaviours_history_dropout_kept() -> None:
    """A fraction near p of the kept behaviours turn unknown; the others keep their own feedback."""
    mask = torch.ones(200, 50, dtype=torch.bool)
    feedback = torch.full((200, 50), FEEDBACK_POSITIVE)
    batch = {"hist_mask": mask, "hist_feedback": feedback}
    drop_history(batch, TrainConfig(history_dropout=0.5, feedback_dropout=0.3), torch.Generator().manual_seed(2))
    kept, out = batch["hist_mask"], batch["hist_feedback"]
    assert (out[~kept] == FEEDBACK_POSITIVE).all()
    unknown = (out[kept] == FEEDBACK_UNKNOWN).double().mean().item()
    assert 0.27 < unknown < 0.33
    assert set(out[kept].unique().tolist()) == {FEEDBACK_UNKNOWN, FEEDBACK_POSITIVE}


def test_user_feature_dropout_hides_a_fraction_near_p_of_the_features_and_nothing_else() -> None:
    feats = torch.randint(FIRST_INDEX, 9, (400, 3))  # (B, F) known values, never OOV
    batch = {"user_feats": feats.clone()}
    drop_user_features(batch, 0.4, torch.Generator().manual_seed(3))
    out = batch["user_feats"]
    hidden = out == OOV
    assert 0.36 < hidden.double().mean().item() < 0.44
    assert torch.equal(out[~hidden], feats[~hidden])
    assert hidden.any(dim=0).all()  # each feature column is hidden somewhere, independently


def test_user_feature_dropout_zero_or_no_features_leaves_the_batch_and_the_generator_alone() -> None:
    for feats in (torch.randint(FIRST_INDEX, 9, (8, 3)), torch.zeros((8, 0), dtype=torch.long)):
        batch, gen = {"user_feats": feats.clone()}, torch.Generator().manual_seed(1)
        drop_user_features(batch, 0.0 if feats.numel() else 0.5, gen)
        assert torch.equal(batch["user_feats"], feats)
        assert torch.equal(gen.get_state(), torch.Generator().manual_seed(1).get_state())
