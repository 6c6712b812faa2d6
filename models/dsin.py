"""Deep Session Interest Network (Feng et al., IJCAI 2019, §3): a user's behaviours come in sessions,
homogeneous inside and different across. Each session's behaviours go through self-attention to one
session interest, a Bi-LSTM lets the interests of consecutive sessions interact, and the candidate
attends over both, as DIN's activation unit does over behaviours.

Stages, as the paper names them:
- session division (§3.1): done on the data side by ``sessions.session_layout`` (numpy, shared with the
  service); the model takes its (B, K, T) positions into the history and mask. Session k = 0 is the most
  recent; inside a session behaviours are oldest first, right-padded.
- session interest extractor (§3.2): bias encoding BE(k, t, c) = w^K_k + w^T_t + w^C_c added to the
  behaviours, multi-head self-attention shared by all sessions, feed-forward, residual and layer norm,
  averaged over the session's behaviours to I_k.
- session interest interacting layer (§3.3): a Bi-LSTM over I_1..I_K, oldest first; a missing session is
  skipped (the state passes over it unchanged) and its output is zero.
- session interest activating layer (§3.4): the candidate's attention over the I_k and over the H_k
  (softmax over the sessions present, eq. 9–10), concatenated with the user profile and the candidate,
  then the final MLP.

Fixed shapes with masks and no packed sequences, so the serving form (models/serving.py) exports as is.
Masking uses a finite fill: a fully padded session gives zeros, never NaN (nn.MultiheadAttention's −inf
fill gives NaN there). The attention returned per history position is defined in ``item_attention``."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.base import CTRModel, ModelOutput
from models.config import ModelConfig
from models.layers import MLP, ActivationUnit, masked_softmax

MASK_FILL = -1e9  # finite: exp(MASK_FILL − max) is exactly 0 in float32, and an all-masked row stays finite


class DSINOutput(NamedTuple):
    logits: Tensor  # (B,)
    attention: Tensor  # (B, L) per history position: its session's weight × its self-attention share
    session_weights: Tensor  # (B, K) the candidate's weight on each session interest, zero for missing ones


class SessionInterestExtractor(nn.Module):
    """§3.2: one Transformer layer shared by every session, then the average over the session's behaviours."""

    def __init__(self, dim: int, sessions: int, length: int, heads: int, bias_encoding: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"DSIN: {heads} heads do not split the behaviour dimension {dim}; pick a divisor")
        self.heads = heads
        # BE(k, t, c) = w^K_k + w^T_t + w^C_c: a bounded additive term that starts at zero, so training starts
        # from the plain behaviours and the encoding cannot blow the attention scores up
        self.bias_encoding = bias_encoding
        self.w_session = nn.Parameter(torch.zeros(sessions, 1, 1))  # w^K (K, 1, 1)
        self.w_position = nn.Parameter(torch.zeros(1, length, 1))  # w^T (1, T, 1)
        self.w_unit = nn.Parameter(torch.zeros(1, 1, dim))  # w^C (1, 1, D)
        self.qkv = nn.Linear(dim, 3 * dim)  # W^Q, W^K, W^V of every head
        self.out = nn.Linear(dim, dim)  # W^O
        self.norm_attention = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm_feed_forward = nn.LayerNorm(dim)

    def encode_bias(self, behaviours: Tensor) -> Tensor:
        """behaviours (B, K, T, D) → Q = behaviours + BE (B, K, T, D) (paper eq. 2)."""
        if not self.bias_encoding:
            return behaviours
        return behaviours + (self.w_session + self.w_position + self.w_unit)  # (B, K, T, D)

    def self_attention(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, T, D), mask (N, T) → head outputs (N, T, D) and weights (N, h, T, T), zero on padded keys."""
        n, length, dim = x.shape
        dh = dim // self.heads
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dh).permute(2, 0, 3, 1, 4)  # (N, h, T, dh) each
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (N, h, T, T)
        key_mask = mask[:, None, None, :]  # (N, 1, 1, T)
        weights = torch.softmax(scores.masked_fill(~key_mask, MASK_FILL), dim=-1) * key_mask  # (N, h, T, T)
        heads = (weights @ v).transpose(1, 2).reshape(n, length, dim)  # (N, T, D) = Concat(head_1..head_h)
        return self.out(heads), weights

    def forward(self, behaviours: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """behaviours (B, K, T, D), mask (B, K, T) → session interests I (B, K, D), zero for an empty
        session, and each behaviour's share of its session's interest (B, K, T): the self-attention weight
        it receives, averaged over heads and over the session's behaviours (sums to 1 per non-empty session)."""
        b, k, t, d = behaviours.shape
        x = self.encode_bias(behaviours).reshape(b * k, t, d)  # (B·K, T, D)
        m = mask.reshape(b * k, t)  # (B·K, T)
        attended, weights = self.self_attention(x, m)  # (B·K, T, D), (B·K, h, T, T)
        x = self.norm_attention(x + attended)  # (B·K, T, D) residual, layer norm
        x = self.norm_feed_forward(x + self.feed_forward(x))  # (B·K, T, D)
        m_f = m.to(x.dtype)  # (B·K, T)
        count = m_f.sum(-1, keepdim=True).clamp(min=1)  # (B·K, 1)
        interests = torch.einsum("nt,ntd->nd", m_f, x) / count  # (B·K, D) average over valid behaviours
        share = torch.einsum("nt,nhtj->nj", m_f, weights) / (count * self.heads)  # (B·K, T)
        return interests.reshape(b, k, d), share.reshape(b, k, t)


def lstm_step(cell: nn.LSTMCell, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step with the cell's weights, written out (i, f, g, o as nn.LSTM orders them)."""
    gates = x @ cell.weight_ih.t() + cell.bias_ih + h @ cell.weight_hh.t() + cell.bias_hh  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=-1)  # (B, H) each
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class SessionInteraction(nn.Module):
    """§3.3: a Bi-LSTM over the session interests, oldest session first. K is small and fixed, so the
    steps are unrolled; a missing session leaves both directions' states unchanged and outputs zero."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"DSIN: the Bi-LSTM's two directions split the behaviour dimension {dim}; make it even")
        self.hidden = dim // 2  # H_t = [h→_t; h←_t] has the behaviours' dimension, so the activation unit fits
        self.forward_cell = nn.LSTMCell(dim, self.hidden)
        self.backward_cell = nn.LSTMCell(dim, self.hidden)

    def run(self, cell: nn.LSTMCell, interests: Tensor, present: Tensor, steps: list[int]) -> list[Tensor]:
        """One direction over the sessions in ``steps`` order → its output at each session (index k)."""
        b = interests.shape[0]
        h = interests.new_zeros(b, self.hidden)  # (B, H)
        c = interests.new_zeros(b, self.hidden)  # (B, H)
        outputs: list[Tensor] = [h] * len(steps)
        for k in steps:
            keep = present[:, k : k + 1].to(interests.dtype)  # (B, 1)
            h_new, c_new = lstm_step(cell, interests[:, k], h, c)  # (B, H) each
            h = keep * h_new + (1 - keep) * h
            c = keep * c_new + (1 - keep) * c
            outputs[k] = h * keep  # (B, H), zero for a missing session
        return outputs

    def forward(self, interests: Tensor, present: Tensor) -> Tensor:
        """interests (B, K, D), present (B, K) bool, session 0 the most recent → H (B, K, D)."""
        k = interests.shape[1]
        oldest_first = list(range(k - 1, -1, -1))
        forward = self.run(self.forward_cell, interests, present, oldest_first)  # K × (B, H)
        backward = self.run(self.backward_cell, interests, present, list(range(k)))  # K × (B, H)
        return torch.stack([torch.cat(pair, dim=-1) for pair in zip(forward, backward, strict=True)], dim=1)


class DSIN(CTRModel):
    uses_negatives = False
    uses_sessions = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.behaviour_dim
        self.extractor = SessionInterestExtractor(
            d, cfg.sessions, cfg.session_length, cfg.session_heads, cfg.bias_encoding
        )
        self.interaction = SessionInteraction(d)
        self.interest_unit = ActivationUnit(d, cfg.attention_hidden, cfg.attention_activation)  # over I_k
        self.state_unit = ActivationUnit(d, cfg.attention_hidden, cfg.attention_activation)  # over H_k
        self.mlp = MLP(cfg.user_repr_dim + 3 * d, cfg.mlp_hidden, 1, cfg.mlp_activation, cfg.dropout)

    def session_behaviours(
        self, behaviours: Tensor, hist_mask: Tensor, sess_index: Tensor, sess_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Session division applied: behaviours (B, L, D), hist_mask (B, L), sess_index and sess_mask (B, K, T)
        → the sessions' behaviours (B, K, T, D) and mask (B, K, T). A position the history mask drops (history
        dropout) is absent from its session too."""
        b, k, t = sess_index.shape
        flat = sess_index.reshape(b, k * t)  # (B, K·T)
        gathered = behaviours.gather(1, flat.unsqueeze(-1).expand(-1, -1, behaviours.shape[-1]))  # (B, K·T, D)
        mask = sess_mask & hist_mask.gather(1, flat).reshape(b, k, t)  # (B, K, T)
        return gathered.reshape(b, k, t, -1), mask

    def activation(self, unit: ActivationUnit, query: Tensor, keys: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """§3.4: query (B, D), keys (B, K, D), present (B, K) → weights (B, K) softmax over the sessions
        present (paper eq. 9–10, the DIN activation unit as the score) and the weighted sum (B, D)."""
        weights = masked_softmax(unit(query, keys), present)  # (B, K)
        return weights, torch.einsum("bk,bkd->bd", weights, keys)  # (B, K), (B, D)

    @staticmethod
    def item_attention(session_weights: Tensor, share: Tensor, sess_index: Tensor, length: int) -> Tensor:
        """The weight of each history position: its session's weight a^I_k × its self-attention share of that
        session's interest. session_weights (B, K), share (B, K, T) zero on padding, sess_index (B, K, T) →
        (B, L), zero on positions in no kept session. Sums to 1 over a history with any session."""
        b, k, t = sess_index.shape
        per_item = (session_weights.unsqueeze(-1) * share).reshape(b, k * t)  # (B, K·T)
        out = per_item.new_zeros(b, length)  # (B, L)
        return out.scatter_add(1, sess_index.reshape(b, k * t), per_item)  # padding adds 0 to position 0

    def sessions_forward(
        self,
        hist_items: Tensor,  # (B, L)
        hist_cats: Tensor,  # (B, L)
        hist_mask: Tensor,  # (B, L) bool
        cand_item: Tensor,  # (B,)
        cand_cat: Tensor,  # (B,)
        user_feats: Tensor,  # (B, F)
        sess_index: Tensor,  # (B, K, T) positions into L (sessions.session_layout)
        sess_mask: Tensor,  # (B, K, T) bool
        hist_feedback: Tensor | None = None,  # (B, L)
    ) -> DSINOutput:
        behaviours = self.embedding.history(hist_items, hist_cats, hist_feedback)  # (B, L, D)
        sessions, mask = self.session_behaviours(behaviours, hist_mask, sess_index, sess_mask)  # (B, K, T, D)
        present = mask.any(-1)  # (B, K)
        interests, share = self.extractor(sessions, mask)  # (B, K, D), (B, K, T)
        states = self.interaction(interests, present)  # (B, K, D)
        query = self.embedding.behaviours(cand_item, cand_cat)  # (B, D)
        w_interest, u_interest = self.activation(self.interest_unit, query, interests, present)  # (B, K), (B, D)
        _, u_state = self.activation(self.state_unit, query, states, present)  # (B, D)
        user = self.embedding.user(user_feats)  # (B, F·U)
        logits = self.click_logit(user, query, cand_item, cand_cat, u_interest, u_state)  # (B,)
        attention = self.item_attention(w_interest, share * mask, sess_index, hist_items.shape[1])  # (B, L)
        return DSINOutput(logits, attention, w_interest)

    def forward(
        self,
        hist_items: Tensor,
        hist_cats: Tensor,
        hist_mask: Tensor,
        cand_item: Tensor,
        cand_cat: Tensor,
        user_feats: Tensor,
        sess_index: Tensor,
        sess_mask: Tensor,
        hist_feedback: Tensor | None = None,
    ) -> ModelOutput:
        out = self.sessions_forward(
            hist_items, hist_cats, hist_mask, cand_item, cand_cat, user_feats, sess_index, sess_mask, hist_feedback
        )
        return ModelOutput(out.logits, out.attention)
