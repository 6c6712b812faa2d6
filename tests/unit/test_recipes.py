"""Recipes: loading, checking against the config dataclasses, and flags given overriding the file."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest

from models import ModelConfig
from training.config import (
    FLAG_FIELDS,
    CompareConfig,
    TrainConfig,
    add_train_arguments,
    config_from_args,
    field_of_flag,
    given_flags,
)
from training.datasets import SyntheticConfig
from training.recipes import RECIPES_DIR, RecipeError, apply_recipe, load_recipe, resolve_compare


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    p.add_argument("--model", default="din")
    p.add_argument("--out")
    return p


def _resolve(recipe: str, argv: list[str]) -> TrainConfig:
    p = _parser()
    args = p.parse_args(["--recipe", recipe, *argv])
    return apply_recipe(config_from_args(args, args.model, args.out or ""), load_recipe(recipe), given_flags(p, argv))


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return str(path)


# training.train's defaults before issue 18 chose new ones by evidence, as flags: a shipped recipe pins each of
# them that it does not set itself, so the results measured with it stand
BEFORE_ISSUE_18 = ["--lr", "1e-3", "--history-dropout", "0", "--user-feature-dropout", "0", "--no-attention-softmax"]
# and those issue 18's second look changed (bench/README.md, "Issue 18: the weights' average")
BEFORE_ISSUE_18 += ["--ema-decay", "0", "--mba-lambda", "0.01"]


def test_the_ml100k_recipe_is_the_flags_the_makefile_spelled_out() -> None:
    recipe = load_recipe("ml-100k")  # by name: training/recipes/ml-100k.toml
    assert recipe.path == (RECIPES_DIR / "ml-100k.toml").resolve()
    assert recipe.sha256 == hashlib.sha256(recipe.path.read_bytes()).hexdigest()
    p = _parser()
    # what `make compare-ml100k` passed before the recipe existed
    old = "--dataset ml-100k --user-features= --history-dropout 0.7 --attention-softmax --dien-pooling attention"
    flags = [*old.split(), "--history-feedback", "--feedback-dropout", "0.2", "--lr", "3e-3"]
    flags.append("--session-chunks")  # DSIN's division of ml-100k's long rating bursts, added since (issue 17)
    flags += ["--patience", "4"]  # since issue 18: DIN's feedback gain outlasts a noisy validation GAUC
    flags += ["--user-feature-dropout", "0"]  # the default then (no option yet), which the recipe pins
    flags += ["--ema-decay", "0", "--mba-lambda", "0.01"]  # the defaults then, which the recipe pins
    by_flags = config_from_args(p.parse_args(flags), "din", "runs/x")
    by_recipe = _resolve("ml-100k", ["--out", "runs/x"])
    assert by_recipe.recipe == recipe.source()
    assert by_recipe == TrainConfig.from_dict({**asdict(by_flags), "recipe": recipe.source()})
    assert by_recipe.user_features == ()
    assert recipe.compare == {"models": ("base", "din", "dien"), "splits": 3}


def test_the_demo_recipe_trains_what_make_demo_trained_from_flags() -> None:
    p = _parser()
    flags = ["--dataset", "synthetic", "--epochs", "3", *BEFORE_ISSUE_18]
    by_flags = config_from_args(p.parse_args(flags), "din", "runs/demo")
    by_recipe = _resolve("demo", ["--out", "runs/demo"])
    assert SyntheticConfig(**by_recipe.synthetic) == SyntheticConfig(**by_flags.synthetic)  # the same log
    assert replace(by_recipe, synthetic=by_flags.synthetic, recipe={}) == by_flags


def test_the_sessions_recipe_trains_with_the_defaults_it_was_measured_with() -> None:
    p = _parser()
    flags = ["--dataset", "synthetic", "--epochs", "4", "--max-len", "50", *BEFORE_ISSUE_18]
    flags += ["--synthetic-session-events", "8", "--synthetic-users", "1500"]
    by_flags = config_from_args(p.parse_args(flags), "din", "runs/s")
    by_recipe = _resolve("synthetic-sessions", ["--out", "runs/s"])
    assert replace(by_recipe, synthetic=by_flags.synthetic, recipe={}) == by_flags
    assert by_recipe.synthetic == {"n_users": 1500, "n_items": 300, "session_events": 8}


def test_flags_given_override_the_recipe_and_defaults_fill_the_rest(tmp_path: Path) -> None:
    recipe = _write(
        tmp_path,
        'dataset = "ml-100k"\nlr = 0.01\nepochs = 4\nhistory_dropout = 0.5\nout = "runs/r"\n'
        "[model_options]\nattention_softmax = true\nitem_dim = 8\nmlp_hidden = [16, 8]\n",
    )
    # a flag given at its default value still wins: "given" is what the command line said, not a changed value
    cfg = _resolve(recipe, ["--lr", "0.001", "--history-dropout", "0", "--item-dim", "32", "--model", "dien"])
    assert (cfg.lr, cfg.history_dropout, cfg.model_options["item_dim"], cfg.model) == (0.001, 0.0, 32, "dien")
    assert (cfg.dataset, cfg.epochs, cfg.out) == ("ml-100k", 4, "runs/r")  # from the recipe
    assert cfg.model_options["attention_softmax"] is True and cfg.model_options["mlp_hidden"] == (16, 8)
    assert (cfg.batch_size, cfg.mba_lambda) == (TrainConfig.batch_size, TrainConfig.mba_lambda)  # defaults
    assert cfg.synthetic == {}  # the synthetic log's settings do not follow a run on ml-100k
    assert _resolve(recipe, ["--no-attention-softmax"]).model_options["attention_softmax"] is False


def test_the_synthetic_table_and_its_flag(tmp_path: Path) -> None:
    recipe = _write(tmp_path, "[synthetic]\nn_users = 300\nn_items = 50\n")
    assert _resolve(recipe, []).synthetic == {"n_users": 300, "n_items": 50}
    assert _resolve(recipe, ["--synthetic-users", "70"]).synthetic == {"n_users": 70, "n_items": 50}
    assert _resolve(recipe, ["--no-progress"]).progress is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch = 3\n", "unknown key 'epoch'; valid keys: accumulate, aux_weight, batch_size,"),
        ("[model_options]\nhidden = [1]\n", "in [model_options]; valid keys: attention, attention_activation,"),
        ("[model_options]\nn_items = 5\n", "unknown key 'n_items' in [model_options]"),  # from the data, not a recipe
        ("[synthetic]\nusers = 5\n", "unknown key 'users' in [synthetic]; valid keys: interests_per_user,"),
        ("[compare]\nmodel = 'din'\n", "unknown key 'model' in [compare]; valid keys: models, repeats, splits"),
        ('recipe = "x"\n', "unknown key 'recipe'"),  # provenance, written by the run
        ('epochs = "3"\n', "epochs = '3': expected int"),
        ("epochs = true\n", "epochs = True: expected int"),
        ("lr = 1\n[model_options]\nevolution = 'gru'\n", "model_options.evolution = 'gru': expected one of 'augru'"),
        ("user_features = [1]\n", "user_features = [1]: expected list of str"),
        ("model_options = 3\n", "'model_options' must be a table"),
        ("epochs = \n", "not valid TOML"),
    ],
)
def test_a_bad_recipe_says_which_key_and_what_is_valid(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=r"r\.toml") as e:
        load_recipe(_write(tmp_path, text))
    assert message in str(e.value)


def test_an_unknown_recipe_name_lists_the_shipped_ones() -> None:
    with pytest.raises(RecipeError, match=r"no recipe 'ml-1m'.*demo, ml-100k"):
        load_recipe("ml-1m")


def test_every_shipped_recipe_loads() -> None:
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))
    assert {"ml-100k", "demo"} <= set(names)
    for name in names:
        assert load_recipe(name).values


def test_every_flag_names_the_field_it_sets() -> None:
    """A flag whose dest is neither a TrainConfig nor a ModelConfig field, nor in FLAG_FIELDS, could not be
    told apart when it overrides a recipe: a new flag must follow the naming or be listed."""
    p = _parser()
    train_fields = {f.name for f in fields(TrainConfig)}
    model_fields = {f"model_options.{f.name}" for f in fields(ModelConfig)}
    for dest in vars(p.parse_args([])):
        if dest == "recipe":
            continue
        target = field_of_flag(dest)
        assert target in train_fields | model_fields | set(FLAG_FIELDS.values()), dest


def test_compare_settings_come_from_the_recipe_unless_given(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, '[compare]\nmodels = ["base", "din"]\nsplits = 3\nrepeats = 2\n'))
    flags = CompareConfig(models=("din",), repeats=1, splits=1)
    assert resolve_compare(flags, recipe, {"splits"}) == CompareConfig(("base", "din"), 2, 1)
    assert resolve_compare(flags, None, set()) == flags


def test_prepare_reads_the_recipe_as_training_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """training.prepare fills the cache a run will look up: the recipe's data settings must reach it."""
    from training import prepare

    recipe = _write(tmp_path, 'dataset = "synthetic"\nmax_len = 7\n[synthetic]\nn_users = 60\n')
    prepare.main(["--recipe", recipe, "--cache-dir", str(tmp_path / "cache")])
    summary = json.loads(capsys.readouterr().out)
    assert summary["max_len"] == 7 and summary["dataset"] == "synthetic"
