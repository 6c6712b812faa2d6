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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("user_id", "item_id", "category_id", "timestamp")
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


def timestamp_seconds(values: pd.Series) -> pd.Series:
    """Unix seconds (int64) from integer or float seconds, datetimes, or date-time strings (ISO 8601 and
    the like; naive ones read as UTC). Unparseable values are an error that names one of them."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.astype("int64")
    try:
        stamps = pd.to_datetime(values, utc=True, format="mixed")
    except (ValueError, TypeError) as e:
        raise ValueError(f"timestamps must be Unix seconds or date-times: {e}") from None
    return ((stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).astype("int64")


def _file_fingerprint(*paths: Path) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


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


def load_event_log(path: Path, user_features: tuple[str, ...] | None = None) -> BehaviourLog:
    """A parquet or CSV file already in the canonical schema, or a folder of them (a partitioned log:
    every part is read). Timestamps may be Unix seconds or date-times.

    Columns other than the canonical ones (and ``rating``/``label``) are user features unless
    ``user_features`` names them explicitly; each user's most recent value is kept. Rows without a user
    or item id are dropped, with a warning that counts them.
    """
    path = Path(path)
    parts = sorted([*path.glob("*.parquet"), *path.glob("*.csv")]) if path.is_dir() else [path]
    if not parts:
        raise FileNotFoundError(f"no .parquet or .csv event log in {path}")
    # ids as strings from CSV too: "007" and "7" are different items
    frames = [
        pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p, dtype={"user_id": str, "item_id": str})
        for p in parts
    ]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    missing = [c for c in EVENT_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing canonical columns {missing}")
    unnamed = df["user_id"].isna() | df["item_id"].isna()
    if unnamed.any():
        log.warning("%s: %d of %d rows have no user_id or item_id; dropped", path, int(unnamed.sum()), len(df))
        df = df[~unnamed]
    df = df.assign(timestamp=timestamp_seconds(df["timestamp"]))  # before "latest" below sorts by it
    known = {*EVENT_COLUMNS, "rating", "label"}
    feats = tuple(user_features) if user_features is not None else tuple(c for c in df.columns if c not in known)
    users = None
    if feats:
        latest = df.sort_values("timestamp", kind="stable").groupby("user_id", sort=False).last()
        users = latest[list(feats)].astype(str)
        users.index = users.index.astype(str)
        users.index.name = "user_id"
    return BehaviourLog(path.stem, _canonical(df), users, _file_fingerprint(*parts))


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
    seed: int = 0


def generate_synthetic(cfg: SyntheticConfig | None = None) -> BehaviourLog:
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    item_cat = rng.integers(0, cfg.n_categories, size=cfg.n_items)  # (n_items,)
    items_of = [np.flatnonzero(item_cat == c) for c in range(cfg.n_categories)]
    interests = np.stack(
        [rng.choice(cfg.n_categories, cfg.interests_per_user, replace=False) for _ in range(cfg.n_users)]
    )  # (U, k)
    counts = rng.integers(cfg.min_events, cfg.max_events + 1, size=cfg.n_users)
    user = np.repeat(np.arange(cfg.n_users), counts)  # (N,)
    n = user.size
    from_interest = rng.random(n) < cfg.p_interest
    cat = np.where(
        from_interest,
        interests[user, rng.integers(0, cfg.interests_per_user, size=n)],
        rng.integers(0, cfg.n_categories, size=n),
    )
    # an item drawn uniformly inside the chosen category (categories are never empty at these sizes)
    sizes = np.array([len(x) for x in items_of])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(items_of)
    item = flat[offsets[cat] + (rng.random(n) * sizes[cat]).astype(np.int64)]
    cat = item_cat[item]
    # did the category occur among this user's previous `recent` behaviours?
    match = np.zeros(n, dtype=bool)
    for lag in range(1, cfg.recent + 1):
        same_user = np.zeros(n, dtype=bool)
        same_user[lag:] = user[lag:] == user[:-lag]
        prev_cat = np.full(n, -1)
        prev_cat[lag:] = cat[:-lag]
        match |= same_user & (prev_cat == cat)
    segment = rng.integers(0, 3, size=cfg.n_users)
    p = np.where(match, cfg.p_click_match, cfg.p_click_other) + 0.03 * segment[user]
    label = (rng.random(n) < p).astype(np.int8)
    gaps = rng.integers(60, 3600, size=n)
    events = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in user],
            "item_id": [f"i{i}" for i in item],
            "category_id": [f"c{c}" for c in cat],
            "timestamp": 1_700_000_000 + np.cumsum(gaps),
            "label": label,
        }
    )
    users = pd.DataFrame({"segment": [f"s{s}" for s in segment]}, index=[f"u{u}" for u in range(cfg.n_users)])
    users.index.name = "user_id"
    fp = hashlib.sha1(json.dumps(cfg.__dict__, sort_keys=True).encode()).hexdigest()[:16]
    return BehaviourLog("synthetic", _canonical(events), users, fp)


def load_dataset(
    dataset: str,
    data_dir: Path | None = None,
    download: bool = False,
    synthetic: SyntheticConfig | None = None,
) -> BehaviourLog:
    """Dispatch on the CLI's ``--dataset`` name."""
    if dataset == "synthetic":
        return generate_synthetic(synthetic)
    if data_dir is None:
        raise ValueError(f"--data-dir is required for dataset {dataset!r}")
    if dataset == "ml-100k":
        if download:
            data_dir = download_movielens_100k(Path(data_dir))
        return load_movielens_100k(Path(data_dir))
    if dataset == "ml-latest":
        return load_movielens_latest(Path(data_dir))
    if dataset == "events":
        return load_event_log(Path(data_dir))
    raise ValueError(f"unknown dataset {dataset!r}")
