"""Session division (DSIN paper §3.1), defined once for training and serving.

A user's behaviours fall into sessions: a new session starts where the gap to the previous behaviour is
more than ``gap`` seconds. DSIN reads the K most recent sessions, each cut to its T most recent
behaviours, as fixed (K, T) shapes with a mask. Training (``training.samples``) and the service
(``app.scorer``) both call ``session_layout`` on the same history window, so a history is divided the same
way in both. Plain numpy on purpose: the serving image has no torch.

Layout: session k = 0 is the most recent, k = K − 1 the oldest kept; inside a session behaviours are
oldest first and right-padded. ``index[b, k, t]`` is the position in the history (oldest first,
right-padded (B, L)) of that behaviour, 0 on padding.

A session longer than T keeps its T most recent behaviours (the paper's layout). With ``chunked`` it is cut
instead into consecutive sessions of T, the most recent T first (its oldest part may be shorter), so the K × T
slots hold up to K × T behaviours even when the log has few gaps: on ml-100k, whose timestamps are rating
bursts, three histories in four are one "session", and the paper's layout kept 30% of their behaviours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SESSION_GAP_SECONDS = 30 * 60  # the paper's rule: a gap of more than 30 minutes starts a new session
SESSIONS, SESSION_LENGTH = 5, 10  # K and T, as the official code keeps them


@dataclass(frozen=True)
class SessionSpec:
    """How a history is divided: K sessions of T behaviours, a new one after more than ``gap`` seconds."""

    sessions: int = SESSIONS
    length: int = SESSION_LENGTH
    gap: int = SESSION_GAP_SECONDS
    chunked: bool = False  # a session longer than T becomes sessions of T (else it keeps its T most recent)

    def to_metadata(self) -> dict[str, int | bool]:
        """As a version's metadata.json states it (``from_metadata`` reads it back)."""
        return {"sessions": self.sessions, "length": self.length, "gap_seconds": self.gap, "chunked": self.chunked}

    @classmethod
    def from_metadata(cls, d: dict[str, Any]) -> SessionSpec:
        """The spec a version's metadata states; versions exported before ``chunked`` divided without it."""
        return cls(int(d["sessions"]), int(d["length"]), int(d["gap_seconds"]), bool(d.get("chunked", False)))


def session_layout(times: np.ndarray, mask: np.ndarray, spec: SessionSpec) -> tuple[np.ndarray, np.ndarray]:
    """times (B, L) int seconds, mask (B, L) bool (valid positions first, oldest first) → index (B, K, T)
    int64 positions into L and session mask (B, K, T) bool. Vectorised over the batch: no Python loop per
    history. A history without valid positions has no session; timestamps on padding are ignored."""
    b, length = mask.shape
    k_max, t_max = spec.sessions, spec.length
    index = np.zeros((b, k_max, t_max), dtype=np.int64)
    smask = np.zeros((b, k_max, t_max), dtype=bool)
    if b == 0 or length == 0:
        return index, smask
    times = np.asarray(times, dtype=np.int64)
    gap_before = np.zeros((b, length), dtype=bool)  # (B, L) more than `gap` after the previous behaviour
    gap_before[:, 1:] = (times[:, 1:] - times[:, :-1]) > spec.gap
    positions = np.arange(length)  # (L,)
    starts = mask & (gap_before | (positions == 0))  # (B, L) a session begins here
    sid = np.cumsum(starts, axis=1) - 1  # (B, L) session number from the oldest, 0-based
    n_sessions = starts.sum(axis=1)  # (B,)
    recency = n_sessions[:, None] - 1 - sid  # (B, L) 0 = the most recent session
    start_pos = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)  # (B, L) its first position
    within = positions - start_pos  # (B, L) place inside the session
    rows = np.arange(b)[:, None]  # (B, 1)
    flat_sid = np.where(mask, rows * length + sid, b * length)  # padding to a spare bin
    sizes = np.bincount(flat_sid.ravel(), minlength=b * length + 1)[:-1].reshape(b, length)  # (B, L) per session
    size = np.take_along_axis(sizes, np.maximum(sid, 0), axis=1)  # (B, L) the size of each position's session
    if spec.chunked:
        back = size - 1 - within  # (B, L) 0 = the session's most recent behaviour
        part = back // t_max  # (B, L) its chunk of T, 0 = the most recent chunk
        part_size = np.minimum(t_max, size - part * t_max)  # (B, L) only the oldest chunk may be short
        slot = part_size - 1 - back % t_max  # (B, L) oldest first inside the chunk
        chunks = -(-sizes // t_max)  # (B, L) chunks of each session (by its number), 0 past the last session
        later = chunks.sum(axis=1, keepdims=True) - np.cumsum(chunks, axis=1)  # (B, L) chunks of later sessions
        recency = np.take_along_axis(later, np.maximum(sid, 0), axis=1) + part  # (B, L) 0 = the most recent chunk
    else:
        skipped = np.maximum(size - t_max, 0)  # (B, L) the session's oldest behaviours beyond T are dropped
        slot = within - skipped  # (B, L) slot in the kept session, negative when dropped
    keep = mask & (recency < k_max) & (slot >= 0)  # (B, L)
    bi, li = np.nonzero(keep)
    index[bi, recency[bi, li], slot[bi, li]] = li
    smask[bi, recency[bi, li], slot[bi, li]] = True
    return index, smask


def one_history(times: list[int] | np.ndarray, spec: SessionSpec) -> tuple[np.ndarray, np.ndarray]:
    """One history's layout (K, T) from its timestamps, oldest first (the service's single-user call)."""
    t = np.asarray(times, dtype=np.int64).reshape(1, -1)
    index, smask = session_layout(t, np.ones(t.shape, dtype=bool), spec)
    return index[0], smask[0]


def session_members(index: np.ndarray, smask: np.ndarray) -> list[list[int]]:
    """(K, T) layout → the history positions of each non-empty session, most recent session first."""
    return [index[k][smask[k]].tolist() for k in range(index.shape[0]) if smask[k].any()]
