"""Layers shared by the models, in their paper form: embeddings, Dice, MLP, DIN's activation unit, the
history compaction, and interest evolution (AUGRU and its variants) with its one gated recurrence.

``gated_recurrence`` is the paper form of the gated GRU: one step loop, TorchScript so an ONNX export keeps
the history length dynamic; the paper form's interest evolution runs it. The training form, a fused
recurrence with a hand-written backward, lives in models/fast_training.py; the serving form, the same step
loop with each user's input projections shared by its candidates, is ``serving.shared_input_recurrence``.
Tests hold both equal to this one."""

from __future__ import annotations

import torch
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
    """DIN's activation unit (paper Fig. 2): score(q, k) = MLP([q, k, q − k, q ⊙ k]) at every history position."""

    def __init__(self, dim: int, hidden: tuple[int, ...], activation: Activation) -> None:
        super().__init__()
        self.dim = dim
        self.first = nn.Linear(4 * dim, hidden[0])
        self.first_activation = make_activation(activation, hidden[0])
        self.rest = MLP(hidden[0], hidden[1:], 1, activation)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """query (B, D), keys (B, L, D) → unnormalised scores (B, L)."""
        q = query.unsqueeze(1).expand_as(keys)  # (B, L, D)
        h = self.first_activation(self.first(torch.cat([q, keys, q - keys, q * keys], dim=-1)))  # (B, L, H)
        return self.rest(h).squeeze(-1)  # (B, L)

    def split_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The first layer rearranged, (W_q + W_d, W_k − W_d, W_p), each (H, D), from
            W·[q; k; q − k; q ⊙ k] = (W_q + W_d)·q + (W_k − W_d)·k + W_p·(q ⊙ k):
        the query part is computed once per row and the key part once per user. The serving graphs and
        the training form use it; the paper form above is the definition."""
        w_q, w_k, w_d, w_p = self.first.weight.split(self.dim, dim=1)
        return w_q + w_d, w_k - w_d, w_p


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over valid positions; exactly zero on padding and all-zero rows for empty histories."""
    filled = scores.masked_fill(~mask, -1e9)  # (B, L)
    return torch.softmax(filled, dim=-1) * mask


def valid_first(mask: Tensor) -> Tensor:
    """mask (B, L) → order (B, L): each row's valid positions first, then its masked ones, each in their order.

    The sort keys are distinct (position, plus L for a masked one), so any sort is stable and the order
    exports to ONNX as it is. ``x.gather(1, order)`` compacts a row's valid behaviours to the front."""
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device)  # (L,)
    return torch.argsort(positions + (~mask).long() * length, dim=1)  # (B, L)


@torch.jit.script
def gated_recurrence(x_proj: Tensor, gate: Tensor, weight: Tensor, scale_update: bool) -> Tensor:
    """The gated GRU, paper convention: h_t = h_{t−1} + ũ_t ⊙ (h̃_t − h_{t−1}) from h_0 = 0, with
    u_t, r_t = σ(x_u + U_u·h_{t−1}), σ(x_r + U_r·h_{t−1}), h̃_t = tanh(x_n + r_t ⊙ U_n·h_{t−1}) and
    ũ_t = g_t·u_t (``scale_update``) or ũ_t = g_t. A step whose gate is zero leaves the state unchanged.

    x_proj (B, L, 3H) the input projection [x_u, x_r, x_n], gate (B, L, 1), weight (3H, H) = [U_u; U_r; U_n]
    → h_L (B, H). TorchScript, so an ONNX export keeps L dynamic (a Loop)."""
    hd = weight.size(1)
    h = torch.zeros(x_proj.size(0), hd, dtype=x_proj.dtype, device=x_proj.device)  # (B, H)
    xs = x_proj.transpose(0, 1).contiguous()  # (L, B, 3H): each step a contiguous slab
    gs = gate.transpose(0, 1).contiguous()  # (L, B, 1)
    w_t = weight.t()  # (H, 3H)
    for t in range(xs.size(0)):
        x_t = xs[t]  # (B, 3H)
        hidden = torch.mm(h, w_t)  # (B, 3H)
        ur = torch.sigmoid(x_t[:, : 2 * hd] + hidden[:, : 2 * hd])  # (B, 2H): u_t, r_t
        n = torch.tanh(x_t[:, 2 * hd :] + ur[:, hd:] * hidden[:, 2 * hd :])  # (B, H): h̃_t
        g = gs[t]  # (B, 1)
        u = g * ur[:, :hd] if scale_update else g  # ũ_t
        h = h + u * (n - h)  # (B, H) = (1 − ũ) ⊙ h + ũ ⊙ h̃
    return h


class InterestEvolution(nn.Module):
    """DIEN's interest evolution (paper eqs. 2–8) over the interest states h'_t, driven by attention a_t:

    - ``augru``: ũ_t = a_t·u_t replaces the update gate (the paper's choice);
    - ``agru``:  a_t replaces it;
    - ``aigru``: the input is scaled, i'_t = a_t·h'_t, before a plain GRU step.

    A padded step leaves the state unchanged (its attention, for AIGRU its mask, is the gate), so right
    padding is harmless."""

    def __init__(self, dim: int, kind: Evolution) -> None:
        super().__init__()
        self.kind = kind
        self.input_proj = nn.Linear(dim, 3 * dim)  # W_u, W_r, W_h with their biases
        self.hidden_proj = nn.Linear(dim, 3 * dim, bias=False)  # U_u, U_r, U_h

    def forward(self, interests: Tensor, attention: Tensor, mask: Tensor) -> Tensor:
        """interests (B, L, H), attention (B, L) zero on padding, mask (B, L) → final interest h_L (B, H)."""
        a = attention.unsqueeze(-1)  # (B, L, 1)
        inputs = interests * a if self.kind == "aigru" else interests  # (B, L, H)
        gate = mask.unsqueeze(-1).to(a.dtype) if self.kind == "aigru" else a  # (B, L, 1)
        x_proj = self.input_proj(inputs)  # (B, L, 3H)
        return gated_recurrence(x_proj, gate, self.hidden_proj.weight, self.kind != "agru")  # (B, H)
