from __future__ import annotations

import pytest
import torch

from training.distributed import Ranks, derived_seed, gather_shards, rank_rows, resolve_device, shard, step_batches


def test_an_epochs_steps_are_one_seeded_permutation_cut_into_global_batches() -> None:
    steps = step_batches(103, 10, seed=7, epoch=2)
    assert [len(s) for s in steps] == [10] * 10 + [3]
    assert sorted(torch.cat(steps).tolist()) == list(range(103))
    again = step_batches(103, 10, seed=7, epoch=2)  # every rank, and a resumed run, cut the same steps
    assert all(torch.equal(a, b) for a, b in zip(steps, again, strict=True))
    assert not torch.equal(torch.cat(steps), torch.cat(step_batches(103, 10, seed=7, epoch=3)))


@pytest.mark.parametrize("m", [12, 11, 3])
def test_the_ranks_shares_of_a_step_are_disjoint_and_make_up_the_step(m: int) -> None:
    step = torch.randperm(50)[:m]
    shares = [rank_rows(step, Ranks(rank, 3)) for rank in range(3)]
    assert sorted(torch.cat(shares).tolist()) == sorted(step.tolist())
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_evaluation_shards_hold_each_row_exactly_once() -> None:
    for n in (0, 1, 7, 100):
        rows = [r for rank in range(4) for r in shard(n, Ranks(rank, 4))]
        assert rows == list(range(n))


def test_one_process_is_a_world_of_one() -> None:
    values = torch.arange(5.0)
    assert gather_shards(values, 5, Ranks()) is values
    assert shard(5, Ranks()) == range(5)


def test_derived_seeds_differ_by_stream_and_rank() -> None:
    seeds = {derived_seed(0, stream, rank) for stream in (1, 2) for rank in range(4)}
    assert len(seeds) == 8 and derived_seed(0, 1, 0) == derived_seed(0, 1, 0)
    assert derived_seed(0, 1) != derived_seed(1, 0)


def test_devices() -> None:
    assert resolve_device("cpu", 3) == torch.device("cpu")
    assert resolve_device("auto", 0).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda", 0)
