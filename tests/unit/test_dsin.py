"""DSIN (models/dsin.py) and the session division it reads (sessions.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from contract import Contract
from models import ModelConfig, build_model
from models.dsin import DSIN
from sessions import SessionSpec, one_history, session_layout, session_members

SPEC = SessionSpec(sessions=5, length=10, gap=1800)
CHUNKED = SessionSpec(sessions=5, length=10, gap=1800, chunked=True)


def reference_layout(times: list[int], spec: SessionSpec) -> list[list[int]]:
    """The division written the plain way, one history at a time: positions per session, most recent first."""
    sessions: list[list[int]] = []
    for pos, t in enumerate(times):
        if pos == 0 or t - times[pos - 1] > spec.gap:
            sessions.append([])
        sessions[-1].append(pos)
    if spec.chunked:  # each session cut into chunks of T from its most recent end
        t = spec.length
        sessions = [s[max(0, end - t) : end] for s in sessions for end in range(len(s), 0, -t)[::-1]]
    return [s[-spec.length :] for s in reversed(sessions)][: spec.sessions]


def random_times(rng: np.random.Generator, n: int) -> np.ndarray:
    """n timestamps, oldest first, with a session break (> 30 min) about every fourth step."""
    gaps = np.where(rng.random(n) < 0.25, rng.integers(1801, 90_000, n), rng.integers(0, 1801, n))
    return 1_700_000_000 + np.cumsum(gaps)


@pytest.mark.parametrize("spec", [SPEC, CHUNKED], ids=["paper", "chunked"])
def test_layout_matches_the_plain_division(spec: SessionSpec) -> None:
    rng = np.random.default_rng(0)
    lengths = [0, 1, 2, 7, 30, 50, 50, 50, 13, 50, 50, 37]
    width = 50
    times = np.stack([random_times(rng, width) for _ in lengths])
    times[0] = 5  # every gap zero in a history without valid positions changes nothing
    times[-3] = np.arange(width)  # one burst: a single session of 50
    times[-2, 20:] = times[-2, 19] + np.arange(width - 20)  # a long session after short ones
    times[-1, :30] = np.arange(30)  # a long session before short ones
    mask = np.arange(width) < np.asarray(lengths)[:, None]
    times = np.where(mask, times, rng.integers(0, 10**9, times.shape))  # timestamps on padding are ignored
    index, smask = session_layout(times, mask, spec)
    assert index.shape == smask.shape == (len(lengths), 5, 10)
    for row, n in enumerate(lengths):
        expected = reference_layout(times[row, :n].tolist(), spec)
        assert session_members(index[row], smask[row]) == expected
        assert (index[row][~smask[row]] == 0).all()
        # slots are filled from the left: a session's behaviours are its first slots, in history order
        for k in range(5):
            assert (smask[row, k] == (np.arange(10) < smask[row, k].sum())).all()
    # one long session keeps its 10 most recent behaviours; the gap rule is "more than", not "at least"
    idx, m = one_history([0, 1800, 3600, 5401], SPEC)
    assert session_members(idx, m) == [[3], [0, 1, 2]]
    idx, m = one_history(list(range(0, 15 * 60, 60)), SPEC)
    assert session_members(idx, m) == [list(range(5, 15))]
    # chunked, the same burst is two sessions: the 10 most recent, then the 5 before them
    idx, m = one_history(list(range(0, 15 * 60, 60)), CHUNKED)
    assert session_members(idx, m) == [list(range(5, 15)), list(range(5))]
    idx, m = one_history([0, 1800, 3600, 5401, *range(9000, 9000 + 60 * 12, 60)], CHUNKED)
    assert session_members(idx, m) == [list(range(6, 16)), [4, 5], [3], [0, 1, 2]]


def test_the_service_reads_the_division_training_used() -> None:
    """metadata.json carries the spec, ``chunked`` included; a version exported before it divided unchunked."""
    for spec in (SPEC, CHUNKED):
        meta = {"sessions": {"inputs": ["sess_index", "sess_mask"], "output": "session_weights", **spec.to_metadata()}}
        assert Contract.from_metadata(meta).session_spec == spec
    older = {"inputs": ["sess_index", "sess_mask"], "sessions": 5, "length": 10, "gap_seconds": 1800}
    assert Contract.from_metadata({"sessions": older}).session_spec == SPEC
    assert ModelConfig(n_items=5, n_categories=3, session_chunks=True).session_spec == CHUNKED


def small_model(**kw: object) -> DSIN:
    cfg = ModelConfig(n_items=60, n_categories=12, user_feature_cardinalities=(5,), **kw)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = build_model("dsin", cfg)
    assert isinstance(model, DSIN)
    with torch.no_grad():  # a non-trivial bias encoding, so the tests see it
        for p in (model.extractor.w_session, model.extractor.w_position, model.extractor.w_unit):
            p.normal_(std=0.3)
    return model.eval()


def batch(lengths: list[int], width: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    b = len(lengths)
    mask = np.arange(width) < np.asarray(lengths)[:, None]
    times = np.stack([random_times(rng, width) for _ in lengths])
    index, smask = session_layout(times, mask, SPEC)
    return {
        "hist_items": torch.as_tensor(np.where(mask, rng.integers(2, 60, (b, width)), 0)),
        "hist_cats": torch.as_tensor(np.where(mask, rng.integers(2, 12, (b, width)), 0)),
        "hist_mask": torch.as_tensor(mask),
        "cand_item": torch.as_tensor(rng.integers(2, 60, b)),
        "cand_cat": torch.as_tensor(rng.integers(2, 12, b)),
        "user_feats": torch.as_tensor(rng.integers(0, 5, (b, 1))),
        "sess_index": torch.as_tensor(index),
        "sess_mask": torch.as_tensor(smask),
    }


def test_shapes_and_attention_contract() -> None:
    model = small_model()
    x = batch([0, 1, 3, 50, 22])
    out = model.sessions_forward(**x)
    assert out.logits.shape == (5,)
    assert out.attention.shape == (5, 50)
    assert out.session_weights.shape == (5, 5)
    present = x["sess_mask"].any(-1)
    # session weights: a softmax over the sessions present, zero elsewhere; nothing for an empty history
    torch.testing.assert_close(out.session_weights.sum(-1), present.any(-1).float())
    assert (out.session_weights[~present] == 0).all()
    # attention per position: zero outside the kept sessions, and it sums to 1 over a history with sessions
    in_session = torch.zeros(5, 50, dtype=torch.bool)
    for row in range(5):
        in_session[row, x["sess_index"][row][x["sess_mask"][row]]] = True
    assert (out.attention[~in_session] == 0).all()
    torch.testing.assert_close(out.attention.sum(-1), present.any(-1).float())
    # the session's weight × the position's share: summed over a session, the session's weight
    for row in range(5):
        for k in range(5):
            members = x["sess_index"][row, k][x["sess_mask"][row, k]]
            torch.testing.assert_close(out.attention[row, members].sum(), out.session_weights[row, k])


@pytest.mark.parametrize("bias_encoding", [True, False])
def test_empty_and_partial_sessions_are_finite_and_zero(bias_encoding: bool) -> None:
    model = small_model(bias_encoding=bias_encoding).train()
    x = batch([0, 1, 2, 50])
    x["hist_mask"][3, 10:20] = False  # history dropout can empty a session in the middle
    out = model.sessions_forward(**x)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.attention).all()
    out.logits.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    model.eval()
    b = batch([0, 4])
    behaviours = model.embedding.history(b["hist_items"], b["hist_cats"], None)
    sessions, mask = model.session_behaviours(behaviours, b["hist_mask"], b["sess_index"], b["sess_mask"])
    interests, share = model.extractor(sessions, mask)
    present = mask.any(-1)
    assert (interests[~present] == 0).all() and (share[~mask] == 0).all()
    states = model.interaction(interests, present)
    assert (states[~present] == 0).all()


def test_padding_content_does_not_change_the_output() -> None:
    model = small_model()
    x = batch([0, 1, 9, 35, 50], seed=3)
    ref = model.sessions_forward(**x)
    noisy = dict(x)
    rng = torch.Generator().manual_seed(1)
    pad = ~x["hist_mask"]
    noisy["hist_items"] = torch.where(pad, torch.randint(2, 60, pad.shape, generator=rng), x["hist_items"])
    noisy["hist_cats"] = torch.where(pad, torch.randint(2, 12, pad.shape, generator=rng), x["hist_cats"])
    slots = ~x["sess_mask"]  # padded session slots may point anywhere
    noisy["sess_index"] = torch.where(slots, torch.randint(0, 50, slots.shape, generator=rng), x["sess_index"])
    out = model.sessions_forward(**noisy)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.session_weights, ref.session_weights, rtol=0, atol=1e-6)
    # positions outside every session get nothing, whatever padded slots point at
    kept = torch.zeros_like(x["hist_mask"])
    for row in range(5):
        kept[row, x["sess_index"][row][x["sess_mask"][row]]] = True
    torch.testing.assert_close(out.attention * kept, ref.attention, rtol=0, atol=1e-6)


def test_a_dropped_position_is_absent_from_its_session() -> None:
    """Masking a behaviour (history dropout) equals the history laid out without it in that session."""
    model = small_model()
    x = batch([30], seed=5)
    k = int(x["sess_mask"][0].sum(-1).argmax())  # the fullest session
    members = x["sess_index"][0, k][x["sess_mask"][0, k]]
    assert members.numel() >= 2
    dropped = dict(x)
    dropped["hist_mask"] = x["hist_mask"].clone()
    dropped["hist_mask"][0, members[0]] = False
    by_mask = model.sessions_forward(**dropped)
    removed = dict(x)
    removed["sess_mask"] = x["sess_mask"].clone()
    removed["sess_mask"][0, k, 0] = False  # the session's first slot holds members[0]
    by_layout = model.sessions_forward(**removed)
    torch.testing.assert_close(by_mask.logits, by_layout.logits)


def test_heads_must_split_the_dimension() -> None:
    with pytest.raises(ValueError, match="heads"):
        ModelConfig(n_items=10, n_categories=5, session_heads=5)  # the config itself is fine
        build_model("dsin", ModelConfig(n_items=10, n_categories=5, session_heads=5))


def test_training_batches_carry_the_division_of_each_samples_history() -> None:
    """Sessions built inside sample preparation from the split's event timestamps, vectorised over the batch:
    each sample's (K, T) layout is the plain division of its own history window, as the service divides it."""
    from training.batches import TensorSamples
    from training.datasets import SyntheticConfig, generate_synthetic
    from training.samples import prepare

    data = prepare(generate_synthetic(SyntheticConfig(n_users=40, session_events=6, seed=3)), "din-movielens", 30)
    split = data.train
    rows = np.arange(0, len(split), 7)
    index, smask = split.sessions(rows, 30, SPEC)
    batch = TensorSamples(split, 30, SPEC).inputs(torch.as_tensor(rows))
    assert torch.equal(batch["sess_index"], torch.as_tensor(index))
    assert torch.equal(batch["sess_mask"], torch.as_tensor(smask))
    assert "sess_index" not in TensorSamples(split, 30).inputs(torch.as_tensor(rows))  # other models: unchanged
    for r, row in enumerate(rows):
        n, end = int(split.length[row]), int(split.end[row])
        times = split.event_time[end - n : end].tolist()
        assert session_members(index[r], smask[r]) == reference_layout(times, SPEC)


def test_planted_sessions_make_the_current_sessions_interest_predict_the_click() -> None:
    from training.datasets import SyntheticConfig, generate_synthetic

    plain = generate_synthetic(SyntheticConfig(n_users=30, seed=1))
    assert plain.events.equals(generate_synthetic(SyntheticConfig(n_users=30, seed=1, session_events=0)).events)
    events = generate_synthetic(SyntheticConfig(n_users=400, seed=1, session_events=8)).events
    gap = events.groupby("user_id")["timestamp"].diff()
    session = (gap.isna() | (gap > SPEC.gap)).cumsum()  # the 30-minute division finds the planted sessions
    sizes = session.value_counts()
    assert 6 < sizes.mean() < 10
    mode = events.groupby(session)["category_id"].agg(lambda c: c.mode().iloc[0])
    user_top = events.groupby("user_id")["category_id"].agg(lambda c: set(c.value_counts().index[:3]))
    matches_session = events["category_id"].to_numpy() == mode[session].to_numpy()
    of_user = np.array([c in user_top[u] for u, c in zip(events["user_id"], events["category_id"], strict=True)])
    label = events["label"].to_numpy()
    # clicked when it is the session's interest, much less when it is only one of the user's interests
    assert label[matches_session].mean() > 0.75
    assert label[of_user & ~matches_session].mean() < 0.45


def test_serving_form_runs_the_history_stages_once_per_user_and_matches_the_paper_form() -> None:
    from models.serving import NaiveServing, serving_module

    model = small_model()
    x = batch([0, 50, 7], seed=2)
    cand_user = torch.tensor([1, 0, 1, 2, 1, 1, 2])
    rng = torch.Generator().manual_seed(0)
    feed = {
        "hist_items": x["hist_items"],
        "hist_cats": x["hist_cats"],
        "hist_mask": x["hist_mask"],
        "user_feats": x["user_feats"],
        "cand_items": torch.randint(2, 60, (7,), generator=rng),
        "cand_cats": torch.randint(2, 12, (7,), generator=rng),
        "cand_user": cand_user,
        "sess_index": x["sess_index"],
        "sess_mask": x["sess_mask"],
    }
    serving = serving_module(model)
    rows_seen: list[int] = []
    for stage in (serving.dsin.extractor, serving.dsin.interaction):
        stage.register_forward_hook(lambda _m, args, _out: rows_seen.append(args[0].shape[0]))
    with torch.no_grad():
        served = serving(**feed)
        naive = NaiveServing(model)(**feed)
    assert rows_seen == [3, 3]  # the extractor and the Bi-LSTM saw the 3 users, not the 7 candidates
    for got, want in zip(served, naive, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_synthesize_writes_planted_sessions(tmp_path: Path) -> None:
    import pandas as pd
    import pyarrow.parquet as pq

    from training.synthesize import main

    main(["--events", "3000", "--session-events", "6", "--out", str(tmp_path / "log")])
    parts = sorted((tmp_path / "log").glob("*.parquet"))
    events = pd.concat([pq.read_table(p).to_pandas() for p in parts]).sort_values(["user_id", "timestamp"])
    gap = events.groupby("user_id")["timestamp"].diff()
    sessions = int((gap.isna() | (gap > SPEC.gap)).sum())
    assert 4 < len(events) / sessions < 7  # ≈ 6 behaviours per session (fewer: users end sessions early)
