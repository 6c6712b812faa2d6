"""The training-speed forms (models/fast_training.py) compute what the paper forms do: values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.fast_training
from models import ModelConfig, build_model
from models.base import ModelOutput
from models.fast_training import (
    FastPReLU,
    PackedDIEN,
    RowIndex,
    ValidPositionsDIN,
    auxiliary_loss,
    gru_states,
    interest_evolution,
    lookup,
    projected_key_tables,
    summed_rows,
    training_form,
)
from models.layers import InterestEvolution, PReLULast
from tests.unit.test_models import CFG  # the same small model config


def _batch(holes: bool, b: int = 5, length: int = 9) -> dict[str, torch.Tensor]:
    """A right-padded training batch (an empty history, a full one) with feedback and sampled negatives;
    with ``holes``, history dropout on top (row 1 loses its only behaviour, row 3 its last one)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([0, 1, 4, length, 6][:b])
    mask = torch.arange(length) < lengths[:, None]
    if holes:
        kept = torch.rand(mask.shape, generator=g) > 0.4
        kept[1, 0], kept[3, -1], kept[2, 0], kept[4, 2] = False, False, True, True
        mask = mask & kept
    return {
        "hist_items": torch.randint(2, 50, (b, length), generator=g) * mask,
        "hist_cats": torch.randint(2, 7, (b, length), generator=g) * mask,
        "hist_mask": mask,
        "cand_item": torch.randint(2, 50, (b,), generator=g),
        "cand_cat": torch.randint(2, 7, (b,), generator=g),
        "user_feats": torch.randint(1, 4, (b, 2), generator=g),
        "hist_feedback": torch.randint(1, 4, (b, length), generator=g) * mask,  # "unknown" (1) included
        "neg_items": torch.randint(2, 50, (b, length), generator=g),
        "neg_cats": torch.randint(2, 7, (b, length), generator=g),
    }


def _loss_and_grads(
    model: torch.nn.Module, out: ModelOutput, attention_weights: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Click loss + auxiliary loss + a weighted sum of the attention (so its gradient is checked too)."""
    labels = torch.tensor([1.0, 0, 1, 0, 1], dtype=out.logits.dtype)
    loss = F.binary_cross_entropy_with_logits(out.logits, labels) + (out.attention * attention_weights).sum()
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    return loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def _assert_same(model: torch.nn.Module, fast: ModelOutput, paper: ModelOutput, w: torch.Tensor) -> None:
    torch.testing.assert_close(fast.logits, paper.logits)
    torch.testing.assert_close(fast.attention, paper.attention)
    torch.testing.assert_close(fast.aux_loss, paper.aux_loss)
    loss, grads = _loss_and_grads(model, fast, w)
    loss_ref, grads_ref = _loss_and_grads(model, paper, w)
    torch.testing.assert_close(loss, loss_ref)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref, strict=True):
        assert (a is None) == (b is None), name
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, msg=name)


DIN_OPTIONS = [{}, {"attention_softmax": True}, {"history_feedback": True}, {"attention_activation": "relu"}]


@pytest.fixture(params=["index_add", "sparse"])
def sums(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways ``RowIndex.sum_back`` sums: ``index_add_`` (few rows) and the sparse product (forced here for
    the small test batches, which stay under the size where training uses it)."""
    if request.param == "sparse":
        monkeypatch.setattr(models.fast_training, "_SPARSE_SUM_MIN", 0)
    return str(request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("ascending", [False, True])
def test_row_index_sums_back_as_index_add_does(dtype: torch.dtype, ascending: bool) -> None:
    """At sizes that take the sparse product (bf16 and one table too large for its 16-bit sort do not), every row's sum,
    empty rows zero, whatever the order and repetition of the index."""
    g = torch.Generator().manual_seed(0)
    for rows, m in [(37, 5000), (1618, 10_000), (40_000, 5000)]:
        index = torch.randint(0, rows, (m,), generator=g)
        index[: m // 2] = 3  # a heavy row
        if ascending:
            index = index.sort().values
        x = torch.randn(m, 6, dtype=dtype, generator=g)
        want = torch.zeros(rows, 6, dtype=dtype).index_add_(0, index, x)
        got = RowIndex(index, rows, ascending=ascending).sum_back(x)
        torch.testing.assert_close(got, want)
        strided = torch.randn(m, 9, dtype=dtype, generator=g)[:, 2:8]  # a slice, as a concatenation's gradient
        torch.testing.assert_close(
            RowIndex(index, rows).sum_back(strided), torch.zeros_like(want).index_add_(0, index, strided)
        )


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("options", DIN_OPTIONS)
def test_din_on_valid_positions_equals_the_paper_form(options: dict[str, object], holes: bool, sums: str) -> None:
    """The unit on valid positions only: the paper form's logits, attention and every gradient, in training
    mode (the final MLP's Dice sees the same batch either way)."""
    torch.manual_seed(3)
    model = build_model("din", ModelConfig(**{**CFG.to_dict(), **options})).double().train()
    fast = training_form(model)
    assert isinstance(fast, ValidPositionsDIN)
    x = {k: v for k, v in _batch(holes).items() if not k.startswith("neg_")}
    w = torch.randn(x["hist_mask"].shape, dtype=torch.double)
    _assert_same(model, fast(**x), model(**x), w)


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("options", DIN_OPTIONS)
def test_din_with_projected_key_tables_equals_the_paper_form(
    options: dict[str, object], holes: bool, sums: str
) -> None:
    """Tables with fewer rows than the batch has valid positions: W_k·k comes from the projected tables
    (``projected_key_tables``, ``summed_rows``), and logits, attention and every gradient stay the paper's."""
    torch.manual_seed(4)
    cfg = ModelConfig(**{**CFG.to_dict(), "n_items": 9, "n_categories": 4, **options})
    model = build_model("din", cfg).double().train()
    x = {k: v for k, v in _batch(holes).items() if not k.startswith("neg_")}
    x["hist_items"], x["cand_item"] = x["hist_items"] % 7 + 2 * x["hist_mask"], x["cand_item"] % 7 + 2
    x["hist_cats"], x["cand_cat"] = x["hist_cats"] % 2 + 2 * x["hist_mask"], x["cand_cat"] % 2 + 2
    mask = x["hist_mask"]
    valid = (x["hist_items"][mask], x["hist_cats"][mask], x["hist_feedback"][mask])
    w_key = model.activation_unit.split_weights()[1]
    assert projected_key_tables(model.embedding, w_key, *valid) is not None  # the path under test
    w = torch.randn(mask.shape, dtype=torch.double)
    _assert_same(model, training_form(model)(**x), model(**x), w)


@pytest.mark.parametrize("holes", [False, True])
def test_din_with_a_sparse_item_table_equals_the_paper_form(holes: bool) -> None:
    """The item table as training makes a large one (sparse gradients, looked up once for the history and the
    candidates): logits, attention and every gradient, the table's as a sparse tensor, the paper form's."""
    torch.manual_seed(5)
    model = build_model("din", ModelConfig(**CFG.to_dict())).double().train()
    model.embedding.item.sparse = True
    x = {k: v for k, v in _batch(holes).items() if not k.startswith("neg_")}
    w = torch.randn(x["hist_mask"].shape, dtype=torch.double)
    fast, paper = training_form(model)(**x), model(**x)
    torch.testing.assert_close(fast.logits, paper.logits)
    torch.testing.assert_close(fast.attention, paper.attention)
    _, grads = _loss_and_grads(model, fast, w)
    _, grads_ref = _loss_and_grads(model, paper, w)
    for (name, p), a, b in zip(model.named_parameters(), grads, grads_ref, strict=True):
        assert a is not None and b is not None, name
        assert a.is_sparse == (p is model.embedding.item.weight), name
        torch.testing.assert_close(a.to_dense(), b.to_dense(), msg=name)


def test_key_tables_are_not_projected_when_a_table_is_larger_than_the_batch_or_sparse() -> None:
    model = build_model("din", CFG)  # 50 items
    w_key = model.activation_unit.split_weights()[1]
    few, many = torch.full((20,), 3), torch.full((60,), 3)
    assert projected_key_tables(model.embedding, w_key, few, few, None) is None
    assert projected_key_tables(model.embedding, w_key, many, many, None) is not None
    model.embedding.category.sparse = True
    assert projected_key_tables(model.embedding, w_key, many, many, None) is None


def test_summed_rows_equals_separate_gathers_without_a_gradient_for_padding() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, dtype=torch.double, generator=g), torch.randn(3, 4, dtype=torch.double, generator=g)
    a.requires_grad_(True)
    b.requires_grad_(True)
    ia, ib = torch.tensor([0, 1, 5, 5, 0, 2]), torch.tensor([2, 0, 1, 1, 2, 2])
    got = summed_rows([(a, ia, 0), (b, ib, None)])
    want = F.embedding(ia, a, padding_idx=0) + b[ib]
    torch.testing.assert_close(got, want)
    out_grad = torch.randn(got.shape, dtype=torch.double, generator=g)
    g_got = torch.autograd.grad(got, [a, b], out_grad)
    g_want = torch.autograd.grad(want, [a, b], out_grad)
    for x, y in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(x, y)
    assert g_got[0][0].abs().sum() == 0  # the padding row


@pytest.mark.parametrize("sparse", [False, True])
def test_lookup_equals_the_embedding_module_without_a_gradient_for_padding(sparse: bool, sums: str) -> None:
    """With ``sums`` "sparse" the threshold is 0, so the dense table goes through DenseRows and its
    sparse sum back, as a batch's histories do."""
    table = torch.nn.Embedding(7, 3, padding_idx=0, sparse=sparse).double()
    index = torch.tensor([[0, 3, 3], [6, 0, 1]])
    got, want = lookup(table, index), table(index)
    torch.testing.assert_close(got, want)
    out_grad = torch.randn(got.shape, dtype=torch.double)
    (g_got,) = torch.autograd.grad(got, table.weight, out_grad)
    (g_want,) = torch.autograd.grad(want, table.weight, out_grad)
    assert g_got.is_sparse == sparse
    torch.testing.assert_close(g_got.to_dense(), g_want.to_dense())
    assert g_got.to_dense()[0].abs().sum() == 0


def test_fast_prelu_equals_prelu_last_at_zero_too() -> None:
    """One kernel each way, the same values and gradients as PReLULast's formula, its slope w at x = 0
    included (exact zeros occur: a ReLU-like unit's input can be 0)."""
    act = PReLULast(5).double()
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.25, -0.5, 0.0, 1.0, 2.0]))
    x = torch.randn(40, 5, dtype=torch.double)
    x[::4] = 0.0
    x.requires_grad_(True)
    got: torch.Tensor = FastPReLU.apply(x, act.weight)
    want = act(x)
    torch.testing.assert_close(got, want)
    out_grad = torch.randn(got.shape, dtype=torch.double)
    g_got = torch.autograd.grad(got, [x, act.weight], out_grad)
    g_want = torch.autograd.grad(want, [x, act.weight], out_grad)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)


def test_din_with_dice_in_its_activation_unit_trains_in_the_paper_form() -> None:
    """Dice's batch statistics over the valid positions only would differ from the paper form's over (B, L)."""
    model = build_model("din", ModelConfig(**{**CFG.to_dict(), "attention_activation": "dice"}))
    assert training_form(model) is model


def test_the_base_model_trains_in_its_paper_form() -> None:
    model = build_model("base", CFG)
    assert training_form(model) is model


DIEN_OPTIONS = [
    {},
    {"evolution": "agru"},
    {"evolution": "aigru"},
    {"dien_pooling": "attention"},
    {"history_feedback": True},
    {"mlp_activation": "prelu"},
]


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("options", DIEN_OPTIONS)
def test_packed_dien_equals_the_paper_form(options: dict[str, object], holes: bool) -> None:
    """Packed histories (S steps), the fused recurrences and the auxiliary loss on valid steps: the paper
    form's logits, attention, auxiliary loss and every gradient, with history dropout's holes or without."""
    torch.manual_seed(5)
    model = build_model("dien", ModelConfig(**{**CFG.to_dict(), **options})).double().train()
    fast = training_form(model)
    assert isinstance(fast, PackedDIEN)
    x = _batch(holes)
    w = torch.randn(x["hist_mask"].shape, dtype=torch.double)
    _assert_same(model, fast(**x), model(**x), w)


def test_packed_auxiliary_loss_equals_the_paper_form() -> None:
    """Only the steps with a real next behaviour, first layer split: the paper form's loss and gradients."""
    model = build_model("dien", CFG).double()
    x = _batch(holes=False)
    mask = x["hist_mask"]
    behaviours = model.embedding.behaviours(x["hist_items"], x["hist_cats"])  # (B, L, D)
    states = torch.randn(behaviours.shape, dtype=torch.double, requires_grad=True)
    params = [states, *model.parameters()]
    sampled = model.embedding.behaviours(x["neg_items"], x["neg_cats"])
    want = model.auxiliary_loss(states, behaviours, sampled, mask)
    time_major = (states.transpose(0, 1), behaviours.transpose(0, 1), x["neg_items"].T, x["neg_cats"].T, mask.T)
    got = auxiliary_loss(model, *time_major)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got, params, allow_unused=True, retain_graph=True)
    g_want = torch.autograd.grad(want, params, allow_unused=True)
    for a, b in zip(g_got, g_want, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["augru", "agru", "aigru"])
def test_fused_evolution_equals_the_paper_recurrence(kind: str) -> None:
    """The fused recurrence with its hand-written backward against autograd through ``gated_recurrence``,
    holes and padding included (a zero-gate step leaves the state and every gradient alone)."""
    evo = InterestEvolution(5, kind).double()  # type: ignore[arg-type]
    states = torch.randn(4, 9, 5, dtype=torch.double, requires_grad=True)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, :] = False
    mask[3, [0, 4, 5, 8]] = False  # dropped positions inside a history (history dropout)
    scores = torch.rand(4, 9, dtype=torch.double, requires_grad=True)
    params = [states, scores, *evo.parameters()]
    att = scores * mask  # zero on padding, as masked_softmax makes it
    fused = interest_evolution(evo, states.transpose(0, 1), att.T, mask.T)
    paper = evo(states, att, mask)
    torch.testing.assert_close(fused, paper)
    g_fused = torch.autograd.grad(fused.pow(2).sum(), params, retain_graph=True)
    g_paper = torch.autograd.grad(paper.pow(2).sum(), params)
    for got, want in zip(g_fused, g_paper, strict=True):
        torch.testing.assert_close(got, want)


def test_fused_gru_equals_torch_gru_values_and_gradients() -> None:
    """nn.GRU's weights mapped onto the fused recurrence: nn.GRU's states and gradients."""
    gru = torch.nn.GRU(5, 4, batch_first=True).double()
    x = torch.randn(3, 8, 5, dtype=torch.double, requires_grad=True)  # (B, L, D)
    ref, _ = gru(x)
    fused = gru_states(gru, x.transpose(0, 1)).transpose(0, 1)  # time-major in and out
    torch.testing.assert_close(fused, ref)
    weights = torch.randn_like(ref)
    params = [x, *gru.parameters()]
    g_ref = torch.autograd.grad((ref * weights).sum(), params)
    g_fused = torch.autograd.grad((fused * weights).sum(), params)
    for got, want in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(got, want)
