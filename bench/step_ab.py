"""training.train's own step, this checkout against another, in one process: CPU time per step, side by side.

    python -m bench.step_ab --checkout /tmp/main-snapshot --data-dir ../shared/data/ml-100k [--threads 1]

On a machine shared with other work, wall times follow the load and two runs minutes apart differ by more
than the change under test (bench/README.md, issue 16). Here both checkouts' ``_train_step`` (batch
gathering, history dropout, forward, loss, MBA terms, backward, optimisers) run in the same process, at
training.train's defaults on DIN unless told otherwise, in alternating blocks of 10 steps over the same
epoch's batches, and each step's CPU time (``time.thread_time``) is kept: at ``--threads 1`` that is the
step's whole work, and what other processes do inflates it little. The other checkout's ``models`` and
``training`` packages are copied under other names (``ab_models``, ``ab_training``) with their imports
rewritten, so the two can be imported side by side; the rest (``contract``, ``sessions``) is this
checkout's. At more threads the calling thread's CPU is not the step's work; the wall time of each step
(``time.perf_counter``) is kept too, and on 2 threads it is the figure to read (alternation spreads what
other processes take over both sides, but not evenly: run it on an idle machine).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

PACKAGES = ("models", "training")
_FROM = re.compile(r"\bfrom (models|training)\b")
_IMPORT = re.compile(r"^(\s*)import (models|training)(\.[\w.]+)?( as \w+)?\s*$", re.MULTILINE)


def _renamed_import(m: re.Match[str]) -> str:
    indent, package, submodule, alias = m.groups()
    if alias is None and submodule:  # its uses name ``models.x``: no rename keeps them working
        raise ValueError(f"cannot rename {m.group(0).strip()!r}: write it 'from {package} import …'")
    return f"{indent}import ab_{package}{submodule or ''}{alias or f' as {package}'}"


def renamed_copy(checkout: Path, into: Path) -> None:
    """``checkout``'s packages under ``into`` as ab_models / ab_training, importing each other by those names."""
    for package in PACKAGES:
        target = into / f"ab_{package}"
        shutil.copytree(checkout / package, target, ignore=shutil.ignore_patterns("__pycache__"))
        for source in target.rglob("*.py"):
            text = _FROM.sub(lambda m: f"from ab_{m.group(1)}", source.read_text())
            source.write_text(_IMPORT.sub(_renamed_import, text))


def stepper(prefix: str, history_dropout: float, data_dir: str, model: str) -> tuple[Any, Any, list[torch.Tensor]]:
    """(``_train_step``, its StepParts, the epoch's step rows) built by the ``prefix`` packages as training.train
    builds them."""

    def mod(name: str) -> ModuleType:
        return importlib.import_module(f"{prefix}{name}")

    train, config, batches, optim = (
        mod("training.train"),
        mod("training.config"),
        mod("training.batches"),
        mod("training.optim"),
    )
    reg, dist, models, fast = (
        mod("training.regularization"),
        mod("training.distributed"),
        mod("models"),
        mod("models.fast_training"),
    )
    cfg = config.TrainConfig(dataset="ml-100k", data_dir=data_dir, model=model, history_dropout=history_dropout)
    data = train.load_data(cfg)
    torch.manual_seed(cfg.seed)
    net = models.build_model(model, config.model_config(data, cfg.model_options)).train()
    forward = fast.training_form(net)
    optimisers = optim.build_optimisers(net, cfg)
    regs = reg.mba_terms(net, data.train, cfg.max_len, cfg.mba_lambda)
    samples = batches.TensorSamples(data.train, cfg.max_len)
    noise = torch.Generator().manual_seed(cfg.seed)
    parts = train.StepParts(
        forward, optimisers, [], regs, samples, None, None, noise, cfg, dist.Ranks(), torch.device("cpu")
    )
    return train._train_step, parts, dist.step_batches(samples.n, cfg.batch_size, cfg.seed, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", required=True, help="the other checkout (e.g. git archive of main into a folder)")
    p.add_argument("--data-dir", default="../shared/data/ml-100k")
    p.add_argument("--model", default="din", choices=["base", "din"], help="(DIEN's negatives are not drawn here)")
    p.add_argument("--history-dropout", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", type=int, default=20, help="blocks of 10 steps per side (the first 2 are warm-up)")
    p.add_argument("--out", type=Path, default=Path("runs/step_ab.json"))
    args = p.parse_args(argv)
    from training.train import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="step-ab-") as tmp:
        renamed_copy(Path(args.checkout), Path(tmp))
        sys.path.insert(0, tmp)
        sides = {
            "other": stepper("ab_", args.history_dropout, args.data_dir, args.model),
            "this": stepper("", args.history_dropout, args.data_dir, args.model),
        }
        cpu: dict[str, list[float]] = {name: [] for name in sides}
        wall: dict[str, list[float]] = {name: [] for name in sides}
        for block in range(args.blocks):
            order = list(sides.items()) if block % 2 == 0 else list(reversed(sides.items()))
            for name, (step, parts, steps) in order:
                start = (block * 10) % max(len(steps) - 10, 1)
                for rows in steps[start : start + 10]:
                    c0, w0 = time.thread_time(), time.perf_counter()
                    step(rows, parts)
                    if block >= 2:
                        cpu[name].append(time.thread_time() - c0)
                        wall[name].append(time.perf_counter() - w0)
    other, this = (1e3 * statistics.median(cpu[k]) for k in ("other", "this"))
    other_wall, this_wall = (1e3 * statistics.median(wall[k]) for k in ("other", "this"))
    result = {
        "checkout": args.checkout,
        "model": args.model,
        "history_dropout": args.history_dropout,
        "threads": args.threads,
        "steps_each": len(cpu["this"]),
        "other_step_cpu_ms_median": other,
        "this_step_cpu_ms_median": this,
        "speedup": other / this,
        "other_step_wall_ms_median": other_wall,
        "this_step_wall_ms_median": this_wall,
        "wall_speedup": other_wall / this_wall,
        "load_average": os.getloadavg(),
    }
    print(
        f"{args.model}, history dropout {args.history_dropout}, {args.threads} thread(s): "
        f"{args.checkout} {other:.2f} ms, this checkout {this:.2f} ms CPU per step "
        f"(median of {len(cpu['this'])}): ×{other / this:.3f} samples/s; wall {other_wall:.2f} vs {this_wall:.2f} ms: "
        f"×{other_wall / this_wall:.3f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
