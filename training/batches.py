"""Training batches: a split held as tensors, gathered into fixed-shape [B, L] batches with masks, and the
noise training adds to a batch (history and feedback dropout, DIEN's sampled negatives)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from models.config import FEEDBACK_UNKNOWN
from sessions import SessionSpec, session_layout
from training.config import TrainConfig
from training.negatives import draw
from training.samples import OOV, PAD, SampleSet


class TensorSamples:
    """A split held as tensors; builds fixed-shape [B, L] batches with masks by gathering.

    The split's arrays keep their compact types (int32 items, int8 feedback, memory-mapped when cached);
    only a batch is widened to the int64 indices the models take. With ``sessions`` (DSIN) a batch also
    carries the session division of each history (sess_index, sess_mask), from the behaviours' timestamps."""

    def __init__(self, s: SampleSet, max_len: int, sessions: SessionSpec | None = None) -> None:
        self.event_item = torch.as_tensor(s.event_item)
        self.event_time = s.event_time
        self.sessions = sessions
        if sessions is not None and s.event_time.shape != s.event_item.shape:
            raise ValueError("this split has no behaviour timestamps: DSIN's sessions need them")
        self.event_cat = torch.as_tensor(s.event_cat)
        self.event_feedback = torch.as_tensor(s.event_feedback)
        self.end = torch.as_tensor(s.end)
        self.length = torch.as_tensor(s.length)
        self.cand_item = torch.as_tensor(s.cand_item)
        self.cand_cat = torch.as_tensor(s.cand_cat)
        self.label = torch.as_tensor(s.label, dtype=torch.float32)
        self.user_feats = torch.as_tensor(s.user_feats)
        self.offsets = torch.arange(max_len)
        self.n = len(s)

    def without_feedback(self) -> TensorSamples:
        """The same split with every behaviour's feedback unknown (as served to a caller sending no labels)."""
        blind = copy.copy(self)
        blind.event_feedback = torch.full_like(self.event_feedback, FEEDBACK_UNKNOWN)
        return blind

    def inputs(self, rows: Tensor) -> dict[str, Tensor]:
        # every gather by index_select on flat indices: advanced indexing costs ≈ 30% more a batch on CPU
        length = self.length.index_select(0, rows)  # (B,)
        mask = self.offsets < length[:, None]  # (B, L)
        start = self.end.index_select(0, rows) - length  # (B,) each history's first event
        idx = torch.where(mask, start[:, None] + self.offsets, 0)  # (B, L)
        flat, padding = idx.flatten(), ~mask

        def history(events: Tensor) -> Tensor:
            return events.index_select(0, flat).view(mask.shape).long().masked_fill_(padding, PAD)  # (B, L)

        batch = {
            "hist_items": history(self.event_item),
            "hist_cats": history(self.event_cat),
            "hist_feedback": history(self.event_feedback),
            "hist_mask": mask,
            "cand_item": self.cand_item.index_select(0, rows).long(),
            "cand_cat": self.cand_cat.index_select(0, rows).long(),
            "user_feats": self.user_feats.index_select(0, rows).long(),
        }
        if self.sessions is not None:  # the division the service makes too (sessions.session_layout)
            index, smask = session_layout(self.event_time[idx.numpy()], mask.numpy(), self.sessions)  # (B, K, T)
            batch["sess_index"], batch["sess_mask"] = torch.from_numpy(index), torch.from_numpy(smask)
        return batch


Batch = dict[str, Tensor]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A batch gathered on the CPU, on ``device``: through pinned memory with non-blocking copies on a GPU, so
    the copy overlaps the work already queued there."""
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def drop_feedback(feedback: Tensor, mask: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """feedback (B, L) FEEDBACK_*, mask (B, L) → the feedback with each valid position's replaced by
    FEEDBACK_UNKNOWN with probability p; padding keeps FEEDBACK_PAD."""
    unknown = mask & (torch.rand(mask.shape, generator=gen) < p)  # (B, L)
    return feedback.masked_fill(unknown, FEEDBACK_UNKNOWN)


def drop_user_features(batch: Batch, p: float, gen: torch.Generator) -> None:
    """Training's noise on a batch's user features, in place: each (B, F) index becomes OOV with probability p.
    Together a log's few user features can name a training user (ml-100k's gender, age and occupation nearly
    do), and a model that memorises a user's habits through them meets only unseen combinations at test time;
    with some of them hidden, a sample looks like a new user's, and OOV gets an embedding to fall back on."""
    if p > 0 and batch["user_feats"].numel():
        hidden = torch.rand(batch["user_feats"].shape, generator=gen) < p  # (B, F)
        batch["user_feats"] = batch["user_feats"].masked_fill(hidden, OOV)


def drop_history(batch: Batch, cfg: TrainConfig, gen: torch.Generator) -> None:
    """Training's noise on a batch's history, in place. History dropout hides each behaviour with probability
    cfg.history_dropout, so a sample's history stops being a fingerprint of its user. Feedback dropout makes
    a kept behaviour's feedback "unknown" with probability cfg.feedback_dropout: a serving caller that sends
    no labels sends "unknown" everywhere, a value that a log with every outcome known never shows in
    training. Draws from ``gen`` only for a dropout that is on."""
    if cfg.history_dropout > 0:
        kept = torch.rand(batch["hist_mask"].shape, generator=gen) >= cfg.history_dropout  # (B, L)
        batch["hist_mask"] = batch["hist_mask"] & kept
    if cfg.feedback_dropout > 0:
        batch["hist_feedback"] = drop_feedback(batch["hist_feedback"], batch["hist_mask"], cfg.feedback_dropout, gen)


def add_negatives(
    batch: Batch, n_items: int, item_category: Tensor, gen: torch.Generator, probabilities: Tensor | None = None
) -> None:
    """DIEN's auxiliary loss: one item per history position (never PAD or OOV), with its category, added to
    the batch in place; drawn uniformly, or with (n_items,) ``probabilities`` (training.negatives)."""
    shape = batch["hist_items"].shape
    if probabilities is None:
        neg = torch.randint(2, n_items, shape, generator=gen)  # (B, L)
    else:
        neg = draw(probabilities, tuple(shape), gen)  # (B, L)
    batch["neg_items"], batch["neg_cats"] = neg, item_category[neg]
