"""Deep Interest Evolution Network (Zhou et al., AAAI 2019): a GRU extracts an interest state per
behaviour (supervised by an auxiliary loss on the next behaviour), attention to the candidate picks the
relevant states, and an AUGRU lets the interest evolve towards the candidate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import CTRModel, ModelOutput
from models.config import ModelConfig
from models.layers import MLP, InterestEvolution, gru_states, masked_softmax


class DIEN(CTRModel):
    uses_negatives = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.behaviour_dim
        self.extractor = nn.GRU(d, d, batch_first=True)
        # auxiliary net over [h_t, e]: its first layer is split so W_h·h_t is shared by both candidates
        self.aux_first = nn.Linear(2 * d, cfg.aux_hidden[0])
        self.aux_rest = MLP(cfg.aux_hidden[0], cfg.aux_hidden[1:], 1, "relu")
        self.attention_proj = nn.Linear(d, d, bias=False)  # W in a_t ∝ exp(h_t W e_a)
        self.evolution = InterestEvolution(d, cfg.evolution)
        self.mlp = MLP(cfg.user_repr_dim + 3 * d, cfg.mlp_hidden, 1, cfg.mlp_activation, cfg.dropout)

    def interest_extraction(self, behaviours: Tensor) -> Tensor:
        """behaviours (B, L, D), oldest first and right-padded → interest states (B, L, D).

        States at padded positions are never read: attention and the auxiliary loss mask them."""
        if torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export():
            return gru_states(self.extractor, behaviours)  # same GRU, hand-written backward (training)
        states, _ = self.extractor(behaviours)  # (B, L, D)
        return states

    def auxiliary_loss(
        self, states: Tensor, behaviours: Tensor, neg_items: Tensor, neg_cats: Tensor, mask: Tensor
    ) -> Tensor:
        """h_t must tell the real next behaviour e_{t+1} from a sampled one ê_{t+1} (paper eq. 1), averaged
        over the steps t whose next behaviour is real (mask[:, t+1]).

        Only those steps are computed (about a quarter of the positions with 50-item histories and history
        dropout 0.7): they are gathered first, and so are the sampled items' embeddings. The first layer is
        split, W·[h; e] = W_h·h + W_e·e, so W_h·h_t is computed once for the real and the sampled item."""
        d = states.shape[-1]
        next_real = torch.zeros_like(mask)  # (B, L): position t has a real behaviour at t+1
        next_real[:, :-1] = mask[:, 1:]
        t = next_real.flatten().nonzero().squeeze(1)  # (N,) flat (b, t) indices into (B·L)
        h_t = states.reshape(-1, d).index_select(0, t)  # (N, D)
        e_real = behaviours.reshape(-1, d).index_select(0, t + 1)  # (N, D)
        e_sampled = self.embedding.behaviours(neg_items.flatten()[t + 1], neg_cats.flatten()[t + 1])  # (N, D)
        w_h, w_e = self.aux_first.weight.split(d, dim=1)
        h_part = F.linear(h_t, w_h, self.aux_first.bias)  # (N, A)
        e_part = torch.stack([e_real, e_sampled]) @ w_e.T  # (2, N, A): real, sampled
        logits = self.aux_rest(torch.relu(h_part + e_part)).squeeze(-1)  # (2, N)
        loss = F.softplus(-logits[0]) + F.softplus(logits[1])  # −log σ(real) − log(1 − σ(sampled))
        return loss.sum() / max(t.numel(), 1)

    def attention(self, query: Tensor, states: Tensor, mask: Tensor) -> Tensor:
        """a_t = softmax_t(h_t · W e_a) over valid positions (paper eq. 4) → (B, L)."""
        # a broadcast product and a sum: on the strided (time-major) states einsum's batched matrix-vector
        # product is ≈ 3× slower
        scores = (states * self.attention_proj(query).unsqueeze(1)).sum(-1)  # (B, L)
        return masked_softmax(scores, mask)

    def interest_evolution(self, states: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
        return self.evolution(states, weights, mask)  # (B, D)

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
        # the auxiliary loss tells real next behaviours from sampled ones on the plain item representation
        # (a sampled item has no feedback); the interest states and the pooling see the feedback
        plain = self.embedding.behaviours(hist_items, hist_cats)  # (B, L, D)
        behaviours = self.embedding.with_feedback(plain, hist_feedback)  # (B, L, D)
        query = self.embedding.behaviours(cand_item, cand_cat)  # (B, D)
        states = self.interest_extraction(behaviours)  # (B, L, D)
        weights = self.attention(query, states, hist_mask)  # (B, L)
        final = self.interest_evolution(states, weights, hist_mask)  # (B, D)
        pool_w = weights if self.cfg.dien_pooling == "attention" else hist_mask.to(behaviours.dtype)  # (B, L)
        pooled = torch.einsum("bl,bld->bd", pool_w, behaviours)  # (B, D)
        user = self.embedding.user(user_feats)  # (B, F·U)
        logits = self.click_logit(user, query, cand_item, cand_cat, pooled, final)  # (B,)
        aux = None
        if neg_items is not None and neg_cats is not None:
            aux = self.auxiliary_loss(states, plain, neg_items, neg_cats, hist_mask)
        return ModelOutput(logits, weights, aux)
