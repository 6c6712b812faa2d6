"""Deep Interest Network (Zhou et al., KDD 2018): a local activation unit weighs each behaviour
by its relevance to the candidate ad, and the weighted sum is the user's interest for that ad.

This is the paper form, the one evaluation and export's parity check run. The training form (the unit on
valid positions only) is in models/fast_training.py; the serving graph in models/serving.py. The activation
unit is the default of ``cfg.attention``; the other scorers of the toolbox are in models/attention.py."""

from __future__ import annotations

import torch
from torch import Tensor

from models.attention import BilinearAttention, DotProductAttention, MultiHeadTargetAttention, RecencyPositions
from models.base import CTRModel, ModelOutput
from models.config import ModelConfig
from models.layers import MLP, ActivationUnit, masked_softmax


class DIN(CTRModel):
    uses_negatives = False
    activation_unit: ActivationUnit  # only where ``uses_activation_unit``: no unused parameters elsewhere

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.behaviour_dim
        kind = cfg.attention
        if kind not in ("mlp", "dot", "bilinear", "multihead", "position"):
            raise ValueError(f"unknown DIN attention {kind!r}")
        if self.uses_activation_unit:  # "mlp", and "position" over keys with positions added
            self.activation_unit = ActivationUnit(d, cfg.attention_hidden, cfg.attention_activation)
        self.positions = RecencyPositions(cfg.attention_positions, d) if kind == "position" else None
        self.dot = DotProductAttention(d) if kind == "dot" else None
        self.bilinear = BilinearAttention(d) if kind == "bilinear" else None
        self.multihead = MultiHeadTargetAttention(d, cfg.attention_heads) if kind == "multihead" else None
        self.mlp = MLP(cfg.user_repr_dim + 2 * d, cfg.mlp_hidden, 1, cfg.mlp_activation, cfg.dropout)

    @property
    def uses_activation_unit(self) -> bool:
        return self.cfg.attention in ("mlp", "position")

    def keys(self, hist_items: Tensor, hist_cats: Tensor, hist_mask: Tensor, hist_feedback: Tensor | None) -> Tensor:
        """(B, L) history → keys (B, L, D): each behaviour, plus its recency embedding for "position"."""
        keys = self.embedding.history(hist_items, hist_cats, hist_feedback)  # (B, L, D)
        return keys if self.positions is None else keys + self.positions(hist_mask)  # (B, L, D)

    def attention(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """query (B, D), keys (B, L, D), mask (B, L) → weights (B, L), exactly zero on padding."""
        return self.target_attention(query, keys, mask)[0]  # (B, L)

    def target_attention(self, query: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """query (B, D), keys (B, L, D), mask (B, L) → weights (B, L), exactly zero on padding, and the
        interest (B, D): Σ_l a_l k_l, or for "multihead" the heads' pooled values concatenated."""
        if self.multihead is not None:
            return self.multihead.attend(query, self.multihead.keys_side(keys), mask, self.attention_weights)
        if self.dot is not None:
            scores = self.dot.scores(query, self.dot.keys_side(keys))  # (B, L)
        elif self.bilinear is not None:
            scores = self.bilinear.scores(query, self.bilinear.keys_side(keys))  # (B, L)
        else:
            scores = self.activation_unit(query, keys)  # (B, L)
        weights = self.attention_weights(scores, mask)  # (B, L)
        return weights, torch.einsum("bl,bld->bd", weights, keys)  # (B, L), (B, D)

    def attention_weights(self, scores: Tensor, mask: Tensor) -> Tensor:
        """scores (…, L) → weights (…, L). Without softmax the weights are sigmoid(score) in (0, 1): their
        sum keeps the intensity of the user's interest, which normalisation would erase (paper §4.3)."""
        if self.cfg.attention_softmax:
            return masked_softmax(scores, mask)  # (…, L)
        return torch.sigmoid(scores) * mask  # (…, L)

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
        keys = self.keys(hist_items, hist_cats, hist_mask, hist_feedback)  # (B, L, D)
        query = self.embedding.behaviours(cand_item, cand_cat)  # (B, D)
        weights, interest = self.target_attention(query, keys, hist_mask)  # (B, L), (B, D)
        logits = self.click_logit(self.embedding.user(user_feats), query, cand_item, cand_cat, interest)  # (B,)
        return ModelOutput(logits, weights)
