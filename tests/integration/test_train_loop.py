"""The training loop at scale: gradient accumulation, resuming a killed run, two gloo ranks under torchrun,
bf16 autocast. Tiny synthetic logs, one thread: each test takes seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.metrics import roc_auc_score

from training.batches import TensorSamples
from training.config import TrainConfig
from training.datasets import SyntheticConfig, generate_synthetic
from training.run_state import STATE_NAME
from training.samples import PreparedData, prepare
from training.train import load_checkpoint, predict, resume_config, train

TINY = {"n_users": 80, "n_items": 60, "n_categories": 6, "min_events": 10, "max_events": 16, "seed": 2}
# SGD (its update is linear in the gradient), no dropout, no Dice (its batch statistics are a micro-batch's,
# a rank's, like BatchNorm's): the runs compared must see the same gradients
EXACT: dict[str, Any] = {
    "optimiser": "sgd",
    "lr": 0.5,
    "max_len": 12,
    "progress": False,
    "threads": 1,
    "cache_dir": None,
    "model_options": {"mlp_activation": "relu"},
    "history_dropout": 0.0,  # its noise is drawn per rank: exact equivalence needs none (the default is 0.7)
}


@pytest.fixture(scope="module")
def tiny() -> PreparedData:
    return prepare(generate_synthetic(SyntheticConfig(**TINY)), "din-movielens", max_len=12, seed=0)


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(run_dir)
    return model.state_dict()


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_accumulated_micro_batches_step_like_one_batch_of_all_of_them(tiny: PreparedData, tmp_path: Path) -> None:
    """3 micro-batches of 16 = one batch of 48: the same mean loss, and the mini-batch aware L2 term over the
    union of the micro-batches' rows (mba_lambda on)."""
    common = {**EXACT, "model": "din", "epochs": 2, "mba_lambda": 0.05}
    train(TrainConfig(**common, out=str(tmp_path / "micro"), batch_size=16, accumulate=3), tiny)
    whole = train(TrainConfig(**common, out=str(tmp_path / "whole"), batch_size=48), tiny)
    assert whole.metrics["train_steps"] > 4
    _assert_close(_params(tmp_path / "micro"), _params(tmp_path / "whole"), atol=1e-6)


class Killed(Exception):
    """Stands for SIGKILL: the run stops where it is, writing nothing more."""


# sparse-adam: the row-wise lazy Adam of the sparse tables (its moments and step counts) is resumed too
@pytest.mark.parametrize("embedding_optimiser", ["auto", "sparse-adam"])
def test_a_killed_run_resumed_ends_where_an_uninterrupted_run_ends(
    tiny: PreparedData, tmp_path: Path, embedding_optimiser: str
) -> None:
    """Killed mid-epoch 2 steps after its last saved state: the resumed run redoes those steps with the same
    rows and the same noise (model dropout, history dropout), the same Adam moments and lr schedule, and
    ends bit for bit where the uninterrupted run ends, its weights' moving average too."""
    cfg: dict[str, Any] = {
        "model": "din",
        "embedding_optimiser": embedding_optimiser,
        "epochs": 3,
        "batch_size": 32,
        "lr": 3e-3,
        "max_len": 12,
        "history_dropout": 0.3,
        "model_options": {"dropout": 0.2},
        "warmup_steps": 5,
        "lr_decay": "cosine",
        "checkpoint_every": 4,
        "patience": 5,
        "ema_decay": 0.9,  # the weights' average is resumed too
        "progress": False,
        "threads": 1,
    }
    whole = train(TrainConfig(**cfg, out=str(tmp_path / "whole")), tiny)
    steps_per_epoch = whole.metrics["train_steps"] // 3
    kill_at = steps_per_epoch + 6  # mid-epoch 2, steps after its last save (every 4 steps and at epoch ends)
    assert steps_per_epoch > 6 and kill_at % 4 != 0

    def kill(step: int) -> None:
        if step == kill_at:
            raise Killed

    run = tmp_path / "killed"
    with pytest.raises(Killed):
        train(TrainConfig(**cfg, out=str(run)), tiny, on_step=kill)
    assert (run / STATE_NAME).is_file() and not (run / "metrics.json").exists()
    assert resume_config(run) == TrainConfig(**cfg, out=str(run), resume=True)  # what --resume RUN_DIR runs
    resumed = train(TrainConfig(**cfg, out=str(run), resume=True), tiny)

    assert resumed.metrics["train_steps"] == whole.metrics["train_steps"]
    assert resumed.history == whole.history
    for key in ("auc", "gauc", "logloss", "best_epoch"):
        assert resumed.metrics[key] == whole.metrics[key], key
    _assert_close(_params(run), _params(tmp_path / "whole"), atol=0)


def test_two_gloo_ranks_end_where_one_process_ends_at_the_doubled_batch(tmp_path: Path) -> None:
    """torchrun with two CPU ranks at batch 24 each = one process at batch 48: the same parameters (the
    mini-batch aware L2 term over both ranks' rows), one metrics.json (rank 0's), a checkpoint load_checkpoint
    (and so the export) reads."""
    flags = {
        "--dataset": "synthetic",
        "--synthetic-users": "120",
        "--model": "din",
        "--user-features": "",
        "--optimiser": "sgd",
        "--lr": "0.5",
        "--mba-lambda": "0.05",
        "--history-dropout": "0",  # as EXACT: no per-rank noise
        "--mlp-activation": "relu",
        "--max-len": "12",
        "--epochs": "2",
        "--threads": "1",
        "--cache-dir": "",
    }
    args = [arg for flag, value in flags.items() for arg in (flag, value)] + ["--no-progress"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    ddp_run = tmp_path / "ddp"
    subprocess.run(
        [*launcher, "-m", "training.train", *args, "--batch-size", "24", "--out", str(ddp_run)],
        check=True,
        timeout=240,
        capture_output=True,
    )
    one = train(
        TrainConfig(
            **{**EXACT, "max_len": 12, "epochs": 2, "mba_lambda": 0.05, "batch_size": 48},
            dataset="synthetic",
            synthetic={"n_users": 120},
            user_features=(),
            model="din",
            out=str(tmp_path / "one"),
        )
    )
    assert one.metrics["samples"]["train"] % 48 != 1  # a one-row tail step is left out by two ranks only
    assert sorted(p.name for p in ddp_run.iterdir()) == ["checkpoint.pt", "metrics.json", STATE_NAME]
    saved = json.loads((ddp_run / "metrics.json").read_text())
    assert saved["world_size"] == 2 and saved["global_batch_size"] == 48
    assert saved["train_steps"] == one.metrics["train_steps"]
    _assert_close(_params(ddp_run), _params(tmp_path / "one"), atol=1e-5)
    assert saved["auc"] == pytest.approx(one.metrics["auc"], abs=1e-4)  # every test sample counted once


def test_bf16_autocast_on_cpu_trains_a_model_as_good_as_fp32(tiny: PreparedData, tmp_path: Path) -> None:
    cfg: dict[str, Any] = {"epochs": 2, "batch_size": 32, "lr": 3e-3, "max_len": 12, "progress": False, "threads": 1}
    # the defaults before issue 18: on this 80-user log DIN learns nothing in 2 epochs with softmax attention and
    # history dropout 0.7 (test AUC 0.51 against 0.73; bench/README.md, "Issue 18: defaults by evidence")
    cfg |= {"history_dropout": 0.0, "user_feature_dropout": 0.0, "model_options": {"attention_softmax": False}}
    # and without the weights' average and the stronger L2 of issue 18's second look: on 19 averaged steps fp32 and
    # bf16 DIN then differ by 0.045 AUC (0.690, 0.735), where the test asks both to learn alike
    cfg |= {"ema_decay": 0.0, "mba_lambda": 0.01}
    auc = {}
    for model in ("din", "dien"):
        for precision in ("fp32", "bf16"):
            run = TrainConfig(**cfg, model=model, precision=precision, out=str(tmp_path / f"{model}-{precision}"))
            auc[model, precision] = train(run, tiny).metrics["auc"]
    for model in ("din", "dien"):
        assert auc[model, "bf16"] > 0.6, auc
        assert auc[model, "bf16"] == pytest.approx(auc[model, "fp32"], abs=0.03), auc


def test_resume_says_what_is_missing_or_wrong(tiny: PreparedData, tmp_path: Path) -> None:
    """The error paths of --resume: a folder with no saved state, and a state saved by another number of
    processes (its steps' rows and random streams would differ); a bad step setting fails before training."""
    with pytest.raises(SystemExit, match=STATE_NAME):
        resume_config(tmp_path / "never-trained")
    cfg = {**EXACT, "model": "din", "epochs": 1, "out": str(tmp_path / "run")}
    train(TrainConfig(**cfg), tiny)
    state = torch.load(tmp_path / "run" / STATE_NAME, weights_only=True)
    torch.save({**state, "world": 2}, tmp_path / "run" / STATE_NAME)
    with pytest.raises(ValueError, match="saved by 2 processes, resumed by 1"):
        train(TrainConfig(**cfg, resume=True), tiny)
    with pytest.raises(ValueError, match="--accumulate"):
        train(TrainConfig(**{**cfg, "out": str(tmp_path / "bad")}, accumulate=0), tiny)


def test_ema_decay_evaluates_and_saves_the_average_of_the_weights_after_each_step(
    tiny: PreparedData, tmp_path: Path
) -> None:
    """--ema-decay d: from the second epoch on, validation and the checkpoint (what export publishes) use
    Σ d^(t−i) w_i / Σ d^(t−i) over the weights w_i after each optimiser step of epoch 2 onwards, computed here by
    hand from the resume state saved after every step; epoch 1 is judged on the weights as trained. Training
    itself is the same as without it, and the test metrics are those of the saved model."""
    decay = 0.8
    cfg = {**EXACT, "model": "din", "epochs": 2, "batch_size": 16, "checkpoint_every": 1, "patience": 5}
    run = tmp_path / "ema"
    steps: list[dict[str, torch.Tensor]] = []

    def record(step: int) -> None:  # the state saved after each step holds the weights as trained
        steps.append(torch.load(run / STATE_NAME, weights_only=True)["model"])

    result = train(TrainConfig(**cfg, ema_decay=decay, out=str(run)), tiny, on_step=record)
    per_epoch = result.metrics["train_steps"] // 2
    assert len(steps) == 2 * per_epoch and per_epoch > 3
    second = steps[per_epoch:]
    factors = [decay ** (len(second) - 1 - i) for i in range(len(second))]
    average = torch.load(run / STATE_NAME, weights_only=True)["average"]
    assert average["updates"] == per_epoch
    for key, value in average["weights"].items():
        if value.is_floating_point():
            expected = sum(f * s[key] for f, s in zip(factors, second, strict=True)) / sum(factors)
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.equal(average["weights"][k], steps[-1][k]) for k in steps[-1])  # not the last step
    # the checkpoint is the best epoch's: epoch 1's weights as trained, or epoch 2's average
    best = steps[per_epoch - 1] if result.metrics["best_epoch"] == 1 else average["weights"]
    _assert_close(_params(run), best, atol=0)
    model, _ = load_checkpoint(run)
    probs, labels = predict(model, TensorSamples(tiny.test, 12), 4096)
    assert result.metrics["auc"] == pytest.approx(float(roc_auc_score(labels, probs)), abs=1e-6)
    plain = train(TrainConfig(**cfg, ema_decay=0.0, out=str(tmp_path / "plain")), tiny)
    assert plain.history[0] == result.history[0]  # epoch 1: the same weights, judged the same
    assert plain.history[1] != result.history[1]
    state = torch.load(tmp_path / "plain" / STATE_NAME, weights_only=True)
    _assert_close(state["model"], steps[-1], atol=0)  # the same steps: the average does not change training
