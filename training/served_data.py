"""Served samples (the parts ``training.served`` writes) as training splits, and online CTR per version.

``training.train --dataset served --data-dir DIR`` trains on what was served: each sample's history is the one
logged with its impression, never rebuilt from a behaviour log, so training sees what the model saw.

- Splits by time, whole impressions: the oldest 80% of impressions train, the next 10% validate, the newest
  10% test (what a retrained model faces next is newer traffic).
- A history is kept as served, most recent first, cut to the run's ``max_len`` most recent behaviours and
  laid out oldest first as the models take it; its feedback is each behaviour's logged label (none: unknown).
  A behaviour or candidate logged without a category takes its item's category in the vocabulary.
- ``--served-rows outcomes`` keeps only the candidates that got an outcome (were shown), see ``prepare_served``.
- Vocabulary: built from the training impressions (items of histories and candidates, most frequent first),
  or, for a warm start (``--init-from RUN_DIR``), the earlier run's vocabulary unchanged: ids it lacks map to
  the OOV index, so the earlier model's embedding tables keep their shapes and rows (they are not grown; a
  new item is learned once a cold-started run adds it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contract import FEEDBACK_NEGATIVE, FEEDBACK_UNKNOWN, FIRST_INDEX, OOV, PAD
from training.samples import PreparedData, SampleSet, Vocabulary, index_dtype

log = logging.getLogger(__name__)

PART_GLOB = "part-*.parquet"
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, valid, test: by impression time


def read_parts(data_dir: Path) -> pa.Table:
    """Every part under ``data_dir``, sorted by (impression time, impression id, candidate position)."""
    parts = sorted(Path(data_dir).glob(PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"{data_dir}: no {PART_GLOB}; run python -m training.served --out {data_dir} first")
    table = pa.concat_tables([pq.read_table(p) for p in parts]).replace_schema_metadata(None)
    order = pc.sort_indices(
        table, sort_keys=[("time_ms", "ascending"), ("impression_id", "ascending"), ("position", "ascending")]
    )
    return table.take(order)


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(offsets (N + 1,), flattened values) of a list column."""
    arr = column.combine_chunks()
    return arr.offsets.to_numpy() - arr.offsets[0].as_py(), arr.flatten()


def _frequency_order(values: pa.Array) -> pa.Array:
    """Distinct non-null values, most frequent first (ties: first seen first)."""
    counts = pc.value_counts(values.drop_null())
    if len(counts) == 0:
        return pa.array([], type=pa.string())
    order = np.argsort(-counts.field("counts").to_numpy(), kind="stable")
    return counts.field("values").take(pa.array(order))


def build_vocabulary(table: pa.Table) -> Vocabulary:
    """The vocabulary of a table of served rows: every item of its histories and candidates, every category,
    every user-feature value."""
    _, hist_items = _flat(table.column("hist_items"))
    _, hist_cats = _flat(table.column("hist_cats"))
    items_all = pa.concat_arrays([hist_items, table.column("item_id").combine_chunks()])
    cats_all = pa.concat_arrays([hist_cats, table.column("category_id").combine_chunks()])
    item_ids = _frequency_order(items_all)
    category_ids = _frequency_order(cats_all)
    # each item's category: the last one it was logged with (rows are in time order)
    known = pc.is_valid(cats_all).to_numpy(zero_copy_only=False)
    item_pos = pc.index_in(items_all, value_set=item_ids).to_numpy(zero_copy_only=False)
    cat_pos = pc.index_in(cats_all, value_set=category_ids).fill_null(-1).to_numpy(zero_copy_only=False)
    item_category = np.full(len(item_ids), OOV, dtype=np.int32)
    item_category[item_pos[known]] = cat_pos[known] + FIRST_INDEX  # numpy assigns repeated indices in order
    features: dict[str, list[str]] = {}
    maps = table.column("user_features").combine_chunks()
    keys, values = maps.keys, maps.items
    for name in sorted(set(keys.to_pylist())):
        seen = values.filter(pc.equal(keys, name))
        features[name] = sorted(set(seen.drop_null().to_pylist()))
    return Vocabulary(item_ids, category_ids, features, np.r_[np.array([PAD, OOV], dtype=np.int32), item_category])


def _split_of_impressions(n: int) -> np.ndarray:
    """(n,) 0 train, 1 valid, 2 test for n impressions in time order; each split gets one when n ≥ 3."""
    n_valid = max(1, round(SPLIT_FRACTIONS[1] * n)) if n >= 3 else 0
    n_test = max(1, round(SPLIT_FRACTIONS[2] * n)) if n >= 3 else 0
    split = np.zeros(n, dtype=np.int8)
    split[n - n_test - n_valid : n - n_test] = 1
    split[n - n_test :] = 2
    return split


def encode_rows(table: pa.Table, vocab: Vocabulary, max_len: int) -> SampleSet:
    """Samples of served rows (impressions whole and contiguous, as ``read_parts`` orders them).

    Each impression's history becomes one run of the event arrays: its ``max_len`` most recent behaviours,
    oldest first; every candidate of the impression points at that run."""
    imp_ids = table.column("impression_id").to_numpy()
    n = len(imp_ids)
    first = np.r_[True, imp_ids[1:] != imp_ids[:-1]] if n else np.zeros(0, dtype=bool)
    imp_of_row = np.cumsum(first) - 1  # (N,) impression index of each row
    imp_rows = np.flatnonzero(first)  # (M,) the first row of each impression
    heads = table.take(pa.array(imp_rows))
    offsets, hist_items = _flat(heads.column("hist_items"))
    _, hist_cats = _flat(heads.column("hist_cats"))
    _, hist_labels = _flat(heads.column("hist_labels"))
    served_len = np.diff(offsets)  # (M,)
    kept = np.minimum(served_len, max_len)  # (M,) the most recent max_len
    # gather, per impression, positions kept-1 … 0 of its served list (most recent first): oldest first
    run_start = np.r_[0, np.cumsum(kept)[:-1]]
    within = np.arange(int(kept.sum())) - np.repeat(run_start, kept)  # 0 … kept-1 inside each run
    src = np.repeat(offsets[:-1] + kept - 1, kept) - within
    take = pa.array(src, type=pa.int64())
    items = vocab.encode_items(hist_items.take(take).to_numpy(zero_copy_only=False))
    cat_values = hist_cats.take(take)
    cats = _categories(vocab, items, cat_values)
    labels = hist_labels.take(take)
    feedback = np.where(
        labels.is_valid().to_numpy(zero_copy_only=False),
        FEEDBACK_NEGATIVE + labels.fill_null(0).to_numpy(zero_copy_only=False),
        FEEDBACK_UNKNOWN,
    )
    ends = np.cumsum(kept)  # (M,) exclusive end of each impression's run
    cand_item = vocab.encode_items(table.column("item_id").to_numpy(zero_copy_only=False))
    cand_cat = _categories(vocab, cand_item, table.column("category_id").combine_chunks())
    users = table.column("user_id").to_numpy(zero_copy_only=False)
    _, user_index = np.unique(users, return_inverse=True)
    feats = _user_features(heads.column("user_features").combine_chunks(), vocab)  # (M, F)
    width = max(vocab.feature_cardinalities, default=FIRST_INDEX)
    return SampleSet(
        event_item=items.astype(index_dtype(vocab.n_items)),
        event_cat=cats.astype(index_dtype(vocab.n_categories)),
        event_feedback=feedback.astype(np.int8),
        end=ends[imp_of_row].astype(index_dtype(int(ends[-1]) + 1 if n else 1)),
        length=kept[imp_of_row].astype(index_dtype(max_len + 1)),
        cand_item=cand_item.astype(index_dtype(vocab.n_items)),
        cand_cat=cand_cat.astype(index_dtype(vocab.n_categories)),
        label=table.column("label").to_numpy().astype(np.int8),
        user=user_index.astype(index_dtype(max(len(users), 1))),
        user_feats=feats[imp_of_row].astype(index_dtype(width)),
    )


def _categories(vocab: Vocabulary, items: np.ndarray, categories: pa.Array) -> np.ndarray:
    """Category indices; a missing category is the item's own in the vocabulary (OOV for an unknown item)."""
    given = vocab.encode_categories(categories.fill_null("").to_numpy(zero_copy_only=False))
    known = categories.is_valid().to_numpy(zero_copy_only=False)
    return np.where(known, given, vocab.item_category_table()[items])


def _user_features(maps: pa.MapArray, vocab: Vocabulary) -> np.ndarray:
    """(M, F) each impression's user-feature indices in the vocabulary's feature order; missing → OOV."""
    rows = maps.to_pylist()
    out = np.full((len(rows), len(vocab.user_features)), OOV, dtype=np.int64)
    for j, name in enumerate(vocab.user_features):
        values = [dict(r or []).get(name) for r in rows]
        present = np.array([v is not None for v in values], dtype=bool)
        if present.any():
            out[present, j] = vocab.encode_feature(name, [v for v in values if v is not None])
    return out


def prepare_served(
    data_dir: Path, max_len: int, vocab: Vocabulary | None = None, only_outcomes: bool = False
) -> PreparedData:
    """The three splits of the served samples under ``data_dir``; ``vocab``: an earlier run's (warm start).

    ``only_outcomes``: keep the candidates that got an outcome, a click or an explicit negative. When a caller
    shows the user only some of the candidates it had scored and posts an outcome for each shown one, the
    others were never seen: as label-0 samples they would teach the next model the last one's ranking."""
    table = read_parts(data_dir)
    if only_outcomes:
        table = table.filter(pc.is_valid(table.column("outcome_time_ms")))
    imp_ids = table.column("impression_id").to_numpy(zero_copy_only=False)
    first = np.r_[True, imp_ids[1:] != imp_ids[:-1]] if len(imp_ids) else np.zeros(0, dtype=bool)
    imp_of_row = np.cumsum(first) - 1
    split_of_row = _split_of_impressions(int(first.sum()))[imp_of_row]
    tables = {name: table.filter(pa.array(split_of_row == k)) for k, name in enumerate(("train", "valid", "test"))}
    warm = vocab is not None
    vocab = vocab if vocab is not None else build_vocabulary(tables["train"])
    sets = {name: encode_rows(t, vocab, max_len) for name, t in tables.items()}
    oov_items = int((sets["train"].cand_item == OOV).sum())
    info: dict[str, Any] = {
        "dataset": "served",
        "protocol": "served",
        "max_len": max_len,
        "impressions": {name: int(np.unique(t.column("impression_id").to_numpy()).size) for name, t in tables.items()},
        "vocabulary": "warm start (earlier run's)" if warm else "built from the training impressions",
        "oov": {"min_count": 1, "items": 0, "item_events": 0, "candidates": oov_items},
        "cached": False,
    }
    return PreparedData(sets["train"], sets["valid"], sets["test"], vocab, info)


def online_ctr(data_dir: Path, since_ms: int | None = None) -> list[dict[str, Any]]:
    """Per (model, version): impressions, candidates, clicks, clicks per impression, clicks per candidate, and
    the mean probability served, from the joined samples (of impressions at or after ``since_ms``)."""
    table = read_parts(data_dir)
    if since_ms is not None:
        table = table.filter(pc.greater_equal(table.column("time_ms"), since_ms))
    grouped = table.group_by(["model", "version"]).aggregate(
        [("impression_id", "count_distinct"), ("label", "sum"), ("label", "count"), ("probability", "mean")]
    )
    out = []
    for r in grouped.to_pylist():
        impressions = int(r["impression_id_count_distinct"])
        clicks = int(r["label_sum"])
        out.append(
            {
                "model": r["model"],
                "version": r["version"],
                "impressions": impressions,
                "candidates": int(r["label_count"]),
                "clicks": clicks,
                "clicks_per_impression": clicks / impressions if impressions else 0.0,
                "click_rate": clicks / r["label_count"] if r["label_count"] else 0.0,
                "mean_probability": float(r["probability_mean"]),
            }
        )
    return sorted(out, key=lambda r: (r["model"], int(r["version"]) if r["version"].isdigit() else r["version"]))


def split_ctr(data_dir: Path, model: str) -> tuple[int | None, list[dict[str, Any]]]:
    """The fair comparison: online CTR per version over the impressions since the model's newest version
    first served (each version then served its share of users over the same period). Returns (that time, rows)."""
    table = read_parts(data_dir)
    mine = table.filter(pc.equal(table.column("model"), model))
    if mine.num_rows == 0:
        return None, []
    versions = mine.column("version").to_numpy(zero_copy_only=False)
    newest = max(versions, key=lambda v: int(v) if v.isdigit() else -1)
    since = int(pc.min(mine.filter(pc.equal(mine.column("version"), newest)).column("time_ms")).as_py())
    return since, [r for r in online_ctr(data_dir, since) if r["model"] == model]
