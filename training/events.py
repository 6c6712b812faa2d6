"""Event logs as compact integer codes, the form both protocols prepare from.

A log is encoded once: users, items and categories become int32 codes into one global dictionary per
column (the string ids are kept once, in the dictionaries, never per event), timestamps int64 seconds,
labels int8, and the events are sorted by (user, time). File logs (parquet or CSV files, or folders of
parts) are streamed with pyarrow, one batch at a time; pandas logs (the MovieLens adapters, the synthetic
generator) are encoded from their frames into the same arrays. Memory: ≈ 25 bytes per event while reading
(the codes) plus the dictionaries, against ≈ 330 for a pandas frame of string columns.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

log = logging.getLogger(__name__)

EVENT_COLUMNS = ("user_id", "item_id", "category_id", "timestamp")
LABEL_COLUMNS = ("rating", "label")
RATING_POSITIVE = 4.0  # a rating of at least this is a click (the DIN paper's MovieLens protocol)
BATCH_ROWS = 1 << 20  # rows per streamed batch: bounds the transient string memory of one batch
ID_COLUMNS = ("user_id", "item_id", "category_id")


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


def file_fingerprint(*paths: Path) -> str:
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclass
class UserFeature:
    """One profile feature: each user's value as a code into ``values``; -1 where the user has none."""

    codes: np.ndarray  # (U,) int32
    values: pa.Array  # string dictionary


@dataclass
class EncodedLog:
    """A behaviour log as codes, sorted by (user, time), ties in log order.

    User codes follow the sorted user ids, so sorting by code sorts by id (the protocols' user split
    shuffles users in id order)."""

    name: str
    fingerprint: str
    user: np.ndarray  # (E,) int32 into user_ids
    item: np.ndarray  # (E,) int32 into item_ids
    category: np.ndarray  # (E,) int32 into category_ids
    timestamp: np.ndarray  # (E,) int64 Unix seconds
    label: np.ndarray | None  # (E,) int8 0/1; None for a log of interactions only (implicit feedback)
    user_ids: pa.Array  # (U,) sorted strings
    item_ids: pa.Array
    category_ids: pa.Array
    user_features: dict[str, UserFeature] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.user.shape[0])

    @property
    def has_labels(self) -> bool:
        return self.label is not None

    @property
    def user_feature_names(self) -> tuple[str, ...]:
        return tuple(self.user_features)

    def encode(self) -> EncodedLog:
        return self

    def with_user_features(self, names: tuple[str, ...] | None) -> EncodedLog:
        if names is None:
            return self
        unknown = sorted(set(names) - set(self.user_features))
        if unknown:
            raise ValueError(f"{self.name}: no user feature {unknown}; it has {list(self.user_features)}")
        kept = {k: self.user_features[k] for k in names}
        return EncodedLog(**{**self.__dict__, "user_features": kept})

    @property
    def events(self) -> pd.DataFrame:
        """The log decoded to a canonical pandas frame (for inspecting small logs; preparation never
        decodes)."""
        out = pd.DataFrame(
            {
                "user_id": self.user_ids.take(pa.array(self.user)).to_pandas(),
                "item_id": self.item_ids.take(pa.array(self.item)).to_pandas(),
                "category_id": self.category_ids.take(pa.array(self.category)).to_pandas(),
                "timestamp": self.timestamp,
            }
        )
        if self.label is not None:
            out["label"] = self.label
        return out

    @property
    def users(self) -> pd.DataFrame | None:
        """The profile table, indexed by user_id (None without features)."""
        if not self.user_features:
            return None
        cols = {
            name: f.values.take(pa.array(f.codes, mask=f.codes < 0)).to_pandas()
            for name, f in self.user_features.items()
        }
        return pd.DataFrame(cols).set_axis(pd.Index(self.user_ids.to_pylist(), name="user_id"))


def _user_time_order(user: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """(E,) stable order by (user, time): one stable sort of a packed int64 key when the time span fits
    32 bits (it always does for Unix seconds of one log), two otherwise."""
    if timestamp.size == 0:
        return np.zeros(0, dtype=np.int64)
    lo = int(timestamp.min())
    if int(timestamp.max()) - lo < (1 << 32) and int(user.max()) < (1 << 31):
        key = user.astype(np.int64) << 32
        key |= timestamp - lo
        return np.argsort(key, kind="stable")
    return np.lexsort((timestamp, user))


def _labels_of(rating: np.ndarray | None, label: np.ndarray | None) -> np.ndarray | None:
    """int8 clicks: a rating of at least RATING_POSITIVE, else the label column (the rating wins)."""
    if rating is not None:
        return (rating >= RATING_POSITIVE).astype(np.int8)
    return None if label is None else label.astype(np.int8)


def _sorted_dictionary(values: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(rank of each code in ``values``' sorted order, the sorted values): renumbering codes by rank makes
    code order id order."""
    order = pc.sort_indices(values).to_numpy()
    rank = np.empty(len(values), dtype=np.int32)
    rank[order] = np.arange(len(values), dtype=np.int32)
    return rank, values.take(pa.array(order))


def _assemble(
    name: str,
    fingerprint: str,
    codes: dict[str, np.ndarray],
    dictionaries: dict[str, pa.Array],
    timestamp: np.ndarray,
    label: np.ndarray | None,
    user_features: dict[str, UserFeature],
) -> EncodedLog:
    rank, user_ids = _sorted_dictionary(dictionaries["user_id"])
    user = rank[codes["user_id"]]
    for f in user_features.values():  # features were coded per user in the old user order
        renumbered = np.empty_like(f.codes)
        renumbered[rank] = f.codes
        f.codes = renumbered
    order = _user_time_order(user, timestamp)
    return EncodedLog(
        name=name,
        fingerprint=fingerprint,
        user=user[order],
        item=codes["item_id"][order],
        category=codes["category_id"][order],
        timestamp=timestamp[order],
        label=None if label is None else label[order],
        user_ids=user_ids,
        item_ids=dictionaries["item_id"],
        category_ids=dictionaries["category_id"],
        user_features=user_features,
    )


def _string_dictionary(values: pd.Series | pd.Index | np.ndarray) -> pa.Array:
    return pa.array(np.asarray(values, dtype=object), type=pa.string())


def encode_frame(name: str, fingerprint: str, events: pd.DataFrame, users: pd.DataFrame | None) -> EncodedLog:
    """Encode a canonical pandas log (and its user table indexed by user_id)."""
    codes, dictionaries = {}, {}
    for col in ID_COLUMNS:
        c, uniques = pd.factorize(events[col].astype(str), sort=False)
        codes[col], dictionaries[col] = c.astype(np.int32), _string_dictionary(uniques)
    rating = events["rating"].to_numpy() if "rating" in events.columns else None
    label = events["label"].to_numpy() if "label" in events.columns else None
    features: dict[str, UserFeature] = {}
    if users is not None:
        table = users.reindex(pd.Index(dictionaries["user_id"].to_pylist()))
        for col in users.columns:
            c, uniques = pd.factorize(table[col].astype(object).where(table[col].notna(), None), sort=False)
            features[col] = UserFeature(c.astype(np.int32), _string_dictionary(np.asarray(uniques).astype(str)))
    ts = events["timestamp"].to_numpy(dtype=np.int64)
    return _assemble(name, fingerprint, codes, dictionaries, ts, _labels_of(rating, label), features)


# --- file logs, streamed ----------------------------------------------------------------------------


def _file_format(path: Path) -> ds.FileFormat:
    if path.suffix == ".parquet":
        return ds.ParquetFileFormat()
    # ids as strings from CSV too: "007" and "7" are different items
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in ID_COLUMNS}, strings_can_be_null=True)
    return ds.CsvFileFormat(convert_options=convert)


def _as_seconds(col: pa.Array) -> np.ndarray:
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return pc.cast(col, pa.int64(), safe=False).to_numpy(zero_copy_only=False)
    return timestamp_seconds(col.to_pandas()).to_numpy()


def _dictionary_chunk(col: pa.Array) -> pa.DictionaryArray:
    """A batch's column as int32 codes into the batch's own string dictionary."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(pa.string())
    elif not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    return pc.dictionary_encode(col)


def _unified_codes(chunks: list[pa.DictionaryArray], n: int) -> tuple[np.ndarray, pa.Array]:
    """One global dictionary for a column's batch dictionaries, and every event's code into it.

    The chunks are consumed (the list is emptied) so each batch's memory goes as soon as it is copied."""
    if not chunks:
        return np.zeros(0, dtype=np.int32), pa.array([], type=pa.string())
    unified = pa.chunked_array(chunks, type=chunks[0].type).unify_dictionaries()
    chunks.clear()
    dictionary = unified.chunk(0).dictionary
    parts = unified.chunks
    del unified
    out = np.empty(n, dtype=np.int32)
    at = 0
    for i in range(len(parts)):
        idx = parts[i].indices.to_numpy(zero_copy_only=False)
        out[at : at + idx.size] = np.where(parts[i].indices.is_null().to_numpy(zero_copy_only=False), -1, idx)
        at += idx.size
        parts[i] = None
    return out, dictionary


@dataclass(frozen=True)
class EventFiles:
    """A log in the canonical schema on disk: parquet or CSV files (a folder's parts are all read).

    Columns other than the canonical ones (and ``rating``/``label``) are user features unless
    ``user_features`` names them; each user's most recent value is kept. Nothing is read until
    ``encode``; the schema is checked on ``open_event_files``."""

    name: str
    parts: tuple[Path, ...]
    fingerprint: str
    columns: tuple[str, ...]
    user_features: tuple[str, ...]

    @property
    def has_labels(self) -> bool:
        return any(c in self.columns for c in LABEL_COLUMNS)

    @property
    def user_feature_names(self) -> tuple[str, ...]:
        return self.user_features

    def with_user_features(self, names: tuple[str, ...] | None) -> EventFiles:
        if names is None:
            return self
        unknown = sorted(set(names) - set(self.user_features))
        if unknown:
            raise ValueError(f"{self.name}: no user feature {unknown}; it has {list(self.user_features)}")
        return EventFiles(self.name, self.parts, self.fingerprint, self.columns, tuple(names))

    def _batches(self) -> Iterator[pa.RecordBatch]:
        wanted = [c for c in (*EVENT_COLUMNS, *LABEL_COLUMNS, *self.user_features) if c in self.columns]
        for part in self.parts:
            dataset = ds.dataset(part, format=_file_format(part))
            yield from dataset.to_batches(columns=wanted, batch_size=BATCH_ROWS)

    def encode(self) -> EncodedLog:
        """Stream every part once into codes; rows without a user or item id are dropped (counted)."""
        id_chunks: dict[str, list[pa.DictionaryArray]] = {c: [] for c in ID_COLUMNS}
        feature_chunks: dict[str, list[pa.DictionaryArray]] = {c: [] for c in self.user_features}
        stamps: list[np.ndarray] = []
        ratings: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        n = dropped = 0
        for batch in self._batches():
            named = pc.and_(pc.is_valid(batch.column("user_id")), pc.is_valid(batch.column("item_id")))
            if named.false_count:
                dropped += named.false_count
                batch = batch.filter(named)
            n += batch.num_rows
            for col in ID_COLUMNS:
                values = batch.column(col)
                if col == "category_id":
                    values = pc.fill_null(pc.cast(values, pa.string()), "unknown")
                id_chunks[col].append(_dictionary_chunk(values))
            for col in self.user_features:
                feature_chunks[col].append(_dictionary_chunk(batch.column(col)))
            stamps.append(_as_seconds(batch.column("timestamp")))
            if "rating" in batch.schema.names:
                ratings.append(pc.cast(batch.column("rating"), pa.float32()).to_numpy(zero_copy_only=False))
            elif "label" in batch.schema.names:
                labels.append(pc.cast(batch.column("label"), pa.int8()).to_numpy(zero_copy_only=False))
        if dropped:
            log.warning("%s: %d of %d rows have no user_id or item_id; dropped", self.name, dropped, n + dropped)
        timestamp = np.concatenate(stamps) if stamps else np.zeros(0, dtype=np.int64)
        del stamps
        label = _labels_of(np.concatenate(ratings) if ratings else None, np.concatenate(labels) if labels else None)
        if label is not None and label.size != n:
            raise ValueError(f"{self.name}: some parts have a rating or label column and others do not")
        codes, dictionaries = {}, {}
        for col in ID_COLUMNS:
            codes[col], dictionaries[col] = _unified_codes(id_chunks[col], n)
        features = {}
        for col in self.user_features:
            feature_codes, values = _unified_codes(feature_chunks[col], n)
            features[col] = UserFeature(_latest_per_user(codes["user_id"], timestamp, feature_codes), values)
        return _assemble(self.name, self.fingerprint, codes, dictionaries, timestamp, label, features)


def _latest_per_user(user: np.ndarray, timestamp: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(U,) each user's most recent non-missing code (ties: the later row), -1 if none; by user code."""
    n_users = int(user.max()) + 1 if user.size else 0
    has = np.flatnonzero(codes >= 0)
    order = has[_user_time_order(user[has], timestamp[has])]
    latest = np.full(n_users, -1, dtype=np.int32)
    latest[user[order]] = codes[order]  # in (user, time) order: the last write per user is the latest
    return latest


def open_event_files(path: Path, user_features: tuple[str, ...] | None = None) -> EventFiles:
    """A parquet or CSV file already in the canonical schema, or a folder of them; the columns are
    checked here (missing canonical columns are an error), the rows are read by ``encode``."""
    path = Path(path)
    parts = sorted([*path.glob("*.parquet"), *path.glob("*.csv")]) if path.is_dir() else [path]
    if not parts:
        raise FileNotFoundError(f"no .parquet or .csv event log in {path}")
    columns: list[str] = []
    for p in parts:
        for c in ds.dataset(p, format=_file_format(p)).schema.names:
            if c not in columns:
                columns.append(c)
    missing = [c for c in EVENT_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing canonical columns {missing}")
    known = {*EVENT_COLUMNS, *LABEL_COLUMNS}
    feats = tuple(user_features) if user_features is not None else tuple(c for c in columns if c not in known)
    return EventFiles(path.stem, tuple(parts), file_fingerprint(*parts), tuple(columns), feats)
