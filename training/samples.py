"""From a behaviour log to samples: (history before t, candidate t, label), split by protocol.

A sample's history is stored by reference: ``end`` (exclusive) and ``length`` into its split's
chronological event arrays, so a [B, L] batch is gathered on demand and nothing is copied L times.
Index 0 is padding and index 1 the out-of-vocabulary index in every vocabulary. Both protocols work on
the log's integer codes (training.events), never on its strings, and keep every array in the smallest
integer type that holds it; prepared splits are cached as one .npy per array, memory-mapped on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contract import FEEDBACK_NEGATIVE, FEEDBACK_PAD, FEEDBACK_UNKNOWN, FIRST_INDEX, OOV, PAD
from sessions import SessionSpec, session_layout
from training.datasets import BehaviourLog
from training.events import EncodedLog, EventFiles
from training.negatives import popularity

log = logging.getLogger(__name__)

PROTOCOLS = ("din-movielens", "implicit")
CACHE_FORMAT = 4  # 3: one .npy per array, compact dtypes, vocabulary as parquet, …; 4: event timestamps (DSIN)
LogSource = BehaviourLog | EventFiles | EncodedLog


def index_dtype(size: int) -> np.dtype:
    """The smallest signed integer type holding 0..size-1."""
    for dtype in (np.int8, np.int16, np.int32):
        if size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _strings(values: object) -> pa.Array:
    return pa.array(np.asarray(values, dtype=object), type=pa.string())


@dataclass
class Vocabulary:
    """Raw id → index maps (indices start at FIRST_INDEX) and each item's category.

    Held as Arrow string arrays and one int32 table, not Python objects: 10^7 items cost ≈ 150 MB here.
    ``items``/``categories`` (Python lists) and ``to_json`` (the form checkpoints, exports and the server
    read) are built on demand."""

    item_ids: pa.Array  # (I,) raw ids, most frequent first
    category_ids: pa.Array  # (C,)
    user_features: dict[str, list[str]]
    item_category: np.ndarray  # (n_items,) category index of every item index; PAD/OOV rows map to PAD/OOV

    @cached_property
    def items(self) -> list[str]:
        return self.item_ids.to_pylist()

    @cached_property
    def categories(self) -> list[str]:
        return self.category_ids.to_pylist()

    @property
    def n_items(self) -> int:
        return len(self.item_ids) + FIRST_INDEX

    @property
    def n_categories(self) -> int:
        return len(self.category_ids) + FIRST_INDEX

    @property
    def feature_cardinalities(self) -> tuple[int, ...]:
        return tuple(len(v) + FIRST_INDEX for v in self.user_features.values())

    @staticmethod
    def _encode(value_set: pa.Array, values: pd.Series | np.ndarray | list[str]) -> np.ndarray:
        pos = pc.index_in(_strings(values), value_set=value_set)
        found = pos.is_valid().to_numpy(zero_copy_only=False)
        return np.where(found, pos.fill_null(0).to_numpy(zero_copy_only=False) + FIRST_INDEX, OOV).astype(np.int64)

    def encode_items(self, values: pd.Series | np.ndarray | list[str]) -> np.ndarray:
        return self._encode(self.item_ids, values)

    def encode_categories(self, values: pd.Series | np.ndarray | list[str]) -> np.ndarray:
        return self._encode(self.category_ids, values)

    def encode_feature(self, name: str, values: pd.Series | np.ndarray | list[str]) -> np.ndarray:
        return self._encode(_strings(self.user_features[name]), values)

    def item_category_table(self) -> np.ndarray:
        """(n_items,) category index of every item index; PAD/OOV items map to PAD/OOV."""
        return self.item_category.astype(np.int64)

    def to_json(self) -> dict[str, object]:
        cats = self.category_ids.take(pa.array(self.item_category[FIRST_INDEX:] - FIRST_INDEX)).to_pylist()
        return {
            "items": self.items,
            "categories": self.categories,
            "user_features": self.user_features,
            "item_category": dict(zip(self.items, cats, strict=True)),
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Vocabulary:
        items, item_category = list(d["items"]), dict(d["item_category"])  # type: ignore[call-overload]
        vocab = cls(
            item_ids=_strings(items),
            category_ids=_strings(d["categories"]),
            user_features={k: list(v) for k, v in d["user_features"].items()},  # type: ignore[attr-defined]
            item_category=np.zeros(0, dtype=np.int32),
        )
        table = vocab.encode_categories([item_category[i] for i in items])
        vocab.item_category = np.r_[PAD, OOV, table].astype(np.int32)
        return vocab

    def save(self, folder: Path) -> None:
        """Parquet (the ids) and JSON (the small feature lists): a 10^7-item vocabulary loads in seconds."""
        items = pa.table({"item_id": self.item_ids, "category": self.item_category[FIRST_INDEX:]})
        pq.write_table(items, folder / "vocab_items.parquet")
        pq.write_table(pa.table({"category_id": self.category_ids}), folder / "vocab_categories.parquet")
        (folder / "vocab_features.json").write_text(json.dumps(self.user_features))

    @classmethod
    def load(cls, folder: Path) -> Vocabulary:
        items = pq.read_table(folder / "vocab_items.parquet")
        cats = pq.read_table(folder / "vocab_categories.parquet")
        table = items.column("category").to_numpy().astype(np.int32)
        return cls(
            item_ids=items.column("item_id").combine_chunks(),
            category_ids=cats.column("category_id").combine_chunks(),
            user_features=json.loads((folder / "vocab_features.json").read_text()),
            item_category=np.r_[np.array([PAD, OOV], dtype=np.int32), table],
        )


@dataclass
class _Coding:
    """Raw code → vocabulary index maps of one log, with what the vocabulary left out."""

    item: np.ndarray  # (raw items,) index, OOV for items not in the vocabulary
    category: np.ndarray  # (raw categories,)
    user_feats: np.ndarray  # (U, F) each user's feature indices (OOV: missing or unseen value)
    oov: dict[str, int]


def _by_frequency(codes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw codes by decreasing count, ties in order of first occurrence, as pandas' value_counts; counts)."""
    counts = np.bincount(codes, minlength=size)
    first_seen = pd.unique(codes)
    return first_seen[np.argsort(-counts[first_seen], kind="stable")], counts


def build_vocabulary(log_: EncodedLog, train_rows: np.ndarray, min_count: int = 1) -> tuple[Vocabulary, _Coding]:
    """The vocabulary of the training events (``train_rows``, in log order): items seen at least
    ``min_count`` times, most frequent first; every category; the feature values of the training users."""
    train_items = log_.item[train_rows]
    ranked, counts = _by_frequency(train_items, len(log_.item_ids))
    kept = ranked[counts[ranked] >= min_count]
    rare = ranked[counts[ranked] < min_count]
    cat_ranked, _ = _by_frequency(log_.category[train_rows], len(log_.category_ids))
    item_map = np.full(len(log_.item_ids), OOV, dtype=index_dtype(kept.size + FIRST_INDEX))
    item_map[kept] = np.arange(FIRST_INDEX, kept.size + FIRST_INDEX)
    cat_map = np.full(len(log_.category_ids), OOV, dtype=index_dtype(cat_ranked.size + FIRST_INDEX))
    cat_map[cat_ranked] = np.arange(FIRST_INDEX, cat_ranked.size + FIRST_INDEX)
    # each item's category: the one of its last training event (numpy assigns repeated indices in order)
    last_cat = np.zeros(len(log_.item_ids), dtype=np.int32)
    last_cat[train_items] = log_.category[train_rows]
    del train_items
    item_category = np.r_[np.array([PAD, OOV]), cat_map[last_cat[kept]]].astype(np.int32)
    train_users = np.unique(log_.user[train_rows])
    features: dict[str, list[str]] = {}
    columns = []
    for name, f in log_.user_features.items():
        seen = np.unique(f.codes[train_users])
        seen = seen[seen >= 0]
        values = f.values.take(pa.array(seen))
        order = pc.sort_indices(values).to_numpy()
        features[name] = values.take(pa.array(order)).to_pylist()
        value_map = np.full(len(f.values) + 1, OOV, dtype=np.int64)  # the last slot: missing (code -1)
        value_map[seen[order]] = np.arange(FIRST_INDEX, seen.size + FIRST_INDEX)
        columns.append(value_map[f.codes])
    width = max((len(v) + FIRST_INDEX for v in features.values()), default=FIRST_INDEX)
    user_feats = np.stack(columns, axis=1) if columns else np.zeros((len(log_.user_ids), 0))
    vocab = Vocabulary(
        log_.item_ids.take(pa.array(kept)), log_.category_ids.take(pa.array(cat_ranked)), features, item_category
    )
    oov = {"min_count": min_count, "items": int(rare.size), "item_events": int(counts[rare].sum())}
    return vocab, _Coding(item_map, cat_map, user_feats.astype(index_dtype(width)), oov)


@dataclass
class SampleSet:
    """One split. Event arrays are chronological per user; samples point into them. Integer arrays are of
    the smallest type that holds them (int32 items, int8 labels and feedback, …); callers cast batches."""

    event_item: np.ndarray  # (E,) item index
    event_cat: np.ndarray  # (E,) category index
    event_feedback: np.ndarray  # (E,) FEEDBACK_* of each behaviour (its own label, seen by later samples only)
    end: np.ndarray  # (N,) exclusive end of the sample's history in the event arrays
    length: np.ndarray  # (N,) history length, 0..max_len
    cand_item: np.ndarray  # (N,)
    cand_cat: np.ndarray  # (N,)
    label: np.ndarray  # (N,) int8 0/1
    user: np.ndarray  # (N,) user index, for GAUC
    user_feats: np.ndarray  # (N, F) user-feature indices
    # (E,) int64 Unix seconds of each behaviour: DSIN divides histories into sessions by it. Last, with a default,
    # so a split built without timestamps still serves the other models (DSIN refuses it: ``sessions``)
    event_time: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def history(self, rows: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gather (items, categories, mask), each (B, max_len), oldest first and right-padded; indices widened
        to int64 (the models' and the exported graphs' index type) from the compact stored dtypes."""
        offsets = np.arange(max_len)  # (L,)
        length = self.length[rows]  # (B,)
        idx = self.end[rows, None] - length[:, None] + offsets  # (B, L)
        mask = offsets < length[:, None]  # (B, L)
        idx = np.where(mask, idx, 0)
        items = np.where(mask, self.event_item[idx], PAD).astype(np.int64)
        cats = np.where(mask, self.event_cat[idx], PAD).astype(np.int64)
        return items, cats, mask

    def history_feedback(self, rows: np.ndarray, max_len: int) -> np.ndarray:
        """(B, max_len) feedback of the same positions as ``history``, FEEDBACK_PAD on padding."""
        offsets = np.arange(max_len)  # (L,)
        length = self.length[rows]  # (B,)
        mask = offsets < length[:, None]  # (B, L)
        idx = np.where(mask, self.end[rows, None] - length[:, None] + offsets, 0)  # (B, L)
        return np.where(mask, self.event_feedback[idx], FEEDBACK_PAD).astype(np.int64)

    def sessions(self, rows: np.ndarray, max_len: int, spec: SessionSpec) -> tuple[np.ndarray, np.ndarray]:
        """DSIN's session division of the same history window as ``history``: (index, mask), each (B, K, T),
        positions into the (B, max_len) history (sessions.session_layout, the service's division too)."""
        if self.event_time.shape != self.event_item.shape:
            raise ValueError("this split has no behaviour timestamps: DSIN's sessions need them")
        offsets = np.arange(max_len)  # (L,)
        length = self.length[rows]  # (B,)
        mask = offsets < length[:, None]  # (B, L)
        idx = np.where(mask, self.end[rows, None] - length[:, None] + offsets, 0)  # (B, L)
        return session_layout(self.event_time[idx], mask, spec)

    def restricted_to(self, users: np.ndarray) -> SampleSet:
        """The samples of the given users only (the event arrays are shared, not copied)."""
        rows = np.flatnonzero(np.isin(self.user, users))
        per_sample = ("end", "length", "cand_item", "cand_cat", "label", "user", "user_feats")
        return SampleSet(
            **{
                f.name: getattr(self, f.name)[rows] if f.name in per_sample else getattr(self, f.name)
                for f in fields(self)
            }
        )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for f in fields(self):
            np.save(folder / f"{f.name}.npy", getattr(self, f.name))

    @classmethod
    def load(cls, folder: Path) -> SampleSet:
        """Memory-mapped copy-on-write: pages are read on first touch and shared with the page cache, and
        the arrays stay writable for callers that wrap them (torch warns on read-only arrays)."""
        return cls(**{f.name: _load_array(folder / f"{f.name}.npy") for f in fields(cls)})


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="c")
    except ValueError:  # an empty array has no bytes to map
        return np.load(path)


@dataclass
class PreparedData:
    train: SampleSet
    valid: SampleSet
    test: SampleSet
    vocab: Vocabulary
    info: dict[str, object] = field(default_factory=dict)


def _feedback(log_: EncodedLog, rows: np.ndarray) -> np.ndarray:
    """Each behaviour's own outcome as history feedback: negative/positive for labelled logs, unknown
    otherwise (an implicit log's behaviours are all interactions; their outcome is not observed)."""
    if log_.label is None:
        return np.full(rows.size, FEEDBACK_UNKNOWN, dtype=np.int8)
    return (FEEDBACK_NEGATIVE + log_.label[rows]).astype(np.int8)


def _positions(user_codes: np.ndarray) -> np.ndarray:
    """Position of each event inside its user's run of a user-sorted array."""
    n = user_codes.size
    starts = np.flatnonzero(np.r_[True, user_codes[1:] != user_codes[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.arange(n) - run_start


def _split_samples(
    log_: EncodedLog, coding: _Coding, events: np.ndarray, max_len: int, rows: np.ndarray | None = None
) -> SampleSet:
    """Samples for every event at position t ≥ 1 of the log rows ``events`` (whole users, in log order),
    or only for the positions ``rows`` of those."""
    raw_user = log_.user[events]
    new_user = np.r_[True, raw_user[1:] != raw_user[:-1]] if events.size else np.zeros(0, dtype=bool)
    user = np.cumsum(new_user) - 1  # (E,) dense user index inside the split, in log order
    pos = _positions(user)
    event_item = coding.item[log_.item[events]]
    event_cat = coding.category[log_.category[events]]
    sel = np.flatnonzero(pos >= 1) if rows is None else rows
    label = np.ones(sel.size, dtype=np.int8) if rows is not None or log_.label is None else log_.label[events[sel]]
    user_first = np.flatnonzero(new_user)  # (U_split,) first event of each user
    feats = coding.user_feats[raw_user[user_first]]  # (U_split, F)
    return SampleSet(
        event_item=event_item,
        event_cat=event_cat,
        event_feedback=_feedback(log_, events),
        event_time=log_.timestamp[events].astype(np.int64),
        end=sel.astype(index_dtype(events.size + 1)),
        length=np.minimum(pos[sel], max_len).astype(index_dtype(max_len + 1)),
        cand_item=event_item[sel],
        cand_cat=event_cat[sel],
        label=label.astype(np.int8),
        user=user[sel].astype(index_dtype(max(user_first.size, 1))),
        user_feats=feats[user[sel]],
    )


def prepare_din_movielens(
    log_: LogSource,
    max_len: int,
    seed: int,
    test_fraction: float = 0.3,
    valid_fraction: float = 0.1,
    min_count: int = 1,
) -> PreparedData:
    """Split users (seeded shuffle) into 70% train / 30% test; validation users carved from train."""
    if not log_.has_labels:
        raise ValueError(f"{log_.name}: the din-movielens protocol needs a rating or label column")
    encoded = log_.encode()
    n_users = len(encoded.user_ids)
    perm = np.random.default_rng(seed).permutation(n_users)  # user codes are in id order
    n_test = round(test_fraction * n_users)
    n_valid = max(1, round(valid_fraction * (n_users - n_test)))
    split_of_user = np.empty(n_users, dtype=np.int8)  # 0 train, 1 valid, 2 test
    split_of_user[perm[:n_test]] = 2
    split_of_user[perm[n_test : n_test + n_valid]] = 1
    split_of_user[perm[n_test + n_valid :]] = 0
    split_of_event = split_of_user[encoded.user]
    train_rows = np.flatnonzero(split_of_event == 0)
    vocab, coding = build_vocabulary(encoded, train_rows, min_count)
    sets = {}
    for code, name in enumerate(("train", "valid", "test")):
        events = train_rows if code == 0 else np.flatnonzero(split_of_event == code)
        sets[name] = _split_samples(encoded, coding, events, max_len)
    counts = np.bincount(split_of_user, minlength=3)
    info: dict[str, object] = {
        "users": {"train": int(counts[0]), "valid": int(counts[1]), "test": int(counts[2])},
        "oov": coding.oov,
    }
    return PreparedData(sets["train"], sets["valid"], sets["test"], vocab, info)


def _sample_negatives(
    rng: np.random.Generator,
    users: np.ndarray,
    seen_keys: np.ndarray,
    n_items: int,
    base: int,
    probabilities: np.ndarray | None = None,
) -> np.ndarray:
    """One item per entry of ``users``, not in the user's own log: uniform over [2, n_items), or drawn with
    the given (n_items,) probabilities (training.negatives.popularity)."""

    def draw(size: int) -> np.ndarray:
        if probabilities is None:
            return rng.integers(2, n_items, size=size)
        return rng.choice(n_items, size=size, p=probabilities)

    neg = draw(users.size)
    for _ in range(100):
        clash = np.isin(users * base + neg, seen_keys)
        if not clash.any():
            break
        neg[clash] = draw(int(clash.sum()))
    return neg


def prepare_implicit(
    log_: LogSource,
    max_len: int,
    seed: int,
    min_count: int = 1,
    negatives: str = "uniform",
    negative_alpha: float = 0.75,
) -> PreparedData:
    """Every behaviour is a positive paired with one sampled negative; leave-last-out per user.

    The last sample of each user is test, the one before it validation, the rest training. Training negatives
    are drawn by ``negatives`` (uniform, or popularity ∝ count^α over the training behaviours); validation and
    test negatives are uniform whatever it says (drawn first, from the same stream: the same for both).
    """
    encoded = log_.encode()
    user_codes = encoded.user
    pos = _positions(user_codes)
    last = np.r_[user_codes[1:] != user_codes[:-1], True] if user_codes.size else np.zeros(0, dtype=bool)
    second_last = np.r_[last[1:], False] & ~last
    vocab, coding = build_vocabulary(encoded, np.flatnonzero(~last), min_count)
    base = vocab.n_items
    event_item = coding.item[encoded.item]
    seen_keys = np.unique(user_codes.astype(np.int64) * base + event_item)
    item_cat = vocab.item_category_table()
    rng = np.random.default_rng(seed)
    split_rows = {
        "test": np.flatnonzero(last & (pos >= 1)),
        "valid": np.flatnonzero(second_last & (pos >= 1)),
        "train": np.flatnonzero(~last & ~second_last & (pos >= 1)),
    }
    everything = np.arange(len(encoded))
    train_probs = None
    if negatives == "popularity":
        train_counts = np.bincount(event_item[split_rows["train"]], minlength=vocab.n_items)
        train_probs = popularity(train_counts, negative_alpha)
    elif negatives != "uniform":
        raise ValueError(f"unknown negative sampler {negatives!r}; choose uniform or popularity")
    sets: dict[str, SampleSet] = {}
    for name, rows in split_rows.items():
        positive = _split_samples(encoded, coding, everything, max_len, rows=rows)
        probs = train_probs if name == "train" else None
        neg_item = _sample_negatives(rng, positive.user.astype(np.int64), seen_keys, vocab.n_items, base, probs)
        sets[name] = SampleSet(
            event_item=positive.event_item,
            event_cat=positive.event_cat,
            event_feedback=positive.event_feedback,
            event_time=positive.event_time,
            end=np.r_[positive.end, positive.end],
            length=np.r_[positive.length, positive.length],
            cand_item=np.r_[positive.cand_item, neg_item.astype(positive.cand_item.dtype)],
            cand_cat=np.r_[positive.cand_cat, item_cat[neg_item].astype(positive.cand_cat.dtype)],
            label=np.r_[np.ones(rows.size), np.zeros(rows.size)].astype(np.int8),
            user=np.r_[positive.user, positive.user],
            user_feats=np.r_[positive.user_feats, positive.user_feats],
        )
    info = {"users": len(encoded.user_ids), "oov": coding.oov}
    return PreparedData(sets["train"], sets["valid"], sets["test"], vocab, info)


def _eval_sample(data: PreparedData, eval_users: int, seed: int) -> None:
    """Keep the samples of at most ``eval_users`` seeded-random users in validation and test, in place."""
    rng = np.random.default_rng([seed, eval_users])
    for name in ("valid", "test"):
        split: SampleSet = getattr(data, name)
        users = np.unique(split.user)
        if users.size > eval_users:
            setattr(data, name, split.restricted_to(rng.choice(users, eval_users, replace=False)))


def prepare(
    log_: LogSource,
    protocol: str,
    max_len: int = 50,
    seed: int = 0,
    cache_dir: Path | None = None,
    min_count: int = 1,
    eval_users: int | None = None,
    negatives: str = "uniform",
    negative_alpha: float = 0.75,
) -> PreparedData:
    """Prepare (or load from ``cache_dir``) the three splits and the vocabulary.

    ``min_count``: items seen fewer times in the training events map to OOV (counted in ``info["oov"]``).
    ``eval_users``: validation and test keep the samples of this many seeded-random users of theirs.
    ``negatives``, ``negative_alpha``: the implicit protocol's training negatives (prepare_implicit)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    key_parts: list[object] = [
        CACHE_FORMAT,
        log_.name,
        log_.fingerprint,
        log_.user_feature_names,
        protocol,
        max_len,
        seed,
        min_count,
    ]
    sampled = protocol == "implicit" and negatives != "uniform"
    if sampled:  # only then do the splits differ (uniform keeps the keys, and the caches, made before)
        key_parts += [negatives, negative_alpha]
    key_src = json.dumps(key_parts)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    folder = None if cache_dir is None else Path(cache_dir) / f"{log_.name}-{protocol}-{key}"
    if folder is not None and (folder / "info.json").exists():
        log.info("prepared data from cache %s", folder)
        info = json.loads((folder / "info.json").read_text())
        train, valid, test = (SampleSet.load(folder / s) for s in ("train", "valid", "test"))
        data = PreparedData(train, valid, test, Vocabulary.load(folder), {**info, "cached": True})
    else:
        if protocol == "din-movielens":
            data = prepare_din_movielens(log_, max_len, seed, min_count=min_count)
        else:
            data = prepare_implicit(log_, max_len, seed, min_count, negatives, negative_alpha)
        data.info.update({"protocol": protocol, "max_len": max_len, "seed": seed, "dataset": log_.name})
        if sampled:
            data.info["negatives"] = {"sampler": negatives, "alpha": negative_alpha}
        if folder is not None:
            tmp = folder.with_name(folder.name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            for s in ("train", "valid", "test"):
                getattr(data, s).save(tmp / s)
            data.vocab.save(tmp)
            (tmp / "info.json").write_text(json.dumps(data.info))
            tmp.replace(folder)
        data.info["cached"] = False
    oov = data.info["oov"]
    assert isinstance(oov, dict)
    if oov["items"]:
        log.info(
            "%d items seen < %d times map to OOV (%d training events)", oov["items"], min_count, oov["item_events"]
        )
    if eval_users is not None:
        _eval_sample(data, eval_users, seed)
        data.info["eval_users"] = eval_users
    return data
