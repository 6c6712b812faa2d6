"""Look at attention: one user's candidates against their history, as a heatmap PNG and the probabilities.

    python -m training.explain --run RUN_DIR --user U [--candidates ID,ID,...] [--out FILE.png]

The user's behaviours come from the run's own data (the dataset and user features its training config names),
read in time order. The last ``--holdout`` behaviours (default 3) are held out: the history is the ones before
them (at most the run's max_len, the most recent), and without ``--candidates`` they are the first candidates
(what the user did next), followed by the most popular training items the history does not hold, up to
``--n-candidates``. Probabilities and attention are the PyTorch model's (the paper form export checks the
serving graph against). Writes FILE.png (rows: candidates, columns: history items, most recent first as /score
returns them) and FILE.json beside it; prints the probabilities.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend, no global figure state

from contract import FEEDBACK_NEGATIVE, FEEDBACK_UNKNOWN, FIRST_INDEX, OOV
from models import CTRModel
from training.config import TrainConfig
from training.datasets import SyntheticConfig, load_dataset
from training.events import EncodedLog
from training.samples import Vocabulary
from training.train import CHECKPOINT_NAME, load_checkpoint

DEFAULT_HOLDOUT = 3
DEFAULT_CANDIDATES = 10


class ExplainError(RuntimeError):
    """The run or the user cannot be explained (no checkpoint, unknown user, ...)."""


@dataclass(frozen=True)
class Behaviour:
    item_id: str
    category_id: str
    label: int | None
    timestamp: int


@dataclass(frozen=True)
class Explanation:
    """One user's candidates scored against their history; history and attention columns most recent first."""

    model: str
    user_id: str
    user_features: dict[str, str | None]  # raw values, in the vocabulary's feature order
    history: list[Behaviour]
    candidates: list[tuple[str, str | None]]  # (item id, category id; None: unknown to the run)
    held_out: list[Behaviour]  # the behaviours after the history: the default candidates
    probability: np.ndarray  # (N,)
    attention: np.ndarray  # (N, L)
    sessions: list[list[int]] | None = None  # DSIN: history indices of each session, most recent session first
    session_weights: np.ndarray | None = None  # DSIN: (N, K) each candidate's weight on each session

    def to_json(self) -> dict[str, Any]:
        next_items = {b.item_id: b.label for b in self.held_out}
        return {
            "model": self.model,
            "user_id": self.user_id,
            "user_features": self.user_features,
            "history": [
                {"item_id": b.item_id, "category_id": b.category_id, "label": b.label, "timestamp": b.timestamp}
                for b in self.history
            ],
            "scores": [
                {
                    "item_id": item,
                    "category_id": cat,
                    "probability": float(p),
                    "attention": [float(a) for a in att],
                    **({} if self.session_weights is None else {"session_weights": self.session_weights[r].tolist()}),
                    "held_out": item in next_items,  # the user's next behaviour, not in the history
                    "label": next_items.get(item),
                }
                for r, ((item, cat), p, att) in enumerate(
                    zip(self.candidates, self.probability, self.attention, strict=True)
                )
            ],
            **({} if self.sessions is None else {"sessions": self.sessions}),  # as /score answers for DSIN
        }


def user_behaviours(log: EncodedLog, user_id: str) -> list[Behaviour]:
    """Every behaviour of ``user_id``, oldest first (the log is sorted by user, then time)."""
    code = pc.index(log.user_ids, pa.scalar(user_id, pa.string())).as_py()
    if code < 0:
        raise ExplainError(f"user {user_id!r} is not in the run's data ({len(log.user_ids)} users)")
    rows = np.flatnonzero(log.user == code)
    items = log.item_ids.take(pa.array(log.item[rows])).to_pylist()
    cats = log.category_ids.take(pa.array(log.category[rows])).to_pylist()
    labels = [None] * rows.size if log.label is None else [int(y) for y in log.label[rows]]
    times = [int(t) for t in log.timestamp[rows]]
    return [Behaviour(*b) for b in zip(items, cats, labels, times, strict=True)]


def user_profile(log: EncodedLog, user_id: str, vocab: Vocabulary) -> dict[str, str | None]:
    """The user's raw value of each feature the run was trained with (None: the log has none)."""
    code = pc.index(log.user_ids, pa.scalar(user_id, pa.string())).as_py()
    out: dict[str, str | None] = {}
    for name in vocab.user_features:
        feature = log.user_features.get(name)
        missing = feature is None or feature.codes[code] < 0
        out[name] = None if feature is None or missing else str(feature.values[int(feature.codes[code])])
    return out


def encode_profile(profile: dict[str, str | None], vocab: Vocabulary) -> np.ndarray:
    """(F,) the profile as the run's vocabulary encodes it; OOV for a missing value or one training never saw."""
    codes = [OOV if v is None else int(vocab.encode_feature(k, [v])[0]) for k, v in profile.items()]
    return np.asarray(codes, dtype=np.int64)


def default_candidates(held_out: list[Behaviour], history: list[Behaviour], vocab: Vocabulary, n: int) -> list[str]:
    """The held-out behaviours' items, then the most popular training items not in the history, ``n`` in all."""
    chosen = list(dict.fromkeys(b.item_id for b in held_out))[:n]
    seen = set(chosen) | {b.item_id for b in history}
    for item in vocab.items:  # most frequent first
        if len(chosen) >= n:
            break
        if item not in seen:
            chosen.append(item)
    return chosen


def vocab_category(vocab: Vocabulary, item_id: str) -> str | None:
    """The category the run's vocabulary gives an item (its last in training); None for an unknown item."""
    cat = int(vocab.item_category[vocab.encode_items([item_id])[0]])
    return str(vocab.categories[cat - FIRST_INDEX]) if cat >= FIRST_INDEX else None


class Scored(NamedTuple):
    probability: np.ndarray  # (N,)
    attention: np.ndarray  # (N, L) most recent first
    sessions: list[list[int]] | None  # DSIN: each session's history indices (most recent first), latest session first
    session_weights: np.ndarray | None  # DSIN: (N, K)


def score(
    model: CTRModel,
    vocab: Vocabulary,
    history: list[Behaviour],
    user_feats: np.ndarray,
    candidates: list[tuple[str, str | None]],
) -> Scored:
    """Probabilities and attention from the model's forward, the history repeated per candidate; the attention
    columns are returned most recent first, as /score returns them. A model that reads sessions (DSIN) gets the
    history divided as training divides it, and its session weights are returned too."""
    n, width = len(candidates), max(1, len(history))
    hist_items = np.zeros(width, dtype=np.int64)  # oldest first, right-padded: the models' layout
    hist_cats = np.zeros(width, dtype=np.int64)
    feedback = np.zeros(width, dtype=np.int64)
    if history:
        hist_items[: len(history)] = vocab.encode_items([b.item_id for b in history])
        hist_cats[: len(history)] = vocab.encode_categories([b.category_id for b in history])
        feedback[: len(history)] = [
            FEEDBACK_UNKNOWN if b.label is None else FEEDBACK_NEGATIVE + b.label for b in history
        ]
    mask = np.arange(width) < len(history)

    def rows(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.repeat(x[None], n, axis=0))  # (N, ...)

    inputs: dict[str, torch.Tensor] = {
        "hist_items": rows(hist_items),  # (N, L)
        "hist_cats": rows(hist_cats),  # (N, L)
        "hist_mask": rows(mask),  # (N, L)
        "cand_item": torch.from_numpy(vocab.encode_items([i for i, _ in candidates])),  # (N,)
        "cand_cat": torch.from_numpy(vocab.encode_categories([c or "" for _, c in candidates])),  # (N,) "": OOV
        "user_feats": rows(user_feats),  # (N, F)
    }
    if model.cfg.history_feedback:
        inputs["hist_feedback"] = rows(feedback)  # (N, L)
    sessions = weights = None
    if getattr(model, "uses_sessions", False):
        # DSIN (issue 17): the top-level `sessions` module divides histories for training and serving alike;
        # imported by name so this file does not depend on it for the models that need no sessions
        division = importlib.import_module("sessions")
        dsin: Any = model  # its session API (session_spec, sessions_forward) is DSIN's own, not CTRModel's
        times = np.zeros((1, width), dtype=np.int64)
        times[0, : len(history)] = [b.timestamp for b in history]
        index, smask = division.session_layout(times, mask[None], dsin.cfg.session_spec)  # (1, K, T)
        inputs["sess_index"], inputs["sess_mask"] = rows(index[0]), rows(smask[0])  # (N, K, T)
        members: list[list[int]] = division.session_members(index[0], smask[0])  # positions, oldest first
        sessions = [[len(history) - 1 - j for j in sorted(m, reverse=True)] for m in members]
        with torch.no_grad():
            out = dsin.sessions_forward(**inputs)
        weights = out.session_weights.numpy()[:, : len(members)].astype(np.float64)  # (N, sessions present)
    else:
        with torch.no_grad():
            out = model(**inputs)
    prob = torch.sigmoid(out.logits).numpy()  # (N,)
    att = out.attention.numpy()[:, : len(history)]  # (N, len(history)) oldest first
    return Scored(prob.astype(np.float64), att[:, ::-1].astype(np.float64), sessions, weights)


def explain(
    run_dir: Path,
    user_id: str,
    candidates: list[str] | None = None,
    holdout: int = DEFAULT_HOLDOUT,
    n_candidates: int = DEFAULT_CANDIDATES,
) -> Explanation:
    if not (run_dir / CHECKPOINT_NAME).is_file():
        raise ExplainError(f"{run_dir}: no {CHECKPOINT_NAME}; train first (python -m training.train --out {run_dir})")
    if holdout < 0 or n_candidates < 1:
        raise ExplainError("--holdout must be ≥ 0 and --n-candidates ≥ 1")
    model, ckpt = load_checkpoint(run_dir)
    cfg = TrainConfig.from_dict(ckpt["train_config"])
    vocab = Vocabulary.from_json(ckpt["vocab"])
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    source = load_dataset(cfg.dataset, data_dir, cfg.download, SyntheticConfig(**cfg.synthetic))
    log = source.with_user_features(cfg.user_features).encode()
    behaviours = user_behaviours(log, user_id)
    cut = max(0, len(behaviours) - holdout)
    history_oldest_first = behaviours[:cut][-int(ckpt["max_len"]) :]
    held_out = behaviours[cut:]
    if candidates is None:
        candidates = default_candidates(held_out, history_oldest_first, vocab, n_candidates)
    if not candidates:
        raise ExplainError("no candidates: name some with --candidates")
    in_log = {b.item_id: b.category_id for b in behaviours}
    # a candidate's category: the vocabulary's (as the service looks it up), else the user's own log's
    with_cats = [(c, vocab_category(vocab, c) or in_log.get(c)) for c in candidates]
    profile = user_profile(log, user_id, vocab)
    scored = score(model, vocab, history_oldest_first, encode_profile(profile, vocab), with_cats)
    return Explanation(
        ckpt["model"],
        user_id,
        profile,
        history_oldest_first[::-1],
        with_cats,
        held_out,
        scored.probability,
        scored.attention,
        scored.sessions,
        scored.session_weights,
    )


def heatmap(ex: Explanation, out: Path) -> None:
    """Rows: candidates (item · category), their probability on the right; columns: history items, most recent
    first, labelled item / category; colour: attention weight. DSIN's sessions: a line between sessions, their
    numbers on top, each candidate's session weights beside its probability."""
    n, length = len(ex.candidates), len(ex.history)
    width = min(40.0, 3.0 + 0.42 * max(length, 4))
    height = min(30.0, 2.2 + 0.38 * n)
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    ax = fig.subplots()
    values = ex.attention if length else np.zeros((n, 1))
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")  # the colour bar gives the range
    ax.set_yticks(range(n), [f"{item} · {cat or '?'}" for item, cat in ex.candidates], fontsize=8)
    if length:
        ax.set_xticks(range(length), [f"{b.item_id} / {b.category_id}" for b in ex.history], rotation=90, fontsize=7)
    else:
        ax.set_xticks([0], ["(no history)"])
    ax.set_xlabel("history: item / category, most recent first")
    ax.set_ylabel("candidate: item · category")
    if ex.sessions:
        _draw_sessions(ax, ex.sessions)
    held = {b.item_id for b in ex.held_out}
    for row, ((item, _), p) in enumerate(zip(ex.candidates, ex.probability, strict=True)):
        mark = " (next)" if item in held else ""
        if ex.session_weights is not None:
            mark += "  sessions " + " ".join(f"{w:.2f}" for w in ex.session_weights[row])
        ax.annotate(
            f"p={p:.4f}{mark}",
            xy=(1.0, row),
            xycoords=("axes fraction", "data"),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_title(f"{ex.model}: attention of user {ex.user_id}'s candidates over the history")
    fig.colorbar(image, ax=ax, label="attention", pad=0.12)
    fig.savefig(out)


def _draw_sessions(ax: Any, sessions: list[list[int]]) -> None:
    """A white line where a session ends, and "s1" (the most recent), "s2", ... above each session's columns."""
    top = ax.secondary_xaxis("top")
    centres, names = [], []
    for k, members in enumerate(sessions):
        if members:
            centres.append((min(members) + max(members)) / 2)
            names.append(f"s{k + 1}")
            ax.axvline(max(members) + 0.5, color="white", linewidth=2)
    top.set_xticks(centres, names, fontsize=8)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:64] or "user"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a training run directory (holding checkpoint.pt)")
    p.add_argument("--user", required=True, help="a user id of the run's data")
    p.add_argument("--candidates", help="comma-separated item ids (default: held-out and popular items)")
    p.add_argument("--out", help="the PNG to write (default: RUN_DIR/explain/USER.png); the JSON goes beside it")
    p.add_argument("--holdout", type=int, default=DEFAULT_HOLDOUT, help="latest behaviours kept out of the history")
    p.add_argument("--n-candidates", type=int, default=DEFAULT_CANDIDATES, help="size of the default candidate set")
    args = p.parse_args(argv)
    run_dir = Path(args.run)
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates else None
    try:
        ex = explain(run_dir, args.user, candidates, args.holdout, args.n_candidates)
    except ExplainError as e:
        raise SystemExit(f"explain: {e}") from e
    out = Path(args.out) if args.out else run_dir / "explain" / f"{_safe_name(args.user)}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    heatmap(ex, out)
    answer = {**ex.to_json(), "run": str(run_dir), "png": str(out)}
    out.with_suffix(".json").write_text(json.dumps(answer, indent=2))
    held = {b.item_id for b in ex.held_out}
    print(f"{ex.model}, user {ex.user_id}: {len(ex.history)} history items, {len(ex.candidates)} candidates")
    for (item, cat), prob in sorted(zip(ex.candidates, ex.probability, strict=True), key=lambda r: -r[1]):
        print(f"  {prob:.4f}  {item} (category {cat}){'  ← next' if item in held else ''}")
    print(f"→ {out}, {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
