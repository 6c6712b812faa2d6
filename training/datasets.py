"""Behaviour logs in one canonical schema, and the adapters that produce it.

Canonical schema (one row per behaviour):
    user_id: str, item_id: str, category_id: str, timestamp: int64 (seconds),
    plus ``rating`` (float) and/or ``label`` (0/1),
and, optionally, a user table indexed by ``user_id`` with one string column per profile feature.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from training.events import (
    EVENT_COLUMNS,
    EncodedLog,
    EventFiles,
    encode_frame,
    open_event_files,
    timestamp_seconds,
)
from training.events import file_fingerprint as _file_fingerprint

log = logging.getLogger(__name__)

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


@dataclass(frozen=True)
class BehaviourLog:
    """A behaviour log in the canonical schema; ``fingerprint`` identifies its source for caching."""

    name: str
    events: pd.DataFrame
    users: pd.DataFrame | None
    fingerprint: str

    def __post_init__(self) -> None:
        missing = [c for c in EVENT_COLUMNS if c not in self.events.columns]
        if missing:
            raise ValueError(f"{self.name}: event log lacks columns {missing}")
        if self.users is not None and self.users.index.name != "user_id":
            raise ValueError(f"{self.name}: the user table must be indexed by user_id")

    @property
    def has_labels(self) -> bool:
        return "rating" in self.events.columns or "label" in self.events.columns

    @property
    def user_feature_names(self) -> tuple[str, ...]:
        return () if self.users is None else tuple(self.users.columns)

    def with_user_features(self, names: tuple[str, ...] | None) -> BehaviourLog:
        """The same log keeping only the named user features (None keeps all, () drops them)."""
        if names is None or self.users is None:
            return self
        unknown = sorted(set(names) - set(self.users.columns))
        if unknown:
            raise ValueError(f"{self.name}: no user feature {unknown}; it has {list(self.users.columns)}")
        users = self.users[list(names)] if names else None
        return BehaviourLog(self.name, self.events, users, self.fingerprint)

    def encode(self) -> EncodedLog:
        """The log as compact codes sorted by (user, time), the form the protocols prepare from."""
        return encode_frame(self.name, self.fingerprint, self.events, self.users)


def _canonical(events: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "user_id": events["user_id"].astype(str),
            "item_id": events["item_id"].astype(str),
            "category_id": events["category_id"].astype(str),
            "timestamp": timestamp_seconds(events["timestamp"]),
        }
    )
    if "rating" in events.columns:
        out["rating"] = events["rating"].astype("float32")
    if "label" in events.columns:
        out["label"] = events["label"].astype("int8")
    return out.reset_index(drop=True)


# --- MovieLens-100K (GroupLens layout) ------------------------------------------------------------


def download_movielens_100k(dest: Path) -> Path:
    """Fetch ml-100k from GroupLens into ``dest`` (the licence forbids redistributing it)."""
    target = dest / "ml-100k"
    if (target / "u.data").exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", ML100K_URL)
    with urllib.request.urlopen(ML100K_URL, timeout=60) as resp:
        payload = resp.read()
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        zf.extractall(dest)
    return target


def load_movielens_100k(data_dir: Path) -> BehaviourLog:
    """u.data ratings; category = the movie's first genre flag; user features = gender, age, occupation."""
    data_dir = Path(data_dir)
    files = [data_dir / n for n in ("u.data", "u.item", "u.user")]
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: point --data-dir at an ml-100k folder or use --download")
    ratings = pd.read_csv(files[0], sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"])
    items = pd.read_csv(files[1], sep="|", header=None, encoding="latin-1")
    flags = items.iloc[:, 5:24].to_numpy(dtype=bool)  # (n_items, 19)
    first = np.where(flags.any(axis=1), flags.argmax(axis=1), 0)
    category = pd.Series(np.asarray(ML100K_GENRES)[first], index=items[0].astype(str))
    ratings["category_id"] = category.reindex(ratings["item_id"].astype(str)).fillna("unknown").to_numpy()
    users = pd.read_csv(files[2], sep="|", header=None, names=["user_id", "age", "gender", "occupation", "zip"])
    users = users.astype(str).set_index("user_id")[["gender", "age", "occupation"]]
    return BehaviourLog("ml-100k", _canonical(ratings), users, _file_fingerprint(*files))


# --- MovieLens "latest" CSV layout ----------------------------------------------------------------


def load_movielens_latest(data_dir: Path) -> BehaviourLog:
    """ratings.csv (userId,movieId,rating,timestamp) + movies.csv (movieId,title,genres 'A|B')."""
    data_dir = Path(data_dir)
    rpath, mpath = data_dir / "ratings.csv", data_dir / "movies.csv"
    for f in (rpath, mpath):
        if not f.exists():
            raise FileNotFoundError(f"{f} not found: --data-dir must hold ratings.csv and movies.csv")
    ratings = pd.read_csv(rpath).rename(columns={"userId": "user_id", "movieId": "item_id"})
    movies = pd.read_csv(mpath)
    first_genre = movies["genres"].astype(str).str.split("|").str[0]
    category = pd.Series(first_genre.to_numpy(), index=movies["movieId"].astype(str))
    ratings["category_id"] = category.reindex(ratings["item_id"].astype(str)).fillna("unknown").to_numpy()
    return BehaviourLog("ml-latest", _canonical(ratings), None, _file_fingerprint(rpath, mpath))


# --- generic event log ----------------------------------------------------------------------------


def load_event_log(path: Path, user_features: tuple[str, ...] | None = None) -> EncodedLog:
    """A parquet or CSV file already in the canonical schema, or a folder of them (a partitioned log:
    every part is read), read now into codes (training.events). Timestamps may be Unix seconds or
    date-times. Columns other than the canonical ones (and ``rating``/``label``) are user features unless
    ``user_features`` names them explicitly; each user's most recent value is kept. Rows without a user
    or item id are dropped, with a warning that counts them."""
    return open_event_files(path, user_features).encode()


# --- synthetic log with planted interests ---------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """Users hold a few latent interests (categories). A behaviour is clicked with high probability
    when its category appears among the user's ``recent`` previous behaviours, so the truly relevant
    history items for a candidate are the recent ones of its category."""

    n_users: int = 2000
    n_items: int = 1000
    n_categories: int = 20
    interests_per_user: int = 3
    min_events: int = 30
    max_events: int = 80
    p_interest: float = 0.55  # chance that a behaviour comes from one of the user's interests
    recent: int = 10
    p_click_match: float = 0.85
    p_click_other: float = 0.10
    zipf: float = 0.0  # item popularity inside its category ∝ 1 / rank^zipf (0: uniform)
    seed: int = 0
    # planted sessions (DSIN, issue 17); 0 keeps the log above. A user's behaviours come in sessions of this
    # many behaviours on average (minutes apart inside, hours to days between); each session follows one of
    # the user's interests, and a behaviour is clicked mostly when it matches the *current session's* interest
    session_events: float = 0.0
    p_session_interest: float = 0.6  # a behaviour of the session's interest; else another of the user's, or any
    p_other_interest: float = 0.25
    p_click_session: float = 0.85
    p_click_interest: float = 0.2  # one of the user's interests, but not the session's


SEGMENT_LIFT = 0.03  # each segment index adds this to the click probability


def planted_click_probability(cfg: SyntheticConfig, match: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """The planted click model: ``p_click_match`` when the behaviour's category occurs among the user's
    ``recent`` previous behaviours (``match``), else ``p_click_other``, plus SEGMENT_LIFT per segment index
    (s0, s1, s2). The log is drawn from it; ``training.simulate``'s users click with it."""
    return np.where(match, cfg.p_click_match, cfg.p_click_other) + SEGMENT_LIFT * segment


class _ItemSampler:
    """Draws an item of a given category, Zipf-distributed by the item's rank inside its category.

    Items are laid out category by category; ``bounds`` holds, per item, its category plus the
    cumulative share of the category's weight up to it (each category's run ends at exactly c + 1), so a
    draw for category c is one search of c + u, u ~ U[0, 1)."""

    def __init__(self, item_cat: np.ndarray, n_categories: int, zipf: float) -> None:
        self.items = np.argsort(item_cat, kind="stable")  # (I,) items grouped by category, by id inside
        sizes = np.bincount(item_cat, minlength=n_categories)
        if (sizes == 0).any():
            raise ValueError(f"{int((sizes == 0).sum())} categories have no item: use more items per category")
        self.end = np.cumsum(sizes)  # (C,) exclusive end of each category's run
        start = self.end - sizes
        cat_of = item_cat[self.items]
        rank = np.arange(item_cat.size) - start[cat_of]  # (I,) 0-based rank inside the category
        weight = 1.0 / (rank + 1.0) ** zipf
        cum = np.cumsum(weight)
        before = np.r_[0.0, cum][start]  # (C,) weight of the categories before each
        share = (cum - before[cat_of]) / (cum[self.end - 1] - before)[cat_of]
        share[self.end - 1] = 1.0
        self.bounds = cat_of + share  # (I,) non-decreasing

    def draw(self, cat: np.ndarray, u: np.ndarray) -> np.ndarray:
        keys = cat + u
        order = np.argsort(keys)  # sorted keys walk the table in order, not at random: ≈ 4× faster
        pos = np.empty(keys.size, dtype=np.int64)
        pos[order] = np.searchsorted(self.bounds, keys[order], side="right")
        return self.items[np.minimum(pos, self.end[cat] - 1)]


def _id_strings(prefix: str, n: int) -> pa.Array:
    """["p0", "p1", …] built in Arrow, not per id in Python."""
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(np.arange(n)), pa.string()), "")


def synthetic_blocks(cfg: SyntheticConfig, block_users: int | None = None) -> Iterator[pa.Table]:
    """The synthetic log in blocks of ``block_users`` users (all at once by default), each a table in the
    canonical schema plus the ``segment`` user feature; vectorised, so 10^8 events stream in bounded
    memory. One generator draws everything in order: the same config and block size give the same log."""
    rng = np.random.default_rng(cfg.seed)
    k = cfg.interests_per_user
    if k > cfg.n_categories:
        raise ValueError("interests_per_user exceeds n_categories")
    item_cat = rng.integers(0, cfg.n_categories, size=cfg.n_items)  # (I,)
    sampler = _ItemSampler(item_cat, cfg.n_categories, cfg.zipf)
    names = {"item": _id_strings("i", cfg.n_items), "cat": _id_strings("c", cfg.n_categories)}
    segment_names = _id_strings("s", 3)
    clock = 1_700_000_000
    step = block_users or max(cfg.n_users, 1)
    for first in range(0, cfg.n_users, step):
        n_users = min(step, cfg.n_users - first)
        interests = _distinct_categories(rng, n_users, k, cfg.n_categories)  # (U, k)
        counts = rng.integers(cfg.min_events, cfg.max_events + 1, size=n_users)
        user = np.repeat(np.arange(n_users), counts)  # (N,) block-local user
        n = user.size
        from_interest = rng.random(n) < cfg.p_interest
        cat = np.where(
            from_interest,
            interests[user, rng.integers(0, k, size=n)],
            rng.integers(0, cfg.n_categories, size=n),
        )
        gaps = None
        if cfg.session_events > 0:
            cat, p, gaps = _planted_sessions(cfg, rng, user, interests)
        item = sampler.draw(cat, rng.random(n))
        if gaps is None:
            # did the category occur among this user's previous `recent` behaviours?
            match = np.zeros(n, dtype=bool)
            for lag in range(1, cfg.recent + 1):
                same = np.zeros(n, dtype=bool)
                same[lag:] = (user[lag:] == user[:-lag]) & (cat[lag:] == cat[:-lag])
                match |= same
        segment = rng.integers(0, 3, size=n_users)
        # with sessions, the session's planted probability, lifted per segment as the click model lifts every click
        p = planted_click_probability(cfg, match, segment[user]) if gaps is None else p + SEGMENT_LIFT * segment[user]
        label = (rng.random(n) < p).astype(np.int8)
        if gaps is None:  # drawn last, as before sessions were planted: the same seed gives the same log
            gaps = rng.integers(60, 3600, size=n)
        stamps = clock + np.cumsum(gaps)
        clock = int(stamps[-1]) if n else clock
        global_user = pa.array(first + user)
        yield pa.table(
            {
                "user_id": pc.binary_join_element_wise("u", pc.cast(global_user, pa.string()), ""),
                "item_id": names["item"].take(pa.array(item)),
                "category_id": names["cat"].take(pa.array(cat)),
                "timestamp": pa.array(stamps, type=pa.int64()),
                "label": pa.array(label),
                "segment": segment_names.take(pa.array(segment[user])),
            }
        )


def _planted_sessions(
    cfg: SyntheticConfig, rng: np.random.Generator, user: np.ndarray, interests: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Categories (N,), click probabilities (N,) and time gaps (N,) of a block's events in sessions.

    A session starts at each user's first event and then with probability 1 / session_events; it draws one
    of the user's interests. A behaviour's category is that interest (p_session_interest), another of the
    user's interests (p_other_interest) or any category; it is clicked with p_click_session when it matches
    the session's interest, p_click_interest when it is another of the user's, p_click_other otherwise. So
    the current session's interest predicts the click, and the user's interests as a whole do not."""
    n, k = user.size, interests.shape[1]
    first = np.r_[True, user[1:] != user[:-1]] if n else np.zeros(0, dtype=bool)
    starts = first | (rng.random(n) < 1.0 / cfg.session_events)  # (N,)
    session = np.cumsum(starts) - 1  # (N,) block-wide session number
    session_user = user[np.flatnonzero(starts)]  # (S,)
    session_interest = interests[session_user, rng.integers(0, k, size=session_user.size)]  # (S,)
    own = session_interest[session]  # (N,)
    other = interests[user, rng.integers(0, k, size=n)]  # (N,) any of the user's interests
    u = rng.random(n)
    cat = np.where(
        u < cfg.p_session_interest,
        own,
        np.where(u < cfg.p_session_interest + cfg.p_other_interest, other, rng.integers(0, cfg.n_categories, size=n)),
    )
    of_user = (interests[user] == cat[:, None]).any(axis=1)  # (N,)
    p = np.where(cat == own, cfg.p_click_session, np.where(of_user, cfg.p_click_interest, cfg.p_click_other))
    # inside a session behaviours are 10 s to 15 min apart; sessions are 2 hours to 3 days apart
    gaps = np.where(starts, rng.integers(2 * 3600, 3 * 86400, size=n), rng.integers(10, 900, size=n))
    return cat, p, gaps


def _distinct_categories(rng: np.random.Generator, n_users: int, k: int, n_categories: int) -> np.ndarray:
    """(U, k) k distinct categories per user: drawn at once, rows with a repeat drawn again."""
    out = rng.integers(0, n_categories, size=(n_users, k))
    while True:
        s = np.sort(out, axis=1)
        clash = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not clash.any():
            return out
        out[clash] = rng.integers(0, n_categories, size=(int(clash.sum()), k))


def generate_synthetic(cfg: SyntheticConfig | None = None) -> BehaviourLog:
    """The synthetic log in memory, as one block (``training.synthesize`` writes big ones to parquet)."""
    cfg = cfg or SyntheticConfig()
    table = next(synthetic_blocks(cfg))
    events = table.drop_columns(["segment"]).to_pandas()
    per_user = table.select(["user_id", "segment"]).to_pandas().drop_duplicates("user_id")
    users = per_user.set_index("user_id")
    fp = hashlib.sha1(json.dumps(cfg.__dict__, sort_keys=True).encode()).hexdigest()[:16]
    return BehaviourLog("synthetic", _canonical(events), users, fp)


def load_dataset(
    dataset: str,
    data_dir: Path | None = None,
    download: bool = False,
    synthetic: SyntheticConfig | None = None,
) -> BehaviourLog | EventFiles:
    """Dispatch on the CLI's ``--dataset`` name."""
    if dataset == "synthetic":
        return generate_synthetic(synthetic)
    if dataset == "served":  # samples as served, not a behaviour log: training.train prepares them itself
        raise ValueError("dataset 'served' holds samples, not behaviours: train on it (training/served_data.py)")
    if data_dir is None:
        raise ValueError(f"--data-dir is required for dataset {dataset!r}")
    if dataset == "ml-100k":
        if download:
            data_dir = download_movielens_100k(Path(data_dir))
        return load_movielens_100k(Path(data_dir))
    if dataset == "ml-latest":
        return load_movielens_latest(Path(data_dir))
    if dataset == "events":
        return open_event_files(Path(data_dir))  # read when prepared (not at all when the cache has it)
    raise ValueError(f"unknown dataset {dataset!r}")
