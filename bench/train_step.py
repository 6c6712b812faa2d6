"""One training step timed in isolation: forward + backward + the optimisers on fixed batches of real data.

    python -m bench.train_step --data-dir ../shared/data/ml-100k --model dien --steps 60
    python -m bench.train_step --model din --table-rows 0,1e7 --embedding-optimiser auto,adam --threads 1

The batches are built exactly as ``training.train`` builds them (history and feedback dropout, one
sampled negative per position for DIEN, the mini-batch aware L2 terms, ``training.optim``'s optimisers),
gathered once up front and cycled, so the figure is the model's step and not the data pipeline. Prints ms
per step (median and quartiles over the timed steps) and the matching samples/s, and the CPU time of each
phase (forward with the loss, the MBA terms' rows, backward with their gradients, the optimisers); ``--profile`` adds a
torch.profiler table. The step runs the model's training-speed form (models/fast_training.py), as training
does; ``--paper-form`` times the paper form. The model and data are the ml-100k recipe's (history dropout
0.7, no user features, softmax attention), or with ``--defaults`` those ``training.train`` and
``bench.peers`` train with (every user feature, softmax attention, no history dropout).

``--table-rows`` sizes the item table (0: the data's own vocabulary): ml-100k's items stay at its front,
as a frequency-ordered vocabulary keeps a Zipf log's busy rows, or with ``--spread-items`` go to random
rows (the MBA counts and DIEN's negatives follow), so the batches, and the work a batch needs, are the
same and only the table grows. Every (rows, optimiser) pair is
built first and timed in alternating blocks of steps in one process; ``--out`` gets every figure as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from contract import FIRST_INDEX, OOV
from models import CTRModel, build_model
from models.fast_training import training_form
from training.batches import Batch, TensorSamples, add_negatives, drop_history
from training.config import EMBEDDING_OPTIMISERS, TrainConfig, model_config
from training.optim import build_optimisers
from training.regularization import add_mba_gradients, mba_terms
from training.samples import PreparedData
from training.train import keep_freed_memory, load_data

DEFAULT_OUT = Path("bench/results/train_step.json")


def widen_item_table(data: PreparedData, rows: int, seed: int, spread: bool) -> tuple[PreparedData, np.ndarray]:
    """The training split in an item table of ``rows`` rows, and the (rows,) item → category table to match
    (OOV for the rows no item maps to). ``spread``: the items at random rows (PAD and OOV kept), every
    batch row far from the others; otherwise where they are, at the front (a vocabulary ordered by
    frequency, as ``Vocabulary.build`` orders it, keeps a Zipf log's busy rows together like this)."""
    n_items = data.vocab.n_items
    if rows < n_items:
        raise ValueError(f"--table-rows {rows} is smaller than the data's {n_items} items")
    rng = np.random.default_rng(seed)
    new_index = np.arange(n_items)
    if spread:
        new_index[FIRST_INDEX:] = FIRST_INDEX + rng.choice(rows - FIRST_INDEX, n_items - FIRST_INDEX, replace=False)
    train = dataclasses.replace(
        data.train, event_item=new_index[data.train.event_item], cand_item=new_index[data.train.cand_item]
    )
    item_category = np.full(rows, OOV, dtype=np.int64)
    item_category[new_index] = data.vocab.item_category_table()
    return dataclasses.replace(data, train=train), item_category


def make_batches(
    cfg: TrainConfig, n_batches: int, data: PreparedData, table_rows: int = 0, spread: bool = False
) -> tuple[CTRModel, list[Batch], list[torch.Tensor], list]:
    """The model (its item table ``table_rows`` rows, 0 = the data's), n fixed training batches with their
    labels, and the regularisers."""
    torch.manual_seed(cfg.seed)
    item_category_np = data.vocab.item_category_table()
    if table_rows:
        data, item_category_np = widen_item_table(data, table_rows, cfg.seed, spread)
    mcfg = dataclasses.replace(model_config(data, cfg.model_options), n_items=len(item_category_np))
    model = build_model(cfg.model, mcfg)
    regs = mba_terms(model, data.train, cfg.max_len, cfg.mba_lambda)
    item_category = torch.as_tensor(item_category_np)
    train_t = TensorSamples(data.train, cfg.max_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(train_t.n, generator=gen)
    batches, labels = [], []
    for rows in perm.split(cfg.batch_size)[:n_batches]:
        batch = train_t.inputs(rows)
        drop_history(batch, cfg, gen)
        if model.uses_negatives:
            add_negatives(batch, mcfg.n_items, item_category, gen)
        batches.append(batch)
        labels.append(train_t.label[rows])
    return model, batches, labels, regs


PHASES = ("forward", "mba", "backward", "optimiser")


def step(
    model: torch.nn.Module,
    optimisers: list[torch.optim.Optimizer],
    batch: Batch,
    label: torch.Tensor,
    regs: list,
    aux_weight: float,
    phases: dict[str, list[float]] | None = None,
) -> None:
    """One step; with ``phases``, each phase's CPU seconds (this thread's) appended to its list."""
    marks = [time.thread_time()]
    out = model(**batch)
    loss = F.binary_cross_entropy_with_logits(out.logits, label)
    loss.item()
    if out.aux_loss is not None:
        loss = loss + aux_weight * out.aux_loss
    marks.append(time.thread_time())
    rows = [torch.cat([idx.reshape(-1) for idx in rows_of(batch)]) for _, rows_of in regs]
    marks.append(time.thread_time())
    for opt in optimisers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if regs:  # as training.train adds them: as gradients, after the backward (timed with it)
        add_mba_gradients([reg for reg, _ in regs], rows)
    marks.append(time.thread_time())
    for opt in optimisers:
        opt.step()
    marks.append(time.thread_time())
    if phases is not None:
        for name, start, end in zip(PHASES, marks, marks[1:], strict=False):
            phases.setdefault(name, []).append(end - start)


class Setup:
    """One configuration ready to step: its training module, optimisers, fixed batches and regularisers."""

    def __init__(self, cfg: TrainConfig, data: PreparedData, table_rows: int, spread: bool, paper_form: bool) -> None:
        self.cfg, self.paper_form, self.spread = cfg, paper_form, spread
        self.model, self.batches, self.labels, self.regs = make_batches(cfg, 20, data, table_rows, spread)
        self.model.train()
        self.optimisers = build_optimisers(self.model, cfg)
        self.forward = self.model if paper_form else training_form(self.model)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.phases: dict[str, list[float]] = {}
        self.i = 0

    def step(self, timed: bool = False) -> tuple[float, float]:
        """Wall and CPU seconds of one step (the CPU time of this thread: with --threads 1 that is all of
        the step's work, and other processes on the machine do not inflate it); ``timed``: its phases' CPU
        seconds kept too."""
        i = self.i % len(self.batches)
        self.i += 1
        phases = self.phases if timed else None
        t0, c0 = time.perf_counter(), time.thread_time()
        step(self.forward, self.optimisers, self.batches[i], self.labels[i], self.regs, self.cfg.aux_weight, phases)
        return time.perf_counter() - t0, time.thread_time() - c0

    def figures(self) -> dict[str, Any]:
        q1, med, q3 = statistics.quantiles(self.times, n=4)
        cfg = self.cfg
        return {
            "model": cfg.model,
            "form": "paper" if self.paper_form else "training",
            "embedding_optimiser": cfg.embedding_optimiser,
            "item_rows": self.model.embedding.item.num_embeddings,
            "items_spread": self.spread,
            "batch_size": cfg.batch_size,
            "history_dropout": cfg.history_dropout,
            "threads": torch.get_num_threads(),
            "steps": len(self.times),
            "step_ms_median": 1e3 * med,
            "step_ms_min": 1e3 * min(self.times),  # the least disturbed step on a shared machine
            "step_cpu_ms_median": 1e3 * statistics.median(self.cpu_times),  # this thread's CPU time
            "step_ms_quartiles": [1e3 * q1, 1e3 * q3],
            "samples_per_second": cfg.batch_size / med,
            "phase_cpu_ms_median": {k: 1e3 * statistics.median(v) for k, v in self.phases.items()},
        }


def time_round_robin(setups: list[Setup], steps: int, block: int = 10) -> None:
    """10 warm-up steps each, then blocks of ``block`` timed steps taken in turn until each has ``steps``:
    on a shared machine every configuration sees the same background load."""
    for s in setups:
        for _ in range(10):
            s.step()
    while any(len(s.times) < steps for s in setups):
        for s in setups:
            for _ in range(min(block, steps - len(s.times))):
                wall, cpu = s.step(timed=True)
                s.times.append(wall)
                s.cpu_times.append(cpu)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data/ml-100k")
    p.add_argument("--model", default="dien", choices=["base", "din", "dien"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=60, help="timed steps (after 10 warm-up steps)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--history-dropout", type=float, default=None, help="default: 0.7 as the ml-100k recipe trains (--defaults: 0)"
    )
    p.add_argument(
        "--defaults",
        action="store_true",
        help="the model and data of training.train's defaults (every user feature, softmax attention, DIEN's "
        "default pooling: what bench.peers trains) instead of the recipe's",
    )
    p.add_argument(
        "--table-rows",
        default="0",
        help="comma-separated item-table sizes to time (e.g. 0,1e7); 0 = the data's own vocabulary",
    )
    p.add_argument(
        "--embedding-optimiser",
        default="auto",
        help=f"comma-separated, each one of {', '.join(EMBEDDING_OPTIMISERS)}",
    )
    p.add_argument(
        "--spread-items",
        action="store_true",
        help="with --table-rows: put the items at random rows of the table (the worst memory locality) "
        "instead of at its front (a frequency-ordered vocabulary's)",
    )
    p.add_argument("--paper-form", action="store_true", help="time the paper form instead of the training form")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of 10 steps (of each)")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings as they are")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON of the figures (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if not args.default_malloc:
        keep_freed_memory()  # as training.train does
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.history_dropout is None:
        args.history_dropout = 0.0 if args.defaults else 0.7
    base = TrainConfig(
        dataset="ml-100k",
        data_dir=args.data_dir,
        model=args.model,
        batch_size=args.batch_size,
        history_dropout=args.history_dropout,
    )
    if not args.defaults:  # the recipe's (training/recipes/ml-100k.toml) model and rate
        recipe = {"attention_softmax": True, "dien_pooling": "attention"}
        base = dataclasses.replace(base, user_features=(), lr=3e-3, model_options=recipe)
    data = load_data(base)
    setups = [
        Setup(
            dataclasses.replace(base, embedding_optimiser=name),
            data,
            int(float(rows)),
            args.spread_items,
            args.paper_form,
        )
        for rows in args.table_rows.split(",")
        for name in args.embedding_optimiser.split(",")
    ]
    time_round_robin(setups, args.steps)
    results = []
    for s in setups:
        r = s.figures()
        print(
            f"{args.model} ({r['form']} form, {r['embedding_optimiser']}, {r['item_rows']:,} item rows): "
            f"step {r['step_ms_median']:.1f} ms (quartiles {r['step_ms_quartiles'][0]:.1f}–"
            f"{r['step_ms_quartiles'][1]:.1f}, min {r['step_ms_min']:.1f}), {r['samples_per_second']:.0f} samples/s, "
            f"CPU {r['step_cpu_ms_median']:.1f} ms (main thread), threads {r['threads']}",
            flush=True,
        )
        print("  CPU ms by phase (medians): " + ", ".join(f"{k} {v:.2f}" for k, v in r["phase_cpu_ms_median"].items()))
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    s.step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        results.append(r)
    if len(results) > 1:
        first = results[0]["samples_per_second"]
        for r in results[1:]:
            r["relative_to_first"] = r["samples_per_second"] / first
            r["relative_to_first_by_min"] = results[0]["step_ms_min"] / r["step_ms_min"]
            r["relative_to_first_by_cpu"] = results[0]["step_cpu_ms_median"] / r["step_cpu_ms_median"]
            print(
                f"{r['item_rows']:,} rows, {r['embedding_optimiser']}: {r['relative_to_first']:.2f}× the first's "
                f"samples/s (by median step), {r['relative_to_first_by_min']:.2f}× (by fastest step), "
                f"{r['relative_to_first_by_cpu']:.2f}× (by CPU time)"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
