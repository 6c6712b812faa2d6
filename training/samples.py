"""From a behaviour log to samples: (history before t, candidate t, label), split by protocol.

A sample's history is stored by reference: ``end`` (exclusive) and ``length`` into its split's
chronological event arrays, so a [B, L] batch is gathered on demand and nothing is copied L times.
Index 0 is padding and index 1 the out-of-vocabulary index in every vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from contract import FEEDBACK_NEGATIVE, FEEDBACK_PAD, FEEDBACK_UNKNOWN, FIRST_INDEX, OOV, PAD
from training.datasets import BehaviourLog

log = logging.getLogger(__name__)

PROTOCOLS = ("din-movielens", "implicit")
CACHE_FORMAT = 2  # 2: event_feedback


@dataclass
class Vocabulary:
    """Raw id → index maps (indices start at FIRST_INDEX) and the item → category table."""

    items: list[str]
    categories: list[str]
    user_features: dict[str, list[str]]
    item_category: dict[str, str]

    def __post_init__(self) -> None:
        self._item_index = pd.Index(self.items)
        self._cat_index = pd.Index(self.categories)
        self._feat_index = {k: pd.Index(v) for k, v in self.user_features.items()}

    @property
    def n_items(self) -> int:
        return len(self.items) + FIRST_INDEX

    @property
    def n_categories(self) -> int:
        return len(self.categories) + FIRST_INDEX

    @property
    def feature_cardinalities(self) -> tuple[int, ...]:
        return tuple(len(v) + FIRST_INDEX for v in self.user_features.values())

    @staticmethod
    def _encode(index: pd.Index, values: pd.Series | np.ndarray | list[str]) -> np.ndarray:
        pos = index.get_indexer(pd.Index(np.asarray(values, dtype=object)))
        return np.where(pos < 0, OOV, pos + FIRST_INDEX).astype(np.int64)

    def encode_items(self, values: pd.Series | np.ndarray | list[str]) -> np.ndarray:
        return self._encode(self._item_index, values)

    def encode_categories(self, values: pd.Series | np.ndarray | list[str]) -> np.ndarray:
        return self._encode(self._cat_index, values)

    def encode_feature(self, name: str, values: pd.Series | np.ndarray | list[str]) -> np.ndarray:
        return self._encode(self._feat_index[name], values)

    def item_category_table(self) -> np.ndarray:
        """(n_items,) category index of every item index; PAD/OOV items map to PAD/OOV."""
        table = np.array([PAD, OOV] + [0] * len(self.items), dtype=np.int64)
        table[FIRST_INDEX:] = self.encode_categories([self.item_category[i] for i in self.items])
        return table

    def to_json(self) -> dict[str, object]:
        return {
            "items": self.items,
            "categories": self.categories,
            "user_features": self.user_features,
            "item_category": self.item_category,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Vocabulary:
        return cls(
            items=list(d["items"]),  # type: ignore[call-overload]
            categories=list(d["categories"]),  # type: ignore[call-overload]
            user_features={k: list(v) for k, v in d["user_features"].items()},  # type: ignore[attr-defined]
            item_category=dict(d["item_category"]),  # type: ignore[call-overload]
        )

    @classmethod
    def build(cls, events: pd.DataFrame, users: pd.DataFrame | None) -> Vocabulary:
        """Vocabulary of the training events, items ordered by decreasing frequency."""
        items = events["item_id"].value_counts(sort=True).index.astype(str).tolist()
        cats = events["category_id"].value_counts(sort=True).index.astype(str).tolist()
        item_category = dict(zip(events["item_id"].astype(str), events["category_id"].astype(str), strict=True))
        feats: dict[str, list[str]] = {}
        if users is not None:
            seen = users.loc[users.index.intersection(pd.Index(events["user_id"].unique()))]
            feats = {c: sorted(seen[c].astype(str).unique().tolist()) for c in users.columns}
        return cls(items, cats, feats, item_category)


@dataclass
class SampleSet:
    """One split. Event arrays are chronological per user; samples point into them."""

    event_item: np.ndarray  # (E,) item index
    event_cat: np.ndarray  # (E,) category index
    event_feedback: np.ndarray  # (E,) FEEDBACK_* of each behaviour (its own label, seen by later samples only)
    end: np.ndarray  # (N,) exclusive end of the sample's history in the event arrays
    length: np.ndarray  # (N,) history length, 0..max_len
    cand_item: np.ndarray  # (N,)
    cand_cat: np.ndarray  # (N,)
    label: np.ndarray  # (N,) float32 0/1
    user: np.ndarray  # (N,) user index, for GAUC
    user_feats: np.ndarray  # (N, F) user-feature indices

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def history(self, rows: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gather (items, categories, mask), each (B, max_len), oldest first and right-padded."""
        offsets = np.arange(max_len)  # (L,)
        length = self.length[rows]  # (B,)
        idx = self.end[rows, None] - length[:, None] + offsets  # (B, L)
        mask = offsets < length[:, None]  # (B, L)
        idx = np.where(mask, idx, 0)
        items = np.where(mask, self.event_item[idx], PAD)
        cats = np.where(mask, self.event_cat[idx], PAD)
        return items, cats, mask

    def history_feedback(self, rows: np.ndarray, max_len: int) -> np.ndarray:
        """(B, max_len) feedback of the same positions as ``history``, FEEDBACK_PAD on padding."""
        offsets = np.arange(max_len)  # (L,)
        length = self.length[rows]  # (B,)
        mask = offsets < length[:, None]  # (B, L)
        idx = np.where(mask, self.end[rows, None] - length[:, None] + offsets, 0)  # (B, L)
        return np.where(mask, self.event_feedback[idx], FEEDBACK_PAD)

    def save(self, path: Path) -> None:
        np.savez(path, **asdict(self))

    @classmethod
    def load(cls, path: Path) -> SampleSet:
        with np.load(path) as z:
            return cls(**{k: z[k] for k in z.files})


@dataclass
class PreparedData:
    train: SampleSet
    valid: SampleSet
    test: SampleSet
    vocab: Vocabulary
    info: dict[str, object] = field(default_factory=dict)


def _sort_events(events: pd.DataFrame) -> pd.DataFrame:
    return events.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)


def _labels(events: pd.DataFrame) -> np.ndarray:
    if "rating" in events.columns:
        return (events["rating"].to_numpy() >= 4).astype(np.float32)
    return events["label"].to_numpy().astype(np.float32)


def _feedback(events: pd.DataFrame) -> np.ndarray:
    """(E,) each behaviour's own outcome as history feedback: negative/positive for labelled logs, unknown
    otherwise (an implicit log's behaviours are all interactions; their outcome is not observed)."""
    if "rating" not in events.columns and "label" not in events.columns:
        return np.full(len(events), FEEDBACK_UNKNOWN, dtype=np.int64)
    return FEEDBACK_NEGATIVE + _labels(events).astype(np.int64)


def _user_feature_matrix(vocab: Vocabulary, users: pd.DataFrame | None, user_ids: np.ndarray) -> np.ndarray:
    """(n, F) feature indices of each user id; unknown users/values → OOV."""
    if users is None or not vocab.user_features:
        return np.zeros((len(user_ids), 0), dtype=np.int64)
    table = users.reindex(pd.Index(user_ids.astype(str)))
    cols = [vocab.encode_feature(name, table[name].fillna("\0").astype(str)) for name in vocab.user_features]
    return np.stack(cols, axis=1)


def _positions(user_codes: np.ndarray) -> np.ndarray:
    """Position of each event inside its user's run of a user-sorted array."""
    n = user_codes.size
    starts = np.flatnonzero(np.r_[True, user_codes[1:] != user_codes[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.arange(n) - run_start


def _split_samples(
    events: pd.DataFrame,
    users: pd.DataFrame | None,
    vocab: Vocabulary,
    max_len: int,
    rows: np.ndarray | None = None,
) -> SampleSet:
    """Samples for every event at position t ≥ 1 of a user-sorted event frame (or only ``rows``)."""
    user_codes, user_uniques = pd.factorize(events["user_id"], sort=False)
    pos = _positions(user_codes)
    event_item = vocab.encode_items(events["item_id"])
    event_cat = vocab.encode_categories(events["category_id"])
    sel = np.flatnonzero(pos >= 1) if rows is None else rows
    feats = _user_feature_matrix(vocab, users, np.asarray(user_uniques))
    return SampleSet(
        event_item=event_item,
        event_cat=event_cat,
        event_feedback=_feedback(events),
        end=sel.astype(np.int64),
        length=np.minimum(pos[sel], max_len).astype(np.int64),
        cand_item=event_item[sel],
        cand_cat=event_cat[sel],
        label=_labels(events)[sel] if rows is None else np.ones(sel.size, dtype=np.float32),
        user=user_codes[sel].astype(np.int64),
        user_feats=feats[user_codes[sel]],
    )


def prepare_din_movielens(
    log_: BehaviourLog, max_len: int, seed: int, test_fraction: float = 0.3, valid_fraction: float = 0.1
) -> PreparedData:
    """Split users (seeded shuffle) into 70% train / 30% test; validation users carved from train."""
    if not log_.has_labels:
        raise ValueError(f"{log_.name}: the din-movielens protocol needs a rating or label column")
    events = _sort_events(log_.events)
    uniq = np.sort(events["user_id"].unique())
    perm = np.random.default_rng(seed).permutation(uniq)
    n_test = round(test_fraction * len(perm))
    n_valid = max(1, round(valid_fraction * (len(perm) - n_test)))
    test_u, valid_u, train_u = perm[:n_test], perm[n_test : n_test + n_valid], perm[n_test + n_valid :]
    parts = {
        name: events[events["user_id"].isin(u)]
        for name, u in (("train", train_u), ("valid", valid_u), ("test", test_u))
    }
    vocab = Vocabulary.build(parts["train"], log_.users)
    sets = {k: _split_samples(v.reset_index(drop=True), log_.users, vocab, max_len) for k, v in parts.items()}
    info: dict[str, object] = {"users": {"train": len(train_u), "valid": len(valid_u), "test": len(test_u)}}
    return PreparedData(sets["train"], sets["valid"], sets["test"], vocab, info)


def _sample_negatives(
    rng: np.random.Generator, users: np.ndarray, seen_keys: np.ndarray, n_items: int, base: int
) -> np.ndarray:
    """One item per entry of ``users``, uniform over [2, n_items) and not in the user's own log."""
    neg = rng.integers(2, n_items, size=users.size)
    for _ in range(100):
        clash = np.isin(users * base + neg, seen_keys)
        if not clash.any():
            break
        neg[clash] = rng.integers(2, n_items, size=int(clash.sum()))
    return neg


def prepare_implicit(log_: BehaviourLog, max_len: int, seed: int) -> PreparedData:
    """Every behaviour is a positive paired with one sampled negative; leave-last-out per user.

    The last sample of each user is test, the one before it validation, the rest training.
    """
    events = _sort_events(log_.events)
    user_codes = pd.factorize(events["user_id"], sort=False)[0]
    pos = _positions(user_codes)
    last = np.r_[user_codes[1:] != user_codes[:-1], True]  # (E,) last event of its user
    second_last = np.r_[last[1:], False] & ~last
    vocab = Vocabulary.build(events[~last], log_.users)
    base = vocab.n_items
    event_item = vocab.encode_items(events["item_id"])
    seen_keys = np.unique(user_codes.astype(np.int64) * base + event_item)
    item_cat = vocab.item_category_table()
    rng = np.random.default_rng(seed)
    split_rows = {
        "test": np.flatnonzero(last & (pos >= 1)),
        "valid": np.flatnonzero(second_last & (pos >= 1)),
        "train": np.flatnonzero(~last & ~second_last & (pos >= 1)),
    }
    sets: dict[str, SampleSet] = {}
    for name, rows in split_rows.items():
        positive = _split_samples(events, log_.users, vocab, max_len, rows=rows)
        neg_item = _sample_negatives(rng, positive.user, seen_keys, vocab.n_items, base)
        sets[name] = SampleSet(
            event_item=positive.event_item,
            event_cat=positive.event_cat,
            event_feedback=positive.event_feedback,
            end=np.r_[positive.end, positive.end],
            length=np.r_[positive.length, positive.length],
            cand_item=np.r_[positive.cand_item, neg_item],
            cand_cat=np.r_[positive.cand_cat, item_cat[neg_item]],
            label=np.r_[np.ones(rows.size), np.zeros(rows.size)].astype(np.float32),
            user=np.r_[positive.user, positive.user],
            user_feats=np.r_[positive.user_feats, positive.user_feats],
        )
    return PreparedData(sets["train"], sets["valid"], sets["test"], vocab, {"users": int(user_codes.max() + 1)})


def prepare(
    log_: BehaviourLog,
    protocol: str,
    max_len: int = 50,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> PreparedData:
    """Prepare (or load from ``cache_dir``) the three splits and the vocabulary."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    key_src = json.dumps([CACHE_FORMAT, log_.name, log_.fingerprint, log_.user_feature_names, protocol, max_len, seed])
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    folder = None if cache_dir is None else Path(cache_dir) / f"{log_.name}-{protocol}-{key}"
    if folder is not None and (folder / "vocab.json").exists():
        log.info("prepared data from cache %s", folder)
        vocab = Vocabulary.from_json(json.loads((folder / "vocab.json").read_text()))
        info = json.loads((folder / "info.json").read_text())
        train, valid, test = (SampleSet.load(folder / f"{s}.npz") for s in ("train", "valid", "test"))
        return PreparedData(train, valid, test, vocab, {**info, "cached": True})
    fn = prepare_din_movielens if protocol == "din-movielens" else prepare_implicit
    data = fn(log_, max_len, seed)
    data.info.update({"protocol": protocol, "max_len": max_len, "seed": seed, "dataset": log_.name})
    if folder is not None:
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for s in ("train", "valid", "test"):
            getattr(data, s).save(tmp / f"{s}.npz")
        (tmp / "info.json").write_text(json.dumps(data.info))
        (tmp / "vocab.json").write_text(json.dumps(data.vocab.to_json()))
        tmp.replace(folder)
    data.info["cached"] = False
    return data
