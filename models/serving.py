"""The serving form of each model: a batch of users, each scored against many candidates.

Per-user work (history embeddings, DIN's first attention layer as one operator per user history,
DIEN's GRU over the history and its AUGRU input projection) runs once per user; only what depends on the
candidate runs per candidate. Dice is folded into affine ops. This is the graph that ONNX export writes.

Inputs (U users, N candidates in all, L history positions, F user features):
    hist_items (U, L) int64, hist_cats (U, L) int64, hist_mask (U, L) bool — oldest first, right-padded
    user_feats (U, F) int64
    cand_items (N,) int64, cand_cats (N,) int64, cand_user (N,) int64 — the row of each candidate's user
    hist_feedback (U, L) int64 — only for models trained with history feedback (FEEDBACK_* per behaviour)
    sess_index (U, K, T) int64, sess_mask (U, K, T) bool — DSIN only: sessions.session_layout of each history
Outputs:
    probability (N,) float32 — click probability per candidate
    attention (N, L) float32 — weight each history position got from the candidate, zero on padding
    session_weights (N, K) float32 — DSIN only: the candidate's weight on each session, most recent first
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import Tensor, nn

# the graph's interface is the contract with the service (contract.py); re-exported for export and tests
from contract import FEEDBACK_INPUT, INPUT_NAMES, OUTPUT_NAMES, input_names  # noqa: F401
from models.base import BaseModel, CTRModel
from models.dien import DIEN
from models.din import DIN
from models.dsin import DSIN
from models.layers import ActivationUnit, Dice, PReLULast, masked_softmax, valid_first


class FoldedDice(nn.Module):
    """Dice at inference as affine ops: p = sigmoid(s·x + t) with s = 1/sqrt(var + ε), t = −mean·s;
    f(x) = x·(α + (1 − α)·p)."""

    scale: Tensor
    shift: Tensor
    alpha: Tensor

    def __init__(self, dice: Dice) -> None:
        super().__init__()
        var, mean = dice.norm.running_var, dice.norm.running_mean
        assert var is not None and mean is not None
        scale = torch.rsqrt(var + dice.norm.eps)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", (-mean * scale).detach().clone())
        self.register_buffer("alpha", dice.alpha.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        p = torch.sigmoid(x * self.scale + self.shift)
        return x * (self.alpha + (1 - self.alpha) * p)


def fold_dice(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every Dice replaced by its folded, batch-independent form."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_children()):
        if isinstance(child, Dice):
            setattr(module, name, FoldedDice(child))
        else:
            setattr(module, name, fold_dice(child))
    return module


class _Serving(nn.Module):
    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        self.model = cast(CTRModel, fold_dice(model.eval()).eval())
        self.embedding = self.model.embedding

    def click_probability(
        self,
        user_feats: Tensor,
        cand_user: Tensor,
        query: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        *interest: Tensor,
    ) -> Tensor:
        """The model's own output layer, with each candidate's user profile gathered → (N,)."""
        user = self.embedding.user(user_feats).index_select(0, cand_user)  # (N, F·U)
        return torch.sigmoid(self.model.click_logit(user, query, cand_items, cand_cats, *interest))


class BaseServing(_Serving):
    def forward(
        self,
        hist_items: Tensor,
        hist_cats: Tensor,
        hist_mask: Tensor,
        user_feats: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        cand_user: Tensor,
        hist_feedback: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        keys = self.embedding.history(hist_items, hist_cats, hist_feedback)  # (U, L, D)
        weights = hist_mask.to(keys.dtype)  # (U, L)
        pooled = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)  # (U, D): once per user
        query = self.embedding.behaviours(cand_items, cand_cats)  # (N, D)
        interest = pooled.index_select(0, cand_user)  # (N, D)
        prob = self.click_probability(user_feats, cand_user, query, cand_items, cand_cats, interest)  # (N,)
        return prob, weights.index_select(0, cand_user)


class MaxPReLU(nn.Module):
    """PReLU as max(x, w·x): exact when every slope w ≤ 1, and two ONNX ops instead of four (ONNX
    Runtime's own PRelu op, with per-channel slopes, is slower than either)."""

    def __init__(self, prelu: PReLULast) -> None:
        super().__init__()
        self.weight = nn.Parameter(prelu.weight.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.maximum(x, x * self.weight)


def serving_activation(module: nn.Module) -> nn.Module:
    """The cheapest exact inference form of an activation: MaxPReLU where the slopes allow it."""
    if isinstance(module, PReLULast) and bool((module.weight <= 1).all()):
        return MaxPReLU(module)
    return module


# Building a user's layer-1 operator costs about as much as this many candidates' layer 1 (measured at
# 128-dim behaviours, 50 positions, H = 80; both scale with L·H·D).
USER_COST_IN_CANDIDATES = 24


@torch.jit.script
def candidate_grid(cand_user: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Each candidate's row in a (U, C_max) grid (N,), and each grid row's candidate (U·C_max,), N where empty."""
    n = cand_user.size(0)
    order = torch.argsort(cand_user)  # candidates grouped by user; the order within a user is free
    users_sorted = cand_user.index_select(0, order)  # (N,)
    starts = torch.cumsum(counts, 0) - counts  # (U,) first sorted position of each user
    slot = torch.arange(n) - starts.index_select(0, users_sorted)  # (N,) slot within its user, sorted order
    grid_index = torch.zeros_like(cand_user).scatter(0, order, users_sorted * counts.max() + slot)  # (N,)
    rows = torch.full((counts.size(0) * int(counts.max()),), n, dtype=torch.long)
    return grid_index, rows.scatter(0, grid_index, torch.arange(n))


@torch.jit.script
def split_first_layer(
    keys: Tensor, query: Tensor, cand_user: Tensor, w_query: Tensor, w_key: Tensor, w_prod: Tensor, bias: Tensor
) -> Tensor:
    """Layer-1 pre-activations (N·L, H) per candidate in split form: only the key part is per user."""
    n, length, dim, hidden = query.size(0), keys.size(1), keys.size(2), bias.size(0)
    key_part = keys @ w_key.t()  # (U, L, H)
    keys_c = keys.index_select(0, cand_user)  # (N, L, D)
    q_part = (query @ w_query.t() + bias).unsqueeze(1)  # (N, 1, H)
    prod_part = ((query.unsqueeze(1) * keys_c).reshape(-1, dim) @ w_prod.t()).reshape(n, length, hidden)
    z = q_part + key_part.index_select(0, cand_user) + prod_part  # (N, L, H)
    return z.reshape(-1, hidden)


@torch.jit.script
def first_layer(
    keys: Tensor,
    query: Tensor,
    cand_user: Tensor,
    w_query: Tensor,
    w_key: Tensor,
    w_prod: Tensor,
    bias: Tensor,
    user_cost: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Layer-1 pre-activations z (R·L, H) for R score rows, each candidate's row (N,), and whether the rows
    are the per-user grid (U, C_max) (1) or the candidates themselves (0). See DINAttention."""
    users, dim, n = keys.size(0), keys.size(2), query.size(0)
    hidden = bias.size(0)
    counts = torch.zeros(users, dtype=torch.long).scatter_add(0, cand_user, torch.ones_like(cand_user))  # (U,)
    grid_rows = users * (int(counts.max()) + user_cost)  # what the per-user form costs, in candidate rows
    if n > 0 and 4 * grid_rows <= 5 * n:
        # once per user: the operator [G; c] with G[d, l, h] = k[l, d]·W_p[h, d] + W_q'[h, d], c[l, h] = W_k'·k_l + b
        g = keys.transpose(1, 2).unsqueeze(3) * w_prod.t().unsqueeze(1) + w_query.t().unsqueeze(1)  # (U, D, L, H)
        c = keys @ w_key.t() + bias  # (U, L, H)
        operator = torch.cat([g.reshape(users, dim, -1), c.reshape(users, 1, -1)], dim=1)  # (U, D+1, L·H)
        # candidates into a (U, C_max) grid, an empty slot holding an all-zero row; the appended 1 picks up c
        grid_index, source = candidate_grid(cand_user, counts)  # (N,), (U·C_max,)
        q1 = torch.cat([query, torch.ones_like(query[:, :1])], dim=1)  # (N, D+1)
        padded = torch.cat([q1, torch.zeros_like(q1[:1])], dim=0)  # (N+1, D+1)
        grid = padded.index_select(0, source).reshape(users, -1, dim + 1)  # (U, C_max, D+1)
        z = torch.bmm(grid, operator)  # (U, C_max, L·H): one product per user
        return z.reshape(-1, hidden), grid_index, torch.ones((), dtype=torch.long)
    z = split_first_layer(keys, query, cand_user, w_query, w_key, w_prod, bias)
    return z, torch.arange(n), torch.zeros((), dtype=torch.long)


@torch.jit.script
def pool_per_candidate(
    scores: Tensor, keys: Tensor, mask: Tensor, cand_user: Tensor, softmax: bool
) -> tuple[Tensor, Tensor]:
    """Scores (N·L,) of per-candidate rows → attention (N, L), exactly zero on padding, and interest (N, D)."""
    s = scores.reshape(-1, keys.size(1))  # (N, L)
    m = mask.index_select(0, cand_user)  # (N, L)
    att = masked_softmax(s, m) if softmax else torch.sigmoid(s) * m
    return att, torch.bmm(att.unsqueeze(1), keys.index_select(0, cand_user)).squeeze(1)


@torch.jit.script
def pool(
    scores: Tensor, keys: Tensor, mask: Tensor, cand_user: Tensor, rows: Tensor, grid: Tensor, softmax: bool
) -> tuple[Tensor, Tensor]:
    """Scores (R·L,) → attention (N, L), exactly zero on padding, and interest Σ_l a_l·k_l (N, D)."""
    users, length, dim = keys.size(0), keys.size(1), keys.size(2)
    if bool(grid):
        s = scores.reshape(users, -1, length)  # (U, C_max, L)
        m = mask.unsqueeze(1)  # (U, 1, L)
        att = masked_softmax(s, m) if softmax else torch.sigmoid(s) * m
        interest = torch.bmm(att, keys)  # (U, C_max, D)
        return att.reshape(-1, length).index_select(0, rows), interest.reshape(-1, dim).index_select(0, rows)
    return pool_per_candidate(scores, keys, mask, cand_user, softmax)


class DINAttention(nn.Module):
    """DIN's activation unit at serving time: weights (N, L) and interest (N, D) for flat candidates.

    Layer 1 of the unit is linear in the query q for a fixed history k:
        z_l = W_p·(q ⊙ k_l) + W_q'·q + W_k'·k_l + b = G_l·q + c_l,   G_l = W_p·diag(k_l) + W_q',  c_l = W_k'·k_l + b
    so each user's history defines one operator [G; c] (D+1 → L·H), and all that user's candidates go
    through it as one (C, D+1)·(D+1, L·H) product: no (N, L, D) copy of the history, no q ⊙ k pass, no
    bias adds. That pays when a user has many candidates: building [G; c] costs about
    USER_COST_IN_CANDIDATES candidates' worth, and a batch of many users with few candidates each would
    need one operator per user (2 MB each at L = 50, H = 80). Such batches, and batches whose users'
    candidate counts are so uneven that the (U, C_max) grid would be mostly empty, take the split form per
    candidate. Both compute the same function; the choice is an ONNX If on the batch's shape, and the
    layers after the first run on 2-D (rows, H) tensors either way (one Gemm each, bias included).

    ``per_user_operator=False`` exports the split form alone, with no If: on a GPU the choice costs more
    than it saves, since deciding it on the host stops the device (measured on an H100: 142 nodes per call
    with 9 copies to the host and an If worth 2–4 ms of node time, against 68 for the split form alone).
    """

    def __init__(self, unit: ActivationUnit, softmax: bool, per_user_operator: bool = True) -> None:
        super().__init__()
        self.per_user_operator = per_user_operator
        frozen = [nn.Parameter(w.detach().clone(), requires_grad=False) for w in unit.split_weights()]
        self.w_query, self.w_key, self.w_prod = frozen  # (H, D) each: W_q + W_d, W_k − W_d, W_p
        self.bias = nn.Parameter(unit.first.bias.detach().clone(), requires_grad=False)  # (H,)
        self.first_activation = serving_activation(unit.first_activation)
        self.rest = nn.Sequential(*(serving_activation(m) for m in unit.rest.net))  # (M, H) → (M, 1)
        self.softmax = softmax

    def forward(self, keys: Tensor, query: Tensor, mask: Tensor, cand_user: Tensor) -> tuple[Tensor, Tensor]:
        """keys (U, L, D), query (N, D), mask (U, L), cand_user (N,) → weights (N, L), interest (N, D)."""
        if not self.per_user_operator:
            z = split_first_layer(keys, query, cand_user, self.w_query, self.w_key, self.w_prod, self.bias)
            scores = self.rest(self.first_activation(z)).squeeze(-1)  # (N·L,)
            return pool_per_candidate(scores, keys, mask, cand_user, self.softmax)
        weights = (self.w_query, self.w_key, self.w_prod, self.bias)
        z, rows, grid = first_layer(keys, query, cand_user, *weights, USER_COST_IN_CANDIDATES)
        scores = self.rest(self.first_activation(z)).squeeze(-1)  # (R·L,)
        return pool(scores, keys, mask, cand_user, rows, grid, self.softmax)


class KeysSideAttention(nn.Module):
    """The toolbox's dot, bilinear and multi-head attention (models/attention.py) at serving time: what they
    need of the keys (``keys_side``: W k_l, [W_k k_l, W_v k_l]) once per user, gathered to the candidates,
    and the paper form's own per-candidate step on it."""

    def __init__(self, model: DIN) -> None:
        super().__init__()
        self.model = model  # the serving copy (Dice folded), for its scorer and ``attention_weights``

    def forward(self, keys: Tensor, query: Tensor, mask: Tensor, cand_user: Tensor) -> tuple[Tensor, Tensor]:
        """keys (U, L, D), query (N, D), mask (U, L), cand_user (N,) → weights (N, L), interest (N, D)."""
        m = self.model
        mask_c = mask.index_select(0, cand_user)  # (N, L)
        if m.multihead is not None:
            side = m.multihead.keys_side(keys).index_select(0, cand_user)  # (N, L, 2D): projected per user
            return m.multihead.attend(query, side, mask_c, m.attention_weights)  # (N, L), (N, D)
        scorer = m.dot if m.dot is not None else m.bilinear
        assert scorer is not None, "the activation unit is served by DINAttention"
        side = scorer.keys_side(keys).index_select(0, cand_user)  # (N, L, D): W k_l computed per user
        weights = m.attention_weights(scorer.scores(query, side), mask_c)  # (N, L)
        interest = torch.bmm(weights.unsqueeze(1), keys.index_select(0, cand_user)).squeeze(1)  # (N, D)
        return weights, interest


class DINServing(_Serving):
    """DIN for many candidates per user. The activation unit ("mlp", "position") runs as ``DINAttention``;
    the toolbox's other scorers as ``KeysSideAttention``. Keys are computed once per user, recency
    embeddings included."""

    def __init__(self, model: DIN, per_user_operator: bool = True) -> None:
        super().__init__(model)
        din = cast(DIN, self.model)
        self.attention: nn.Module = (
            DINAttention(din.activation_unit, model.cfg.attention_softmax, per_user_operator)
            if din.uses_activation_unit
            else KeysSideAttention(din)
        )

    def forward(
        self,
        hist_items: Tensor,
        hist_cats: Tensor,
        hist_mask: Tensor,
        user_feats: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        cand_user: Tensor,
        hist_feedback: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        keys = cast(DIN, self.model).keys(hist_items, hist_cats, hist_mask, hist_feedback)  # (U, L, D): per user
        query = self.embedding.behaviours(cand_items, cand_cats)  # (N, D)
        weights, interest = self.attention(keys, query, hist_mask, cand_user)  # (N, L), (N, D)
        return self.click_probability(user_feats, cand_user, query, cand_items, cand_cats, interest), weights


@torch.jit.script
def shared_input_recurrence(
    p_ur: Tensor,
    p_n: Tensor,
    cand_user: Tensor,
    attention: Tensor,
    mask: Tensor,
    w_ur: Tensor,
    w_n: Tensor,
    b_ur: Tensor,
    b_n: Tensor,
    hidden: int,
    kind_aigru: bool,
    scale_update: bool,
) -> Tensor:
    """``layers.gated_recurrence`` for N candidates whose inputs are their users' interest states: the
    input projections W·h'_t stay one row per user, time-major, and each step gathers its candidates' rows.

    p_ur (L, U, 2H), p_n (L, U, H): W_{u,r}·h'_t and W_n·h'_t per user (plus their biases, except for AIGRU,
    whose input is a_t·h'_t: W·(a·s) + b = a·(W·s) + b is formed per step); cand_user (N,); attention and mask
    (L, N, 1) time-major; w_ur (H, 2H) = [U_u; U_r]ᵀ, w_n (H, H) = U_nᵀ, b_ur (2H,), b_n (H,); ``hidden`` = H
    as a constant, so the split below exports as one Split → h_L (N, H).

    Why this shape (bench/README.md, 2026-12-05): each of the L steps is a handful of small ops on (N, H)
    tensors, so the step's op count is its cost. The u, r pre-activations are one Gemm with x_t as its C input
    (and the sigmoid fused in by ONNX Runtime); U_n·h is its own MatMul, so no step slices a (N, 3H) tensor;
    the per-user rows are gathered per step rather than copied up front into an (L, N, 3H) tensor."""
    h = torch.zeros(cand_user.size(0), hidden, dtype=p_ur.dtype, device=p_ur.device)  # (N, H)
    for t in range(p_ur.size(0)):
        x_ur = p_ur[t].index_select(0, cand_user)  # (N, 2H)
        x_n = p_n[t].index_select(0, cand_user)  # (N, H)
        a = attention[t]  # (N, 1)
        if kind_aigru:
            x_ur, x_n = a * x_ur + b_ur, a * x_n + b_n
        ur = torch.sigmoid(torch.addmm(x_ur, h, w_ur))  # (N, 2H): u_t, r_t
        u, r = torch.split(ur, hidden, 1)  # (N, H) each
        n = torch.tanh(x_n + r * torch.mm(h, w_n))  # (N, H): h̃_t
        gate = mask[t] if kind_aigru else a  # (N, 1): zero on padding either way
        update = gate * u if scale_update else gate  # ũ_t
        h = h + update * (n - h)  # (N, H)
    return h


class DIENServing(_Serving):
    """DIEN for many candidates per user: the extractor GRU, the AUGRU's input projection and the behaviour
    sum run once per user; the attention and the interest evolution per candidate.

    The evolution is ``shared_input_recurrence`` over the longest history in the call (a step past every
    user's last behaviour has gate zero for all candidates, so it is skipped, not run). Equal to the paper
    form (models/dien.py) within float rounding: tests/unit/test_serving.py and the export's parity check."""

    def __init__(self, model: DIEN) -> None:
        super().__init__(model)
        m = cast(DIEN, self.model)
        self.extractor = m.extractor
        self.attention_proj = m.attention_proj
        self.kind = m.evolution.kind
        self.attention_pooling = m.cfg.dien_pooling == "attention"
        self.hidden = m.cfg.behaviour_dim
        hd = self.hidden

        def frozen(t: Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)

        w_in, b_in = m.evolution.input_proj.weight, m.evolution.input_proj.bias  # (3H, H), (3H,)
        w_hidden = m.evolution.hidden_proj.weight  # (3H, H) = [U_u; U_r; U_n]
        self.w_in, self.b_in = frozen(w_in.t()), frozen(b_in)  # (H, 3H), (3H,)
        self.w_ur, self.w_n = frozen(w_hidden[: 2 * hd].t()), frozen(w_hidden[2 * hd :].t())  # (H, 2H), (H, H)

    def forward(
        self,
        hist_items: Tensor,
        hist_cats: Tensor,
        hist_mask: Tensor,
        user_feats: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        cand_user: Tensor,
        hist_feedback: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        # a masked behaviour is absent, as in the paper form: each user's valid behaviours to the front
        # (a no-op on the right-padded histories the service sends), then only as many positions as the
        # longest history holds (at least one, so the extractor always has a step)
        order = valid_first(hist_mask)  # (U, L)
        steps = hist_mask.sum(1).max().clamp(min=1)  # ()
        kept = order[:, :steps]  # (U, S)
        hist_mask, hist_items, hist_cats = (x.gather(1, kept) for x in (hist_mask, hist_items, hist_cats))
        feedback = None if hist_feedback is None else hist_feedback.gather(1, kept)  # (U, S)
        behaviours = self.embedding.history(hist_items, hist_cats, feedback)  # (U, S, D)
        states, _ = self.extractor(behaviours)  # (U, S, D): interest extraction, once per user
        query = self.embedding.behaviours(cand_items, cand_cats)  # (N, D)
        states_c = states.index_select(0, cand_user)  # (N, S, D)
        scores = torch.bmm(states_c, self.attention_proj(query).unsqueeze(-1)).squeeze(-1)  # (N, S)
        mask = hist_mask.index_select(0, cand_user)  # (N, S)
        weights = masked_softmax(scores, mask)  # (N, S)
        final = self.interest_evolution(states, weights, mask, cand_user)  # (N, H)
        if self.attention_pooling:  # Σ_t a_t e_t depends on the candidate
            pooled_c = torch.bmm(weights.unsqueeze(1), behaviours.index_select(0, cand_user)).squeeze(1)  # (N, D)
        else:  # the plain sum is per-user work
            mask_f = hist_mask.to(behaviours.dtype)  # (U, S)
            pooled_c = torch.bmm(mask_f.unsqueeze(1), behaviours).squeeze(1).index_select(0, cand_user)  # (N, D)
        prob = self.click_probability(user_feats, cand_user, query, cand_items, cand_cats, pooled_c, final)
        attention = torch.zeros(weights.size(0), order.size(1), dtype=weights.dtype)  # (N, L)
        return prob, attention.scatter(1, kept.index_select(0, cand_user), weights)  # (N, L), original positions

    def interest_evolution(self, states: Tensor, weights: Tensor, mask: Tensor, cand_user: Tensor) -> Tensor:
        """states (U, S, H) per user, weights and mask (N, S) per candidate → final interest h'_S (N, H)."""
        hd, aigru = self.hidden, self.kind == "aigru"
        proj = states.transpose(0, 1) @ self.w_in  # (S, U, 3H): W·h'_t, once per user, time-major
        if not aigru:  # the bias joins the per-user rows; AIGRU adds it per step, after scaling by a_t
            proj = proj + self.b_in  # (S, U, 3H)
        p_ur, p_n = proj[:, :, : 2 * hd].contiguous(), proj[:, :, 2 * hd :].contiguous()  # (S, U, 2H), (S, U, H)
        attention = weights.t().unsqueeze(-1)  # (S, N, 1)
        mask_t = mask.t().unsqueeze(-1).to(weights.dtype)  # (S, N, 1)
        b_ur, b_n = self.b_in[: 2 * hd], self.b_in[2 * hd :]  # (2H,), (H,)
        args = (self.w_ur, self.w_n, b_ur, b_n, hd, aigru, self.kind != "agru")
        return shared_input_recurrence(p_ur, p_n, cand_user, attention, mask_t, *args)  # (N, H)


class DSINServing(_Serving):
    """DSIN's serving form: the session interest extractor and the Bi-LSTM depend only on the history, so they
    run once per user; only the activating layer (two activation units over K sessions) and the output MLP
    run per candidate. The paper form's own stage methods, on (U, ·) instead of (N, ·) rows."""

    def __init__(self, model: DSIN) -> None:
        super().__init__(model)
        self.dsin = cast(DSIN, self.model)

    def forward(
        self,
        hist_items: Tensor,
        hist_cats: Tensor,
        hist_mask: Tensor,
        user_feats: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        cand_user: Tensor,
        sess_index: Tensor,
        sess_mask: Tensor,
        hist_feedback: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        m = self.dsin
        behaviours = self.embedding.history(hist_items, hist_cats, hist_feedback)  # (U, L, D)
        sessions, mask = m.session_behaviours(behaviours, hist_mask, sess_index, sess_mask)  # (U, K, T, D)
        present = mask.any(-1)  # (U, K)
        interests, share = m.extractor(sessions, mask)  # (U, K, D), (U, K, T): once per user
        states = m.interaction(interests, present)  # (U, K, D): once per user
        query = self.embedding.behaviours(cand_items, cand_cats)  # (N, D)
        present_c = present.index_select(0, cand_user)  # (N, K)
        w_interest, u_interest = m.activation(m.interest_unit, query, interests.index_select(0, cand_user), present_c)
        _, u_state = m.activation(m.state_unit, query, states.index_select(0, cand_user), present_c)  # (N, D)
        prob = self.click_probability(user_feats, cand_user, query, cand_items, cand_cats, u_interest, u_state)
        share_c = (share * mask).index_select(0, cand_user)  # (N, K, T)
        attention = m.item_attention(w_interest, share_c, sess_index.index_select(0, cand_user), hist_items.shape[1])
        return prob, attention, w_interest  # (N,), (N, L), (N, K)


class NaiveServing(nn.Module):
    """The paper form behind the serving interface: every candidate carries its own copy of its user's
    history and the whole model runs per candidate (Dice folded as in the serving form, so the two differ
    only in what is shared and how layers are arranged). Export's parity reference; bench.inprocess builds
    its "naive" graph from it."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        self.model = fold_dice(model.eval()).eval()

    def forward(
        self,
        hist_items: Tensor,
        hist_cats: Tensor,
        hist_mask: Tensor,
        user_feats: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        cand_user: Tensor,
        hist_feedback: Tensor | None = None,
        sess_index: Tensor | None = None,
        sess_mask: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        if isinstance(self.model, DSIN):  # the paper form also answers the session weights
            assert sess_index is not None and sess_mask is not None, "DSIN needs the session division"
            d = self.model.sessions_forward(
                hist_items.index_select(0, cand_user),
                hist_cats.index_select(0, cand_user),
                hist_mask.index_select(0, cand_user),
                cand_items,
                cand_cats,
                user_feats.index_select(0, cand_user),
                sess_index.index_select(0, cand_user),
                sess_mask.index_select(0, cand_user),
                hist_feedback=None if hist_feedback is None else hist_feedback.index_select(0, cand_user),
            )
            return torch.sigmoid(d.logits), d.attention, d.session_weights
        out = self.model(
            hist_items.index_select(0, cand_user),
            hist_cats.index_select(0, cand_user),
            hist_mask.index_select(0, cand_user),
            cand_items,
            cand_cats,
            user_feats.index_select(0, cand_user),
            hist_feedback=None if hist_feedback is None else hist_feedback.index_select(0, cand_user),
        )
        return torch.sigmoid(out.logits), out.attention


def serving_module(model: CTRModel, device: str = "cpu") -> nn.Module:
    """The serving form for a device kind: "cpu", or "cuda" (DIN's graph without host-side branching)."""
    if isinstance(model, DIN):
        return DINServing(model, per_user_operator=device != "cuda").eval()
    if isinstance(model, DIEN):
        return DIENServing(model).eval()
    if isinstance(model, DSIN):
        return DSINServing(model).eval()
    if isinstance(model, BaseModel):
        return BaseServing(model).eval()
    raise TypeError(f"no serving form for {type(model).__name__}")
