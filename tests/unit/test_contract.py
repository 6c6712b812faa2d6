"""The contract between export and serving (contract.py): defined once, written by the export into each
version's metadata.json, read back by the service, defaults for versions exported before it was written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import contract
from app.scorer import LoadedModel
from contract import Contract

ROOT = Path(__file__).resolve().parents[2]


def test_the_service_imports_no_torch() -> None:
    """The serving image has no torch: neither the contract nor the app may import it."""
    code = "import sys, contract, app.main, app.scorer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_models_and_export_use_the_contracts_values() -> None:
    from models.config import FEEDBACK_NEGATIVE, FEEDBACK_POSITIVE, FEEDBACK_UNKNOWN
    from models.serving import INPUT_NAMES, OUTPUT_NAMES, input_names
    from training.samples import OOV, PAD

    assert INPUT_NAMES is contract.INPUT_NAMES and OUTPUT_NAMES is contract.OUTPUT_NAMES
    assert input_names(True) == (*contract.INPUT_NAMES, contract.FEEDBACK_INPUT)
    assert (FEEDBACK_UNKNOWN, FEEDBACK_NEGATIVE, FEEDBACK_POSITIVE) == (1, 2, 3) and (PAD, OOV) == (0, 1)


def test_an_old_metadata_gets_the_defaults() -> None:
    assert Contract.from_metadata({"name": "din", "version": 1}) == Contract()
    c = Contract()
    assert (c.feedback_of(None), c.feedback_of(0), c.feedback_of(1)) == (1, 2, 3)


def test_what_a_metadata_states_wins() -> None:
    meta = {
        "inputs": [{"name": n} for n in ("a", "b", "c", "d", "e", "f", "g", "fb")],
        "outputs": [{"name": "p"}, {"name": "att"}],
        "history_feedback": {"input": "fb", "values": {"padding": 0, "unknown": 7, "negative": 8, "positive": 9}},
        "vocabulary": {"pad_index": 0, "oov_index": 5, "first_index": 6},
    }
    c = Contract.from_metadata(meta)
    assert c.inputs == ("a", "b", "c", "d", "e", "f", "g") and c.feedback_input == "fb" and c.outputs == ("p", "att")
    assert (c.oov, c.first_index) == (5, 6)
    assert (c.feedback_of(None), c.feedback_of(0), c.feedback_of(1)) == (7, 8, 9)


def _copy(
    model_repository: Path, tmp_path: Path, edit: dict[str, object] | None = None, drop: tuple[str, ...] = ()
) -> Path:
    folder = tmp_path / "din" / "1"
    shutil.copytree(model_repository / "repo" / "din" / "1", folder)
    meta = json.loads((folder / "metadata.json").read_text())
    for key in drop:
        meta.pop(key)
    for key, value in (edit or {}).items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_the_export_writes_the_contract(model_repository: Path) -> None:
    meta = json.loads((model_repository / "repo" / "din" / "1" / "metadata.json").read_text())
    assert [i["name"] for i in meta["inputs"]] == list(contract.INPUT_NAMES)
    assert [o["name"] for o in meta["outputs"]] == list(contract.OUTPUT_NAMES)
    assert meta["history_feedback"]["values"] == contract.FEEDBACK_VALUES
    assert {k: meta["vocabulary"][k] for k in contract.VOCABULARY_INDICES} == contract.VOCABULARY_INDICES
    assert Contract.from_metadata(meta) == Contract()


def test_a_version_without_the_contract_in_its_metadata_scores_the_same(model_repository: Path, tmp_path: Path) -> None:
    current = LoadedModel(model_repository / "repo" / "din" / "1")
    old = LoadedModel(_copy(model_repository, tmp_path, drop=("inputs", "outputs", "history_feedback")))
    vocab = json.loads((model_repository / "repo" / "din" / "1" / "vocab.json").read_text())
    history = [(i, None, None) for i in vocab["items"][:8]] + [("never-seen", None, None)]
    candidates = [(i, None) for i in vocab["items"][10:30]]
    ((p_old, a_old),) = old.run([old.encode(history, None, candidates)])
    ((p_new, a_new),) = current.run([current.encode(history, None, candidates)])
    np.testing.assert_array_equal(p_old, p_new)
    np.testing.assert_array_equal(a_old, a_new)


def test_the_service_reads_the_indices_from_the_metadata(model_repository: Path, tmp_path: Path) -> None:
    """The vocabulary's reserved indices come from the version, not from the service's code."""
    vocab = json.loads((model_repository / "repo" / "din" / "1" / "vocab.json").read_text())
    indices = {"vocabulary": {"oov_index": 4, "first_index": 5}}
    model = LoadedModel(_copy(model_repository, tmp_path, edit=indices))
    encoded = model.encode([(vocab["items"][3], None, None)], None, [(vocab["items"][0], None), ("never-seen", None)])
    assert encoded.hist_items.tolist() == [3 + 5]
    assert encoded.cand_items.tolist() == [0 + 5, 4] and encoded.unknown["item"] == 1
