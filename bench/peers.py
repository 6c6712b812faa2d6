"""Our DIN against DeepCTR-Torch's DIN, side by side: the same training samples, batch size and threads.

    python -m bench.peers --data-dir ../shared/data/ml-100k [--threads 2 --batch-size 256 --rounds 3]

Both sides train on our prepared training split (histories, candidates, labels: the din-movielens protocol
for ml-100k), one epoch each (or the same ``--max-steps``), each in its own process, run alternately
(ours first in even rounds, the peer first in odd ones) so a drift of the machine's speed falls on both.
Ours is ``training.train`` with its defaults (``train_samples_per_second`` of its metrics.json: the loop,
not data preparation or evaluation), except that it keeps every behaviour as the peer does: the default
``--ours-flags "--history-dropout 0"`` undoes the default history dropout (0.7 since issue 18), which would
let ours score 30% of the positions the peer scores; ``--ours-flags ""`` times the defaults as they are.
The peer is DeepCTR-Torch's ``DIN`` built as its examples/run_din.py
builds it (SparseFeat for the candidate's item and category and each user feature, VarLenSparseFeat for
the history sharing their embeddings, ``compile("adam", "binary_crossentropy")``), with our embedding
sizes and layer widths, timed over its ``fit``. Its activations stay its own (ReLU in the MLP, Dice in
attention): its MLP cannot take Dice on a 2-D input. Prints a table and writes JSON (``--out``).

DeepCTR-Torch is an optional extra: ``pip install -e '.[peers]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

PEER = "deepctr-torch"
MISSING = (
    "bench.peers: DeepCTR-Torch is not installed, and it is the peer this benchmark runs against; "
    "install the optional extra: .venv/bin/pip install -e '.[peers]'"
)


def require_peer() -> None:
    if find_spec("deepctr_torch") is None:
        raise SystemExit(MISSING)


def data_flags(args: argparse.Namespace) -> list[str]:
    """The flags that make both sides prepare (or read from the cache) the same split."""
    flags = ["--dataset", args.dataset, "--max-len", str(args.max_len), "--cache-dir", args.cache_dir]
    flags += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    if args.synthetic_users:
        flags += ["--synthetic-users", str(args.synthetic_users)]
    if args.max_steps:
        flags += ["--max-steps", str(args.max_steps)]
    return flags


def run_ours(args: argparse.Namespace, work: Path, tag: str) -> dict[str, Any]:
    out = work / f"ours-{tag}"
    cmd = [sys.executable, "-m", "training.train", *data_flags(args), "--model", "din", "--epochs", "1"]
    cmd += shlex.split(args.ours_flags)
    env = dict(os.environ)
    if args.checkout:  # another checkout's training.train (``-m`` imports from the working directory first)
        env["PYTHONPATH"] = args.checkout
    _run([*cmd, "--out", str(out), "--no-progress"], env, cwd=args.checkout)
    m = json.loads((out / "metrics.json").read_text())
    return {
        "samples_per_second": m["train_samples_per_second"],
        "steps": m["train_steps"],
        "split": m["samples"]["train"],
    }


def run_peer(args: argparse.Namespace, work: Path, tag: str) -> dict[str, Any]:
    result = work / f"peer-{tag}.json"
    cmd = [sys.executable, "-m", "bench.peers", "--peer-child", str(result), *data_flags(args)]
    # DeepCTR-Torch asks PyPI for its latest version at import, in a non-daemon thread with no timeout: a dead
    # proxy makes that fail at once instead of holding the process (or the network) during the timing
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    _run(cmd, env)
    out: dict[str, Any] = json.loads(result.read_text())
    return out


def _run(cmd: list[str], env: dict[str, str], cwd: str | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"bench.peers: {' '.join(cmd[1:4])} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def peer_child(args: argparse.Namespace) -> None:
    """In its own process: DeepCTR-Torch's DIN on our training split, its ``fit`` timed."""
    import numpy as np
    import torch
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN

    from training.config import TrainConfig, model_config
    from training.train import load_data

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        max_len=args.max_len,
        cache_dir=args.cache_dir,
        synthetic={"n_users": args.synthetic_users} if args.synthetic_users else {},
    )
    data = load_data(cfg)
    mcfg = model_config(data, {})
    train = data.train
    rows = np.arange(len(train))  # fit shuffles; with --max-steps, the first max_steps batches' worth of samples
    if args.max_steps:
        rows = rows[: args.max_steps * args.batch_size]
    items, cats, mask = train.history(rows, cfg.max_len)  # (N, L) each, right-padded as DeepCTR-Torch expects
    x = {
        "item": train.cand_item[rows],
        "cat": train.cand_cat[rows],
        "hist_item": items,
        "hist_cat": cats,
        "seq_length": mask.sum(axis=1),
    }
    features = [
        SparseFeat("item", mcfg.n_items, embedding_dim=mcfg.item_dim),
        SparseFeat("cat", mcfg.n_categories, embedding_dim=mcfg.category_dim),
    ]
    for i, cardinality in enumerate(mcfg.user_feature_cardinalities):
        x[f"user_{i}"] = train.user_feats[rows, i]
        features.append(SparseFeat(f"user_{i}", cardinality, embedding_dim=mcfg.user_dim))
    for name, dim in (("item", mcfg.item_dim), ("cat", mcfg.category_dim)):
        hist = SparseFeat(
            f"hist_{name}", features[0 if name == "item" else 1].vocabulary_size, dim, embedding_name=name
        )
        features.append(VarLenSparseFeat(hist, maxlen=cfg.max_len, length_name="seq_length"))
    model = DIN(
        features,
        ["item", "cat"],
        dnn_hidden_units=mcfg.mlp_hidden,
        att_hidden_size=mcfg.attention_hidden,
        device="cpu",
        seed=cfg.seed,
    )
    model.compile("adam", "binary_crossentropy")
    t0 = time.perf_counter()
    model.fit(x, train.label[rows], batch_size=args.batch_size, epochs=1, verbose=0)
    seconds = time.perf_counter() - t0
    steps = -(-len(rows) // args.batch_size)
    result = {"samples_per_second": len(rows) / seconds, "steps": steps, "split": len(train), "seconds": seconds}
    Path(args.peer_child).write_text(json.dumps(result))


def compare(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``args.rounds`` alternated rounds; medians of each side and of the per-round ratios, written to ``out``
    after every round (a run cut short keeps what it measured)."""
    rounds: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            sides = [("ours", run_ours), (PEER, run_peer)]
            if r % 2:
                sides.reverse()
            load_before = os.getloadavg()[0]
            row: dict[str, Any] = {name: run(args, work, str(r)) for name, run in sides}
            if (row["ours"]["split"], row["ours"]["steps"]) != (row[PEER]["split"], row[PEER]["steps"]):
                raise SystemExit(f"bench.peers: the two sides did not train on the same samples: {row}")
            row["ratio"] = row["ours"]["samples_per_second"] / row[PEER]["samples_per_second"]
            # the machine's 1-minute load average around the round: with more runnable threads than cores,
            # multi-threaded steps wait on preempted threads and the figures say more about the load
            row["load_average"] = [load_before, os.getloadavg()[0]]
            print(
                f"round {r + 1}/{args.rounds}: ours {row['ours']['samples_per_second']:,.0f}  "
                f"{PEER} {row[PEER]['samples_per_second']:,.0f} samples/s  ×{row['ratio']:.2f}  "
                f"(load {load_before:.1f} → {row['load_average'][1]:.1f})",
                flush=True,
            )
            rounds.append(row)
            result = summary(args, rounds)
            out.write_text(json.dumps(result, indent=2))
    return result


def summary(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "max_len": args.max_len,
        "max_steps": args.max_steps,
        "steps": rounds[0]["ours"]["steps"],
        "ours_checkout": args.checkout or "this one",
        "ours_flags": args.ours_flags,
        "cores": os.cpu_count(),
        "peer_version": _version("deepctr-torch"),
        "torch_version": _version("torch"),
        "ours_samples_per_second": statistics.median(r["ours"]["samples_per_second"] for r in rounds),
        "peer_samples_per_second": statistics.median(r[PEER]["samples_per_second"] for r in rounds),
        "ratio": statistics.median(r["ratio"] for r in rounds),
        "rounds": rounds,
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def table(result: dict[str, Any]) -> str:
    return (
        f"DIN training on {result['dataset']}, batch {result['batch_size']}, {result['threads']} threads, "
        f"{result['steps']} steps, median of {len(result['rounds'])} alternated rounds on {result['cores']} cores; "
        f"ours with `{result['ours_flags'] or 'its defaults'}`\n"
        "| implementation | train samples/s |\n| --- | --- |\n"
        f"| ours (training.train) | {result['ours_samples_per_second']:,.0f} |\n"
        f"| DeepCTR-Torch {result['peer_version']} | {result['peer_samples_per_second']:,.0f} |\n"
        f"| ratio (median of rounds) | ×{result['ratio']:.2f} |\n"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-100k", "synthetic"], default="ml-100k")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--synthetic-users", type=int, default=None, help="size of the synthetic log (tests)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--max-steps", type=int, default=None, help="both sides: this many steps, not one epoch")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds (each: one run of each side)")
    p.add_argument("--cache-dir", default=".cache/prepared", help="prepared-data cache both sides read")
    p.add_argument(
        "--checkout",
        default=None,
        help="time another checkout's training.train as ours (a branch extracted with git archive); its "
        "relative paths are its own",
    )
    p.add_argument(
        "--ours-flags",
        default="--history-dropout 0",
        help="extra training.train flags for ours (default: every behaviour kept, the peer's work)",
    )
    p.add_argument("--out", default="runs/peers.json")
    p.add_argument("--peer-child", help=argparse.SUPPRESS)  # internal: run the peer, write its result here
    args = p.parse_args(argv)
    if args.data_dir:  # the same log whichever directory a side runs in
        args.data_dir = str(Path(args.data_dir).resolve())
    require_peer()
    if args.peer_child:
        peer_child(args)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(table(compare(args, out)) + f"→ {out}")


if __name__ == "__main__":
    main()
