"""Train the base model, DIN or DIEN on a behaviour log; write metrics.json and a checkpoint.

python -m training.train --dataset synthetic --model din --out runs/din
python -m training.train --dataset ml-100k --data-dir ../shared/data/ml-100k --model dien --out runs/dien
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models import CTRModel, ModelConfig, build_model
from models.fast_training import training_form
from training.batches import TensorSamples, add_negatives, drop_history
from training.config import TrainConfig, add_train_arguments, config_from_args, model_config
from training.datasets import SyntheticConfig, load_dataset
from training.metrics import evaluate
from training.optim import build_optimisers
from training.regularization import mba_terms
from training.samples import PreparedData, SampleSet, prepare

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    run_dir: Path


@torch.no_grad()
def predict(model: nn.Module, data: TensorSamples, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Click probabilities (N,) and the labels (N,) of a split."""
    model.eval()
    probs = []
    for start in range(0, data.n, batch_size):
        rows = torch.arange(start, min(start + batch_size, data.n))
        out = model(**data.inputs(rows))
        probs.append(torch.sigmoid(out.logits))
    return torch.cat(probs).numpy(), data.label.numpy()


def _evaluate(model: nn.Module, data: TensorSamples, split: SampleSet, batch_size: int) -> dict[str, float]:
    probs, labels = predict(model, data, batch_size)
    return evaluate(split.user, labels, probs)


def load_data(cfg: TrainConfig) -> PreparedData:
    """The run's prepared splits (from the cache when they were prepared before)."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    blog = load_dataset(cfg.dataset, data_dir, cfg.download, SyntheticConfig(**cfg.synthetic))
    blog = blog.with_user_features(cfg.user_features)
    protocol = cfg.protocol or ("din-movielens" if blog.has_labels else "implicit")
    t0 = time.perf_counter()
    cache = Path(cfg.cache_dir) if cfg.cache_dir else None
    data = prepare(blog, protocol, cfg.max_len, cfg.seed, cache, cfg.min_count, cfg.eval_users)
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


def train(cfg: TrainConfig, data: PreparedData | None = None) -> TrainResult:
    """Train with Adam and early stopping on validation GAUC; test the best epoch; save the run."""
    keep_freed_memory()
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if data is None:
        data = load_data(cfg)
    mcfg = model_config(data, cfg.model_options)
    model = build_model(cfg.model, mcfg)
    # the same parameters, values and gradients; evaluation and the checkpoint use ``model``, the paper form
    forward = model if cfg.paper_form else training_form(model)
    optimisers = build_optimisers(model, cfg)
    regs = mba_terms(model, data.train, cfg.max_len, cfg.mba_lambda)
    item_category = torch.as_tensor(data.vocab.item_category_table())
    train_t, valid_t, test_t = (TensorSamples(s, cfg.max_len) for s in (data.train, data.valid, data.test))
    gen = torch.Generator().manual_seed(cfg.seed)

    history: list[dict[str, float]] = []
    best_gauc, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    train_seconds, train_samples, steps = 0.0, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(train_t.n, generator=gen)
        batches = perm.split(cfg.batch_size)
        bar = tqdm(batches, desc=f"{cfg.model} epoch {epoch}", disable=not cfg.progress, leave=False)
        running, t0 = 0.0, time.perf_counter()
        for step, rows in enumerate(bar, start=1):
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
            steps += 1
            train_samples += len(rows)
            batch = train_t.inputs(rows)
            drop_history(batch, cfg, gen)
            if model.uses_negatives:
                add_negatives(batch, mcfg.n_items, item_category, gen)
            out = forward(**batch)
            loss = F.binary_cross_entropy_with_logits(out.logits, train_t.label[rows])
            running += (loss.item() - running) / min(step, 100)
            if out.aux_loss is not None:
                loss = loss + cfg.aux_weight * out.aux_loss
            for reg, rows_of in regs:
                loss = loss + reg(*rows_of(batch))
            for opt in optimisers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimisers:
                opt.step()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running:.4f}")
        train_seconds += time.perf_counter() - t0
        valid = _evaluate(model, valid_t, data.valid, cfg.eval_batch_size)
        history.append({"epoch": epoch, "train_loss": running, **{f"valid_{k}": v for k, v in valid.items()}})
        log.info("%s epoch %d: loss %.4f valid %s", cfg.model, epoch, running, valid)
        if valid["gauc"] > best_gauc:
            best_gauc, best_epoch, best_state = valid["gauc"], epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break

    model.load_state_dict(best_state)
    test = _evaluate(model, test_t, data.test, cfg.eval_batch_size)
    metrics: dict[str, Any] = {
        **test,
        "best_epoch": best_epoch,
        "valid_gauc": best_gauc,
        "train_samples_per_second": train_samples / train_seconds,
        "train_steps": steps,
        "samples": {k: len(getattr(data, k)) for k in ("train", "valid", "test")},
        "data": data.info,
        "config": asdict(cfg),
        "model_config": mcfg.to_dict(),
        "threads": torch.get_num_threads(),
    }
    if mcfg.history_feedback:  # what a caller that sends no labels gets: every behaviour's feedback unknown
        metrics["without_feedback"] = _evaluate(model, test_t.without_feedback(), data.test, cfg.eval_batch_size)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_NAME).write_text(json.dumps({**metrics, "history": history}, indent=2))
    torch.save(
        {
            "model": cfg.model,
            "model_config": mcfg.to_dict(),
            "state_dict": model.state_dict(),
            "vocab": data.vocab.to_json(),
            "max_len": cfg.max_len,
            "train_config": asdict(cfg),
            "metrics": {k: metrics[k] for k in ("auc", "gauc", "logloss", "best_epoch")},
        },
        run_dir / CHECKPOINT_NAME,
    )
    return TrainResult(metrics, history, run_dir)


def load_checkpoint(run_dir: Path) -> tuple[CTRModel, dict[str, Any]]:
    """The trained model (eval mode) and the checkpoint's metadata (vocab, config, metrics)."""
    ckpt = torch.load(Path(run_dir) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    model = build_model(ckpt["model"], ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--model", choices=["base", "din", "dien"], default="din")
    p.add_argument("--out", required=True, help="run directory for metrics.json and the checkpoint")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_MININTERVAL", "0.5")
    result = train(config_from_args(args, args.model, args.out))
    m = result.metrics
    print(
        f"{args.model}: test AUC {m['auc']:.4f}  GAUC {m['gauc']:.4f}  logloss {m['logloss']:.4f}  "
        f"best epoch {m['best_epoch']}  {m['train_samples_per_second']:.0f} train samples/s  → {result.run_dir}"
    )


if __name__ == "__main__":
    main()
