"""An ensemble: several trained models of one kind, on one vocabulary, averaged (the seeds' practice of
averaging models trained from different initialisations).

The ensemble's click probability is the mean of its members' probabilities, p = (1/M) Σ_m σ(logit_m), and
its attention the mean of theirs; exported, it is one graph with the serving interface of any single model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.base import CTRModel, ModelOutput


class Ensemble(nn.Module):
    """M trained models behind the training interface (evaluation only: an ensemble is not trained as one)."""

    def __init__(self, members: list[CTRModel]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        kinds = {type(m) for m in members}
        if len(kinds) > 1:
            raise ValueError(f"an ensemble's members are of one kind, got {sorted(k.__name__ for k in kinds)}")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg

    def forward(
        self,
        hist_items: Tensor,  # (B, L)
        hist_cats: Tensor,  # (B, L)
        hist_mask: Tensor,  # (B, L) bool
        cand_item: Tensor,  # (B,)
        cand_cat: Tensor,  # (B,)
        user_feats: Tensor,  # (B, F)
        hist_feedback: Tensor | None = None,  # (B, L)
    ) -> ModelOutput:
        outs = [
            m(hist_items, hist_cats, hist_mask, cand_item, cand_cat, user_feats, hist_feedback) for m in self.members
        ]
        p = torch.stack([torch.sigmoid(o.logits) for o in outs]).mean(0)  # (B,)
        attention = torch.stack([o.attention for o in outs]).mean(0)  # (B, L)
        return ModelOutput(torch.logit(p), attention)  # the logit of the mean probability: σ gives p back


class EnsembleServing(nn.Module):
    """Serving forms (or the naive reference forms) of the members, averaged: the same inputs and the same
    (probability (N,), attention (N, L)) outputs as each member's."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, *inputs: Tensor, **named: Tensor) -> tuple[Tensor, Tensor]:
        outs = [m(*inputs, **named) for m in self.members]
        probability = torch.stack([p for p, _ in outs]).mean(0)  # (N,)
        attention = torch.stack([a for _, a in outs]).mean(0)  # (N, L)
        return probability, attention
