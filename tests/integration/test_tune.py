"""training.tune: Optuna on validation GAUC, never on test users; seeded, resumable, and its recipe trains."""

from __future__ import annotations

import json
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest

import training.tune as tune_module
from training.config import TrainConfig
from training.samples import PreparedData
from training.train import load_data
from training.train import main as train_main
from training.tune import main as tune_main

# a tiny log, one short epoch per trial: the tests check the tuner's behaviour, not the models
TINY = ["--dataset", "synthetic", "--synthetic-users", "120", "--max-len", "6", "--epochs", "1", "--threads", "1"]


class PoisonedSplit:
    """Stands in for the test split: any read of it fails the run that made it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the tuner read the test split ({name})")

    def __len__(self) -> int:
        raise AssertionError("the tuner read the test split (len)")


def test_tuning_never_reads_the_test_split_and_its_recipe_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load_without_test(cfg: TrainConfig) -> PreparedData:
        data = load_data(cfg)
        return PreparedData(data.train, data.valid, PoisonedSplit(), data.vocab, data.info)  # type: ignore[arg-type]

    monkeypatch.setattr(tune_module, "load_data", load_without_test)
    out = tmp_path / "tune"
    tune_main([*TINY, "--cache-dir", str(tmp_path / "cache"), "--model", "din", "--trials", "2", "--out", str(out)])

    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(list(t.intermediate_values) == [1] for t in study.trials)  # validation GAUC reported per epoch
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 2 and {"value", "params_lr", "user_attrs_valid_gauc_1"} <= set(table.columns)
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "trials").exists() or not any((out / "trials").iterdir())  # trial runs are not kept

    # the recipe holds the best trial's values, and training.train takes it as any recipe
    run = tmp_path / "run"
    train_main(["--recipe", str(out / "recipe.toml"), "--cache-dir", str(tmp_path / "cache"), "--out", str(run)])
    config = json.loads((run / "metrics.json").read_text())["config"]
    best = study.best_trial.params
    assert config["lr"] == best["lr"] and config["history_dropout"] == best["history_dropout"]
    assert config["model_options"]["item_dim"] == best["model_options.item_dim"]
    assert (config["synthetic"], config["max_len"]) == ({"n_users": 120}, 6)


def params(out: Path) -> list[dict[str, Any]]:
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")
    return [t.params for t in sorted(study.trials, key=lambda t: t.number)]


def test_tuning_is_reproducible_with_a_seed_and_resumes_its_study(tmp_path: Path) -> None:
    common = [*TINY, "--max-steps", "2", "--cache-dir", str(tmp_path / "cache"), "--seed", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    tune_main([*common, "--trials", "2", "--out", str(a)])
    tune_main([*common, "--trials", "2", "--out", str(b)])
    first = params(a)
    assert len(first) == 2 and first == params(b)  # the same sequence of values
    assert first[0] != first[1]

    tune_main([*common, "--trials", "3", "--out", str(a)])  # rerun with more trials: continues the study
    resumed = params(a)
    assert len(resumed) == 3 and resumed[:2] == first
    assert resumed[2] not in first  # a resumed sampler does not draw the first trials' values again


def test_two_processes_share_one_study(tmp_path: Path) -> None:
    """--jobs 2: two spawned processes, each with its share of the trials and its own sampler seed."""
    out = tmp_path / "jobs"
    common = [*TINY, "--max-steps", "2", "--cache-dir", str(tmp_path / "cache")]
    try:
        tune_main([*common, "--trials", "3", "--jobs", "2", "--out", str(out)])
    finally:
        # spawning starts multiprocessing's resource tracker, which lives as long as the process that started
        # it: the command's ends with it, this test's process (pytest) would keep it running
        resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]
    trials = params(out)
    assert len(trials) == 3 and len({json.dumps(t, sort_keys=True) for t in trials}) == 3
    assert (out / "recipe.toml").is_file()


def test_a_study_from_a_recipe_tries_the_recipe_first_and_only_once(tmp_path: Path) -> None:
    """The recipe's own values are the first trial (so the study's best is never below the recipe's validation
    GAUC); a value outside the space (item_dim 24) is the sampler's to choose; a resumed study does not try the
    recipe again."""
    recipe = tmp_path / "start.toml"
    recipe.write_text(
        'dataset = "synthetic"\nlr = 0.002\nhistory_dropout = 0.3\n\n[model_options]\nitem_dim = 24\n'
        'attention_softmax = true\nmlp_activation = "relu"\n'
    )
    out = tmp_path / "tune"
    common = [*TINY, "--max-steps", "2", "--cache-dir", str(tmp_path / "cache"), "--recipe", str(recipe)]
    tune_main([*common, "--trials", "2", "--out", str(out)])
    first = params(out)[0]
    assert (first["lr"], first["history_dropout"], first["model_options.category_dim"]) == (0.002, 0.3, 16)
    assert (first["model_options.attention_softmax"], first["model_options.mlp_activation"]) == (True, "relu")
    assert first["model_options.item_dim"] in (8, 16, 32, 64)  # sampled: 24 lies outside the space

    tune_main([*common, "--trials", "4", "--out", str(out)])
    resumed = params(out)
    assert len(resumed) == 4 and resumed[0] == first
    assert all(trial["lr"] != 0.002 for trial in resumed[1:])
