"""Tune a model's hyper-parameters on validation GAUC with Optuna, and write the best as a recipe.

    python -m training.tune --dataset ml-100k --data-dir ../shared/data/ml-100k --model din --trials 30 \\
        --out runs/tune-din [--jobs 2] [--recipe ml-100k]
    python -m training.train --recipe runs/tune-din/recipe.toml --data-dir ../shared/data/ml-100k --out runs/din

Every training flag (and ``--recipe``) sets the starting configuration; each trial changes only the searched
fields (``SEARCH_SPACE``). A trial trains with early stopping as ``training.train`` does and scores its best
validation GAUC; after each epoch it reports the validation GAUC to a median pruner, which stops trials that
trail the median of earlier trials at the same epoch. Sampling is TPE, seeded by ``--seed``.

A new study tuned from a recipe (``--recipe``) tries the recipe first: its searched values (a model option the
recipe leaves unset at ModelConfig's default) are the first trial, which runs to the end (it is within the
pruner's start-up trials). The study's best, and so ``recipe.toml``, is then never below the recipe on
validation GAUC with the same training flags; a value outside the space is left to the sampler.

The space (``SEARCH_SPACE``) brackets the ml-100k recipe and the defaults: lr log-uniform in [3e-4, 1e-2]
(recipe 3e-3, default 3e-3), MBA λ log-uniform in [1e-4, 1e-1] (default 0.1, recipe 1e-2), the weights'
average's decay among 0 (none), 0.99, 0.999 (default) and 0.9995, history dropout uniform in
[0, 0.8] (recipe 0.7), feedback dropout in [0, 0.5] (recipe 0.2; searched only with history feedback), MLP
dropout in [0, 0.5] (default 0); item and category embedding sizes 8–64 and 4–32 (defaults 32 and 16), the
MLP's and the attention's activation (Dice, PReLU, ReLU) and softmax attention or not (DIN and DIEN only).

The tuner reads the train and validation users only: the prepared test split is dropped as soon as the data
is loaded (``without_test``), and a trial's final evaluation runs on validation users.

DIR holds the study (``study.db``, SQLite: rerunning the command continues the study until ``--trials``
trials are complete or pruned), ``recipe.toml`` (the starting configuration with the best trial's values),
``trials.csv`` (one row per trial: its values, state, validation GAUC per epoch) and ``history.png`` (the
optimisation history). ``--jobs N`` runs N processes on the same study (each with its share of the cores);
with one job, a seed gives the same sequence of trials on every run.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import optuna
import tomli_w
from matplotlib.figure import Figure

from models.config import ModelConfig
from training.config import TrainConfig, add_train_arguments
from training.recipes import NOT_SETTINGS, config_from_command_line, load_recipe
from training.samples import PreparedData
from training.train import load_data, train

log = logging.getLogger(__name__)

STUDY_NAME = "tune"
STORAGE_NAME = "study.db"
RECIPE_NAME = "recipe.toml"
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


# The search space: a TrainConfig field (or ``model_options.X``, a ModelConfig field) → its distribution.
# Ranges bracket the values measured by hand (bench/README.md): ml-100k's recipe (lr 3e-3, history dropout 0.7,
# feedback dropout 0.2, softmax attention) and the defaults (lr 3e-3, 32/16-dim embeddings, Dice, λ 0.1, average 0.999).
SEARCH_SPACE: dict[str, optuna.distributions.BaseDistribution] = {
    "lr": optuna.distributions.FloatDistribution(3e-4, 1e-2, log=True),
    "history_dropout": optuna.distributions.FloatDistribution(0.0, 0.8),
    "feedback_dropout": optuna.distributions.FloatDistribution(0.0, 0.5),  # only with history feedback
    "mba_lambda": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
    # the weights' average (training/averaging.py): none, or over ≈ the last 100, 1,000 (default), 2,000 steps
    "ema_decay": optuna.distributions.CategoricalDistribution([0.0, 0.99, 0.999, 0.9995]),
    "model_options.item_dim": optuna.distributions.CategoricalDistribution([8, 16, 32, 64]),
    "model_options.category_dim": optuna.distributions.CategoricalDistribution([4, 8, 16, 32]),
    "model_options.dropout": optuna.distributions.FloatDistribution(0.0, 0.5),
    "model_options.mlp_activation": optuna.distributions.CategoricalDistribution(["dice", "prelu", "relu"]),
    "model_options.attention_softmax": optuna.distributions.CategoricalDistribution([False, True]),  # DIN, DIEN
    "model_options.attention_activation": optuna.distributions.CategoricalDistribution(["dice", "prelu", "relu"]),
}
ATTENTION_KEYS = frozenset({"model_options.attention_softmax", "model_options.attention_activation"})


def searched(cfg: TrainConfig) -> dict[str, optuna.distributions.BaseDistribution]:
    """The part of the space that changes this model: attention only where there is one, feedback dropout only
    where behaviours carry feedback."""
    space = dict(SEARCH_SPACE)
    if cfg.model == "base":
        space = {k: v for k, v in space.items() if k not in ATTENTION_KEYS}
    if not cfg.model_options.get("history_feedback", False):
        space.pop("feedback_dropout")
    return space


def with_values(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """``cfg`` with a trial's values (keys as in SEARCH_SPACE)."""
    top = {k: v for k, v in values.items() if "." not in k}
    options = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("model_options.")}
    return replace(cfg, **top, model_options={**cfg.model_options, **options})


def starting_values(cfg: TrainConfig) -> dict[str, Any]:
    """The searched values ``cfg`` trains with (a model option it leaves unset: ModelConfig's default), keeping
    only those inside their distribution: Optuna samples the rest."""
    model_defaults = {f.name: f.default for f in fields(ModelConfig) if f.default is not MISSING}
    values: dict[str, Any] = {}
    for name, dist in searched(cfg).items():
        if name.startswith("model_options."):
            option = name.split(".", 1)[1]
            value = cfg.model_options.get(option, model_defaults[option])
        else:
            value = getattr(cfg, name)
        if isinstance(dist, optuna.distributions.FloatDistribution):
            inside = isinstance(value, int | float) and dist.low <= value <= dist.high
        else:
            assert isinstance(dist, optuna.distributions.CategoricalDistribution)
            inside = value in dist.choices
        if inside:
            values[name] = value
    return values


def without_test(data: PreparedData) -> PreparedData:
    """The prepared data with its test split replaced by the validation split: training's last evaluation
    ("test") then scores validation users, and nothing downstream can reach a test user."""
    return PreparedData(data.train, data.valid, data.valid, data.vocab, dict(data.info))


@dataclass(frozen=True)
class Job:
    """What one tuning process needs (picklable: ``--jobs`` starts processes with spawn)."""

    cfg: TrainConfig
    out: Path
    trials: int  # this process's share
    seed: int  # the sampler's: the run's seed, plus the job's index when several share the study
    threads: int


def storage_url(out: Path) -> str:
    return f"sqlite:///{(out / STORAGE_NAME).resolve()}"


def open_study(out: Path, seed: int) -> optuna.Study:
    """The study in ``out`` (created on first use): TPE seeded, median pruning on validation GAUC per epoch.

    The sampler's seed also counts the trials the study already holds: a resumed study, re-seeded with the
    same seed, would otherwise draw its first trials' values again."""
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage_url(out),
        direction="maximize",
        # the first 4 trials run to the end; later ones stop after epoch 1+ when below that epoch's median
        pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1),
        load_if_exists=True,
    )
    held = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed + 100_003 * held, n_startup_trials=8)
    return study


def done(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE))


def suggest(trial: optuna.Trial, name: str, dist: optuna.distributions.BaseDistribution) -> Any:
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    assert isinstance(dist, optuna.distributions.CategoricalDistribution)
    return trial.suggest_categorical(name, dist.choices)


def objective(trial: optuna.Trial, job: Job, data: PreparedData) -> float:
    """Train one configuration; its best validation GAUC."""
    values = {name: suggest(trial, name, dist) for name, dist in searched(job.cfg).items()}
    run_dir = job.out / "trials" / str(trial.number)
    cfg = replace(with_values(job.cfg, values), out=str(run_dir), progress=False, threads=job.threads)

    def report(epoch: int, valid: dict[str, float]) -> None:
        trial.report(valid["gauc"], epoch)
        trial.set_user_attr(f"valid_gauc_{epoch}", valid["gauc"])  # the table shows each epoch's
        trial.set_user_attr(f"valid_auc_{epoch}", valid["auc"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation GAUC {valid['gauc']:.4f} at epoch {epoch}")

    try:
        result = train(cfg, data=data, on_epoch=report)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # a trial's checkpoint is not kept: the recipe reproduces it
    trial.set_user_attr("best_epoch", result.metrics["best_epoch"])
    return float(result.metrics["valid_gauc"])


def run_job(job: Job) -> None:
    """One process's share: ``job.trials`` trials on the shared study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = without_test(load_data(job.cfg))
    study = open_study(job.out, job.seed)
    study.optimize(lambda t: objective(t, job, data), n_trials=job.trials)


def tune(cfg: TrainConfig, out: Path, trials: int, jobs: int = 1) -> optuna.Study:
    """Run (or continue) the study in ``out`` to ``trials`` finished trials; write its recipe, table and plot."""
    if trials < 1 or jobs < 1:
        raise ValueError("--trials and --jobs must be at least 1")
    if cfg.ensemble > 1:  # its members train without the per-epoch report the pruner needs
        raise ValueError("tune single models (--ensemble 1), then train the tuned recipe with --ensemble N")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    load_data(cfg)  # prepare once (into the cache) before several processes would each prepare it
    # the study is created here, once, before several processes would race to create it
    study = open_study(out, cfg.seed)
    if cfg.recipe and not study.trials:
        # a new study's first trial is the recipe it starts from: its best is then never below the recipe's
        # validation GAUC (the first trial is within the pruner's start-up trials, so it runs to the end)
        study.enqueue_trial(starting_values(cfg))
    remaining = max(0, trials - done(study))
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // jobs)
    # each process its share of the remaining trials, and its own sampler seed (one seed would repeat values)
    shares = [remaining // jobs + (i < remaining % jobs) for i in range(jobs)]
    work = [Job(cfg, out, share, cfg.seed + i, threads) for i, share in enumerate(shares) if share]
    if len(work) == 1:
        run_job(work[0])
    elif work:
        with ProcessPoolExecutor(len(work), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(run_job, work))
    study = open_study(out, cfg.seed)
    write_outputs(study, cfg, out)
    return study


def write_outputs(study: optuna.Study, cfg: TrainConfig, out: Path) -> None:
    study.trials_dataframe().to_csv(out / "trials.csv", index=False)
    with warnings.catch_warnings():  # optuna marks its matplotlib plots experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name="validation GAUC")
    fig = cast(Figure, ax.figure)
    fig.savefig(out / "history.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        write_recipe(study, cfg, out / RECIPE_NAME)


# TrainConfig fields a recipe leaves to the command line: where things are and how this machine runs them
NOT_IN_RECIPE = NOT_SETTINGS | {"out", "data_dir", "download", "threads", "cache_dir", "progress", "device"}


def write_recipe(study: optuna.Study, cfg: TrainConfig, path: Path) -> None:
    """The starting configuration with the best trial's values, as a recipe ``training.train`` reads (checked
    by loading it back)."""
    best = study.best_trial
    tuned = with_values(cfg, best.params)
    default = TrainConfig()
    values: dict[str, Any] = {}
    for f in fields(TrainConfig):
        value = getattr(tuned, f.name)
        keep = f.name in ("dataset", "model", "model_options") or value != getattr(default, f.name)
        if f.name in NOT_IN_RECIPE or value is None or not keep:
            continue
        values[f.name] = list(value) if isinstance(value, tuple) else value
    values["model_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in tuned.model_options.items()}
    if cfg.dataset != "synthetic":
        values.pop("synthetic", None)
    finished = done(study)
    header = [
        f"# Tuned by training.tune: the best of {finished} finished trials ({len(study.trials)} in all) of the study",
        f"# in {path.parent / STORAGE_NAME}: trial {best.number}, validation GAUC {best.value:.4f}"
        f" (best epoch {best.user_attrs.get('best_epoch')}).",
        "# Searched: " + ", ".join(sorted(best.params)) + "; the rest is the configuration tuning started from.",
        "#",
        f"#   python -m training.train --recipe {path} --data-dir DATA --out runs/tuned",
        "",
    ]
    path.write_text("\n".join(header) + tomli_w.dumps(values))
    load_recipe(str(path))  # a recipe training.train would refuse is an error here, not later


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--model", choices=["base", "din", "dien"], default="din")
    p.add_argument("--trials", type=int, default=30, help="finished trials the study should hold (in all, resumed)")
    p.add_argument("--jobs", type=int, default=1, help="processes trying trials at once, on the same study")
    p.add_argument("--out", required=True, help="the study's folder: study.db, recipe.toml, trials.csv, history.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_command_line(p, args, argv, args.model, args.out)
    out = Path(args.out)
    study = tune(cfg, out, args.trials, args.jobs)
    best = study.best_trial
    print(f"best of {done(study)} trials: #{best.number}, validation GAUC {best.value:.4f}, {best.params}")
    print(f"→ {out / RECIPE_NAME}, {out / 'trials.csv'}, {out / 'history.png'}")


if __name__ == "__main__":
    main()
