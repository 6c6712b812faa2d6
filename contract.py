"""The interface between an exported model version and the service that scores with it, defined once.

The serving graph's input and output names, the history-feedback codes and the vocabulary's reserved
indices. ``training/export.py`` writes them into each version's ``metadata.json``; the service reads them
from there (``Contract.from_metadata``), with the values below for versions exported before they were
written. Plain Python on purpose: the serving image has neither torch nor FastAPI's dependencies here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sessions import SessionSpec

# The serving graph's inputs, in order (models/serving.py describes each), and its outputs.
INPUT_NAMES = ("hist_items", "hist_cats", "hist_mask", "user_feats", "cand_items", "cand_cats", "cand_user")
FEEDBACK_INPUT = "hist_feedback"  # only in graphs of models trained with history feedback
OUTPUT_NAMES = ("probability", "attention")
# DSIN's graphs also take each user's session division (sessions.session_layout, (U, K, T) each) and also
# answer the candidate's weight on each session (N, K)
SESSION_INPUTS = ("sess_index", "sess_mask")
SESSION_OUTPUT = "session_weights"

# Vocabulary indices: 0 pads a history, 1 stands for any id the training data did not have, and the
# vocabulary's own ids start at 2 (index = position in vocab.json's list + FIRST_INDEX).
PAD, OOV, FIRST_INDEX = 0, 1, 2

# History feedback: what the user did with each history behaviour, known before the candidate is shown.
# Index 0 is padding; "unknown" (no label given) embeds to zeros; a label y is FEEDBACK_NEGATIVE + y.
FEEDBACK_PAD, FEEDBACK_UNKNOWN, FEEDBACK_NEGATIVE, FEEDBACK_POSITIVE = 0, 1, 2, 3
FEEDBACK_SIZE = 4

# as metadata.json states them: "vocabulary" holds VOCABULARY_INDICES, "history_feedback" {"input", "values"}
VOCABULARY_INDICES = {"pad_index": PAD, "oov_index": OOV, "first_index": FIRST_INDEX}
FEEDBACK_VALUES = {
    "padding": FEEDBACK_PAD,
    "unknown": FEEDBACK_UNKNOWN,
    "negative": FEEDBACK_NEGATIVE,
    "positive": FEEDBACK_POSITIVE,
}


def input_names(history_feedback: bool, sessions: bool = False) -> tuple[str, ...]:
    """The serving graph's inputs, in order: the session inputs only for DSIN, the feedback input only for a
    model that uses it."""
    return (*INPUT_NAMES, *(SESSION_INPUTS if sessions else ()), *((FEEDBACK_INPUT,) if history_feedback else ()))


def output_names(sessions: bool = False) -> tuple[str, ...]:
    return (*OUTPUT_NAMES, SESSION_OUTPUT) if sessions else OUTPUT_NAMES


@dataclass(frozen=True)
class Contract:
    """One version's interface, read from its metadata.json."""

    inputs: tuple[str, ...] = INPUT_NAMES  # in INPUT_NAMES' order, whatever each is called
    feedback_input: str = FEEDBACK_INPUT
    outputs: tuple[str, ...] = OUTPUT_NAMES  # probability, attention
    pad: int = PAD
    oov: int = OOV
    first_index: int = FIRST_INDEX
    feedback_unknown: int = FEEDBACK_UNKNOWN
    feedback_negative: int = FEEDBACK_NEGATIVE
    feedback_positive: int = FEEDBACK_POSITIVE
    session_inputs: tuple[str, ...] = ()  # DSIN: (index, mask) input names; empty for other models
    session_output: str | None = None  # DSIN: the per-session weights output
    session_spec: SessionSpec | None = None  # DSIN: how the service divides a history, as training did

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Contract:
        """The values a version's metadata states; this module's for each one it does not."""
        feedback = meta.get("history_feedback") or {}
        feedback_input = feedback.get("input") or FEEDBACK_INPUT
        values = {**FEEDBACK_VALUES, **feedback.get("values", {})}
        vocabulary = {**VOCABULARY_INDICES, **meta.get("vocabulary", {})}
        sessions = meta.get("sessions") or {}
        session_inputs = tuple(sessions.get("inputs", ()))
        session_output = sessions.get("output")
        inputs = [i["name"] for i in meta.get("inputs", []) if i["name"] not in {feedback_input, *session_inputs}]
        outputs = [o["name"] for o in meta.get("outputs", []) if o["name"] != session_output]
        return cls(
            inputs=tuple(inputs) or INPUT_NAMES,
            feedback_input=feedback_input,
            outputs=tuple(outputs) or OUTPUT_NAMES,
            pad=int(vocabulary["pad_index"]),
            oov=int(vocabulary["oov_index"]),
            first_index=int(vocabulary["first_index"]),
            feedback_unknown=int(values["unknown"]),
            feedback_negative=int(values["negative"]),
            feedback_positive=int(values["positive"]),
            session_inputs=session_inputs,
            session_output=session_output,
            session_spec=SessionSpec.from_metadata(sessions) if session_inputs else None,
        )

    def feedback_of(self, label: int | None) -> int:
        """A behaviour's label (None: not given) → the graph's feedback code."""
        if label is None:
            return self.feedback_unknown
        return self.feedback_positive if label else self.feedback_negative
