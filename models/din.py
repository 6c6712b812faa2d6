"""Deep Interest Network (Zhou et al., KDD 2018): a local activation unit weighs each behaviour
by its relevance to the candidate ad, and the weighted sum is the user's interest for that ad.

This is the paper form, the one evaluation and export's parity check run. The training form (the unit on
valid positions only) is in models/fast_training.py; the serving graph in models/serving.py."""

from __future__ import annotations

import torch
from torch import Tensor

from models.base import CTRModel, ModelOutput
from models.config import ModelConfig
from models.layers import MLP, ActivationUnit, masked_softmax


class DIN(CTRModel):
    uses_negatives = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.behaviour_dim
        self.activation_unit = ActivationUnit(d, cfg.attention_hidden, cfg.attention_activation)
        self.mlp = MLP(cfg.user_repr_dim + 2 * d, cfg.mlp_hidden, 1, cfg.mlp_activation, cfg.dropout)

    def attention(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """query (B, D), keys (B, L, D), mask (B, L) → weights (B, L), exactly zero on padding."""
        scores = self.activation_unit(query, keys)  # (B, L)
        return self.attention_weights(scores, mask)  # (B, L)

    def attention_weights(self, scores: Tensor, mask: Tensor) -> Tensor:
        """scores (B, L) → weights (B, L). Without softmax the weights are sigmoid(score) in (0, 1): their
        sum keeps the intensity of the user's interest, which normalisation would erase (paper §4.3)."""
        if self.cfg.attention_softmax:
            return masked_softmax(scores, mask)  # (B, L)
        return torch.sigmoid(scores) * mask  # (B, L)

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
        weights = self.attention(query, keys, hist_mask)  # (B, L)
        interest = torch.einsum("bl,bld->bd", weights, keys)  # (B, D)
        logits = self.click_logit(self.embedding.user(user_feats), query, cand_item, cand_cat, interest)  # (B,)
        return ModelOutput(logits, weights)
