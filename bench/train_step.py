"""One training step timed in isolation: forward + backward + Adam on fixed batches of real data.

    python -m bench.train_step --data-dir ../shared/data/ml-100k --model dien --steps 60

The batches are built exactly as ``training.train`` builds them (history and feedback dropout, one
sampled negative per position for DIEN, the mini-batch aware L2 terms), gathered once up front and
cycled, so the figure is the model's step and not the data pipeline. Prints ms per step (median and quartiles over
the timed steps) and the matching samples/s; ``--profile`` adds a torch.profiler table. The step runs the
model's training-speed form (models/fast_training.py), as training does; ``--paper-form`` times the paper form.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from models import CTRModel, build_model
from models.fast_training import training_form
from training.batches import Batch, TensorSamples, add_negatives, drop_history
from training.config import TrainConfig, model_config
from training.regularization import mba_terms
from training.train import keep_freed_memory, load_data


def make_batches(cfg: TrainConfig, n_batches: int) -> tuple[CTRModel, list[Batch], list[torch.Tensor], list]:
    """The model, n fixed training batches with their labels, and the regularisers."""
    torch.manual_seed(cfg.seed)
    data = load_data(cfg)
    mcfg = model_config(data, cfg.model_options)
    model = build_model(cfg.model, mcfg)
    regs = mba_terms(model, data.train, cfg.max_len, cfg.mba_lambda)
    item_category = torch.as_tensor(data.vocab.item_category_table())
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


def step(
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    batch: Batch,
    label: torch.Tensor,
    regs: list,
    aux_weight: float,
) -> None:
    out = model(**batch)
    loss = F.binary_cross_entropy_with_logits(out.logits, label)
    loss.item()
    if out.aux_loss is not None:
        loss = loss + aux_weight * out.aux_loss
    for reg, rows_of in regs:
        loss = loss + reg(*rows_of(batch))
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data/ml-100k")
    p.add_argument("--model", default="dien", choices=["base", "din", "dien"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=60, help="timed steps (after 10 warm-up steps)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--paper-form", action="store_true", help="time the paper form instead of the training form")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of 10 steps")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings as they are")
    args = p.parse_args(argv)
    if not args.default_malloc:
        keep_freed_memory()  # as training.train does
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        dataset="ml-100k",
        data_dir=args.data_dir,
        user_features=(),
        model=args.model,
        batch_size=args.batch_size,
        history_dropout=0.7,
        lr=3e-3,
        model_options={"attention_softmax": True, "dien_pooling": "attention"},
    )
    model, batches, labels, regs = make_batches(cfg, 20)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    forward = model if args.paper_form else training_form(model)
    for i in range(10):
        step(forward, optimiser, batches[i % len(batches)], labels[i % len(batches)], regs, cfg.aux_weight)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(forward, optimiser, batches[i % len(batches)], labels[i % len(batches)], regs, cfg.aux_weight)
        times.append(time.perf_counter() - t0)
    q1, med, q3 = statistics.quantiles(times, n=4)
    form = "paper" if args.paper_form else "training"
    print(
        f"{args.model} ({form} form): step {1e3 * med:.1f} ms (quartiles {1e3 * q1:.1f}–{1e3 * q3:.1f}), "
        f"{args.batch_size / med:.0f} samples/s, threads {torch.get_num_threads()}"
    )
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for i in range(10):
                step(forward, optimiser, batches[i], labels[i], regs, cfg.aux_weight)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
