from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.config import FEEDBACK_NEGATIVE, FEEDBACK_PAD, FEEDBACK_POSITIVE, FEEDBACK_UNKNOWN
from training.batches import TensorSamples
from training.datasets import BehaviourLog
from training.samples import OOV, PAD, PreparedData, prepare, prepare_din_movielens


def _tiny_log() -> BehaviourLog:
    # user a: 4 behaviours given out of order, user b: 3, user c: 1 (no sample: nothing before it)
    events = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "a", "b", "a", "b", "c"],
            "item_id": ["i3", "i1", "i9", "i2", "i8", "i4", "i7", "i1"],
            "category_id": ["x", "x", "y", "y", "y", "x", "z", "x"],
            "timestamp": [30, 10, 5, 20, 6, 40, 7, 1],
            "rating": [5, 1, 4, 2, 5, 4, 3, 5],
        }
    )
    return BehaviourLog("tiny", events, None, "tiny")


def test_history_is_strictly_before_the_candidate_and_capped(small_data: PreparedData) -> None:
    for split in (small_data.train, small_data.valid, small_data.test):
        rows = np.arange(len(split))
        items, cats, mask = split.history(rows, 20)
        assert items.shape == cats.shape == mask.shape == (len(split), 20)
        assert (split.length <= 20).all() and (split.length >= 1).all()
        # every history slot points strictly before the candidate's own event
        last_hist = split.end - 1
        assert (last_hist < split.end).all()
        # masks: valid positions first (oldest first, right padding), padding carries index 0
        assert (mask.sum(1) == split.length).all()
        assert (items[~mask] == PAD).all() and (cats[~mask] == PAD).all()
        np.testing.assert_array_equal(mask, np.arange(20) < split.length[:, None])


def test_no_user_in_two_splits(small_log: BehaviourLog, small_data: PreparedData) -> None:
    n = {name: len(np.unique(getattr(small_data, name).user)) for name in ("train", "valid", "test")}
    users = small_data.info["users"]
    assert isinstance(users, dict)
    assert n["train"] == users["train"] and n["valid"] == users["valid"] and n["test"] == users["test"]
    assert users["train"] + users["valid"] + users["test"] == small_log.events["user_id"].nunique()
    assert abs(users["test"] / small_log.events["user_id"].nunique() - 0.3) < 0.01


def test_din_movielens_samples_by_hand() -> None:
    data = prepare_din_movielens(_tiny_log(), max_len=2, seed=0, test_fraction=0.0)
    expected = {  # candidate → most recent history (max_len 2), time-ordered
        "i2": ["i1"],
        "i3": ["i1", "i2"],
        "i4": ["i2", "i3"],  # user a
        "i8": ["i9"],
        "i7": ["i9", "i8"],  # user b (user c has a single behaviour: no sample)
    }
    vocab = data.vocab

    def raw(idx: int) -> str:
        return vocab.items[idx - 2] if idx >= 2 else "?"

    def known(item: str) -> str:
        return item if item in vocab.items else "?"

    seen = {}
    for s in (data.train, data.valid):
        for row in range(len(s)):
            items, _, mask = s.history(np.array([row]), 2)
            cand_raw = next(
                c
                for c, h in expected.items()
                if len(h) == s.length[row]
                and [known(x) for x in h] == [raw(i) for i in items[0][mask[0]]]
                and known(c) == raw(int(s.cand_item[row]))
            )
            seen[cand_raw] = True
    assert sorted(seen) == sorted(expected)


def test_history_feedback_is_each_earlier_behaviours_own_label() -> None:
    """A history position carries the label of that (earlier) behaviour, never the candidate's own."""
    data = prepare_din_movielens(_tiny_log(), max_len=2, seed=0, test_fraction=0.0)
    vocab = data.vocab
    liked = {"i1": False, "i2": False, "i3": True, "i4": True, "i9": True, "i8": True, "i7": False}  # rating ≥ 4
    item_of = {vocab.encode_items([i])[0]: i for i in vocab.items}
    checked = 0
    for s in (data.train, data.valid):
        for row in range(len(s)):
            items, _, mask = s.history(np.array([row]), 2)
            feedback = s.history_feedback(np.array([row]), 2)
            assert (feedback[~mask] == FEEDBACK_PAD).all()
            for idx, fb in zip(items[0][mask[0]], feedback[0][mask[0]], strict=True):
                expected = FEEDBACK_POSITIVE if liked[item_of[int(idx)]] else FEEDBACK_NEGATIVE
                assert fb == expected
                checked += 1
    assert checked == 8  # 1 + 2 + 2 (user a) + 1 + 2 (user b)


def test_unlabelled_logs_have_unknown_feedback(small_log: BehaviourLog) -> None:
    unlabelled = BehaviourLog("nolabel", small_log.events.drop(columns=["label"]), small_log.users, "x")
    data = prepare(unlabelled, "implicit", max_len=10, seed=0)
    assert (data.train.event_feedback == FEEDBACK_UNKNOWN).all()


def test_labels_follow_rating_threshold() -> None:
    data = prepare_din_movielens(_tiny_log(), max_len=5, seed=3, test_fraction=0.0)
    s = data.train if len(data.train) else data.valid
    vocab = data.vocab
    item_of = {vocab.encode_items([i])[0]: i for i in vocab.items}
    ratings = {("a", "i2"): 2, ("a", "i3"): 5, ("a", "i4"): 4, ("b", "i8"): 5, ("b", "i7"): 3}
    for row in range(len(s)):
        item = item_of.get(int(s.cand_item[row]))
        if item is None:
            continue
        rating = next(v for (u, i), v in ratings.items() if i == item)
        assert s.label[row] == float(rating >= 4)


def test_implicit_protocol_pairs_each_positive_with_an_unseen_negative(small_log: BehaviourLog) -> None:
    unlabelled = BehaviourLog("nolabel", small_log.events.drop(columns=["label"]), small_log.users, "x")
    data = prepare(unlabelled, "implicit", max_len=10, seed=0)
    seen = small_log.events.groupby("user_id")["item_id"].apply(set)
    for split in (data.train, data.valid, data.test):
        n = len(split) // 2
        assert split.label[:n].sum() == n and split.label[n:].sum() == 0
        np.testing.assert_array_equal(split.end[:n], split.end[n:])  # same history for the pair
    # leave-last-out: one test pair and one validation pair per user
    n_users = small_log.events["user_id"].nunique()
    assert len(data.test) == 2 * n_users and len(data.valid) == 2 * n_users
    items = np.array([*data.vocab.items])
    user_names = pd.factorize(small_log.events.sort_values(["user_id", "timestamp"])["user_id"])[1]
    n = len(data.test) // 2
    for row in range(n):
        neg = items[data.test.cand_item[n + row] - 2]
        assert neg not in seen[user_names[data.test.user[n + row]]]


def test_unknown_ids_map_to_oov(small_data: PreparedData) -> None:
    v = small_data.vocab
    np.testing.assert_array_equal(v.encode_items(["never-seen", v.items[0]]), [OOV, 2])
    assert v.encode_categories(["nope"])[0] == OOV
    table = v.item_category_table()
    assert table.shape == (v.n_items,) and table[PAD] == PAD and table[OOV] == OOV


def test_prepared_data_is_cached(small_log: BehaviourLog, tmp_path: pytest.TempPathFactory) -> None:
    first = prepare(small_log, "din-movielens", max_len=20, seed=0, cache_dir=tmp_path)  # type: ignore[arg-type]
    second = prepare(small_log, "din-movielens", max_len=20, seed=0, cache_dir=tmp_path)  # type: ignore[arg-type]
    assert first.info["cached"] is False and second.info["cached"] is True
    np.testing.assert_array_equal(first.test.cand_item, second.test.cand_item)
    assert first.vocab.items == second.vocab.items


def test_training_batches_gather_the_histories_the_split_describes(small_data: PreparedData) -> None:
    """TensorSamples.inputs (training's batches, by flat index_select) against SampleSet.history (numpy)."""
    split = small_data.train
    rows = np.random.default_rng(0).choice(len(split), size=min(300, len(split)), replace=False)
    batch = TensorSamples(split, 20).inputs(torch.as_tensor(rows))
    items, cats, mask = split.history(rows, 20)
    np.testing.assert_array_equal(batch["hist_items"].numpy(), items)
    np.testing.assert_array_equal(batch["hist_cats"].numpy(), cats)
    np.testing.assert_array_equal(batch["hist_mask"].numpy(), mask)
    np.testing.assert_array_equal(batch["hist_feedback"].numpy(), split.history_feedback(rows, 20))
    np.testing.assert_array_equal(batch["cand_item"].numpy(), split.cand_item[rows])
    np.testing.assert_array_equal(batch["user_feats"].numpy(), split.user_feats[rows])
    assert all(v.dtype == torch.int64 for k, v in batch.items() if k != "hist_mask")
