"""training.optim: sparse gradients and lazy row-wise Adam for the vocabulary tables, dense Adam for the rest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.fast_training import training_form
from training.batches import TensorSamples
from training.config import TrainConfig, model_config
from training.optim import RowSparseAdam, build_optimisers, coalesce_rows, dense_adam, vocabulary_tables
from training.regularization import mba_terms
from training.samples import PreparedData


def _setup(data: PreparedData, optimiser: str, model: str = "din") -> tuple[torch.nn.Module, list, list, dict]:
    torch.manual_seed(0)
    cfg = TrainConfig(model=model, embedding_optimiser=optimiser, lr=0.01)
    m = build_model(model, model_config(data, {"history_feedback": True}))
    optimisers = build_optimisers(m, cfg)
    regs = mba_terms(m, data.train, 20, 0.01)
    batch = TensorSamples(data.train, 20).inputs(torch.arange(32))
    batch["hist_mask"] = batch["hist_mask"] & (torch.rand(batch["hist_mask"].shape) > 0.5)  # history dropout
    return m, optimisers, regs, batch


def _loss(model: torch.nn.Module, regs: list, batch: dict, label: torch.Tensor) -> torch.Tensor:
    out = training_form(model)(**batch)  # type: ignore[arg-type]
    loss = F.binary_cross_entropy_with_logits(out.logits, label)
    for reg, rows_of in regs:
        loss = loss + reg(*rows_of(batch))
    return loss


def test_adam_is_one_dense_optimiser_over_every_parameter(small_data: PreparedData) -> None:
    model, optimisers, _, _ = _setup(small_data, "adam")
    assert [type(o) for o in optimisers] == [torch.optim.Adam]
    assert not any(t.sparse for t in vocabulary_tables(model))  # type: ignore[arg-type]


def test_sparse_adam_owns_the_vocabulary_tables_and_adam_the_rest(small_data: PreparedData) -> None:
    model, optimisers, _, _ = _setup(small_data, "sparse-adam")
    dense, sparse = optimisers
    assert isinstance(dense, torch.optim.Adam) and isinstance(sparse, RowSparseAdam)
    tables = vocabulary_tables(model)  # type: ignore[arg-type]
    assert all(t.sparse for t in tables)
    owned = [id(p) for o in optimisers for g in o.param_groups for p in g["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert {id(p) for p in sparse.param_groups[0]["params"]} == {id(t.weight) for t in tables}
    assert model.embedding.feedback is not None and not model.embedding.feedback.sparse  # type: ignore[union-attr]


@pytest.mark.parametrize("model_name", ["base", "din", "dien"])
def test_sparse_gradients_equal_the_dense_ones(small_data: PreparedData, model_name: str) -> None:
    """The click loss plus every MBA term: the same gradient for every parameter, sparse for the tables."""
    dense_model, _, dense_regs, batch = _setup(small_data, "adam", model_name)
    sparse_model, _, sparse_regs, _ = _setup(small_data, "sparse-adam", model_name)
    label = torch.arange(32) % 2 == 0
    for model, regs in ((dense_model, dense_regs), (sparse_model, sparse_regs)):
        _loss(model, regs, batch, label.float()).backward()
    tables = {id(t.weight) for t in vocabulary_tables(sparse_model)}  # type: ignore[arg-type]
    for (name, p), q in zip(sparse_model.named_parameters(), dense_model.parameters(), strict=True):
        if q.grad is None:  # DIEN's auxiliary net without sampled negatives
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        assert p.grad.is_sparse == (id(p) in tables), name
        torch.testing.assert_close(p.grad.to_dense(), q.grad, msg=name)


def test_a_sparse_step_moves_only_the_batchs_rows(small_data: PreparedData) -> None:
    model, optimisers, regs, batch = _setup(small_data, "sparse-adam")
    item = model.embedding.item.weight  # type: ignore[union-attr]
    before = item.detach().clone()
    for _ in range(3):  # a row untouched by the batch stays where it was, momentum or not
        for o in optimisers:
            o.zero_grad(set_to_none=True)
        _loss(model, regs, batch, torch.ones(32)).backward()
        for o in optimisers:
            o.step()
    used = torch.zeros(item.shape[0], dtype=torch.bool)
    used[batch["hist_items"][batch["hist_mask"]]] = True
    used[batch["hist_items"].reshape(-1)] = True  # MBA penalises every history index, dropped or not
    used[batch["cand_item"]] = True
    used[0] = False
    moved = (item.detach() != before).any(-1)
    assert moved[used].all()
    assert not moved[~used].any()


def test_an_unknown_embedding_optimiser_is_refused(small_data: PreparedData) -> None:
    with pytest.raises(ValueError, match="unknown embedding optimiser"):
        build_optimisers(build_model("din", model_config(small_data, {})), TrainConfig(embedding_optimiser="sgd"))


def test_row_sparse_adam_makes_torch_sparse_adams_updates() -> None:
    """Several steps of sparse gradients with repeated and unseen rows: the parameters SparseAdam reaches."""
    torch.manual_seed(0)
    tables = [torch.nn.Embedding(40, 6, sparse=True) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    ours = RowSparseAdam([tables[0].weight], lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    ref = torch.optim.SparseAdam([tables[1].weight], lr=0.05, betas=(0.8, 0.99), eps=1e-6)
    for step in range(6):
        idx = torch.randint(0, 40 if step % 2 else 10, (30,))  # rows repeat within a step and across steps
        target = torch.randn(30, 6)
        for table, opt in ((tables[0], ours), (tables[1], ref)):
            opt.zero_grad()
            ((table(idx) - target) ** 2).sum().backward()
            opt.step()
        torch.testing.assert_close(tables[0].weight, tables[1].weight)


def test_coalesce_rows_sums_repeated_rows_as_coalesce_does() -> None:
    g = torch.Generator().manual_seed(3)
    slot = torch.zeros(1000, dtype=torch.int32)
    for k in (1, 50, 5000):
        index = torch.randint(0, 1000 if k < 5000 else 30, (k,), generator=g)
        grad = torch.sparse_coo_tensor(
            index.unsqueeze(0), torch.randn(k, 4, generator=g), (1000, 4), check_invariants=True
        )
        rows, values = coalesce_rows(grad, slot)
        assert rows.numel() == index.unique().numel()  # each row once
        want = grad.coalesce()
        order = rows.argsort()
        torch.testing.assert_close(rows[order], want.indices()[0])
        torch.testing.assert_close(values[order], want.values())


def test_auto_updates_sparsely_only_the_tables_larger_than_a_batchs_lookups(small_data: PreparedData) -> None:
    model = build_model("din", model_config(small_data, {}))
    cfg = TrainConfig(embedding_optimiser="auto", batch_size=2, max_len=20)  # 42 lookups per batch
    expected = [t for t in vocabulary_tables(model) if t.num_embeddings > 42]
    assert model.embedding.item.num_embeddings > 42 > model.embedding.category.num_embeddings
    _, sparse = build_optimisers(model, cfg)
    assert {id(p) for p in sparse.param_groups[0]["params"]} == {id(t.weight) for t in expected}
    assert model.embedding.item.sparse and not model.embedding.category.sparse
    small = build_model("din", model_config(small_data, {}))
    assert len(build_optimisers(small, TrainConfig(embedding_optimiser="auto"))) == 1  # 256 × 51 lookups


def test_the_fused_dense_adam_makes_the_default_adams_updates() -> None:
    """``dense_adam`` (one fused kernel) against torch's default Adam, five steps on the same gradients."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 3, generator=g), torch.randn(5, generator=g)]
    fused = [torch.nn.Parameter(p.clone()) for p in start]
    plain = [torch.nn.Parameter(p.clone()) for p in start]
    opt_fused, opt_plain = dense_adam(fused, 0.01), torch.optim.Adam(plain, lr=0.01)
    for _ in range(5):
        for a, b in zip(fused, plain, strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_fused.step()
        opt_plain.step()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(fused[0], start[0])
