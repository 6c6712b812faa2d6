"""DeepCTR-Torch's DIN trained and tested on our prepared split: the quality a user gets from the peer.

    python -m bench.peers_quality --dataset ml-100k --data-dir ../shared/data/ml-100k --seed 0 [--threads 1]

``bench.peers`` times the peer; this trains it to the end and scores the same test samples ``training.train``
scores (the split its ``--seed`` and flags prepare), with our metrics (training.metrics.evaluate: AUC, GAUC,
logloss, NDCG/Recall/Precision@K). The peer is DeepCTR-Torch's ``DIN`` as its examples/run_din.py builds it,
with its own training defaults (``compile("adam", "binary_crossentropy")``: lr 1e-3, L2 1e-6 on the
embeddings, Dice in attention, ReLU MLP), 3 epochs, and by default its own sizes (32-dim embeddings, MLP
256-128, attention 64-16; ``--sizes ours`` gives it ours, as ``bench.peers`` does). It sees what our models
see without history feedback: the candidate's item and category, each user feature, and the history's items
and categories. Prints one JSON line and writes
it to ``--out``.

DeepCTR-Torch is an optional extra: ``pip install -e '.[peers]'``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers import require_peer
from training.samples import SampleSet


def _inputs(split: SampleSet, max_len: int, n_user_features: int) -> dict[str, np.ndarray]:
    """DeepCTR-Torch's named inputs of every sample of a split (history right-padded, as it expects)."""
    rows = np.arange(len(split))
    items, cats, mask = split.history(rows, max_len)  # (N, L) each
    x = {
        "item": split.cand_item.astype(np.int64),
        "cat": split.cand_cat.astype(np.int64),
        "hist_item": items,
        "hist_cat": cats,
        "seq_length": mask.sum(axis=1),
    }
    for i in range(n_user_features):
        x[f"user_{i}"] = split.user_feats[:, i].astype(np.int64)
    return x


def peer_quality(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN

    from training.config import TrainConfig, model_config
    from training.metrics import evaluate
    from training.train import load_data

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        protocol=args.protocol,
        user_features=None if args.user_features is None else tuple(f for f in args.user_features.split(",") if f),
        max_len=args.max_len,
        seed=args.seed,
        cache_dir=args.cache_dir,
        synthetic=json.loads(args.synthetic) if args.synthetic else {},
    )
    data = load_data(cfg)
    mcfg = model_config(data, {})
    n_feats = len(mcfg.user_feature_cardinalities)
    if args.sizes == "ours":  # the sizes bench.peers times it with
        item_dim, cat_dim, user_dim = mcfg.item_dim, mcfg.category_dim, mcfg.user_dim
        widths: dict[str, Any] = {"dnn_hidden_units": mcfg.mlp_hidden, "att_hidden_size": mcfg.attention_hidden}
    else:  # DeepCTR-Torch's own: 32-dim embeddings everywhere, DIN's default widths (MLP 256-128, attention 64-16)
        item_dim = cat_dim = user_dim = 32
        widths = {}
    features: list[Any] = [
        SparseFeat("item", mcfg.n_items, embedding_dim=item_dim),
        SparseFeat("cat", mcfg.n_categories, embedding_dim=cat_dim),
    ]
    features += [
        SparseFeat(f"user_{i}", c, embedding_dim=user_dim) for i, c in enumerate(mcfg.user_feature_cardinalities)
    ]
    for name, size, dim in (("item", mcfg.n_items, item_dim), ("cat", mcfg.n_categories, cat_dim)):
        hist = SparseFeat(f"hist_{name}", size, dim, embedding_name=name)
        features.append(VarLenSparseFeat(hist, maxlen=cfg.max_len, length_name="seq_length"))
    model = DIN(features, ["item", "cat"], device="cpu", seed=args.seed, **widths)
    model.compile("adam", "binary_crossentropy")
    t0 = time.perf_counter()
    model.fit(
        _inputs(data.train, cfg.max_len, n_feats),
        data.train.label.astype(np.float32),
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
    )
    seconds = time.perf_counter() - t0
    prob = model.predict(_inputs(data.test, cfg.max_len, n_feats), batch_size=4096).reshape(-1)  # (N_test,)
    metrics = evaluate(data.test.user, data.test.label.astype(np.float64), prob.astype(np.float64))
    return {
        "dataset": args.dataset,
        "protocol": data.info.get("protocol", args.protocol),
        "seed": args.seed,
        "epochs": args.epochs,
        "sizes": args.sizes,
        "user_features": list(data.vocab.user_features),
        "train_samples": len(data.train),
        "test_samples": len(data.test),
        "train_seconds": seconds,
        "test": metrics,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["ml-100k", "synthetic"], default="ml-100k")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--protocol", choices=["din-movielens", "implicit"], default=None)
    p.add_argument("--user-features", default=None, help="as training.train's: comma-separated, '' for none")
    p.add_argument("--synthetic", default=None, help="SyntheticConfig overrides as JSON, e.g. '{\"n_users\": 3000}'")
    p.add_argument("--seed", type=int, default=0, help="the user split (and the peer's seed), as training.train's")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--sizes",
        choices=["ours", "deepctr"],
        default="deepctr",
        help="embedding sizes and layer widths: DeepCTR-Torch's defaults (32-dim embeddings), or ours (bench.peers)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--cache-dir", default=".cache/prepared", help="prepared-data cache training.train reads too")
    p.add_argument("--out", default="runs/peers-quality.json")
    args = p.parse_args(argv)
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())
    require_peer()
    result = peer_quality(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
