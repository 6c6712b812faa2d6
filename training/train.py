"""Train the base model, DIN, DIEN or DSIN on a behaviour log; write metrics.json and a checkpoint.

python -m training.train --dataset synthetic --model din --out runs/din
python -m training.train --dataset ml-100k --data-dir ../shared/data/ml-100k --model dien --out runs/dien
python -m training.train --recipe ml-100k --data-dir ../shared/data/ml-100k --model dien --out runs/dien
torchrun --standalone --nproc-per-node=2 -m training.train --dataset synthetic --model din --out runs/din
python -m training.train --resume runs/din    # continue a killed run from its last saved state
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import CTRModel, ModelConfig, build_model
from models.ensemble import Ensemble
from models.fast_training import training_form
from training import distributed, run_state
from training.averaging import WeightAverage
from training.batches import TensorSamples, add_negatives, drop_history, drop_user_features, to_device
from training.config import TrainConfig, add_train_arguments, model_config
from training.datasets import SyntheticConfig, load_dataset
from training.distributed import Ranks
from training.losses import click_loss
from training.metrics import evaluate
from training.negatives import SAMPLERS, behaviour_counts, popularity
from training.optim import build_optimisers
from training.recipes import config_from_command_line
from training.regularization import Batch, MiniBatchAwareL2, add_mba_gradients, mba_terms
from training.run_state import STATE_NAME, Progress
from training.samples import PreparedData, SampleSet, Vocabulary, prepare
from training.schedule import build_schedulers
from training.served_data import prepare_served

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    run_dir: Path


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The forward's precision: bf16 autocast (matrix products in bf16, reductions and the loss in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def predict_rows(
    model: nn.Module,
    data: TensorSamples,
    rows: range,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> Tensor:
    """Click probabilities (len(rows),), float32 on ``device``, of a contiguous range of a split's rows."""
    model.eval()
    probs = [torch.empty(0, device=device)]
    for start in range(rows.start, rows.stop, batch_size):
        batch = to_device(data.inputs(torch.arange(start, min(start + batch_size, rows.stop))), device)
        with autocast(device, precision):
            out = model(**batch)
        probs.append(torch.sigmoid(out.logits.float()))
    return torch.cat(probs)


def predict(model: nn.Module, data: TensorSamples, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Click probabilities (N,) and the labels (N,) of a split, on the CPU."""
    probs = predict_rows(model, data, range(data.n), batch_size, torch.device("cpu"))
    return probs.numpy(), data.label.numpy()


def _evaluate(
    model: nn.Module, data: TensorSamples, split: SampleSet, cfg: TrainConfig, ranks: Ranks, device: torch.device
) -> dict[str, float]:
    """The split's metrics, the same on every rank: each rank predicts its own slice of the rows, and the
    slices, gathered in row order, hold every sample exactly once."""
    mine = predict_rows(model, data, distributed.shard(data.n, ranks), cfg.eval_batch_size, device, cfg.precision)
    probs = distributed.gather_shards(mine, data.n, ranks).cpu().numpy()
    return evaluate(split.user, data.label.numpy(), probs, cfg.ranking_k)


def load_data(cfg: TrainConfig) -> PreparedData:
    """The run's prepared splits (from the cache when they were prepared before)."""
    if cfg.dataset == "served":  # samples as served, not a behaviour log (training/served_data.py)
        if not cfg.data_dir:
            raise ValueError("--data-dir is required for dataset 'served' (the parts training.served wrote)")
        vocab = None
        if cfg.init_from:
            vocab = Vocabulary.from_json(_checkpoint(Path(cfg.init_from))["vocab"])
        return prepare_served(Path(cfg.data_dir), cfg.max_len, vocab, only_outcomes=cfg.served_rows == "outcomes")
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    blog = load_dataset(cfg.dataset, data_dir, cfg.download, SyntheticConfig(**cfg.synthetic))
    blog = blog.with_user_features(cfg.user_features)
    protocol = cfg.protocol or ("din-movielens" if blog.has_labels else "implicit")
    t0 = time.perf_counter()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    data = prepare(
        blog, protocol, cfg.max_len, cfg.seed, cache, cfg.min_count, cfg.eval_users, cfg.negatives, cfg.negative_alpha
    )
    sizes = {k: len(getattr(data, k)) for k in ("train", "valid", "test")}
    log.info("data ready in %.1fs (cached=%s): %s", time.perf_counter() - t0, data.info.get("cached"), sizes)
    return data


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves big blocks (from 128 KB, adaptively up to 32 MB) with fresh mmap'd pages
    and trims the top of the heap on free, so a training step's large temporaries page-fault again on
    first touch every step: ≈ 10,000 minor faults and ≈ 18 ms of a 75 ms DIEN step at batch 256
    (bench/README.md, "Training throughput"). With these settings the heap stays at its peak size and
    blocks are reused. Process-wide; a no-op (False) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    mmap_ok = libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's ceiling for this setting
    trim_ok = libc.mallopt(m_trim_threshold, 1 << 30)
    return bool(mmap_ok and trim_ok)


EpochHook = Callable[[int, dict[str, float]], None]


def train(
    cfg: TrainConfig,
    data: PreparedData | None = None,
    on_step: Callable[[int], None] | None = None,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train with early stopping on validation GAUC; test the best epoch; save the run (rank 0).

    Under torchrun each rank trains on its share of every optimiser step's rows (DDP averages the gradients);
    ``on_step(steps)`` is called after each optimiser step and its checkpoint (tests stop a run there as a
    kill would); ``on_epoch(epoch, validation metrics)`` after each epoch's evaluation and saved state (the
    tuner reports to its pruner there, and stops a trial by raising)."""
    keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.negatives not in SAMPLERS:
        raise ValueError(f"unknown negative sampler {cfg.negatives!r}; choose one of {SAMPLERS}")
    if cfg.ensemble > 1:
        return train_ensemble(cfg, data)
    ranks, device = distributed.start(cfg.device)
    try:
        return _train(cfg, data, ranks, device, on_step, on_epoch)
    finally:
        distributed.stop(ranks)


def _train(
    cfg: TrainConfig,
    data: PreparedData | None,
    ranks: Ranks,
    device: torch.device,
    on_step: Callable[[int], None] | None,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    if cfg.accumulate < 1 or cfg.batch_size < 1 or (cfg.checkpoint_every is not None and cfg.checkpoint_every < 1):
        raise ValueError("--batch-size, --accumulate and --checkpoint-every must be at least 1")
    torch.manual_seed(cfg.seed)  # the initial parameters: the same on every rank
    if data is None:
        data = load_data(cfg)
    init = _checkpoint(Path(cfg.init_from)) if cfg.init_from else None
    if init is not None and init["model"] != cfg.model:
        raise ValueError(f"--init-from {cfg.init_from} holds a {init['model']} model, not {cfg.model}")
    # a warm start keeps the earlier model's configuration, so its parameters fit (the vocabulary is its too)
    mcfg = ModelConfig.from_dict(init["model_config"]) if init is not None else model_config(data, cfg.model_options)
    model = build_model(cfg.model, mcfg).to(device)
    if init is not None:
        model.load_state_dict(init["state_dict"])
    # the same parameters, values and gradients; evaluation and the checkpoint use ``model``, the paper form
    forward: nn.Module = model if cfg.paper_form else training_form(model)
    # before DDP wraps the model: it reads each table's ``sparse`` (set here) to expect sparse gradients
    optimisers = build_optimisers(model, cfg)
    if ranks.distributed:
        forward = distributed.wrap(forward, device)
    regs = [(reg.to(device), rows_of) for reg, rows_of in mba_terms(model, data.train, cfg.max_len, cfg.mba_lambda)]
    item_category = torch.as_tensor(data.vocab.item_category_table()) if model.uses_negatives else None
    negative_probs = None  # DIEN's auxiliary negatives: uniform unless --negatives popularity
    if model.uses_negatives and cfg.negatives == "popularity":
        counts = behaviour_counts(data.train, data.vocab.n_items, implicit=data.info.get("protocol") == "implicit")
        negative_probs = torch.as_tensor(popularity(counts, cfg.negative_alpha), dtype=torch.float32)
    elif cfg.negatives == "popularity" and data.info.get("protocol") != "implicit":
        log.warning("--negatives popularity changes nothing here: no implicit-protocol negatives, no DIEN")
    sessions = mcfg.session_spec if model.uses_sessions else None  # DSIN's batches carry the session division
    train_t, valid_t, test_t = (TensorSamples(s, cfg.max_len, sessions) for s in (data.train, data.valid, data.test))
    # one optimiser step = accumulate micro-batches of batch_size on each rank: world × accumulate × batch_size rows
    step_size = cfg.batch_size * cfg.accumulate * ranks.world
    steps_per_epoch = -(-train_t.n // step_size)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch)
    schedulers = build_schedulers(optimisers, cfg.warmup_steps, total_steps, cfg.lr_decay)
    # training's noise (model dropout from torch's global stream; history/feedback dropout and DIEN's negatives
    # from ``noise``): a stream of its own on each rank, or the ranks would drop the same positions
    torch.manual_seed(distributed.derived_seed(cfg.seed, 1, ranks.rank))
    noise = torch.Generator().manual_seed(distributed.derived_seed(cfg.seed, 2, ranks.rank))

    run_dir = Path(cfg.out)
    # --ema-decay: validation, test and the checkpoint use the weights' moving average (training/averaging.py),
    # from the second epoch on: the first epoch's weights travel far from the random start, and an average over
    # them is no model (a one-epoch run of 309 steps on a planted log: DIN test AUC 0.81 as trained, 0.61 averaged)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    progress, best_state = Progress(), copy.deepcopy(model.state_dict())
    state = run_state.load_state(run_dir) if cfg.resume else None
    if state is not None:
        if state["world"] != ranks.world:
            raise ValueError(
                f"{run_dir}: saved by {state['world']} processes, resumed by {ranks.world}: the steps' rows and "
                "the ranks' random streams would differ; resume with the same --nproc-per-node × --nnodes"
            )
        model.load_state_dict(state["model"])
        for opt, opt_state in zip(optimisers, state["optimisers"], strict=True):
            opt.load_state_dict(opt_state)
        for sched, sched_state in zip(schedulers, state["schedulers"], strict=True):
            sched.load_state_dict(sched_state)
        progress, best_state = Progress(**state["progress"]), state["best_state"]
        if average is not None:
            average.load_state_dict(state["average"])
        run_state.set_rng_state(state["rng"][ranks.rank], noise, device)
        log.info("resumed %s at epoch %d, step %d", run_dir, progress.epoch, progress.steps)
    elif cfg.resume:
        log.info("%s: no %s yet, starting from the beginning", run_dir, STATE_NAME)

    def save_state() -> None:
        """Every rank takes part (its random streams travel to rank 0); rank 0 writes."""
        rngs = distributed.gather_objects(run_state.rng_state(noise, device), ranks)
        if ranks.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "model": model.state_dict(),
                "optimisers": [opt.state_dict() for opt in optimisers],
                "schedulers": [sched.state_dict() for sched in schedulers],
                "progress": asdict(progress),
                "best_state": best_state,
                "average": average.state_dict() if average is not None else None,
                "rng": rngs,
                "world": ranks.world,
                "train_config": asdict(cfg),
            }
            run_state.atomic_save(state, run_dir / STATE_NAME)

    parts = StepParts(
        forward, optimisers, schedulers, regs, train_t, item_category, negative_probs, noise, cfg, ranks, device
    )

    def out_of_steps() -> bool:
        return cfg.max_steps is not None and progress.steps >= cfg.max_steps

    while not progress.stopped and progress.epoch <= cfg.epochs and not out_of_steps():
        epoch = progress.epoch
        model.train()
        forward.train()
        steps = distributed.step_batches(train_t.n, step_size, cfg.seed, epoch)
        bar = tqdm(
            total=len(steps),
            initial=progress.step_in_epoch,
            desc=f"{cfg.model} epoch {epoch}",
            disable=not (cfg.progress and ranks.is_main),
            leave=False,
        )
        for step_rows in steps[progress.step_in_epoch :]:
            if out_of_steps() or len(step_rows) < ranks.world:  # a tail too short to give each rank a row
                break
            t0 = time.perf_counter()
            loss = _train_step(step_rows, parts)
            if average is not None and epoch > 1:
                average.update(model)
            progress.train_seconds += time.perf_counter() - t0
            progress.steps += 1
            progress.step_in_epoch += 1
            progress.train_samples += len(step_rows)
            progress.running_loss += (loss - progress.running_loss) / min(progress.step_in_epoch, 100)
            bar.update()
            if progress.step_in_epoch % 20 == 0:
                bar.set_postfix(loss=f"{progress.running_loss:.4f}")
            if cfg.checkpoint_every and progress.steps % cfg.checkpoint_every == 0:
                save_state()
            if on_step is not None:
                on_step(progress.steps)
        bar.close()
        scored = average.model if average is not None and average.updates else model  # evaluated, and kept if best
        valid = _evaluate(scored, valid_t, data.valid, cfg, ranks, device)
        progress.history.append(
            {"epoch": epoch, "train_loss": progress.running_loss, **{f"valid_{k}": v for k, v in valid.items()}}
        )
        log.info("%s epoch %d: loss %.4f valid %s", cfg.model, epoch, progress.running_loss, valid)
        # every rank evaluated the same predictions: they all take the same decision here
        if valid["gauc"] > progress.best_gauc:
            progress.best_gauc, progress.best_epoch = valid["gauc"], epoch
            best_state = copy.deepcopy(scored.state_dict())
        elif epoch - progress.best_epoch >= cfg.patience:
            progress.stopped = True
        progress.epoch, progress.step_in_epoch, progress.running_loss = epoch + 1, 0, 0.0
        save_state()
        if on_epoch is not None:
            on_epoch(epoch, valid)

    model.load_state_dict(best_state)  # the best epoch's weights (its average's, with --ema-decay)
    test = _evaluate(model, test_t, data.test, cfg, ranks, device)
    metrics: dict[str, Any] = {
        **test,
        "best_epoch": progress.best_epoch,
        "valid_gauc": progress.best_gauc,
        "train_samples_per_second": progress.train_samples / max(progress.train_seconds, 1e-9),
        "train_steps": progress.steps,
        "world_size": ranks.world,
        "global_batch_size": step_size,
        "samples": {k: len(getattr(data, k)) for k in ("train", "valid", "test")},
        "data": data.info,
        "config": asdict(cfg),
        "model_config": mcfg.to_dict(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if mcfg.history_feedback:  # what a caller that sends no labels gets: every behaviour's feedback unknown
        metrics["without_feedback"] = _evaluate(model, test_t.without_feedback(), data.test, cfg, ranks, device)
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved_metrics = json.dumps({**metrics, "history": progress.history}, indent=2)
        run_state.atomic_write_text(saved_metrics, run_dir / METRICS_NAME)
        checkpoint = {
            "model": cfg.model,
            "model_config": mcfg.to_dict(),
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "vocab": data.vocab.to_json(),
            "max_len": cfg.max_len,
            "train_config": asdict(cfg),
            "metrics": {k: metrics[k] for k in ("auc", "gauc", "logloss", "best_epoch")},
        }
        run_state.atomic_save(checkpoint, run_dir / CHECKPOINT_NAME)
    return TrainResult(metrics, progress.history, run_dir)


def train_ensemble(cfg: TrainConfig, data: PreparedData | None = None) -> TrainResult:
    """Train ``cfg.ensemble`` models on one split, member i from seed derived_seed(seed, 3, i) (member 0 from
    the seed itself: a one-member ensemble is the plain run), each into out/member-i; then evaluate their
    average (models/ensemble.py) and save it as the run's checkpoint, which export publishes as one graph."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--ensemble trains its members one after another in one process: run it without torchrun")
    if cfg.model == "dsin":  # its serving graph has a third output (session weights) that Ensemble does not average
        raise ValueError("--ensemble averages base, DIN and DIEN models; DSIN ensembles are not built")
    if data is None:
        data = load_data(cfg)
    run_dir = Path(cfg.out)
    seeds = [cfg.seed] + [distributed.derived_seed(cfg.seed, 3, i) for i in range(1, cfg.ensemble)]
    results = []
    for i, seed in enumerate(seeds):
        member = replace(cfg, ensemble=1, seed=seed, out=str(run_dir / f"member-{i}"), resume=False)
        results.append(train(member, data=data))
    models = [load_checkpoint(r.run_dir)[0] for r in results]
    ensemble = Ensemble(models)
    cpu = torch.device("cpu")

    def evaluated(split: SampleSet, t: TensorSamples) -> dict[str, float]:
        probs = predict_rows(ensemble, t, range(t.n), cfg.eval_batch_size, cpu).numpy()
        return evaluate(split.user, t.label.numpy(), probs, cfg.ranking_k)

    valid_t, test_t = TensorSamples(data.valid, cfg.max_len), TensorSamples(data.test, cfg.max_len)
    valid, test = evaluated(data.valid, valid_t), evaluated(data.test, test_t)
    member_metrics = [
        {"seed": seed, **{k: r.metrics[k] for k in ("auc", "gauc", "logloss", "best_epoch")}}
        for seed, r in zip(seeds, results, strict=True)
    ]
    mcfg = models[0].cfg
    metrics: dict[str, Any] = {
        **test,
        "best_epoch": [m["best_epoch"] for m in member_metrics],
        "valid_gauc": valid["gauc"],
        "train_samples_per_second": float(np.mean([r.metrics["train_samples_per_second"] for r in results])),
        "train_steps": sum(r.metrics["train_steps"] for r in results),
        "ensemble": {"members": len(models), "seeds": seeds, "member_metrics": member_metrics},
        "samples": {k: len(getattr(data, k)) for k in ("train", "valid", "test")},
        "data": data.info,
        "config": asdict(cfg),
        "model_config": mcfg.to_dict(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if mcfg.history_feedback:
        blind = test_t.without_feedback()
        probs = predict_rows(ensemble, blind, range(blind.n), cfg.eval_batch_size, cpu).numpy()
        metrics["without_feedback"] = evaluate(data.test.user, blind.label.numpy(), probs, cfg.ranking_k)
    run_dir.mkdir(parents=True, exist_ok=True)
    history = [{"member": i, **h} for i, r in enumerate(results) for h in r.history]
    run_state.atomic_write_text(json.dumps({**metrics, "history": history}, indent=2), run_dir / METRICS_NAME)
    checkpoint = {
        "model": cfg.model,
        "model_config": mcfg.to_dict(),
        "ensemble": [{k: v.cpu() for k, v in m.state_dict().items()} for m in models],
        "vocab": data.vocab.to_json(),
        "max_len": cfg.max_len,
        "train_config": asdict(cfg),
        "metrics": {k: metrics[k] for k in ("auc", "gauc", "logloss", "best_epoch")},
    }
    run_state.atomic_save(checkpoint, run_dir / CHECKPOINT_NAME)
    # the history of the first member stands for the run's (compare plots one curve per run)
    return TrainResult(metrics, results[0].history, run_dir)


@dataclass
class StepParts:
    """What an optimiser step works with."""

    forward: nn.Module  # the training form, inside DDP under torchrun
    optimisers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    regs: list[tuple[MiniBatchAwareL2, Callable[[Batch], tuple[Tensor, ...]]]]
    train: TensorSamples
    item_category: Tensor | None  # (n_items,): DIEN draws negatives, None for the other models
    negative_probs: Tensor | None  # (n_items,) DIEN's negatives by popularity; None: uniform
    noise: torch.Generator
    cfg: TrainConfig
    ranks: Ranks
    device: torch.device


def _train_step(step_rows: Tensor, p: StepParts) -> float:
    """One optimiser step over a global batch of m rows; returns this rank's mean click loss.

    Each rank runs its share in micro-batches (the same number on every rank, DDP syncing on the last only)
    and weights each sample's loss by world / m: the gradients summed over micro-batches and averaged over
    ranks are then the mean over all m rows, exactly what one process computes on the whole batch. DIEN's
    auxiliary loss (a mean over a micro-batch) is weighted by the micro-batch's share of the m rows. The
    mini-batch aware L2 term is computed once, on the last micro-batch, over the rows of all of the rank's
    micro-batches and of every rank's (gathered): the term of the whole global batch, the same on every rank."""
    cfg, ranks, forward = p.cfg, p.ranks, p.forward
    mine = distributed.rank_rows(step_rows, ranks)
    n_micro = -(-(len(step_rows) // ranks.world) // cfg.batch_size)  # ≥ 1; every rank's share has ≥ n_micro rows
    weight = ranks.world / len(step_rows)
    for opt in p.optimisers:
        opt.zero_grad(set_to_none=True)
    reg_indices: list[list[tuple[Tensor, ...]]] = []
    click_total = torch.zeros((), device=p.device)
    micro_batches = torch.tensor_split(mine, n_micro)
    for i, rows in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        batch = p.train.inputs(rows)
        drop_history(batch, cfg, p.noise)
        drop_user_features(batch, cfg.user_feature_dropout, p.noise)
        if p.item_category is not None:
            add_negatives(batch, len(p.item_category), p.item_category, p.noise, p.negative_probs)
        batch = to_device({**batch, "label": p.train.label[rows]}, p.device)
        label = batch.pop("label")
        # DDP: accumulate the gradients locally, all-reduce once with the last micro-batch's backward
        accumulate = not last and isinstance(forward, DistributedDataParallel)
        with forward.no_sync() if accumulate else contextlib.nullcontext():  # type: ignore[operator]
            with autocast(p.device, cfg.precision):
                out = forward(**batch)
            losses = click_loss(out.logits.float(), label, cfg.pos_weight, cfg.focal_gamma).sum()
            loss = losses * weight
            if out.aux_loss is not None:
                loss = loss + cfg.aux_weight * out.aux_loss.float() * (weight * len(rows))
            reg_indices.append([rows_of(batch) for _, rows_of in p.regs])
            loss.backward()
        click_total += losses.detach()
    if p.regs:  # the terms as gradients, after DDP's all-reduce: the same on every rank
        reg_rows = _regularised_rows(p, reg_indices)
        add_mba_gradients([reg for reg, _ in p.regs], reg_rows)
    for opt in p.optimisers:
        opt.step()
    for sched in p.schedulers:
        sched.step()
    return click_total.item() / len(mine)


def _regularised_rows(p: StepParts, micro_indices: list[list[tuple[Tensor, ...]]]) -> list[Tensor]:
    """The rows the mini-batch aware L2 terms of a global batch penalise: per term, its table's rows that occur
    in any micro-batch of any rank. micro_indices: per micro-batch, per term, the batch's index tensors of that
    term's table."""
    rows = [torch.cat([idx.reshape(-1) for micro in micro_indices for idx in micro[j]]) for j in range(len(p.regs))]
    return distributed.gather_concat(rows, p.ranks)


def _checkpoint(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT_NAME} to start from")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(run_dir: Path) -> tuple[CTRModel, dict[str, Any]]:
    """The trained model (eval mode) and the checkpoint's metadata (vocab, config, metrics)."""
    model, ckpt = load_model(run_dir)
    if isinstance(model, Ensemble):
        raise ValueError(f"{run_dir} holds an ensemble of {len(model.members)} models: load it with load_model")
    return model, ckpt


def load_model(run_dir: Path) -> tuple[CTRModel | Ensemble, dict[str, Any]]:
    """The trained model or ensemble (eval mode) and the checkpoint's metadata (vocab, config, metrics)."""
    ckpt = torch.load(Path(run_dir) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    mcfg = ModelConfig.from_dict(ckpt["model_config"])
    states = ckpt["ensemble"] if "ensemble" in ckpt else [ckpt["state_dict"]]
    members = []
    for state in states:
        member = build_model(ckpt["model"], mcfg)
        member.load_state_dict(state)
        members.append(member.eval())
    model: CTRModel | Ensemble = Ensemble(members).eval() if "ensemble" in ckpt else members[0]
    return model, ckpt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--model", choices=["base", "din", "dien", "dsin"], default="din")
    p.add_argument("--out", help="run directory for metrics.json and the checkpoint (here or in the recipe)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last saved state, with the configuration it was started with "
        "(the other flags are ignored)",
    )
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: only rank 0 logs progress
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s %(name)s{f' [rank {rank}]' if rank else ''}: %(message)s",
    )
    os.environ.setdefault("TQDM_MININTERVAL", "0.5")
    if args.resume:
        cfg = resume_config(Path(args.resume))
    else:
        cfg = config_from_command_line(p, args, argv, args.model, args.out or "")
        if not cfg.out:
            p.error("--out RUN_DIR is required (or `out` in the recipe, or --resume RUN_DIR)")
    result = train(cfg)
    m = result.metrics
    if rank == 0:
        print(
            f"{cfg.model}: test AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  logloss {m['logloss']:.4f}  "
            f"best epoch {m['best_epoch']}  {m['train_samples_per_second']:.0f} train samples/s  → {result.run_dir}"
        )


def resume_config(run_dir: Path) -> TrainConfig:
    """The configuration a run was started with (from its resume state), set to resume in ``run_dir``."""
    state_path = run_dir / STATE_NAME
    if not state_path.is_file():
        raise SystemExit(
            f"{run_dir}: no {STATE_NAME} to resume from (a run saves it after --checkpoint-every "
            "steps and at each epoch's end)"
        )
    state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
    return TrainConfig.from_dict({**state["train_config"], "out": str(run_dir), "resume": True})


if __name__ == "__main__":
    main()
