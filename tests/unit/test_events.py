"""Event logs as codes: the streamed file reader and the pandas path give the same prepared data; the
vocabulary's --min-count, the evaluation sample and the memory-mapped cache; the block-wise generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.datasets import BehaviourLog, SyntheticConfig, generate_synthetic, load_event_log, synthetic_blocks
from training.events import open_event_files
from training.regularization import history_coverage
from training.samples import OOV, PreparedData, SampleSet, prepare
from training.synthesize import scaled_config, write_parts


def _same(a: PreparedData, b: PreparedData) -> None:
    for name in ("train", "valid", "test"):
        x, y = getattr(a, name), getattr(b, name)
        for field in vars(x):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=f"{name}.{field}")
    assert a.vocab.to_json() == b.vocab.to_json()


def _write_shuffled_parts(log: BehaviourLog, folder: Path) -> None:
    """The log with its user feature as a column, rows shuffled, in three parts (parquet and CSV)."""
    assert log.users is not None
    df = log.events.assign(segment=log.users["segment"].reindex(log.events["user_id"]).to_numpy())
    df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    folder.mkdir()
    thirds = np.array_split(np.arange(len(df)), 3)
    df.iloc[thirds[0]].to_parquet(folder / "a.parquet")
    df.iloc[thirds[1]].to_csv(folder / "b.csv", index=False)
    pq.write_table(pa.Table.from_pandas(df.iloc[thirds[2]], preserve_index=False), folder / "c.parquet")


@pytest.mark.parametrize("protocol", ["din-movielens", "implicit"])
def test_streamed_files_prepare_like_the_pandas_log(small_log: BehaviourLog, tmp_path: Path, protocol: str) -> None:
    _write_shuffled_parts(small_log, tmp_path / "parts")
    files = open_event_files(tmp_path / "parts")
    assert files.user_feature_names == ("segment",) and files.has_labels
    # timestamps are distinct per user in the synthetic log, so (user, time) fixes the order of shuffled rows
    _same(prepare(small_log, protocol, max_len=10, seed=0), prepare(files, protocol, max_len=10, seed=0))


def test_min_count_sends_rare_items_to_oov_and_counts_them(small_log: BehaviourLog) -> None:
    full = prepare(small_log, "din-movielens", max_len=10, seed=0)
    counts = dict(zip(full.vocab.items, np.bincount(full.train.event_item)[2:], strict=True))
    threshold = int(np.median(list(counts.values())))
    rare = prepare(small_log, "din-movielens", max_len=10, seed=0, min_count=threshold)
    dropped = {i for i, c in counts.items() if c < threshold}
    assert dropped and set(rare.vocab.items) == set(counts) - dropped
    expected = {"min_count": threshold, "items": len(dropped), "item_events": sum(counts[i] for i in dropped)}
    assert rare.info["oov"] == expected
    assert (rare.train.event_item == OOV).sum() == expected["item_events"]
    np.testing.assert_array_equal(rare.train.label, full.train.label)  # same samples, coarser ids


def test_eval_users_keeps_a_seeded_sample_of_validation_and_test_users(small_log: BehaviourLog) -> None:
    full = prepare(small_log, "din-movielens", max_len=10, seed=0)
    a = prepare(small_log, "din-movielens", max_len=10, seed=0, eval_users=7)
    b = prepare(small_log, "din-movielens", max_len=10, seed=0, eval_users=7)
    assert len(np.unique(a.test.user)) == len(np.unique(a.valid.user)) == 7
    np.testing.assert_array_equal(a.test.user, b.test.user)
    assert len(a.train) == len(full.train) and a.info["eval_users"] == 7
    users = np.unique(a.test.user)
    np.testing.assert_array_equal(a.test.cand_item, full.test.cand_item[np.isin(full.test.user, users)])


def test_cache_is_memory_mapped_and_equal(small_log: BehaviourLog, tmp_path: Path) -> None:
    first = prepare(small_log, "din-movielens", max_len=10, seed=0, cache_dir=tmp_path)
    second = prepare(small_log, "din-movielens", max_len=10, seed=0, cache_dir=tmp_path)
    assert second.info["cached"] is True
    assert isinstance(second.train.event_item, np.memmap) and second.train.event_item.dtype == np.int16
    assert second.train.label.dtype == np.int8
    _same(first, second)
    assert isinstance(SampleSet.load(next(tmp_path.iterdir()) / "test"), SampleSet)


def test_generator_blocks_keep_the_planted_structure(tmp_path: Path) -> None:
    cfg = scaled_config(20_000, zipf=1.0, seed=2)
    summary = write_parts(cfg, tmp_path / "log", block_users=150)
    assert summary["parts"] == 3 and 15_000 < int(summary["events"]) < 25_000  # type: ignore[call-overload]
    log = load_event_log(tmp_path / "log")
    ev = log.events
    assert len(ev) == summary["events"] and ev["user_id"].nunique() == cfg.n_users
    assert log.users is not None and set(log.users["segment"]) <= {"s0", "s1", "s2"}
    # clicks follow the planted rule: a category among the user's 10 previous behaviours
    user, cat = log.user, log.category
    match = np.zeros(len(ev), dtype=bool)
    for lag in range(1, cfg.recent + 1):
        match[lag:] |= (user[lag:] == user[:-lag]) & (cat[lag:] == cat[:-lag])
    assert log.label is not None
    assert log.label[match].mean() > 0.8 and log.label[~match].mean() < 0.2
    # Zipf inside a category: each category's top item is far above its median one
    top = ev.groupby(["category_id", "item_id"]).size().groupby("category_id").agg(["max", "median"])
    assert (top["max"] > 4 * top["median"]).mean() > 0.9


def test_small_generator_is_the_block_generator_in_one_block() -> None:
    cfg = SyntheticConfig(n_users=50, n_items=60, n_categories=5, seed=4)
    one = generate_synthetic(cfg).events
    block = next(synthetic_blocks(cfg))
    assert one["item_id"].tolist() == block.column("item_id").to_pylist()
    assert one["label"].tolist() == block.column("label").to_pylist()


def test_history_coverage_counts_what_the_gathered_histories_hold(small_data: PreparedData) -> None:
    train = small_data.train
    items, _, mask = train.history(np.arange(len(train)), 20)  # the preparation's max_len
    gathered = np.bincount(items[mask], minlength=small_data.vocab.n_items)
    coverage = history_coverage(train, 20)
    from_coverage = np.bincount(train.event_item, weights=coverage, minlength=len(gathered))
    np.testing.assert_array_equal(from_coverage, gathered)
