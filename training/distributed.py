"""Data parallelism for ``training.train`` under torchrun: the process group from torchrun's environment,
the sampler (one permutation per epoch, each optimiser step's rows shared out between the ranks), the
evaluation shards and the gathers that put each split's predictions back together.

One process without torchrun's environment is a world of one: every function here is then the identity."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the run's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # the process's index on its machine: its GPU under CUDA

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def derived_seed(*keys: int) -> int:
    """A seed for one random stream of a run, e.g. (seed, epoch) or (seed, stream, rank): independent streams
    from one run seed (numpy's SeedSequence), where seed + rank would make run 1's rank 0 run 0's rank 1."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> np.uint64(1))


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``cpu``, ``cuda`` (this process's GPU: cuda:LOCAL_RANK) or ``auto`` (cuda when there is one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: this torch build sees no CUDA device (torch.cuda.is_available())")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"device {name!r}: expected cpu, cuda or auto")
    return torch.device("cpu")


def start(device_name: str) -> tuple[Ranks, torch.device]:
    """This process's rank and device. Under torchrun (WORLD_SIZE > 1) it joins the process group: NCCL
    between GPUs, gloo on CPU (gloo also carries sparse gradients, which NCCL's all-reduce does not)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    ranks = Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)
    log.info("rank %d of %d on %s (%s)", ranks.rank, ranks.world, device, dist.get_backend())
    return ranks, device


def stop(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP around the module training runs: its backward all-reduces (averages) the gradients of the
    parameters it shares with the paper-form model."""
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def step_batches(n: int, step_size: int, seed: int, epoch: int) -> list[Tensor]:
    """An epoch's optimiser steps: a permutation of the n training rows seeded by (seed, epoch), the same on
    every rank and on resume, cut into global batches of step_size rows (the last one may be shorter)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, epoch)))
    return list(order.split(step_size))


def rank_rows(step_rows: Tensor, ranks: Ranks) -> Tensor:
    """This rank's share of a global batch: every world-th row from its rank on, disjoint between ranks,
    their union the global batch; the shares differ by one row at most."""
    return step_rows[ranks.rank :: ranks.world]


def shard(n: int, ranks: Ranks) -> range:
    """This rank's contiguous slice of n evaluation rows: each row in exactly one slice, nothing padded."""
    return range(ranks.rank * n // ranks.world, (ranks.rank + 1) * n // ranks.world)


def gather_shards(values: Tensor, n: int, ranks: Ranks) -> Tensor:
    """values (len(shard(n, ranks)),) on every rank → (n,) in row order, on every rank. all_gather needs
    equal sizes: each shard is padded to the largest and the padding cut off again, so no row counts twice."""
    if not ranks.distributed:
        return values
    sizes = [len(shard(n, Ranks(r, ranks.world))) for r in range(ranks.world)]
    padded = values.new_zeros(max(sizes))
    padded[: len(values)] = values
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def gather_concat(parts: list[Tensor], ranks: Ranks) -> list[Tensor]:
    """1-D tensors of any lengths, the same number on every rank → for each one, its concatenation over the
    ranks, on every rank. Two collectives whatever the number of parts: their lengths, then all of them
    in one padded buffer."""
    if not ranks.distributed or not parts:
        return parts
    flat = torch.cat(parts)
    lengths = torch.tensor([len(part) for part in parts], device=flat.device)
    all_lengths = [torch.empty_like(lengths) for _ in range(ranks.world)]
    dist.all_gather(all_lengths, lengths)
    longest = max(int(n.sum()) for n in all_lengths)
    padded = flat.new_zeros(longest)
    padded[: len(flat)] = flat
    buffers = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(buffers, padded)
    pieces = [buf[: int(n.sum())].split(n.tolist()) for buf, n in zip(buffers, all_lengths, strict=True)]
    return [torch.cat([rank_pieces[i] for rank_pieces in pieces]) for i in range(len(parts))]


def gather_objects(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ranks.distributed:
        return [obj]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out
