"""Embedding&MLP base model (DIN paper §4.2): sum pooling over the history, the RelaImpr baseline."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.layers import MLP, FeatureEmbedding


class ModelOutput(NamedTuple):
    logits: Tensor  # (B,) click logit per candidate
    attention: Tensor  # (B, L) weight each history position got, zero on padding
    aux_loss: Tensor | None = None  # DIEN's auxiliary loss, when negatives were given


class CTRModel(nn.Module):
    """What every model shares: its config, its embedding tables, and whether it wants negatives."""

    uses_negatives = False
    uses_sessions = False  # DSIN: the batch carries the session division (sess_index, sess_mask)
    mlp: MLP  # the final MLP, built by each model for its own input width

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = FeatureEmbedding(cfg)

    def click_logit(
        self, user: Tensor, query: Tensor, cand_item: Tensor, cand_cat: Tensor, *interest: Tensor
    ) -> Tensor:
        """MLP([user profile, candidate, interest…]) plus the first-order terms: (B, ·) → (B,)."""
        logits = self.mlp(torch.cat([user, query, *interest], dim=-1)).squeeze(-1)  # (B,)
        return logits + self.embedding.bias(cand_item, cand_cat)


class BaseModel(CTRModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.behaviour_dim
        self.mlp = MLP(cfg.user_repr_dim + 2 * d, cfg.mlp_hidden, 1, cfg.mlp_activation, cfg.dropout)

    def forward(
        self,
        hist_items: Tensor,  # (B, L)
        hist_cats: Tensor,  # (B, L)
        hist_mask: Tensor,  # (B, L) bool
        cand_item: Tensor,  # (B,)
        cand_cat: Tensor,  # (B,)
        user_feats: Tensor,  # (B, F)
        hist_feedback: Tensor | None = None,  # (B, L) FEEDBACK_* of each behaviour, when the model uses it
    ) -> ModelOutput:
        keys = self.embedding.history(hist_items, hist_cats, hist_feedback)  # (B, L, D)
        query = self.embedding.behaviours(cand_item, cand_cat)  # (B, D)
        weights = hist_mask.to(keys.dtype)  # (B, L): sum pooling = weight 1 per behaviour
        pooled = torch.einsum("bl,bld->bd", weights, keys)  # (B, D)
        logits = self.click_logit(self.embedding.user(user_feats), query, cand_item, cand_cat, pooled)  # (B,)
        return ModelOutput(logits, weights)
