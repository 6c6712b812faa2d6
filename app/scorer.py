"""A loaded model version: its ONNX Runtime session, vocabularies, and batched scoring.

Knows nothing of HTTP or Redis: it takes raw ids and returns probabilities and attention.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app import runtime
from contract import Contract
from sessions import one_history, session_members

log = logging.getLogger(__name__)

HistoryEntry = tuple[str, str | None, int | None]  # item id, category id, label (each as the caller gave it)
# per request: probability (c,), attention (c, l), and for DSIN each candidate's session weights (c, K)
Result = tuple[np.ndarray, ...]


class ModelLoadError(RuntimeError):
    """A model version is missing, incomplete or unusable; the message says which and why."""


class Lookup:
    """Vectorised raw id → index over a sorted array (index = position in the vocabulary + first index)."""

    def __init__(self, values: list[str], contract: Contract) -> None:
        arr = np.asarray(values, dtype=str)
        self.order = np.argsort(arr, kind="stable") + contract.first_index  # (n,) index of each sorted id
        self.sorted = arr[self.order - contract.first_index]
        self.oov = contract.oov

    def __call__(self, ids: list[str]) -> np.ndarray:
        if not ids:
            return np.zeros(0, dtype=np.int64)
        q = np.asarray(ids, dtype=str)
        if self.sorted.size == 0:
            return np.full(q.shape, self.oov, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sorted, q), self.sorted.size - 1)
        found = self.sorted[pos] == q
        return np.where(found, self.order[pos], self.oov).astype(np.int64)


@dataclass
class Encoded:
    """One request in model indices: history oldest first, as the graph expects."""

    hist_items: np.ndarray  # (l,)
    hist_cats: np.ndarray  # (l,)
    user_feats: np.ndarray  # (F,)
    cand_items: np.ndarray  # (c,)
    cand_cats: np.ndarray  # (c,)
    unknown: dict[str, int] = field(default_factory=dict)  # ids mapped to OOV, by kind
    hist_feedback: np.ndarray | None = None  # (l,) feedback code per behaviour (feedback models); None: all unknown
    sess_index: np.ndarray | None = None  # (K, T) DSIN: sessions.session_layout of the history (positions into l)
    sess_mask: np.ndarray | None = None  # (K, T)

    def sessions(self) -> list[list[int]]:
        """DSIN: the API's history indices (most recent first) of each session, most recent session first."""
        if self.sess_index is None or self.sess_mask is None:
            return []
        last = self.hist_items.size - 1  # graph position l (oldest first) is API index last − l
        return [sorted(last - pos for pos in members) for members in session_members(self.sess_index, self.sess_mask)]


class LoadedModel:
    def __init__(self, folder: Path, provider: str = "auto", intra_op_threads: int = 0) -> None:
        self.folder = folder
        self.loaded_at = time.time()
        meta_path = folder / "metadata.json"
        if not meta_path.exists():
            raise ModelLoadError(f"{folder}: no metadata.json (not an exported model version)")
        try:
            self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
            vocab = json.loads((folder / self.metadata["files"]["vocabulary"]).read_text())
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{folder}: unreadable metadata or vocabulary: {e!r}") from e
        self.name: str = self.metadata["name"]
        self.version = str(self.metadata["version"])
        self.max_history = int(self.metadata["max_history"])
        self.contract = contract = Contract.from_metadata(self.metadata)
        self.items = Lookup(vocab["items"], contract)
        self.categories = Lookup(vocab["categories"], contract)
        self.feature_names: list[str] = list(vocab["user_features"])
        self.features = {name: Lookup(values, contract) for name, values in vocab["user_features"].items()}
        item_cat = vocab["item_category"]
        self._item_category_raw: dict[str, str] = item_cat
        # (n_items,) category index of every item index: PAD's is PAD, OOV's OOV
        self.item_category = np.full(contract.first_index + len(vocab["items"]), contract.oov, dtype=np.int64)
        self.item_category[contract.pad] = contract.pad
        self.item_category[contract.first_index :] = self.categories([item_cat[i] for i in vocab["items"]])
        try:
            providers = runtime.select_providers(provider)
        except runtime.RuntimeUnavailable as e:
            raise ModelLoadError(str(e)) from e
        files = self.metadata["files"]
        # DIN ships a CUDA form of its graph (the same function, no host-side branching); older versions do not
        on_cuda = providers[0] == runtime.CUDA
        self.graph_file: str = files.get("model_cuda", files["model"]) if on_cuda else files["model"]
        try:
            self.session = runtime.open_session(folder / self.graph_file, providers, intra_op_threads)
        except Exception as e:  # ONNX Runtime raises its own exception types for corrupt graphs
            raise ModelLoadError(f"{folder}: ONNX Runtime cannot load the model: {e}") from e
        names = {i.name for i in self.session.get_inputs()}
        if names - {contract.feedback_input, *contract.session_inputs} != set(contract.inputs):
            raise ModelLoadError(f"{folder}: graph inputs {sorted(names)} are not the serving interface")
        self.uses_feedback = contract.feedback_input in names  # the model reads each history behaviour's label
        # DSIN: each history is divided into sessions here, by sessions.session_layout as training divided it
        self.session_spec = contract.session_spec if set(contract.session_inputs) <= names else None
        if contract.session_inputs and self.session_spec is None:
            raise ModelLoadError(f"{folder}: metadata names session inputs the graph does not take")
        self.provider = self.session.get_providers()[0]
        self.self_check_diff: float | None = None
        self.ready_seconds = 0.0  # load + warm-up + self-check, set by load_version
        if on_cuda and self.provider != "CUDAExecutionProvider":
            log.warning(
                "model %s v%s: CUDA was found, ONNX Runtime runs it on %s", self.name, self.version, self.provider
            )
        log.info("model %s v%s runs %s on %s", self.name, self.version, self.graph_file, self.provider)

    def encode(
        self,
        history: list[HistoryEntry],
        user_features: dict[str, str] | None,
        candidates: list[tuple[str, str | None]],
        times: list[int] | None = None,
    ) -> Encoded:
        """history most recent first (truncated by the caller); unknown ids → OOV, counted. ``times``: each
        history behaviour's Unix seconds, in the same order, for DSIN's session division; without them (None)
        the whole history is one session (of its T most recent behaviours)."""
        hist = history[: self.max_history][::-1]  # oldest first
        h_items = self.items([i for i, _, _ in hist])
        c_items = self.items([i for i, _ in candidates])
        h_cats = self._categories(h_items, [c for _, c, _ in hist])
        feedback_of = self.contract.feedback_of
        feedback = (  # only a model trained with history feedback reads the labels
            np.array([feedback_of(y) for _, _, y in hist], dtype=np.int64) if self.uses_feedback else None
        )
        c_cats = self._categories(c_items, [c for _, c in candidates])
        feats = user_features or {}
        oov = self.contract.oov
        f_idx = np.array(
            [self.features[n]([feats[n]])[0] if n in feats else oov for n in self.feature_names], dtype=np.int64
        )
        unknown = {
            "item": int((h_items == oov).sum() + (c_items == oov).sum()),
            "category": int((h_cats == oov).sum() + (c_cats == oov).sum()),
            "user_feature": int((f_idx == oov).sum()),
        }
        encoded = Encoded(h_items, h_cats, f_idx, c_items, c_cats, unknown, feedback)
        if self.session_spec is not None:
            oldest_first = [0] * len(hist) if times is None else times[: self.max_history][::-1]
            encoded.sess_index, encoded.sess_mask = one_history(oldest_first, self.session_spec)
        return encoded

    def category_of(self, item_id: str) -> str | None:
        """The training data's category of an item (None for items the model never saw)."""
        return self._item_category_raw.get(item_id)

    def _categories(self, item_idx: np.ndarray, given: list[str | None]) -> np.ndarray:
        """The caller's category when given, else the item table's (OOV for unknown items)."""
        table = self.item_category[item_idx]
        if all(c is None for c in given):
            return table
        explicit = self.categories([c or "" for c in given])
        return np.where(np.array([c is not None for c in given]), explicit, table)

    def run(self, batch: list[Encoded]) -> list[Result]:
        """Score a batch of requests; per request: probabilities (c,), attention (c, l), and for DSIN the
        session weights (c, K).

        On CUDA the whole batch is one ONNX Runtime call (a GPU call costs its launches, whatever its size).
        On CPU each user gets its own call, still within this one executor task: the graph's single-user
        layout broadcasts the history over the candidates where a several-user call gathers each candidate's
        user rows, and 8 users × 200 candidates took 14.9 ms as one call against 12.0 ms as 8 (bench/README.md)."""
        if self.provider != "CUDAExecutionProvider" and len(batch) > 1:
            return [result for e in batch for result in self._run_users([e])]
        return self._run_users(batch)

    def _run_users(self, batch: list[Encoded]) -> list[Result]:
        """One ONNX Runtime call scoring every request of ``batch``."""
        contract = self.contract
        width = max(1, max(e.hist_items.size for e in batch))
        u = len(batch)
        hist_items = np.full((u, width), contract.pad, dtype=np.int64)
        hist_cats = np.full((u, width), contract.pad, dtype=np.int64)
        mask = np.zeros((u, width), dtype=bool)
        for row, e in enumerate(batch):
            n = e.hist_items.size
            hist_items[row, :n], hist_cats[row, :n], mask[row, :n] = e.hist_items, e.hist_cats, True
        counts = [e.cand_items.size for e in batch]
        arrays = (  # in the contract's input order
            hist_items,
            hist_cats,
            mask,
            np.stack([e.user_feats for e in batch]).reshape(u, len(self.feature_names)),
            np.concatenate([e.cand_items for e in batch]),
            np.concatenate([e.cand_cats for e in batch]),
            np.repeat(np.arange(u, dtype=np.int64), counts),  # each candidate's user row
        )
        feed = dict(zip(contract.inputs, arrays, strict=True))
        if self.uses_feedback:
            feedback = np.full((u, width), contract.pad, dtype=np.int64)  # (U, L)
            for row, e in enumerate(batch):
                n = e.hist_items.size
                feedback[row, :n] = contract.feedback_unknown if e.hist_feedback is None else e.hist_feedback
            feed[contract.feedback_input] = feedback
        outputs = list(contract.outputs)
        if self.session_spec is not None:
            layouts = [self._layout(e) for e in batch]
            for name, part in zip(contract.session_inputs, zip(*layouts, strict=True), strict=True):
                feed[name] = np.stack(part)  # (U, K, T)
            outputs.append(str(contract.session_output))
        results = self.session.run(outputs, feed)
        out: list[Result] = []
        start = 0
        for e, c in zip(batch, counts, strict=True):
            rows = slice(start, start + c)
            prob, att = results[0][rows], results[1][rows, : e.hist_items.size]
            out.append((prob, att) if self.session_spec is None else (prob, att, results[2][rows]))
            start += c
        return out

    def _layout(self, e: Encoded) -> tuple[np.ndarray, np.ndarray]:
        """A request's (K, T) session division; one session when it was encoded without one (warm-up)."""
        if e.sess_index is not None and e.sess_mask is not None:
            return e.sess_index, e.sess_mask
        assert self.session_spec is not None
        return one_history([0] * e.hist_items.size, self.session_spec)

    def warm_up(self) -> None:
        """Run the graph at a few shapes so the first real request does not pay for initialisation."""
        first, oov = self.contract.first_index, self.contract.oov
        for hist_len, n_cand in ((0, 1), (self.max_history, 200)):
            e = Encoded(
                np.full(hist_len, first, dtype=np.int64),
                np.full(hist_len, first, dtype=np.int64),
                np.full(len(self.feature_names), oov, dtype=np.int64),
                np.full(n_cand, first, dtype=np.int64),
                np.full(n_cand, first, dtype=np.int64),
            )
            self.run([e, e])

    def close(self) -> None:
        """Free the ONNX Runtime session (its weights, arena and threads) now, not whenever the garbage
        collector breaks the reference cycles around a retired version: 60 swaps grew the process by
        ≈ 15 MB each without this. The model cannot run afterwards."""
        if hasattr(self, "session"):
            del self.session

    def self_check(self) -> float | None:
        """Re-run the inputs the export stored with this version; refuse the version if its answers differ.

        Returns the largest absolute difference (None for versions exported without a self-check)."""
        name = self.metadata["files"].get("selfcheck")
        if name is None:
            log.warning("model %s v%s has no self-check data; loaded unchecked", self.name, self.version)
            return None
        try:
            with np.load(self.folder / name, allow_pickle=False) as data:
                feed = {k.removeprefix("input_"): data[k] for k in data.files if k.startswith("input_")}
                expected_p, expected_a = data["probability"], data["attention"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{self.folder}: unreadable self-check data: {e!r}") from e
        try:
            prob, att = self.session.run(list(self.contract.outputs), feed)
        except Exception as e:  # ONNX Runtime's own exception types
            raise ModelLoadError(f"{self.folder}: self-check inputs do not run: {e}") from e
        if prob.shape != expected_p.shape or att.shape != expected_a.shape:
            raise ModelLoadError(f"{self.folder}: self-check output shapes differ from the export's")
        diff = float(max(np.abs(prob - expected_p).max(initial=0), np.abs(att - expected_a).max(initial=0)))
        tolerance = float(self.metadata.get("selfcheck", {}).get("tolerance", 1e-4))
        if not diff <= tolerance:  # also catches NaN
            raise ModelLoadError(f"{self.folder}: self-check failed: max abs diff {diff:.3g} > {tolerance:g}")
        return diff


def load_version(folder: Path, provider: str = "auto", intra_op_threads: int = 0) -> LoadedModel:
    """Load, warm up and self-check one version; any failure is a ModelLoadError saying which and why."""
    model = LoadedModel(folder, provider, intra_op_threads)
    try:
        model.warm_up()
    except Exception as e:
        raise ModelLoadError(f"{folder}: warm-up failed: {e}") from e
    model.self_check_diff = model.self_check()
    model.ready_seconds = time.time() - model.loaded_at
    return model


def published_versions(repository: Path, name: str) -> list[int]:
    """The model's published versions, oldest first (hidden staging folders are not versions)."""
    model_dir = repository / name
    if not model_dir.is_dir():
        raise ModelLoadError(f"model {name!r} not found in repository {repository}")
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version(repository: Path, name: str) -> Path:
    versions = published_versions(repository, name)
    if not versions:
        raise ModelLoadError(f"model {name!r} has no published version under {repository / name}")
    return repository / name / str(versions[-1])


def discover(repository: Path) -> list[str]:
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} does not exist")
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
