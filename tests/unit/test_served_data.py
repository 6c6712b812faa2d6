"""--dataset served: served samples become training splits with the history exactly as it was served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contract import FEEDBACK_NEGATIVE, FEEDBACK_UNKNOWN, OOV
from impressions import Impression, Outcome, ServedBehaviour, ServedCandidate
from training.served import Joiner, write_part
from training.served_data import online_ctr, prepare_served, read_parts, split_ctr

MAX_LEN = 6


def served_log(out: Path, n: int = 120, seed: int = 0, n_items: int = 50) -> list[Impression]:
    """``n`` impressions of 4 candidates with histories of 0..9 behaviours (some categories and labels not
    logged), clicks where the candidate's category is in the history, joined and written as two parts."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    joiner = Joiner(window_ms=1_000)
    imps = []
    for k in range(n):
        hist_len = int(rng.integers(0, 10))
        history = tuple(
            ServedBehaviour(
                f"i{rng.integers(40)}",
                None if j == 2 else f"c{rng.integers(5)}",
                1_700_000_000 - j,
                None if j % 3 == 1 else int(rng.integers(2)),
            )
            for j in range(hist_len)
        )
        cands = tuple(
            ServedCandidate(f"i{rng.integers(n_items)}", f"c{rng.integers(5)}", float(rng.random())) for _ in range(4)
        )
        imp = Impression(
            f"din.{1 + k % 2}.{k:x}",
            10_000 * k,
            f"u{k % 9}",
            "din",
            str(1 + k % 2),
            "store",
            history,
            cands,
            {"segment": f"s{k % 3}"},
        )
        imps.append(imp)
        joiner.add_impression(f"{k}-0", imp)
        seen = {b.category_id for b in history}
        for c in cands:
            if c.category_id in seen:
                joiner.add_outcome(f"{k}-1", Outcome(imp.impression_id, imp.user_id, c.item_id, 1, imp.time_ms + 10))
        if k in (n // 2, n - 1):
            joiner.add_outcome("x", Outcome("none", "u", "i", 0, imp.time_ms + 5_000))  # moves the clock on
            write_part(out, joiner.close(), [])
    return imps


def test_history_is_the_served_one(tmp_path: Path) -> None:
    imps = {imp.impression_id: imp for imp in served_log(tmp_path)}
    table = read_parts(tmp_path)
    assert table.num_rows == 4 * len(imps)
    data = prepare_served(tmp_path, MAX_LEN)
    vocab = data.vocab
    assert [len(s) for s in (data.train, data.valid, data.test)] == [96 * 4, 12 * 4, 12 * 4]
    # every training row: its encoded history is the served history, most recent MAX_LEN, oldest first
    train_rows = table.to_pylist()[: len(data.train)]  # the oldest impressions, in read_parts' order
    items, cats, mask = data.train.history(np.arange(len(data.train)), MAX_LEN)
    feedback = data.train.history_feedback(np.arange(len(data.train)), MAX_LEN)
    for r, row in enumerate(train_rows):
        served = imps[row["impression_id"]].history[:MAX_LEN][::-1]
        n = len(served)
        assert mask[r].sum() == n
        assert list(items[r, :n]) == list(vocab.encode_items([b.item_id for b in served]))
        want_cats = [
            vocab.encode_categories([b.category_id])[0]
            if b.category_id
            else vocab.item_category[vocab.encode_items([b.item_id])[0]]
            for b in served
        ]
        assert list(cats[r, :n]) == want_cats
        assert list(feedback[r, :n]) == [
            FEEDBACK_UNKNOWN if b.label is None else FEEDBACK_NEGATIVE + b.label for b in served
        ]
        assert data.train.label[r] == row["label"]
        assert data.train.cand_item[r] == vocab.encode_items([row["item_id"]])[0]
        assert (
            data.train.user_feats[r, 0] == vocab.encode_feature("segment", [dict(row["user_features"])["segment"]])[0]
        )
    assert data.train.label.sum() > 0


def test_warm_start_vocabulary_maps_new_ids_to_oov(tmp_path: Path) -> None:
    served_log(tmp_path / "a", seed=0)
    first = prepare_served(tmp_path / "a", MAX_LEN)
    served_log(tmp_path / "b", seed=1, n_items=70)
    with_new = read_parts(tmp_path / "b")
    again = prepare_served(tmp_path / "b", MAX_LEN, first.vocab)
    assert again.vocab is first.vocab
    known = set(first.vocab.items)
    rows = with_new.to_pylist()[: len(again.train)]
    new = [i for i, r in enumerate(rows) if r["item_id"] not in known]
    assert new, "the second log has candidates the first vocabulary lacks"
    assert (again.train.cand_item[new] == OOV).all()
    assert (again.train.cand_item[[i for i in range(len(rows)) if i not in new]] != OOV).all()


def test_online_ctr_per_version(tmp_path: Path) -> None:
    served_log(tmp_path)
    table = read_parts(tmp_path).to_pylist()
    report = {r["version"]: r for r in online_ctr(tmp_path)}
    for v in ("1", "2"):
        mine = [r for r in table if r["version"] == v]
        impressions = len({r["impression_id"] for r in mine})
        clicks = sum(r["label"] for r in mine)
        assert report[v]["impressions"] == impressions and report[v]["clicks"] == clicks
        assert report[v]["clicks_per_impression"] == pytest.approx(clicks / impressions)


def test_split_ctr_compares_versions_over_the_same_period(tmp_path: Path) -> None:
    served_log(tmp_path)  # versions 1 and 2 alternate from the first impression on
    table = read_parts(tmp_path).to_pylist()
    since, rows = split_ctr(tmp_path, "din")
    assert since == min(r["time_ms"] for r in table if r["version"] == "2")
    assert {r["version"]: r["impressions"] for r in rows} == {
        v: len({r["impression_id"] for r in table if r["version"] == v and r["time_ms"] >= since}) for v in ("1", "2")
    }
    assert split_ctr(tmp_path, "dien") == (None, [])
