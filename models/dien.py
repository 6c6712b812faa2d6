"""Deep Interest Evolution Network (Zhou et al., AAAI 2019): a GRU extracts an interest state per
behaviour (supervised by an auxiliary loss on the next behaviour), attention to the candidate picks the
relevant states, and an AUGRU lets the interest evolve towards the candidate.

This is the paper form, the one evaluation and export's parity check run. A behaviour whose mask is off
is absent: each row's valid behaviours are compacted to the front (in their order) before the
extractor, so a hole in the mask (history dropout) is the same history without that behaviour, and
the next behaviour of a kept one is the next kept one. The training form (packed histories, fused
recurrences) is in models/fast_training.py and computes the same; the serving graph in models/serving.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import CTRModel, ModelOutput
from models.config import ModelConfig
from models.layers import MLP, InterestEvolution, masked_softmax, valid_first


class DIEN(CTRModel):
    uses_negatives = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.behaviour_dim
        self.extractor = nn.GRU(d, d, batch_first=True)
        self.auxiliary_net = MLP(2 * d, cfg.aux_hidden, 1, "relu")  # over [h_t, e]
        self.attention_proj = nn.Linear(d, d, bias=False)  # W in a_t ∝ exp(h_t W e_a)
        self.evolution = InterestEvolution(d, cfg.evolution)
        self.mlp = MLP(cfg.user_repr_dim + 3 * d, cfg.mlp_hidden, 1, cfg.mlp_activation, cfg.dropout)

    def interest_extraction(self, behaviours: Tensor) -> Tensor:
        """behaviours (B, L, D), oldest first and right-padded → interest states h_t (B, L, D).

        States at padded positions are never read: attention and the auxiliary loss mask them."""
        states, _ = self.extractor(behaviours)  # (B, L, D)
        return states

    def auxiliary_loss(self, states: Tensor, behaviours: Tensor, sampled: Tensor, mask: Tensor) -> Tensor:
        """h_t must tell the real next behaviour e_{t+1} from a sampled one ê_{t+1} (paper eq. 1), averaged
        over the steps whose next behaviour is real. states, behaviours, sampled (B, L, D), mask (B, L)."""
        h = states[:, :-1]  # (B, L−1, D)
        real = self.auxiliary_net(torch.cat([h, behaviours[:, 1:]], dim=-1)).squeeze(-1)  # (B, L−1)
        fake = self.auxiliary_net(torch.cat([h, sampled[:, 1:]], dim=-1)).squeeze(-1)  # (B, L−1)
        per_step = F.softplus(-real) + F.softplus(fake)  # (B, L−1) = −log σ(real) − log(1 − σ(fake))
        next_real = mask[:, 1:].to(per_step.dtype)  # (B, L−1)
        return (per_step * next_real).sum() / next_real.sum().clamp(min=1)

    def attention(self, query: Tensor, states: Tensor, mask: Tensor) -> Tensor:
        """a_t = softmax_t(h_t · W e_a) over valid positions (paper eq. 4) → (B, L)."""
        scores = torch.einsum("bld,bd->bl", states, self.attention_proj(query))  # (B, L)
        return masked_softmax(scores, mask)  # (B, L)

    def interest_evolution(self, states: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
        """states (B, L, D), attention (B, L), mask (B, L) → final interest h'_L (B, D)."""
        return self.evolution(states, weights, mask)  # (B, D)

    def pooling(self, behaviours: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
        """The behaviour summary beside the final interest: the plain sum (paper) or attention-weighted → (B, D)."""
        pool_w = weights if self.cfg.dien_pooling == "attention" else mask.to(behaviours.dtype)  # (B, L)
        return torch.einsum("bl,bld->bd", pool_w, behaviours)  # (B, D)

    def forward(
        self,
        hist_items: Tensor,  # (B, L)
        hist_cats: Tensor,  # (B, L)
        hist_mask: Tensor,  # (B, L) bool
        cand_item: Tensor,  # (B,)
        cand_cat: Tensor,  # (B,)
        user_feats: Tensor,  # (B, F)
        neg_items: Tensor | None = None,  # (B, L) sampled negatives for the auxiliary loss
        neg_cats: Tensor | None = None,  # (B, L)
        hist_feedback: Tensor | None = None,  # (B, L) FEEDBACK_* of each behaviour, when the model uses it
    ) -> ModelOutput:
        order = valid_first(hist_mask)  # (B, L): a masked behaviour is absent, so valid ones move to the front
        mask, items, cats = (x.gather(1, order) for x in (hist_mask, hist_items, hist_cats))  # (B, L) each
        feedback = None if hist_feedback is None else hist_feedback.gather(1, order)  # (B, L)
        # the auxiliary loss tells real next behaviours from sampled ones on the plain item representation
        # (a sampled item has no feedback); the interest states and the pooling see the feedback
        plain = self.embedding.behaviours(items, cats)  # (B, L, D)
        behaviours = self.embedding.with_feedback(plain, feedback)  # (B, L, D)
        query = self.embedding.behaviours(cand_item, cand_cat)  # (B, D)
        states = self.interest_extraction(behaviours)  # (B, L, D)
        weights = self.attention(query, states, mask)  # (B, L)
        final = self.interest_evolution(states, weights, mask)  # (B, D)
        pooled = self.pooling(behaviours, weights, mask)  # (B, D)
        logits = self.click_logit(self.embedding.user(user_feats), query, cand_item, cand_cat, pooled, final)  # (B,)
        aux = None
        if neg_items is not None and neg_cats is not None:
            sampled = self.embedding.behaviours(neg_items.gather(1, order), neg_cats.gather(1, order))  # (B, L, D)
            aux = self.auxiliary_loss(states, plain, sampled, mask)
        attention = torch.zeros_like(weights).scatter(1, order, weights)  # (B, L), at the original positions
        return ModelOutput(logits, attention, aux)
