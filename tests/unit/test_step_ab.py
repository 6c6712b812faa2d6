"""bench.step_ab: another checkout's packages importable beside this one's."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from bench.step_ab import renamed_copy


def test_the_other_checkout_is_imported_under_its_own_names(tmp_path: Path) -> None:
    checkout, into = tmp_path / "other", tmp_path / "renamed"
    (checkout / "models").mkdir(parents=True)
    (checkout / "training").mkdir()
    (checkout / "models" / "__init__.py").write_text("from models.base import WHO\n")
    (checkout / "models" / "base.py").write_text("WHO = 'other models'\n")
    (checkout / "training" / "__init__.py").write_text("")
    (checkout / "training" / "train.py").write_text(
        "import models\nfrom models import base\nfrom training import __name__ as package  # a comment on training\n"
        "WHO = models.WHO + ' via ' + base.__name__ + ' in ' + package\n"
    )
    into.mkdir()
    renamed_copy(checkout, into)
    sys.path.insert(0, str(into))
    try:
        train = importlib.import_module("ab_training.train")
    finally:
        sys.path.remove(str(into))
    assert train.WHO == "other models via ab_models.base in ab_training"
    assert importlib.import_module("models").__file__ != sys.modules["ab_models"].__file__  # this checkout's untouched
