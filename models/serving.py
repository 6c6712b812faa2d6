"""The serving form of each model: a batch of users, each scored against many candidates.

Per-user work (history embeddings, the key-only part of DIN's activation unit, DIEN's GRU over the
history and its AUGRU input projection) runs once per user; only what depends on the candidate runs
per candidate. Dice is folded into affine ops. This is the graph that ONNX export writes.

Inputs (U users, N candidates in all, L history positions, F user features):
    hist_items (U, L) int64, hist_cats (U, L) int64, hist_mask (U, L) bool — oldest first, right-padded
    user_feats (U, F) int64
    cand_items (N,) int64, cand_cats (N,) int64, cand_user (N,) int64 — the row of each candidate's user
Outputs:
    probability (N,) float32 — click probability per candidate
    attention (N, L) float32 — weight each history position got from the candidate, zero on padding
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import Tensor, nn

from models.base import BaseModel, CTRModel
from models.dien import DIEN
from models.din import DIN
from models.layers import Dice, masked_softmax

INPUT_NAMES = ("hist_items", "hist_cats", "hist_mask", "user_feats", "cand_items", "cand_cats", "cand_user")
OUTPUT_NAMES = ("probability", "attention")


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
    ) -> tuple[Tensor, Tensor]:
        keys = self.embedding.behaviours(hist_items, hist_cats)  # (U, L, D)
        weights = hist_mask.to(keys.dtype)  # (U, L)
        pooled = torch.bmm(weights.unsqueeze(1), keys).squeeze(1)  # (U, D): once per user
        query = self.embedding.behaviours(cand_items, cand_cats)  # (N, D)
        prob = self.click_probability(user_feats, cand_user, query, cand_items, cand_cats,
                                      pooled.index_select(0, cand_user))  # fmt: skip
        return prob, weights.index_select(0, cand_user)


class DINServing(_Serving):
    def __init__(self, model: DIN) -> None:
        super().__init__(model)
        self.unit = cast(DIN, self.model).activation_unit
        self.softmax = model.cfg.attention_softmax

    def forward(
        self,
        hist_items: Tensor,
        hist_cats: Tensor,
        hist_mask: Tensor,
        user_feats: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        cand_user: Tensor,
    ) -> tuple[Tensor, Tensor]:
        keys = self.embedding.behaviours(hist_items, hist_cats)  # (U, L, D): once per user
        key_part = self.unit.key_part(keys)  # (U, L, H): (W_k − W_d)·k, once per user
        query = self.embedding.behaviours(cand_items, cand_cats)  # (N, D)
        keys_c = keys.index_select(0, cand_user)  # (N, L, D)
        scores = self.unit.scores(query, keys_c, key_part.index_select(0, cand_user))  # (N, L)
        mask = hist_mask.index_select(0, cand_user)  # (N, L)
        weights = masked_softmax(scores, mask) if self.softmax else torch.sigmoid(scores) * mask  # (N, L)
        interest = torch.bmm(weights.unsqueeze(1), keys_c).squeeze(1)  # (N, D)
        return self.click_probability(user_feats, cand_user, query, cand_items, cand_cats, interest), weights


def gated_recurrence(x_proj: Tensor, gate: Tensor, weight: Tensor, scale_update: bool) -> Tensor:
    """h_t = h_{t−1} + ũ_t ⊙ (h̃_t − h_{t−1}) over t (see AUGRUCell); x_proj (N, L, 3H), gate (N, L, 1),
    weight (3H, H) → h_L (N, H). Written for TorchScript, so export keeps L dynamic (an ONNX Loop)."""
    hd = weight.size(1)
    h = torch.zeros(x_proj.size(0), hd, dtype=x_proj.dtype, device=x_proj.device)
    xs = x_proj.transpose(0, 1).contiguous()  # (L, N, 3H): each step a contiguous slab, no strided gather
    gs = gate.transpose(0, 1).contiguous()  # (L, N, 1)
    w_t = weight.t()
    for t in range(xs.size(0)):
        x_t = xs[t]
        hidden = torch.mm(h, w_t)  # (N, 3H)
        ur = torch.sigmoid(x_t[:, : 2 * hd] + hidden[:, : 2 * hd])  # (N, 2H)
        n = torch.tanh(x_t[:, 2 * hd :] + ur[:, hd:] * hidden[:, 2 * hd :])  # (N, H)
        g = gs[t]  # (N, 1)
        u = g * ur[:, :hd] if scale_update else g
        h = h + u * (n - h)
    return h


class DIENServing(_Serving):
    def __init__(self, model: DIEN) -> None:
        super().__init__(model)
        m = cast(DIEN, self.model)
        self.extractor = m.extractor
        self.attention_proj = m.attention_proj
        self.cell = m.evolution.cell
        self.kind = m.evolution.kind
        self.attention_pooling = m.cfg.dien_pooling == "attention"
        self.recurrence = torch.jit.script(gated_recurrence)

    def forward(
        self,
        hist_items: Tensor,
        hist_cats: Tensor,
        hist_mask: Tensor,
        user_feats: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        cand_user: Tensor,
    ) -> tuple[Tensor, Tensor]:
        behaviours = self.embedding.behaviours(hist_items, hist_cats)  # (U, L, D)
        states, _ = self.extractor(behaviours)  # (U, L, D): interest extraction, once per user
        w_in, b_in = self.cell.input_proj.weight, self.cell.input_proj.bias
        proj = states @ w_in.T  # (U, L, 3H): the AUGRU input projection, once per user
        query = self.embedding.behaviours(cand_items, cand_cats)  # (N, D)
        states_c = states.index_select(0, cand_user)  # (N, L, D)
        scores = torch.bmm(states_c, self.attention_proj(query).unsqueeze(-1)).squeeze(-1)  # (N, L)
        mask = hist_mask.index_select(0, cand_user)  # (N, L)
        weights = masked_softmax(scores, mask)  # (N, L)
        proj_c = proj.index_select(0, cand_user)  # (N, L, 3H)
        if self.kind == "aigru":  # input scaled by attention: W·(a·s) + b = a·(W·s) + b
            x_proj, gate = proj_c * weights.unsqueeze(-1) + b_in, mask.to(weights.dtype).unsqueeze(-1)
        else:
            x_proj, gate = proj_c + b_in, weights.unsqueeze(-1)
        final = self.recurrence(x_proj, gate, self.cell.hidden_proj.weight, self.kind != "agru")  # (N, H)
        if self.attention_pooling:  # Σ_t a_t e_t depends on the candidate
            pooled_c = torch.bmm(weights.unsqueeze(1), behaviours.index_select(0, cand_user)).squeeze(1)  # (N, D)
        else:  # the plain sum is per-user work
            mask_f = hist_mask.to(behaviours.dtype)  # (U, L)
            pooled_c = torch.bmm(mask_f.unsqueeze(1), behaviours).squeeze(1).index_select(0, cand_user)  # (N, D)
        prob = self.click_probability(user_feats, cand_user, query, cand_items, cand_cats, pooled_c, final)
        return prob, weights


class NaiveServing(nn.Module):
    """The training form behind the serving interface: every candidate carries its own copy of its
    user's history and the whole model runs per candidate (Dice folded as in the serving form, so the
    two differ only in what is shared). Only for benchmarks and parity checks."""

    def __init__(self, model: CTRModel, literal: bool = False) -> None:
        super().__init__()
        self.model = fold_dice(model.eval()).eval()
        if literal and isinstance(self.model, DIN):  # DIN's layer 1 on [q, k, q − k, q ⊙ k] as drawn in the paper
            self.model.activation_unit.literal = True

    def forward(
        self,
        hist_items: Tensor,
        hist_cats: Tensor,
        hist_mask: Tensor,
        user_feats: Tensor,
        cand_items: Tensor,
        cand_cats: Tensor,
        cand_user: Tensor,
    ) -> tuple[Tensor, Tensor]:
        out = self.model(
            hist_items.index_select(0, cand_user),
            hist_cats.index_select(0, cand_user),
            hist_mask.index_select(0, cand_user),
            cand_items,
            cand_cats,
            user_feats.index_select(0, cand_user),
        )
        return torch.sigmoid(out.logits), out.attention


def serving_module(model: CTRModel) -> nn.Module:
    if isinstance(model, DIN):
        return DINServing(model).eval()
    if isinstance(model, DIEN):
        return DIENServing(model).eval()
    if isinstance(model, BaseModel):
        return BaseServing(model).eval()
    raise TypeError(f"no serving form for {type(model).__name__}")
