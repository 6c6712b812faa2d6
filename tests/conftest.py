from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.datasets import BehaviourLog, SyntheticConfig, generate_synthetic
from training.samples import PreparedData, prepare

ML100K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_log() -> BehaviourLog:
    return generate_synthetic(SyntheticConfig(n_users=300, n_items=200, n_categories=8, min_events=20,
                                              max_events=40, seed=1))  # fmt: skip


@pytest.fixture(scope="session")
def small_data(small_log: BehaviourLog) -> PreparedData:
    return prepare(small_log, "din-movielens", max_len=20, seed=0)
