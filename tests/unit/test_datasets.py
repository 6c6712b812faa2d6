from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.datasets import (
    SyntheticConfig,
    generate_synthetic,
    load_dataset,
    load_event_log,
    load_movielens_100k,
    load_movielens_latest,
)
from training.samples import prepare


def _write_ml_latest(folder: Path) -> None:
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,10,4.5,100\n1,20,2.0,90\n1,30,5.0,120\n"
        "2,10,3.5,50\n2,30,4.0,60\n2,40,1.0,70\n"
        "3,20,4.0,10\n3,40,4.5,20\n"
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        '10,"Heat (1995)",Action|Crime|Thriller\n'
        "20,Casino (1995),Crime|Drama\n"
        "30,Toy Story (1995),Animation|Children's|Comedy\n"
        "40,Nothing (2000),(no genres listed)\n"
    )


def test_movielens_latest_adapter(tmp_path: Path) -> None:
    _write_ml_latest(tmp_path)
    log = load_movielens_latest(tmp_path)
    ev = log.events
    assert list(ev.columns[:4]) == ["user_id", "item_id", "category_id", "timestamp"]
    assert len(ev) == 8 and log.users is None
    cats = dict(zip(ev["item_id"], ev["category_id"], strict=True))
    assert cats == {"10": "Action", "20": "Crime", "30": "Animation", "40": "(no genres listed)"}
    assert ev.loc[(ev.user_id == "1") & (ev.item_id == "10"), "rating"].item() == pytest.approx(4.5)
    data = prepare(log, "din-movielens", max_len=5, seed=0)
    total = len(data.train) + len(data.valid) + len(data.test)
    assert total == 8 - 3  # one sample per behaviour after each user's first


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_generic_event_log_with_user_features(tmp_path: Path, suffix: str) -> None:
    df = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 2],
            "item_id": ["a", "b", "a", "c", "d"],
            "category_id": ["x", "y", "x", "x", "z"],
            "timestamp": [1, 2, 3, 4, 5],
            "label": [1, 0, 0, 1, 1],
            "country": ["fr", "fr", "de", "de", "at"],  # user 2 moved: the latest value wins
        }
    )
    path = tmp_path / f"log{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_parquet(path)
    log = load_event_log(path)
    assert log.user_feature_names == ("country",)
    assert log.users is not None and log.users.loc["2", "country"] == "at"
    assert log.has_labels and log.events["user_id"].tolist()[0] == "1"


def test_event_log_missing_columns_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    pd.DataFrame({"user_id": [1], "item_id": [2]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="category_id"):
        load_event_log(path)


def test_synthetic_log_plants_interests() -> None:
    cfg = SyntheticConfig(n_users=400, seed=3)
    log = generate_synthetic(cfg)
    ev = log.events
    assert log.users is not None and log.has_labels
    # recompute "category among the previous `recent` behaviours" independently, per user
    matched = []
    for _, g in ev.groupby("user_id", sort=False):
        cats = g["category_id"].tolist()
        matched += [c in cats[max(0, t - cfg.recent) : t] for t, c in enumerate(cats)]
    m = np.array(matched)
    rate_match, rate_other = ev["label"][m].mean(), ev["label"][~m].mean()
    assert rate_match > 0.8 and rate_other < 0.2
    assert ev.groupby("user_id")["timestamp"].apply(lambda s: s.is_monotonic_increasing).all()
    # deterministic for a seed
    again = generate_synthetic(cfg)
    pd.testing.assert_frame_equal(ev, again.events)


def test_ml100k_missing_files_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--download"):
        load_movielens_100k(tmp_path)
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("ml-100k")


def test_event_log_folder_of_parts_with_datetime_timestamps(tmp_path: Path) -> None:
    """A partitioned log (every part read), date-time timestamps in either form, ids kept as written,
    rows without ids dropped."""
    parts = tmp_path / "log"
    parts.mkdir()
    pd.DataFrame(
        {
            "user_id": ["007", "007", None],
            "item_id": ["a", "b", "c"],
            "category_id": ["x", "y", "x"],
            "timestamp": ["2024-01-01T00:00:10Z", "2024-01-01 00:00:20", "2024-01-01 00:00:30"],
        }
    ).to_csv(parts / "part-0.csv", index=False)
    pd.DataFrame(
        {
            "user_id": ["8"],
            "item_id": ["a"],
            "category_id": ["x"],
            "timestamp": pd.to_datetime(["2024-01-02 00:00:00"]),
        }
    ).to_parquet(parts / "part-1.parquet")
    log = load_event_log(parts)
    assert log.events["user_id"].tolist() == ["007", "007", "8"]
    assert log.events["timestamp"].tolist() == [1704067210, 1704067220, 1704153600]
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"user_id": [1], "item_id": [2], "category_id": [3], "timestamp": ["yesterday-ish"]}).to_csv(bad)
    with pytest.raises(ValueError, match="Unix seconds or date-times"):
        load_event_log(bad)


def test_event_log_folder_without_logs_says_so(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a log")
    with pytest.raises(FileNotFoundError, match=r"no \.parquet or \.csv event log"):
        load_event_log(tmp_path)
