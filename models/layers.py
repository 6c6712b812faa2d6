"""Layers shared by the models: embeddings, Dice, MLP, DIN's activation unit, AUGRU and its variants."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import FEEDBACK_SIZE, Activation, Evolution, ModelConfig


class Dice(nn.Module):
    """Data-adaptive activation (DIN paper, eq. 9): f(s) = p(s)·s + (1 − p(s))·α·s,
    p(s) = sigmoid((s − E[s]) / sqrt(Var[s] + ε)).

    E[s] and Var[s] are the mini-batch statistics in training and the running averages at inference,
    so in eval mode a row's output never depends on the other rows of its batch.
    """

    def __init__(self, dim: int, eps: float = 1e-8, momentum: float = 0.01) -> None:
        super().__init__()
        self.dim = dim
        self.norm = nn.BatchNorm1d(dim, eps=eps, momentum=momentum, affine=False)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, s: Tensor) -> Tensor:
        shape = s.shape
        flat = s.reshape(-1, self.dim)  # (N, C); a constant C keeps the exported graph's shapes known
        p = torch.sigmoid(self.norm(flat))  # (N, C)
        out = p * flat + (1 - p) * self.alpha * flat
        return out.reshape(shape)


class PReLULast(nn.Module):
    """PReLU over the last axis (nn.PReLU treats axis 1 as channels)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 0.25))

    def forward(self, x: Tensor) -> Tensor:
        # prelu(x) = w·x + (1 − w)·relu(x): F.prelu's CPU backward reduces the slope's gradient slowly
        return self.weight * x + (1 - self.weight) * torch.relu(x)


def make_activation(kind: Activation, dim: int) -> nn.Module:
    if kind == "dice":
        return Dice(dim)
    if kind == "prelu":
        return PReLULast(dim)
    if kind == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {kind!r}")


class MLP(nn.Module):
    """Linear → activation → dropout per hidden layer, then a linear output layer."""

    def __init__(
        self, in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: Activation, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), make_activation(activation, h)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = h
        layers.append(nn.Linear(in_dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FeatureEmbedding(nn.Module):
    """Embedding tables: item id, category, one per user-profile feature (index 0 = padding, 1 = OOV)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.item = nn.Embedding(cfg.n_items, cfg.item_dim, padding_idx=0)
        self.category = nn.Embedding(cfg.n_categories, cfg.category_dim, padding_idx=0)
        self.user_features: list[nn.Embedding] = nn.ModuleList(  # type: ignore[assignment]
            nn.Embedding(card, cfg.user_dim, padding_idx=0) for card in cfg.user_feature_cardinalities
        )
        for table in (self.item, self.category, *self.user_features):
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[:2].zero_()  # padding and OOV start as "nothing known"
        # first-order terms: how clickable an item (category) is regardless of who sees it
        self.item_bias = nn.Embedding(cfg.n_items, 1, padding_idx=0) if cfg.first_order else None
        self.category_bias = nn.Embedding(cfg.n_categories, 1, padding_idx=0) if cfg.first_order else None
        for bias in (self.item_bias, self.category_bias):
            if bias is not None:
                nn.init.zeros_(bias.weight)
        # history feedback, added to a history behaviour's representation; padding and "unknown" stay zero
        self.feedback = nn.Embedding(FEEDBACK_SIZE, cfg.behaviour_dim, padding_idx=0) if cfg.history_feedback else None
        if self.feedback is not None:
            nn.init.normal_(self.feedback.weight, std=0.05)
            with torch.no_grad():
                self.feedback.weight[:2].zero_()

    def behaviours(self, items: Tensor, cats: Tensor) -> Tensor:
        """(...,) item and category indices → (..., D) item representation."""
        return torch.cat([self.item(items), self.category(cats)], dim=-1)

    def history(self, items: Tensor, cats: Tensor, feedback: Tensor | None) -> Tensor:
        """(B, L) history indices and feedback → (B, L, D): each behaviour's representation plus what the
        user did with it (the feedback embedding; nothing when the model has none or none is given)."""
        return self.with_feedback(self.behaviours(items, cats), feedback)

    def with_feedback(self, behaviours: Tensor, feedback: Tensor | None) -> Tensor:
        """(B, L, D) behaviours, (B, L) feedback → (B, L, D) behaviours + feedback embedding."""
        if self.feedback is None or feedback is None:
            return behaviours
        return behaviours + self.feedback(feedback)  # (B, L, D)

    def bias(self, items: Tensor, cats: Tensor) -> Tensor:
        """(B,) candidate indices → (B,) first-order logit term (zeros when disabled)."""
        if self.item_bias is None or self.category_bias is None:
            return items.new_zeros(items.shape, dtype=torch.float32)
        return (self.item_bias(items) + self.category_bias(cats)).squeeze(-1)

    def user(self, feats: Tensor) -> Tensor:
        """(B, F) feature indices → (B, F·user_dim); (B, 0) when there are no user features."""
        if len(self.user_features) == 0:
            return feats.new_zeros((feats.shape[0], 0), dtype=torch.float32)
        return torch.cat([emb(feats[:, i]) for i, emb in enumerate(self.user_features)], dim=-1)


class ActivationUnit(nn.Module):
    """DIN's activation unit: score(q, k) = MLP([q, k, q − k, q ⊙ k]) for every history position.

    The first layer is evaluated in its split form, with the same weights:
        W·[q; k; q − k; q ⊙ k] = (W_q + W_d)·q + (W_k − W_d)·k + W_p·(q ⊙ k)
    so the query part is computed once per row instead of once per position, and the key part does not
    depend on the query at all (the serving graph computes it once per user).
    """

    def __init__(self, dim: int, hidden: tuple[int, ...], activation: Activation) -> None:
        super().__init__()
        self.dim = dim
        self.literal = False  # evaluate layer 1 on the literal concat (reference form, for benchmarks)
        self.first = nn.Linear(4 * dim, hidden[0])
        self.first_activation = make_activation(activation, hidden[0])
        self.rest = MLP(hidden[0], hidden[1:], 1, activation)
        # no layer uses batch statistics (Dice), so each position's score is its own: packed_scores applies
        self.elementwise = not any(isinstance(m, Dice) for m in self.modules())

    def split_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(W_q + W_d, W_k − W_d, W_p), each (H, D)."""
        w_q, w_k, w_d, w_p = self.first.weight.split(self.dim, dim=1)
        return w_q + w_d, w_k - w_d, w_p

    def key_part(self, keys: Tensor) -> Tensor:
        """(B, L, D) → (W_k − W_d)·k  (B, L, H): query-independent, once per user at serving time."""
        return keys @ self.split_weights()[1].T

    def scores(self, query: Tensor, keys: Tensor, key_part: Tensor) -> Tensor:
        """query (B, D), keys (B, L, D), key_part (B, L, H) → unnormalised scores (B, L)."""
        w_query, _, w_prod = self.split_weights()
        q_part = F.linear(query, w_query, self.first.bias).unsqueeze(1)  # (B, 1, H)
        prod_part = (query.unsqueeze(1) * keys) @ w_prod.T  # (B, L, H)
        h = self.first_activation(q_part + key_part + prod_part)  # (B, L, H)
        return self.rest(h).squeeze(-1)  # (B, L)

    def packed_scores(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """Training's form of ``forward``: the unit runs on the valid positions only, since padding and
        history dropout leave most of (B, L) empty; padded positions score 0, which the caller masks.
        The same function and gradients as ``forward`` where every activation is element-wise (Dice's batch
        statistics would differ, so a unit with Dice keeps the full form)."""
        rows, cols = mask.nonzero(as_tuple=True)  # (M,) each
        w_query, w_key, w_prod = self.split_weights()
        q_part = F.linear(query, w_query, self.first.bias)  # (B, H): once per row
        k = keys[rows, cols]  # (M, D)
        z = q_part[rows] + k @ w_key.T + (query[rows] * k) @ w_prod.T  # (M, H)
        valid = self.rest(self.first_activation(z)).squeeze(-1)  # (M,)
        return keys.new_zeros(mask.shape).index_put((rows, cols), valid)  # (B, L)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        if self.literal:
            q = query.unsqueeze(1).expand_as(keys)  # (B, L, D)
            h = self.first_activation(self.first(torch.cat([q, keys, q - keys, q * keys], dim=-1)))  # (B, L, H)
            return self.rest(h).squeeze(-1)  # (B, L)
        return self.scores(query, keys, self.key_part(keys))


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over valid positions; exactly zero on padding and all-zero rows for empty histories."""
    filled = scores.masked_fill(~mask, -1e9)  # (B, L)
    return torch.softmax(filled, dim=-1) * mask


class AUGRUCell(nn.Module):
    """One step of interest evolution (DIEN paper, eqs. 2–5 and 6–8), paper convention
    h_t = (1 − u_t) ⊙ h_{t−1} + u_t ⊙ h̃_t.

    - ``augru``: ũ_t = a_t · u_t replaces u_t (the paper's choice);
    - ``agru``:  a_t replaces u_t;
    - ``aigru``: the input is scaled by a_t before a plain GRU step (done by the caller's projection).
    """

    def __init__(self, input_dim: int, hidden_dim: int, kind: Evolution) -> None:
        super().__init__()
        self.kind = kind
        self.hidden_dim = hidden_dim
        self.input_proj = nn.Linear(input_dim, 3 * hidden_dim)  # W_u, W_r, W_h with biases
        self.hidden_proj = nn.Linear(hidden_dim, 3 * hidden_dim, bias=False)  # U_u, U_r, U_h

    def forward(self, x_proj: Tensor, h: Tensor, a: Tensor) -> Tensor:
        """x_proj (B, 3H) = input_proj(i_t), h (B, H), a (B, 1) → h_t (B, H)."""
        hidden = self.hidden_proj(h)  # (B, 3H)
        gates = torch.sigmoid(x_proj[:, : 2 * self.hidden_dim] + hidden[:, : 2 * self.hidden_dim])  # (B, 2H)
        u, r = gates.chunk(2, dim=-1)  # update and reset gates, (B, H) each
        h_tilde = torch.tanh(x_proj[:, 2 * self.hidden_dim :] + r * hidden[:, 2 * self.hidden_dim :])  # (B, H)
        if self.kind == "augru":
            u = a * u  # ũ_t = a_t · u_t
        elif self.kind == "agru":
            u = a
        return h + u * (h_tilde - h)  # = (1 − u) ⊙ h + u ⊙ h̃


def _tanh_(x: Tensor) -> Tensor:
    """In-place tanh of a contiguous CPU tensor that needs no gradient. numpy's tanh takes ≈ 2 µs on a
    (256, 48) slab where torch.tanh takes ≈ 25 µs on this project's machines (torch 2.13, AVX-512); the
    recurrence calls it once per step."""
    if x.is_cpu and x.is_contiguous() and not x.requires_grad:
        np.tanh(x.numpy(), out=x.numpy())
        return x
    return x.tanh_()


class GatedGRUSequence(torch.autograd.Function):
    """The whole (attention-gated) GRU recurrence with a hand-written backward, for training.

    Same maths as stepping ``AUGRUCell``: h_t = h_{t−1} + ũ_t ⊙ (h̃_t − h_{t−1}) with ũ_t = g_t·u_t
    (``scale_update``: AUGRU, AIGRU with g = mask, a plain GRU with g = 1) or ũ_t = g_t (AGRU), and
    h̃_t = tanh(x_n + r_t ⊙ (U_n·h_{t−1} + b_n)) with b_n the only bias on the hidden side (the u and r
    hidden biases fold into the input projection's). Autograd over 50 small steps spends most of its
    time in bookkeeping; this backward runs 4 tensor ops per step and vectorises the rest over steps.

    Time-major (L, B, ·) throughout: every step reads and writes contiguous (B, ·) slabs of buffers
    allocated once, so nothing is stacked or transposed afterwards. Not exportable: the cell loop and
    nn.GRU are what eval and ONNX export run (tests check they agree, gradients included).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_proj: Tensor,
        gate: Tensor,
        weight: Tensor,
        candidate_bias: Tensor | None,
        scale_update: bool,
    ) -> Tensor:
        """x_proj (L, B, 3H), gate (L, B, 1), weight (3H, H), candidate_bias (H,) or None
        → states h_1..h_L (L, B, H)."""
        steps, batch, three_h = x_proj.shape
        hd = three_h // 3
        hidden = x_proj.new_empty(steps, batch, three_h)  # U·h_{t−1} (+ b_n on the candidate part)
        gates = x_proj.new_empty(steps, batch, 2 * hd)  # [u_t, r_t]
        cand = x_proj.new_empty(steps, batch, hd)  # h̃_t
        states = x_proj.new_empty(steps + 1, batch, hd)  # h_0 = 0, h_1 … h_L
        states[0].zero_()
        for t in range(steps):
            h, hid, ur, n, h_next = states[t], hidden[t], gates[t], cand[t], states[t + 1]
            torch.mm(h, weight.T, out=hid)  # (B, 3H)
            if candidate_bias is not None:
                hid[:, 2 * hd :].add_(candidate_bias)
            torch.add(x_proj[t, :, : 2 * hd], hid[:, : 2 * hd], out=ur).sigmoid_()  # (B, 2H)
            _tanh_(torch.mul(ur[:, hd:], hid[:, 2 * hd :], out=n).add_(x_proj[t, :, 2 * hd :]))  # (B, H)
            u_t = gate[t] * ur[:, :hd] if scale_update else gate[t]  # ũ_t, (B, H) or (B, 1)
            torch.sub(n, h, out=h_next).mul_(u_t).add_(h)  # h + ũ ⊙ (h̃ − h)
        ctx.save_for_backward(gate, weight, states, gates, cand, hidden)
        ctx.scale_update = scale_update  # type: ignore[attr-defined]
        ctx.has_bias = candidate_bias is not None  # type: ignore[attr-defined]
        return states[1:]

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, d_states: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, None]:
        gate, weight, states, gates, cand, hidden = ctx.saved_tensors  # type: ignore[attr-defined]
        scale = ctx.scale_update  # type: ignore[attr-defined]
        steps, batch, hd = cand.shape
        # Everything that does not depend on the incoming gradient is computed for all steps at once,
        # so the sequential loop is left with 3 tensor ops and a matrix product per step:
        #   ∂(U·h_{t−1}) = ∂h ⊙ [C_u, C_r, C_n ⊙ r],  ∂pre = ∂h ⊙ [C_u, C_r, C_n],
        #   ∂h_{t−1} = ∂h ⊙ (1 − ũ) + ∂(U·h_{t−1})·U
        h_prev = states[:-1]  # (L, B, H)
        u, r = gates[..., :hd], gates[..., hd:]  # (L, B, H) each
        n, hh = cand, hidden[..., 2 * hd :]
        ut = gate * u if scale else gate  # (L, B, H) or (L, B, 1)
        diff = n - h_prev
        c_n = ut * (1 - n * n)  # (L, B, H)
        c_u = diff * gate * u * (1 - u) if scale else torch.zeros_like(c_n)
        coef_hidden = torch.cat([c_u, c_n * hh * r * (1 - r), c_n * r], dim=-1)  # (L, B, 3H): [C_u, C_r, C_n·r]
        keep = 1 - ut  # (L, B, H) or (L, B, 1)
        dh_all = d_states.new_empty(steps, batch, hd)  # ∂loss/∂h_t, all paths
        d_hidden = d_states.new_empty(steps, batch, 3 * hd)  # ∂(U·h_{t−1} + b)
        dh = d_states.new_zeros(batch, hd)
        for t in reversed(range(steps)):
            dh = torch.add(dh, d_states[t], out=dh_all[t])
            torch.mul(coef_hidden[t].view(batch, 3, hd), dh.unsqueeze(1), out=d_hidden[t].view(batch, 3, hd))
            dh = torch.addmm(dh * keep[t], d_hidden[t], weight)
        d_hid = d_hidden.view(steps * batch, 3 * hd)
        d_weight = d_hid.T @ h_prev.reshape(steps * batch, hd)  # (3H, H)
        d_bias = d_hid[:, 2 * hd :].sum(0) if ctx.has_bias else None  # type: ignore[attr-defined]
        d_pre = d_hidden  # the u and r parts are the same; the candidate's has no r factor:
        torch.mul(dh_all, c_n, out=d_pre[..., 2 * hd :])  # (done last: d_hidden is not needed any more)
        d_gate = None  # a constant gate (the plain GRU's ones) needs none
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            d_gate = (dh_all * (diff * u if scale else diff)).sum(-1, keepdim=True)  # (L, B, 1)
        return d_pre, d_gate, d_weight, d_bias, None


def gru_states(gru: nn.GRU, x: Tensor) -> Tensor:
    """PyTorch's single-layer GRU over time-major x (L, B, D) → states (L, B, H), computed by the fused
    recurrence (``gru`` may be batch-first: only its weights are read). Gate order (r, z, n) becomes
    (u, r, n) with u = 1 − z, i.e. z's pre-activation negated: h' = (1 − z)·n + z·h = h + u·(n − h)."""
    hd = gru.hidden_size
    w_ih, w_hh, b_ih, b_hh = (cast(Tensor, getattr(gru, n)) for n in ("weight_ih_l0", "weight_hh_l0",
                                                                     "bias_ih_l0", "bias_hh_l0"))  # fmt: skip
    w_in = torch.cat([-w_ih[hd : 2 * hd], w_ih[:hd], w_ih[2 * hd :]])  # (3H, D)
    w_rec = torch.cat([-w_hh[hd : 2 * hd], w_hh[:hd], w_hh[2 * hd :]])  # (3H, H)
    b_in = torch.cat([-(b_ih[hd : 2 * hd] + b_hh[hd : 2 * hd]), b_ih[:hd] + b_hh[:hd], b_ih[2 * hd :]])  # (3H,)
    x_proj = F.linear(x, w_in, b_in)  # (L, B, 3H)
    ones = x.new_ones(x.shape[0], x.shape[1], 1)  # (L, B, 1)
    states: Tensor = GatedGRUSequence.apply(x_proj, ones, w_rec, b_hh[2 * hd :], True)  # (L, B, H)
    return states


def valid_first(mask: Tensor) -> Tensor:
    """mask (B, L) → order (S, B): row b's valid positions first, in their order (stable), then the others;
    S = the longest row's valid count, at least 1. ``pack_time_major`` gathers a row's tensors in this order."""
    steps = max(int(mask.sum(1).max()), 1)
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :steps].T  # (S, B)


def pack_time_major(x: Tensor, order: Tensor) -> Tensor:
    """x (B, L, ...) and order (S, B) from ``valid_first`` → (S, B, ...): step s of row b is x[b, order[s, b]]."""
    index = order.view(*order.shape, *(1,) * (x.dim() - 2)).expand(*order.shape, *x.shape[2:])  # (S, B, ...)
    return x.transpose(0, 1).gather(0, index)


class InterestEvolution(nn.Module):
    """Runs the AUGRU (or AGRU / AIGRU) over the interest states, driven by attention."""

    def __init__(self, dim: int, kind: Evolution) -> None:
        super().__init__()
        self.kind = kind
        self.cell = AUGRUCell(dim, dim, kind)

    def forward(self, interests: Tensor, attention: Tensor, mask: Tensor) -> Tensor:
        """interests (B, L, H), attention (B, L) zero on padding, mask (B, L) → final interest (B, H).

        With ũ = a·u, a padded step (a = 0) leaves the state unchanged, so right padding is harmless.
        For AIGRU the scaled input still updates the state; the mask is applied to the step instead.
        """
        if torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export():
            return self._train_forward(interests, attention, mask)
        inputs = interests * attention.unsqueeze(-1) if self.kind == "aigru" else interests
        x_proj = self.cell.input_proj(inputs)  # (B, L, 3H)
        a = attention.unsqueeze(-1)  # (B, L, 1)
        h = interests.new_zeros(interests.shape[0], interests.shape[-1])  # (B, H)
        steps = zip(x_proj.unbind(1), a.unbind(1), mask.unsqueeze(-1).unbind(1), strict=True)
        for x_t, a_t, valid_t in steps:
            h_next = self.cell(x_t, h, a_t)  # (B, H)
            h = torch.where(valid_t, h_next, h) if self.kind == "aigru" else h_next
        return h

    def _train_forward(self, interests: Tensor, attention: Tensor, mask: Tensor) -> Tensor:
        """The fused recurrence over each row's valid steps only.

        A step whose gate is zero (attention, or the mask for AIGRU) leaves the state exactly unchanged,
        h + 0·(h̃ − h) = h, and passes no gradient to its input (every coefficient carries the gate). So
        each row's valid steps are packed to the front in their order and the recurrence runs for the
        longest row only (≈ 25 of 50 steps with history dropout 0.7); shorter rows are padded with
        zero-gate steps. Same values and gradients as running all L steps (tested)."""
        order = valid_first(mask)  # (S, B)
        return self.packed_forward(*(pack_time_major(x, order) for x in (interests, attention, mask)))

    def packed_forward(self, interests: Tensor, attention: Tensor, mask: Tensor) -> Tensor:
        """Training's form on inputs already packed time-major: interests (S, B, H), attention (S, B) and
        mask (S, B), each row's valid steps first and zero attention past them → final interest (B, H).
        The fused recurrence with its hand-written backward; not exportable."""
        inputs = interests * attention.unsqueeze(-1) if self.kind == "aigru" else interests  # (S, B, H)
        gate = mask.to(interests.dtype) if self.kind == "aigru" else attention  # (S, B), zero where ~mask
        x_proj = self.cell.input_proj(inputs)  # (S, B, 3H)
        weight = self.cell.hidden_proj.weight
        states: Tensor = GatedGRUSequence.apply(x_proj, gate.unsqueeze(-1), weight, None, self.kind != "agru")
        return states[-1]  # (B, H)
