"""The training-speed forms of DIN and DIEN: the same functions and gradients as the paper forms in
models/din.py and models/dien.py (tests/unit/test_fast_training.py), computed on less.

``training_form(model)`` is the one switch: ``training.train`` (and ``bench.train_step``) run the returned
module unless asked for ``--paper-form``; evaluation and export always run the paper form.

- DIN: the behaviours are looked up, scored and pooled at the valid positions only (padding and history
  dropout leave most of (B, L) empty), with the unit's first layer split so the query part is computed once
  per row and the key part once per table row where the tables are small (``projected_key_tables``), its
  PReLUs in one kernel each way (``FastPReLU``), and every sum by an index (the gathers' gradients, the
  pooling) one sparse product per index and step (``RowIndex``, ``DenseRows``). A unit with Dice
  keeps the paper form: Dice's batch statistics over valid positions only would be other statistics. So do
  the attention toolbox's other scorers (models/attention.py), which have no training form of their own.
- DIEN: each row's valid behaviours are packed to the front, time-major (S, B, ·) with S the longest row's
  valid count, and every stage runs on S steps, not L. The extractor and the interest evolution run
  ``GatedGRUSequence``, the fused training form of the gated recurrence with a hand-written backward (the
  paper/serving form is ``models.layers.gated_recurrence``); ``gru_states`` maps nn.GRU's weights onto it.
  The auxiliary loss runs on the steps with a real next behaviour only.
"""

from __future__ import annotations

import logging
import warnings
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import CTRModel, ModelOutput
from models.dien import DIEN
from models.din import DIN
from models.layers import (
    MLP,
    ActivationUnit,
    Dice,
    FeatureEmbedding,
    InterestEvolution,
    PReLULast,
    masked_softmax,
    valid_first,
)

log = logging.getLogger(__name__)


def training_form(model: CTRModel) -> nn.Module:
    """The module training runs for ``model``: its training-speed form sharing its parameters, or the model
    itself where it has none (the base model; DIN with Dice in its activation unit)."""
    if isinstance(model, DIEN):
        return PackedDIEN(model)
    if isinstance(model, DIN):
        if model.cfg.attention != "mlp":
            log.info("DIN with %s attention: training runs the paper form", model.cfg.attention)
            return model
        if any(isinstance(m, Dice) for m in model.activation_unit.modules()):
            log.info("DIN's activation unit uses Dice: training runs the paper form (batch statistics over (B, L))")
            return model
        return ValidPositionsDIN(model)
    return model


class FastPReLU(torch.autograd.Function):
    """``PReLULast`` (w·x + (1 − w)·relu(x), slope w at x = 0 too) on (N, C), one kernel forward and four
    backward: 1.7 ms forward and backward at (10^4, 80) on one CPU thread, where autograd through
    PReLULast's formula takes 2.75 ms. F.prelu's own backward (``_prelu_kernel_backward``, 4.5 ms) is
    slower still, as is anything reading a bool mask (``torch.where``, ≈ 3 ms): the backward here sorts the
    gradient by sign with relu's ``threshold_backward`` instead. The paper form keeps PReLULast: it exports
    to ONNX as it is."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, weight: Tensor) -> Tensor:
        """x (N, C), weight (C,) → (N, C), in x's dtype (bf16 under autocast)."""
        weight = weight.to(x.dtype)
        ctx.save_for_backward(x, weight)
        return F.prelu(x, weight)  # channels on axis 1: the last of (N, C)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        pos = torch.ops.aten.threshold_backward(grad, x, 0)  # (N, C) grad where x > 0, else 0
        neg = grad - pos  # (N, C) grad where x ≤ 0
        # both temporaries are this function's own, so the results are written into them: two fresh
        # (N, C) blocks fewer, and the reduction runs over contiguous rows (vecdot on the transposes did not)
        d_x = pos.addcmul_(neg, weight)  # (N, C) grad·slope
        return d_x, neg.mul_(x).sum(0)  # (C,) Σ_n grad·min(x, 0)


def activate(activation: nn.Module, x: Tensor) -> Tensor:
    """``activation(x)`` for x (N, C): by ``FastPReLU`` for PReLULast, by ``dice`` for Dice, the module
    itself otherwise."""
    if isinstance(activation, PReLULast):
        out: Tensor = FastPReLU.apply(x, activation.weight)
        return out
    if isinstance(activation, Dice):
        return dice(activation, x)
    return cast(Tensor, activation(x))


def dice(activation: Dice, s: Tensor) -> Tensor:
    """``Dice`` for s (N, C), its batch normalisation the module's own (statistics and running averages):
    p·s + (1 − p)·α·s written s·(α + p·(1 − α)), two passes over (N, C) after the sigmoid instead of four."""
    p = torch.sigmoid(activation.norm(s))  # (N, C)
    return s * torch.addcmul(activation.alpha, p, 1 - activation.alpha)  # (N, C)


def mlp_forward(mlp: MLP, x: Tensor) -> Tensor:
    """``mlp(x)`` for x (N, C), its PReLUs by ``FastPReLU``."""
    for layer in mlp.net:
        x = activate(layer, x)
    return x


def valid_position_scores(
    unit: ActivationUnit,
    query: Tensor,
    keys: Tensor,
    rows: Tensor | RowIndex,
    key_tables: list[tuple[Tensor, RowIndex, int | None]] | None = None,
    split_weights: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """The activation unit's scores (M,) at M valid positions: query (B, D), keys (M, D) the behaviours
    there, rows (M,) the batch row of each; ``key_tables``, when given, hold W_k·k as rows of projected
    tables (``projected_key_tables``); ``split_weights``, the unit's ``split_weights()`` when the caller
    has them. Every activation must be element-wise."""
    w_query, w_key, w_prod = split_weights or unit.split_weights()  # (H, D) each
    q_part = F.linear(query, w_query, unit.first.bias)  # (B, H): once per row
    rows = as_row_index(rows, query.shape[0])
    q = gather(query, rows)  # (M, D)
    if key_tables is None:  # the key and product parts in one product: [k, q ⊙ k]·[W_k; W_p]ᵀ
        kp = torch.cat([keys, q * keys], dim=-1) @ torch.cat([w_key, w_prod], dim=1).T  # (M, H)
        z = gather(q_part, rows) + kp  # (M, H)
    else:  # the query and key parts gathered and summed in one pass, then the product part
        summed, product = summed_rows([(q_part, rows, None), *key_tables]), q * keys  # (M, H), (M, D)
        if torch.is_autocast_enabled(summed.device.type):  # in-place operations are outside autocast's casts
            z = torch.addmm(summed, product, w_prod.T)  # (M, H)
        else:  # in place: torch.addmm would first copy the (M, H) sum into a new output, ≈ 0.2 ms a step
            z = summed.addmm_(product, w_prod.T)  # (M, H)
    return mlp_forward(unit.rest, activate(unit.first_activation, z)).squeeze(-1)  # (M,)


def projected_key_tables(
    emb: FeatureEmbedding,
    w_key: Tensor,
    items: Tensor | RowIndex,
    cats: Tensor | RowIndex,
    feedback: Tensor | RowIndex | None,
) -> list[tuple[Tensor, RowIndex, int | None]] | None:
    """W_k·k at M valid positions (items, cats and feedback (M,)) as rows of each table projected once:
    W_k·([e_item; e_cat] + e_fb) = (E_item·W_k,itemᵀ)[item] + (E_cat·W_k,catᵀ)[cat] + (E_fb·W_kᵀ)[fb], as
    (projected table (V, H), index (M,), padding row) triples for ``summed_rows``. A table of V rows costs
    V·E·H multiply-adds instead of M·E·H and its gradient flows back the same way: with ml-100k's tables
    (1,618 items, 20 categories) and ≈ 10^4 positions a batch, this halves the first layer's three
    (M, 2D) products. None (W_k·k per position) where a table has more rows than there are positions, or
    makes sparse gradients (its projection's gradient would be dense)."""
    parts = [(emb.item, as_row_index(items, emb.item.num_embeddings))]
    parts.append((emb.category, as_row_index(cats, emb.category.num_embeddings)))
    if emb.feedback is not None and feedback is not None:
        parts.append((emb.feedback, as_row_index(feedback, emb.feedback.num_embeddings)))
    if any(t.sparse or t.num_embeddings > index.index.numel() for t, index in parts):
        return None
    w_item, w_cat = w_key.split([emb.item.embedding_dim, emb.category.embedding_dim], dim=1)  # (H, E) each
    weights = [w_item, w_cat, w_key]  # the feedback embedding is added to the whole behaviour
    return [(t.weight @ w.T, index, t.padding_idx) for (t, index), w in zip(parts, weights, strict=False)]


class RowIndex:
    """An index (M,) into a table of ``rows`` rows, and the sum back by it: row r of ``sum_back(x)`` is
    Σ x[m] over the m with index[m] = r, (M, H) → (rows, H), the backward of every gather by the index and
    the forward of DIN's pooling. On CPU that sum is one sparse (rows, M) × (M, H) product (CSR, built once
    and shared by every sum the step makes by this index): ``index_add_`` runs it serially and takes
    ≈ 3× as long at ml-100k's 10^4 positions on 2 threads. Elsewhere (CUDA) it is ``index_add_``."""

    def __init__(self, index: Tensor, rows: int, ascending: bool = False) -> None:
        """``ascending``: the index never decreases (the batch row of each valid position), so the CSR
        columns need no sort."""
        self.index, self.rows, self.ascending = index, rows, ascending
        self._matrices: dict[torch.dtype, Tensor] = {}

    def sum_back(self, x: Tensor) -> Tensor:
        """x (M, H) → (rows, H)."""
        if not x.is_cpu or x.dtype not in _MKL_DTYPES or self.rows > _RADIX_ROWS or x.shape[0] < _SPARSE_SUM_MIN:
            # contiguous: index_add_ from a strided source (a slice of a concatenation's gradient) takes ≈ 3×
            # the copy and the contiguous index_add_ together
            return x.new_zeros(self.rows, x.shape[1]).index_add_(0, self.index, x.contiguous())
        # the product reads row-major slices in place (as fast as contiguous rows); other layouts are copied
        return self._matrix(x.dtype) @ (x if x.stride(-1) == 1 else x.contiguous())

    def _matrix(self, dtype: torch.dtype) -> Tensor:
        """The (rows, M) 0/1 matrix with a 1 at (index[m], m), as CSR, in ``dtype``."""
        if dtype not in self._matrices:
            m = self.index.numel()
            counts = torch.bincount(self.index, minlength=self.rows)  # (rows,)
            crow = torch.zeros(self.rows + 1, dtype=torch.int32)  # 32-bit indices: what MKL takes without a cast
            torch.cumsum(counts, 0, out=crow[1:])
            if self.ascending:
                cols = torch.arange(m, dtype=torch.int32)
            else:  # positions grouped by row, ascending within each (numpy's radix sort on 16-bit keys)
                cols = torch.from_numpy(np.argsort(self.index.numpy().astype(np.int16), kind="stable").astype(np.int32))
            with warnings.catch_warnings():  # "sparse CSR support is in beta": construction and mm are all we use
                warnings.simplefilter("ignore", UserWarning)
                self._matrices[dtype] = torch.sparse_csr_tensor(
                    crow, cols, torch.ones(m, dtype=dtype), size=(self.rows, m), check_invariants=False
                )
        return self._matrices[dtype]


_SPARSE_SUM_MIN = 4096  # fewer rows (a batch's candidates, its users): building the matrix costs more than it saves
_MKL_DTYPES = (torch.float32, torch.float64)  # the sparse CPU product has no bf16 kernel (bf16 autocast)
_RADIX_ROWS = 2**15 - 1  # int16 keys: numpy sorts them by radix in O(M); larger tables sum by index_add_


def distinct_rows(index: Tensor, slot: Tensor) -> Tensor:
    """Each value of ``index`` (K,) once, (U,) in an unspecified order, in O(K) without a sort. ``slot`` is an
    int32 scratch vector of one entry per table row, never read where this call did not write it: every
    position writes its number into its row's slot, one write per row survives, and the position that reads
    its own number back stands for its row. By ``scatter_`` and ``index_select``: indexing
    (``slot[index] = pos``) takes ≈ 10× as long on 2 threads."""
    pos = torch.arange(index.numel(), dtype=torch.int32, device=index.device)  # (K,)
    slot.scatter_(0, index, pos)
    return index[slot.index_select(0, index) == pos]  # (U,)


def as_row_index(index: Tensor | RowIndex, rows: int) -> RowIndex:
    return index if isinstance(index, RowIndex) else RowIndex(index, rows)


class SumBack(torch.autograd.Function):
    """``RowIndex.sum_back`` with its gradient (a gather by the index): DIN's pooling of the valid
    positions into their batch rows."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, index: RowIndex) -> Tensor:
        """x (M, H) → (rows, H)."""
        ctx.index = index  # type: ignore[attr-defined]
        return index.sum_back(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.index_select(0, ctx.index.index), None  # type: ignore[attr-defined]


def summed_rows(tables: list[tuple[Tensor, Tensor | RowIndex, int | None]]) -> Tensor:
    """Σ_j table_j[index_j] for (table (V_j, H), index (M,), padding row) triples → (M, H); a padding row
    gets no gradient (as nn.Embedding's)."""
    indices = [as_row_index(index, table.shape[0]) for table, index, _ in tables]
    out: Tensor = SummedRows.apply([pad for _, _, pad in tables], indices, *(table for table, _, _ in tables))
    return out


class SummedRows(torch.autograd.Function):
    """``summed_rows`` in one ``embedding_bag`` pass over the tables stacked (≈ 0.1 ms where separate
    gathers and sums take ≈ 0.5–1 ms at (10^4, 80)), and one ``RowIndex.sum_back`` per table backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, paddings: list[int | None], indices: list[RowIndex], *tables: Tensor
    ) -> Tensor:
        """tables (V_j, H), each indexed by indices[j] (M,) → (M, H)."""
        starts = torch.tensor([0, *(t.shape[0] for t in tables[:-1])], device=tables[0].device).cumsum(0)
        bags = torch.stack([index.index for index in indices], dim=1) + starts  # (M, J) rows of the stacked tables
        ctx.indices, ctx.paddings = indices, paddings  # type: ignore[attr-defined]
        return F.embedding_bag(bags, torch.cat(tables), mode="sum")  # (M, H)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad = grad.contiguous()
        grads: list[Tensor | None] = [None, None]
        for index, pad in zip(ctx.indices, ctx.paddings, strict=True):  # type: ignore[attr-defined]
            d_table = index.sum_back(grad)  # (V_j, H)
            if pad is not None:
                d_table[pad] = 0
            grads.append(d_table)
        return tuple(grads)


class DenseRows(torch.autograd.Function):
    """``F.embedding(index, weight, padding_idx)`` for a table with a dense gradient: the same rows and the
    same gradient (none for the padding row), summed back by ``RowIndex.sum_back``. Its CPU backward
    (``embedding_dense_backward``) takes ≈ 4× as long at ml-100k's 10^4 history lookups a batch."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, weight: Tensor, index: RowIndex, padding_idx: int | None
    ) -> Tensor:
        """weight (V, E), index (K,) → rows (K, E)."""
        ctx.index, ctx.padding_idx = index, padding_idx  # type: ignore[attr-defined]
        return weight.index_select(0, index.index)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        d_weight = ctx.index.sum_back(grad)  # type: ignore[attr-defined]
        if ctx.padding_idx is not None:  # type: ignore[attr-defined]
            d_weight[ctx.padding_idx] = 0  # type: ignore[attr-defined]
        return d_weight, None, None


def gather(x: Tensor, index: Tensor | RowIndex, padding_idx: int | None = None) -> Tensor:
    """x[index] for x (V, E) and index (K,) → (K, E), its gradient summed back by ``RowIndex.sum_back``."""
    out: Tensor = DenseRows.apply(x, as_row_index(index, x.shape[0]), padding_idx)
    return out


def lookup(table: nn.Embedding, index: Tensor | RowIndex) -> Tensor:
    """``table(index)``, (...) → (..., E): by ``DenseRows`` where it pays, many lookups into a table with a
    dense gradient; the module itself for a sparse one, and for a batch's few lookups (its candidates, its
    users: < ``_SPARSE_SUM_MIN``), where a Python autograd.Function's own overhead (≈ 25 µs forward and
    backward) costs more than ``embedding_dense_backward`` does. A ``RowIndex`` is flat (K,)."""
    flat = index.index if isinstance(index, RowIndex) else index
    if table.sparse or flat.numel() < _SPARSE_SUM_MIN:
        return cast(Tensor, table(flat))
    if isinstance(index, RowIndex):
        return gather(table.weight, index, table.padding_idx)
    rows = gather(table.weight, index.reshape(-1), table.padding_idx)
    return rows.view(*index.shape, table.embedding_dim)


def behaviours(
    emb: FeatureEmbedding,
    items: Tensor | RowIndex,
    cats: Tensor | RowIndex,
    feedback: Tensor | RowIndex | None = None,
    item_rows: Tensor | None = None,
) -> Tensor:
    """``emb.history(items, cats, feedback)`` (``emb.behaviours`` without feedback) by ``lookup``: (K,) → (K, D);
    ``item_rows``: the items' rows where the caller looked them up already."""
    if item_rows is None:
        item_rows = lookup(emb.item, items)  # (K, E_i)
    rows = torch.cat([item_rows, lookup(emb.category, cats)], dim=-1)  # (K, D)
    if emb.feedback is None or feedback is None:
        return rows
    return rows + lookup(emb.feedback, feedback)  # (K, D)


def click_logit(
    m: CTRModel, user_feats: Tensor, query: Tensor, cand_item: Tensor, cand_cat: Tensor, *interest: Tensor
) -> Tensor:
    """``m.click_logit(m.embedding.user(user_feats), query, …)`` by ``lookup`` and ``mlp_forward``: (B, ·) → (B,)."""
    emb = m.embedding
    user = [lookup(table, user_feats[:, i]) for i, table in enumerate(emb.user_features)]  # (B, U) each
    logits = mlp_forward(m.mlp, torch.cat([*user, query, *interest], dim=-1)).squeeze(-1)  # (B,)
    if emb.item_bias is None or emb.category_bias is None:
        return logits
    return logits + (lookup(emb.item_bias, cand_item) + lookup(emb.category_bias, cand_cat)).squeeze(-1)


class ValidPositionsDIN(nn.Module):
    """DIN computed at the valid positions only: the behaviours are looked up, scored and pooled there, so
    padding and history dropout's holes (most of (B, L)) cost nothing, and a sparse embedding gradient
    holds the batch's valid behaviours only. Positions are flat indices into (B·L) and every gather is an
    ``index_select`` (far cheaper on CPU than advanced indexing), summed back by ``RowIndex``."""

    def __init__(self, model: DIN) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        hist_items: Tensor,  # (B, L)
        hist_cats: Tensor,  # (B, L)
        hist_mask: Tensor,  # (B, L) bool
        cand_item: Tensor,  # (B,)
        cand_cat: Tensor,  # (B,)
        user_feats: Tensor,  # (B, F)
        hist_feedback: Tensor | None = None,  # (B, L)
    ) -> ModelOutput:
        m = self.model
        flat = hist_mask.flatten().nonzero().squeeze(1)  # (M,) valid positions in (B·L)
        rows = flat.div(hist_mask.shape[1], rounding_mode="floor")  # (M,) their batch rows

        def at_valid(x: Tensor) -> Tensor:
            return x.flatten().index_select(0, flat)  # (B, L) → (M,)

        emb = m.embedding
        # each index with the sum back its gathers' gradients share (one sparse matrix per index and step)
        rows_index = RowIndex(rows, hist_mask.shape[0], ascending=True)
        items = RowIndex(at_valid(hist_items), emb.item.num_embeddings)  # (M,)
        cats = RowIndex(at_valid(hist_cats), emb.category.num_embeddings)  # (M,)
        feedback = None
        if hist_feedback is not None and emb.feedback is not None:
            feedback = RowIndex(at_valid(hist_feedback), emb.feedback.num_embeddings)  # (M,)
        hist_item_rows = cand_item_rows = None
        if emb.item.sparse:  # one lookup, so one sparse gradient: autograd would add two as sparse tensors
            both = emb.item(torch.cat([items.index, cand_item]))  # (M + B, E_i): ≈ 0.3 ms less at 10^7 rows
            hist_item_rows, cand_item_rows = both.split([len(rows), len(cand_item)])
        keys = behaviours(emb, items, cats, feedback, hist_item_rows)  # (M, D)
        query = behaviours(emb, cand_item, cand_cat, item_rows=cand_item_rows)  # (B, D)
        unit = m.activation_unit
        w_split = unit.split_weights()  # (H, D) each
        key_tables = projected_key_tables(m.embedding, w_split[1], items, cats, feedback)
        valid = valid_position_scores(unit, query, keys, rows_index, key_tables, w_split)  # (M,)
        if m.cfg.attention_softmax:  # normalised over each row: scattered into (B, L) first
            # in the scores' own dtype: bf16 under autocast, while the embeddings stay fp32
            scores = valid.new_zeros(hist_mask.numel()).index_copy(0, flat, valid).view(hist_mask.shape)  # (B, L)
            weights = m.attention_weights(scores, hist_mask)  # (B, L)
            valid_weights = at_valid(weights)  # (M,)
        else:  # sigmoid(score) · mask: element-wise, so computed where the mask is 1 only
            valid_weights = torch.sigmoid(valid)  # (M,)
            weights = valid_weights.new_zeros(hist_mask.numel()).index_copy(0, flat, valid_weights)
            weights = weights.view(hist_mask.shape)  # (B, L), zero on padding
        weighted = valid_weights.unsqueeze(-1) * keys  # (M, D)
        interest: Tensor = SumBack.apply(weighted, rows_index)  # (B, D)
        logits = click_logit(m, user_feats, query, cand_item, cand_cat, interest)  # (B,)
        return ModelOutput(logits, weights)


class PackedDIEN(nn.Module):
    """DIEN on packed histories: each row's valid behaviours first, time-major (S, B, ·), S steps."""

    def __init__(self, model: DIEN) -> None:
        super().__init__()
        self.model = model

    def forward(
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
        m = self.model
        steps = max(int(hist_mask.sum(1).max()), 1)  # S
        order = valid_first(hist_mask)[:, :steps]  # (B, S)

        def packed(x: Tensor) -> Tensor:
            return x.gather(1, order).T  # (B, L) → (S, B)

        mask, items, cats = packed(hist_mask), packed(hist_items), packed(hist_cats)  # (S, B) each
        plain = m.embedding.behaviours(items, cats)  # (S, B, D)
        behaviours = m.embedding.with_feedback(plain, None if hist_feedback is None else packed(hist_feedback))
        query = m.embedding.behaviours(cand_item, cand_cat)  # (B, D)
        states = gru_states(m.extractor, behaviours)  # (S, B, D): interest extraction
        # a broadcast product and a sum: on the time-major states einsum's batched matrix-vector product is slower
        scores = (states * m.attention_proj(query)).sum(-1)  # (S, B)
        weights = masked_softmax(scores.T, mask.T)  # (B, S)
        final = interest_evolution(m.evolution, states, weights.T, mask)  # (B, D)
        pool_w = weights.T if m.cfg.dien_pooling == "attention" else mask.to(behaviours.dtype)  # (S, B)
        pooled = (pool_w.unsqueeze(-1) * behaviours).sum(0)  # (B, D)
        logits = m.click_logit(m.embedding.user(user_feats), query, cand_item, cand_cat, pooled, final)  # (B,)
        aux = None
        if neg_items is not None and neg_cats is not None:
            aux = auxiliary_loss(m, states, plain, packed(neg_items), packed(neg_cats), mask)
        attention = weights.new_zeros(hist_mask.shape).scatter(1, order, weights)  # (B, L), back in place
        return ModelOutput(logits, attention, aux)


def auxiliary_loss(
    model: DIEN, states: Tensor, behaviours: Tensor, neg_items: Tensor, neg_cats: Tensor, mask: Tensor
) -> Tensor:
    """DIEN's auxiliary loss on packed time-major inputs: states, behaviours (S, B, D), the sampled items and
    the mask (S, B). Only the N steps with a real next behaviour are computed, and so are the sampled items'
    embeddings; the first layer is split, W·[h; e] = W_h·h + W_e·e, so W_h·h_t serves both items."""
    d = states.shape[-1]
    t = mask[1:].flatten().nonzero().squeeze(1)  # (N,) flat (t, b) indices into (S·B) with a real next step
    t_next = t + mask.shape[1]  # (N,) the same row one step later
    h_t = states.reshape(-1, d).index_select(0, t)  # (N, D)
    e_real = behaviours.reshape(-1, d).index_select(0, t_next)  # (N, D)
    e_sampled = model.embedding.behaviours(neg_items.flatten()[t_next], neg_cats.flatten()[t_next])  # (N, D)
    first, rest = cast(nn.Linear, model.auxiliary_net.net[0]), model.auxiliary_net.net[1:]
    w_h, w_e = first.weight.split(d, dim=1)  # (A, D) each
    h_part = F.linear(h_t, w_h, first.bias)  # (N, A)
    e_part = torch.stack([e_real, e_sampled]) @ w_e.T  # (2, N, A): real, sampled
    logits = rest(h_part + e_part).squeeze(-1)  # (2, N)
    loss = F.softplus(-logits[0]) + F.softplus(logits[1])  # (N,) −log σ(real) − log(1 − σ(sampled))
    return loss.sum() / max(t.numel(), 1)


def interest_evolution(evolution: InterestEvolution, interests: Tensor, attention: Tensor, mask: Tensor) -> Tensor:
    """``InterestEvolution`` on packed time-major inputs, interests (S, B, H), attention and mask (S, B) →
    final interest (B, H), by the fused recurrence. A zero-gate step leaves the state unchanged and passes
    no gradient to its input, so packing the valid steps to the front changes nothing."""
    inputs = interests * attention.unsqueeze(-1) if evolution.kind == "aigru" else interests  # (S, B, H)
    gate = mask.to(interests.dtype) if evolution.kind == "aigru" else attention  # (S, B), zero where ~mask
    x_proj = evolution.input_proj(inputs)  # (S, B, 3H)
    weight = evolution.hidden_proj.weight  # (3H, H)
    states = fused_recurrence(x_proj, gate.unsqueeze(-1), weight, None, evolution.kind != "agru")  # (S, B, H)
    return states[-1]  # (B, H)


def gru_states(gru: nn.GRU, x: Tensor) -> Tensor:
    """PyTorch's single-layer GRU over time-major x (L, B, D) → states (L, B, H), by the fused recurrence
    (``gru`` may be batch-first: only its weights are read). A mapping of weights, not another recurrence:
    gate order (r, z, n) becomes (u, r, n) with u = 1 − z, i.e. z's pre-activation negated, since
    h' = (1 − z)·n + z·h = h + u·(n − h); nn.GRU's b_hn is the candidate's hidden-side bias."""
    hd = gru.hidden_size
    w_ih, w_hh = cast(Tensor, gru.weight_ih_l0), cast(Tensor, gru.weight_hh_l0)  # (3H, D), (3H, H)
    b_ih, b_hh = cast(Tensor, gru.bias_ih_l0), cast(Tensor, gru.bias_hh_l0)  # (3H,) each
    w_in = torch.cat([-w_ih[hd : 2 * hd], w_ih[:hd], w_ih[2 * hd :]])  # (3H, D)
    w_rec = torch.cat([-w_hh[hd : 2 * hd], w_hh[:hd], w_hh[2 * hd :]])  # (3H, H)
    b_in = torch.cat([-(b_ih[hd : 2 * hd] + b_hh[hd : 2 * hd]), b_ih[:hd] + b_hh[:hd], b_ih[2 * hd :]])  # (3H,)
    x_proj = F.linear(x, w_in, b_in)  # (L, B, 3H)
    ones = x.new_ones(x.shape[0], x.shape[1], 1)  # (L, B, 1)
    return fused_recurrence(x_proj, ones, w_rec, b_hh[2 * hd :], True)  # (L, B, H)


def fused_recurrence(
    x_proj: Tensor, gate: Tensor, weight: Tensor, candidate_bias: Tensor | None, scale_update: bool
) -> Tensor:
    """``GatedGRUSequence`` in the weights' precision, also under autocast (bf16 training): its steps write
    into preallocated buffers (``out=``), which autocast does not cast, so bf16 inputs would meet fp32
    weights; its small sequential steps gain little from bf16 anyway."""
    with torch.autocast(x_proj.device.type, enabled=False):
        states: Tensor = GatedGRUSequence.apply(
            x_proj.to(weight.dtype), gate.to(weight.dtype), weight, candidate_bias, scale_update
        )
    return states


def _tanh_(x: Tensor) -> Tensor:
    """In-place tanh of a contiguous CPU tensor that needs no gradient. numpy's tanh takes ≈ 2 µs on a
    (256, 48) slab where torch.tanh takes ≈ 25 µs on this project's machines (torch 2.13, AVX-512); the
    recurrence calls it once per step."""
    if x.is_cpu and x.is_contiguous() and not x.requires_grad:
        np.tanh(x.numpy(), out=x.numpy())
        return x
    return x.tanh_()


class GatedGRUSequence(torch.autograd.Function):
    """The gated recurrence's training form: the whole sequence with a hand-written backward.

    The same function as ``models.layers.gated_recurrence`` (the paper/serving form), time-major and
    returning every state: h_t = h_{t−1} + ũ_t ⊙ (h̃_t − h_{t−1}) with ũ_t = g_t·u_t (``scale_update``:
    AUGRU, AIGRU with g = mask, a plain GRU with g = 1) or ũ_t = g_t (AGRU), and
    h̃_t = tanh(x_n + r_t ⊙ (U_n·h_{t−1} + b_n)) with b_n the only bias on the hidden side (the u and r
    hidden biases fold into the input projection's). Autograd over 50 small steps spends most of its
    time in bookkeeping; this backward runs 4 tensor ops per step and vectorises the rest over steps.

    Time-major (L, B, ·) throughout: every step reads and writes contiguous (B, ·) slabs of buffers
    allocated once, so nothing is stacked or transposed afterwards. Not exportable.
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
