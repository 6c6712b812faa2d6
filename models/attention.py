"""DIN's target attention, the toolbox: ways to weigh each behaviour k_l by its relevance to the candidate q.

- ``mlp``: DIN's activation unit, MLP([q, k, q − k, q ⊙ k]) (the paper's; ``layers.ActivationUnit``);
- ``dot``: scaled dot product, q·k_l / √D (Vaswani et al. 2017), no parameters;
- ``bilinear``: qᵀ W k_l (Luong et al. 2015, "general"), W (D, D) learned;
- ``multihead``: h heads, each scoring W_q^i q against W_k^i k_l and pooling W_v^i k_l; the interest is the
  heads' pooled values concatenated (Vaswani et al. 2017 with the candidate as the one query, as in BST);
- ``position``: the activation unit over keys with a learned position embedding added, k_l + p_{r(l)}, r(l)
  the behaviour's recency rank (0 for the latest valid one): where a behaviour sits in time, not only what
  it is, counts (position embeddings as in BST, Chen et al. 2019).

Every kind turns scores into weights the same way (DIN's ``attention_weights``: sigmoid, or a softmax over
valid positions when asked) and is exactly zero on padding. The attention a caller sees is one weight per
behaviour: for ``multihead`` the mean of the heads' weights.

Each module here splits its work into a per-user part (``keys_side``: what depends on the history only) and a
per-candidate part (``attend``), so that the paper form (``forward``, one candidate per row) and the serving
graph (models/serving.py: the per-user part once per user) run the same two functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

Weigh = Callable[[Tensor, Tensor], Tensor]  # scores (…, L), mask (…, L) → weights, zero on padding


class DotProductAttention(nn.Module):
    """score(q, k_l) = q·k_l / √D."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = 1.0 / math.sqrt(dim)

    def keys_side(self, keys: Tensor) -> Tensor:
        """keys (U, L, D) → what scoring needs of them (U, L, D)."""
        return keys

    def scores(self, query: Tensor, keys_side: Tensor) -> Tensor:
        """query (B, D), keys_side (B, L, ·) → scores (B, L)."""
        return torch.bmm(keys_side, (query * self.scale).unsqueeze(-1)).squeeze(-1)  # (B, L)


class BilinearAttention(nn.Module):
    """score(q, k_l) = qᵀ W k_l = (Wᵀ q)·k_l; W starts as the identity over √D (the dot product's start)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim) / math.sqrt(dim))  # (D, D)

    def keys_side(self, keys: Tensor) -> Tensor:
        """keys (U, L, D) → W k_l (U, L, D), once per user."""
        return keys @ self.weight.t()  # (U, L, D)

    def scores(self, query: Tensor, keys_side: Tensor) -> Tensor:
        """query (B, D), keys_side W k_l (B, L, D) → scores (B, L)."""
        return torch.bmm(keys_side, query.unsqueeze(-1)).squeeze(-1)  # (B, L)


class MultiHeadTargetAttention(nn.Module):
    """h heads of dimension D/h: score_i(q, k_l) = (W_q^i q)·(W_k^i k_l) / √(D/h); head i pools W_v^i k_l
    with its own weights; the interest is the heads' pooled values concatenated (D)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"multihead attention: {heads} heads do not divide the behaviour dimension {dim}")
        self.heads, self.head_dim = heads, dim // heads
        self.query_proj = nn.Linear(dim, dim, bias=False)  # W_q, the heads stacked
        self.key_value_proj = nn.Linear(dim, 2 * dim, bias=False)  # [W_k; W_v]

    def keys_side(self, keys: Tensor) -> Tensor:
        """keys (U, L, D) → [W_k k_l, W_v k_l] (U, L, 2D), once per user."""
        return self.key_value_proj(keys)  # (U, L, 2D)

    def attend(self, query: Tensor, keys_side: Tensor, mask: Tensor, weigh: Weigh) -> tuple[Tensor, Tensor]:
        """query (B, D), keys_side (B, L, 2D), mask (B, L) → mean weights over heads (B, L), interest (B, D)."""
        b, length = keys_side.shape[0], keys_side.shape[1]
        h, d = self.heads, self.head_dim
        k, v = keys_side.split(h * d, dim=-1)  # (B, L, D) each
        k = k.reshape(b, length, h, d).transpose(1, 2)  # (B, h, L, d)
        v = v.reshape(b, length, h, d).transpose(1, 2)  # (B, h, L, d)
        q = self.query_proj(query).reshape(b, h, d, 1) / math.sqrt(d)  # (B, h, d, 1)
        scores = torch.matmul(k, q).squeeze(-1)  # (B, h, L)
        weights = weigh(scores, mask.unsqueeze(1).expand(b, h, length))  # (B, h, L)
        interest = torch.matmul(weights.unsqueeze(2), v).reshape(b, h * d)  # (B, D): heads concatenated
        return weights.mean(dim=1), interest  # (B, L), (B, D)


class RecencyPositions(nn.Module):
    """A learned embedding p_r per recency rank r (0 for the latest valid behaviour, 1 for the one before, …);
    ranks from ``positions`` − 1 on share the last embedding. Counted over valid positions, so a masked
    behaviour is absent here as everywhere."""

    def __init__(self, positions: int, dim: int) -> None:
        super().__init__()
        if positions < 1:
            raise ValueError(f"position attention needs at least one position embedding, got {positions}")
        self.table = nn.Embedding(positions, dim)
        nn.init.normal_(self.table.weight, std=0.05)

    def forward(self, mask: Tensor) -> Tensor:
        """mask (B, L), oldest first → p_{r(l)} (B, L, D), zero on padding."""
        valid = mask.long()  # (B, L)
        rank = valid.sum(dim=1, keepdim=True) - valid.cumsum(dim=1)  # (B, L): valid behaviours after l
        rank = rank.clamp(max=self.table.num_embeddings - 1)  # (B, L)
        return self.table(rank) * mask.unsqueeze(-1).to(self.table.weight.dtype)  # (B, L, D)
