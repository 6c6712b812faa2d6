"""Recipes: a run's settings as a TOML file, checked against the configuration dataclasses.

A recipe's top-level keys are TrainConfig's fields; its ``[model_options]`` table holds ModelConfig's
hyper-parameters, ``[synthetic]`` SyntheticConfig's fields and ``[compare]`` training.compare's own settings
(CompareConfig). The valid keys come from the dataclasses themselves, so a field added to one of them is a
recipe key at once. A run records the recipe it used (name, path, sha256 of the file) and the resolved config.

    python -m training.train --recipe ml-100k --data-dir ../shared/data/ml-100k --out runs/din
    python -m training.compare --recipe training/recipes/ml-100k.toml --data-dir ... --splits 1 --out runs/c
"""

from __future__ import annotations

import argparse
import hashlib
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from models import ModelConfig
from training.config import CompareConfig, TrainConfig, config_from_args, field_of_flag, given_flags
from training.datasets import SyntheticConfig

RECIPES_DIR = Path(__file__).parent / "recipes"

# the tables of a recipe: the dataclass whose fields are its keys, less those a run derives from its data
TABLES: dict[str, tuple[type, frozenset[str]]] = {
    "model_options": (ModelConfig, frozenset({"n_items", "n_categories", "user_feature_cardinalities"})),
    "synthetic": (SyntheticConfig, frozenset()),
    "compare": (CompareConfig, frozenset()),
}
NOT_SETTINGS = frozenset({"recipe", "resume"})  # TrainConfig fields a recipe cannot set (provenance; --resume)


class RecipeError(ValueError):
    """A recipe that cannot be found, parsed or checked; the message says which file and key."""


@dataclass(frozen=True)
class Recipe:
    name: str  # the file's stem
    path: Path
    sha256: str  # of the file's bytes: two runs with the same hash used the same recipe
    values: dict[str, Any]  # checked; tables as dicts

    def source(self) -> dict[str, str]:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256}

    @property
    def compare(self) -> dict[str, Any]:
        return dict(self.values.get("compare", {}))


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def find_recipe(name_or_path: str) -> Path:
    """A path to an existing file, else the name of a recipe in training/recipes/ (``ml-100k``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.name == name_or_path and path.suffix != ".toml":  # a bare name: look among the shipped recipes
        shipped = RECIPES_DIR / f"{name_or_path}.toml"
        if shipped.is_file():
            return shipped
    shipped_names = ", ".join(available())
    raise RecipeError(f"no recipe {name_or_path!r}: not a file, nor one of training/recipes/ ({shipped_names})")


def load_recipe(name_or_path: str) -> Recipe:
    path = find_recipe(name_or_path)
    raw = path.read_bytes()
    try:
        values = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from e
    return Recipe(path.stem, path.resolve(), hashlib.sha256(raw).hexdigest(), check(values, where=str(path)))


def _keys(cls: type, exclude: frozenset[str]) -> dict[str, Any]:
    """A dataclass's settable fields and their types."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.name not in exclude}


def check(values: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    """The recipe's values, checked against TrainConfig (and each table against its dataclass): an unknown
    key or a value of the wrong type is a RecipeError naming it (and, for a key, the valid ones)."""
    top = _keys(TrainConfig, NOT_SETTINGS)
    top.update({name: dict for name in TABLES if name not in top})  # [compare] is not a TrainConfig field
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in top:
            raise RecipeError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(top))}")
        if key in TABLES:
            if not isinstance(value, dict):
                raise RecipeError(f"{where}: {key!r} must be a table ([{key}])")
            cls, exclude = TABLES[key]
            keys = _keys(cls, exclude)
            table = {}
            for sub, v in value.items():
                if sub not in keys:
                    raise RecipeError(f"{where}: unknown key {sub!r} in [{key}]; valid keys: {', '.join(sorted(keys))}")
                table[sub] = _checked(f"{key}.{sub}", v, keys[sub], where)
            out[key] = table
        else:
            out[key] = _checked(key, value, top[key], where)
    return out


def _checked(key: str, value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field's type wants it (TOML arrays become tuples), or a RecipeError."""
    if _fits(value, hint):
        return tuple(value) if isinstance(value, list) else value
    raise RecipeError(f"{where}: {key} = {value!r}: expected {_describe(hint)}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args if a is not type(None))  # TOML has no null: omit the key
    if origin is typing.Literal:
        return value in args
    if origin is tuple:  # tuple[X, ...]
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"list of {_describe(args[0])}"
    return getattr(hint, "__name__", str(hint))


def apply_recipe(cfg: TrainConfig, recipe: Recipe, given: set[str]) -> TrainConfig:
    """``cfg`` (built from the flags and their defaults) with the recipe's values wherever no flag given on
    the command line set that field: flags given > recipe > defaults."""
    overridden = {field_of_flag(dest) for dest in given}
    d = asdict(cfg)
    for key, value in recipe.values.items():
        if key == "compare":
            continue
        if key in TABLES:
            d[key].update({sub: v for sub, v in value.items() if f"{key}.{sub}" not in overridden})
        elif key not in overridden:
            d[key] = value
    if d["dataset"] != "synthetic":  # as the flags do: the generator's settings belong to the synthetic log only
        d["synthetic"] = {}
    d["recipe"] = recipe.source()
    return TrainConfig.from_dict(d)


def resolve_compare(flags: CompareConfig, recipe: Recipe | None, given: set[str]) -> CompareConfig:
    """training.compare's settings: flags given > the recipe's [compare] table > defaults."""
    d = asdict(flags)
    if recipe is not None:
        d.update({k: v for k, v in recipe.compare.items() if k not in given})
    return CompareConfig(**d)


def recipe_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> Recipe | None:
    """The recipe ``--recipe`` names (None without one); a bad one ends the command with its message."""
    if args.recipe is None:
        return None
    try:
        return load_recipe(args.recipe)
    except RecipeError as e:
        p.error(str(e))


def config_from_command_line(
    p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None, model: str, out: str
) -> TrainConfig:
    """The run's TrainConfig from a parsed command line: its flags, under them the ``--recipe`` (if any),
    under both the defaults."""
    cfg = config_from_args(args, model, out)
    recipe = recipe_from_args(p, args)
    return cfg if recipe is None else apply_recipe(cfg, recipe, given_flags(p, argv))
