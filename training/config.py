"""A training run's configuration: the TrainConfig dataclass, its command-line flags (shared by
``training.train`` and ``training.compare``), and the model configuration a run derives from its data."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from models import ModelConfig
from training.datasets import SyntheticConfig
from training.samples import PreparedData


@dataclass
class TrainConfig:
    dataset: str = "synthetic"
    data_dir: str | None = None
    download: bool = False
    protocol: str | None = None  # None: din-movielens for labelled logs, implicit otherwise
    user_features: tuple[str, ...] | None = None  # None: every user feature the log has
    model: str = "din"
    out: str = "runs/din"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    max_len: int = 50
    seed: int = 0
    mba_lambda: float = 0.01  # mini-batch aware L2 strength; 0 disables it
    aux_weight: float = 1.0  # DIEN auxiliary loss weight
    history_dropout: float = 0.0  # drop each history position with this probability while training
    feedback_dropout: float = 0.0  # training: a kept behaviour's feedback becomes "unknown" with this probability
    paper_form: bool = False  # train the paper form itself, not its training-speed form (models/fast_training.py)
    patience: int = 2  # epochs without a better validation GAUC before stopping
    max_steps: int | None = None  # stop after this many optimiser steps in all (a timing or smoke run), then test
    eval_batch_size: int = 4096
    min_count: int = 1  # items seen fewer times in the training events map to the OOV index
    eval_users: int | None = None  # validate and test on this many seeded-random users of each split
    threads: int | None = None
    cache_dir: str | None = ".cache/prepared"
    progress: bool = True
    model_options: dict[str, Any] = field(default_factory=dict)  # overrides of ModelConfig fields
    synthetic: dict[str, Any] = field(default_factory=dict)  # overrides of SyntheticConfig fields

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if d.get("user_features") is not None:
            d["user_features"] = tuple(d["user_features"])
        return cls(**d)


def model_config(data: PreparedData, options: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        n_items=data.vocab.n_items,
        n_categories=data.vocab.n_categories,
        user_feature_cardinalities=data.vocab.feature_cardinalities,
        **options,
    )


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--dataset", choices=["ml-100k", "ml-latest", "events", "synthetic"], default=d.dataset)
    p.add_argument("--data-dir", default=None, help="folder (or file, for events) holding the log")
    p.add_argument("--download", action="store_true", help="fetch ml-100k from GroupLens into --data-dir")
    p.add_argument("--protocol", choices=["din-movielens", "implicit"], default=None)
    p.add_argument(
        "--user-features",
        default=None,
        help="comma-separated user features to use (default: all the log has; '' for none)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mba-lambda", type=float, default=d.mba_lambda, help="mini-batch aware L2; 0 = off")
    p.add_argument("--aux-weight", type=float, default=d.aux_weight)
    p.add_argument(
        "--history-dropout",
        type=float,
        default=d.history_dropout,
        help="training only: drop each history position with this probability",
    )
    p.add_argument(
        "--feedback-dropout",
        type=float,
        default=d.feedback_dropout,
        help="training only: make a kept behaviour's feedback 'unknown' with this probability",
    )
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument(
        "--max-steps",
        type=int,
        default=d.max_steps,
        help="stop after this many optimiser steps in all, whatever --epochs says (timings, smoke runs)",
    )
    p.add_argument(
        "--paper-form",
        action="store_true",
        help="train the paper form itself (slower; the default trains its training-speed form)",
    )
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--attention-softmax", action="store_true", help="DIN: normalise attention weights")
    p.add_argument("--mlp-activation", choices=["dice", "prelu", "relu"], default="dice")
    p.add_argument("--evolution", choices=["augru", "agru", "aigru"], default="augru")
    p.add_argument(
        "--dien-pooling",
        choices=["sum", "attention"],
        default="sum",
        help="DIEN: sum of behaviours (paper) or attention-weighted, beside the final interest",
    )
    p.add_argument(
        "--history-feedback",
        action="store_true",
        help="each history behaviour carries its own label (liked or not) as an embedding",
    )
    p.add_argument("--item-dim", type=int, default=ModelConfig.item_dim)
    p.add_argument("--category-dim", type=int, default=ModelConfig.category_dim)
    p.add_argument(
        "--min-count",
        type=int,
        default=d.min_count,
        help="items seen fewer times in the training events map to the out-of-vocabulary index",
    )
    p.add_argument(
        "--eval-users",
        type=int,
        default=d.eval_users,
        help="validate and test on the samples of this many seeded-random users (big logs; default: all)",
    )
    p.add_argument("--synthetic-users", type=int, default=SyntheticConfig.n_users, help="size of the synthetic log")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--cache-dir", default=d.cache_dir, help="prepared-data cache ('' to disable)")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace, model: str, out: str) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        protocol=args.protocol,
        user_features=None if args.user_features is None else tuple(f for f in args.user_features.split(",") if f),
        model=model,
        out=out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_len=args.max_len,
        seed=args.seed,
        mba_lambda=args.mba_lambda,
        aux_weight=args.aux_weight,
        history_dropout=args.history_dropout,
        feedback_dropout=args.feedback_dropout,
        paper_form=args.paper_form,
        patience=args.patience,
        max_steps=args.max_steps,
        threads=args.threads,
        min_count=args.min_count,
        eval_users=args.eval_users,
        cache_dir=args.cache_dir or None,
        progress=not args.no_progress,
        synthetic={"n_users": args.synthetic_users} if args.dataset == "synthetic" else {},
        model_options={
            "dropout": args.dropout,
            "attention_softmax": args.attention_softmax,
            "mlp_activation": args.mlp_activation,
            "evolution": args.evolution,
            "dien_pooling": args.dien_pooling,
            "history_feedback": args.history_feedback,
            "item_dim": args.item_dim,
            "category_dim": args.category_dim,
        },
    )
