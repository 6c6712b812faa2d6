"""Deep Interest Evolution Network (Zhou et al., AAAI 2019): a GRU extracts an interest state per
behaviour (supervised by an auxiliary loss on the next behaviour), attention to the candidate picks the
relevant states, and an AUGRU lets the interest evolve towards the candidate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import CTRModel, ModelOutput
from models.config import ModelConfig
from models.layers import MLP, InterestEvolution, gru_states, masked_softmax, pack_time_major, valid_first


class DIEN(CTRModel):
    """Two forms of the same network: ``packed_forward`` (training: each row's kept behaviours packed to the
    front, every stage on the longest row's kept count) and ``fixed_shape_forward`` (eval and ONNX export:
    the whole masked (B, L) grid). ``forward`` takes the packed form whenever gradients are on and no export
    is tracing, so a gradient through an eval-mode model (attributions, say) sees a history with holes in
    its mask compacted; on histories without holes the two forms agree (tested)."""

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
        states, _ = self.extractor(behaviours)  # (B, L, D)
        return states

    def auxiliary_loss(
        self, states: Tensor, behaviours: Tensor, neg_items: Tensor, neg_cats: Tensor, mask: Tensor
    ) -> Tensor:
        """h_t must tell the real next behaviour e_{t+1} from a sampled one ê_{t+1} (paper eq. 1), averaged
        over the steps t whose next behaviour is real (mask[:, t+1]). states, behaviours (B, L, D); the
        sampled items and the mask (B, L)."""
        next_real = torch.zeros_like(mask)  # (B, L): position t has a real behaviour at t+1
        next_real[:, :-1] = mask[:, 1:]
        t = next_real.flatten().nonzero().squeeze(1)  # (N,) flat (b, t) indices into (B·L)
        return self.auxiliary_loss_at(states, behaviours, neg_items, neg_cats, t, t + 1)

    def packed_auxiliary_loss(
        self, states: Tensor, behaviours: Tensor, neg_items: Tensor, neg_cats: Tensor, mask: Tensor
    ) -> Tensor:
        """The auxiliary loss on the packed time-major form: states, behaviours (S, B, D), the sampled items
        and the mask (S, B). The next behaviour of packed step t is packed step t+1, when that is kept."""
        t = mask[1:].flatten().nonzero().squeeze(1)  # (N,) flat (t, b) indices into (S·B)
        return self.auxiliary_loss_at(states, behaviours, neg_items, neg_cats, t, t + mask.shape[1])

    def auxiliary_loss_at(
        self, states: Tensor, behaviours: Tensor, neg_items: Tensor, neg_cats: Tensor, t: Tensor, t_next: Tensor
    ) -> Tensor:
        """The auxiliary loss over N steps: the state at flat index t (N,) of ``states`` against the real
        behaviour and the sampled item at flat index t_next (N,), the step after it.

        Only those steps are computed (about a quarter of the positions with 50-item histories and history
        dropout 0.7), and so are the sampled items' embeddings. The first layer is split,
        W·[h; e] = W_h·h + W_e·e, so W_h·h_t is computed once for the real and the sampled item."""
        d = states.shape[-1]
        h_t = states.reshape(-1, d).index_select(0, t)  # (N, D)
        e_real = behaviours.reshape(-1, d).index_select(0, t_next)  # (N, D)
        e_sampled = self.embedding.behaviours(neg_items.flatten()[t_next], neg_cats.flatten()[t_next])  # (N, D)
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
        """The packed form in training (gradients on, not exporting), the fixed-shape form otherwise."""
        training = torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export()
        form = self.packed_forward if training else self.fixed_shape_forward
        return form(hist_items, hist_cats, hist_mask, cand_item, cand_cat, user_feats, neg_items, neg_cats,
                    hist_feedback)  # fmt: skip

    def fixed_shape_forward(
        self,
        hist_items: Tensor,  # (B, L)
        hist_cats: Tensor,  # (B, L)
        hist_mask: Tensor,  # (B, L) bool
        cand_item: Tensor,  # (B,)
        cand_cat: Tensor,  # (B,)
        user_feats: Tensor,  # (B, F)
        neg_items: Tensor | None = None,  # (B, L)
        neg_cats: Tensor | None = None,  # (B, L)
        hist_feedback: Tensor | None = None,  # (B, L)
    ) -> ModelOutput:
        """Every stage on the whole (B, L) grid, masked: the form that eval runs and ONNX export traces.

        The extractor GRU reads every position, so a behaviour dropped inside a history (a hole in the mask)
        still moves the later interest states; serving never sends such holes."""
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

    def packed_forward(
        self,
        hist_items: Tensor,  # (B, L)
        hist_cats: Tensor,  # (B, L)
        hist_mask: Tensor,  # (B, L) bool
        cand_item: Tensor,  # (B,)
        cand_cat: Tensor,  # (B,)
        user_feats: Tensor,  # (B, F)
        neg_items: Tensor | None = None,  # (B, L)
        neg_cats: Tensor | None = None,  # (B, L)
        hist_feedback: Tensor | None = None,  # (B, L)
    ) -> ModelOutput:
        """Training's form: each row's kept behaviours (hist_mask) are packed to the front in their order,
        time-major (S, B, ·) with S the longest row's kept count, and every stage runs on S steps, not L.

        A dropped behaviour (history dropout) is absent here, as it is from what serving sees: the extractor
        GRU does not read it either (the fixed-shape form's GRU would, so it would still move the later
        interest states), and the next real behaviour of a kept one is the next kept one. So this equals
        ``fixed_shape_forward`` on the batch with each row's kept behaviours (and their feedback and sampled
        negatives) moved to the front; on a right-padded batch without holes, the batch itself. The attention
        comes back at its (B, L) positions, zero on padded and dropped ones."""
        order = valid_first(hist_mask)  # (S, B): each row's kept positions first
        mask = pack_time_major(hist_mask, order)  # (S, B)
        items, cats = pack_time_major(hist_items, order), pack_time_major(hist_cats, order)  # (S, B) each
        plain = self.embedding.behaviours(items, cats)  # (S, B, D)
        feedback = None if hist_feedback is None else pack_time_major(hist_feedback, order)  # (S, B)
        behaviours = self.embedding.with_feedback(plain, feedback)  # (S, B, D)
        query = self.embedding.behaviours(cand_item, cand_cat)  # (B, D)
        states = gru_states(self.extractor, behaviours)  # (S, B, D): interest extraction, fused recurrence
        weights = self.attention(query, states.transpose(0, 1), mask.T)  # (B, S)
        final = self.evolution.packed_forward(states, weights.T, mask)  # (B, D)
        pool_w = weights.T if self.cfg.dien_pooling == "attention" else mask.to(behaviours.dtype)  # (S, B)
        pooled = (pool_w.unsqueeze(-1) * behaviours).sum(0)  # (B, D)
        user = self.embedding.user(user_feats)  # (B, F·U)
        logits = self.click_logit(user, query, cand_item, cand_cat, pooled, final)  # (B,)
        aux = None
        if neg_items is not None and neg_cats is not None:
            negatives = pack_time_major(neg_items, order), pack_time_major(neg_cats, order)  # (S, B) each
            aux = self.packed_auxiliary_loss(states, plain, *negatives, mask)
        attention = weights.new_zeros(hist_mask.shape).scatter(1, order.T, weights)  # (B, L), back in place
        return ModelOutput(logits, attention, aux)
