"""One configuration for every model: vocab sizes come from the data, the rest are hyper-parameters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# the history-feedback codes are part of the contract with the service (contract.py); re-exported for the models
from contract import FEEDBACK_NEGATIVE, FEEDBACK_PAD, FEEDBACK_POSITIVE, FEEDBACK_SIZE, FEEDBACK_UNKNOWN  # noqa: F401
from sessions import SESSION_GAP_SECONDS, SESSION_LENGTH, SESSIONS, SessionSpec

Activation = Literal["dice", "prelu", "relu"]
Evolution = Literal["augru", "agru", "aigru"]
AttentionKind = Literal["mlp", "dot", "bilinear", "multihead", "position"]  # DIN's scorer (models/attention.py)


@dataclass(frozen=True)
class ModelConfig:
    n_items: int
    n_categories: int
    user_feature_cardinalities: tuple[int, ...] = ()
    item_dim: int = 32
    category_dim: int = 16
    user_dim: int = 8
    mlp_hidden: tuple[int, ...] = (200, 80)
    mlp_activation: Activation = "dice"
    attention_hidden: tuple[int, ...] = (80, 40)
    attention_activation: Activation = "prelu"
    # DIN: normalise the attention weights. The paper (§4.3) leaves them unnormalised to keep the intensity of a
    # user's interest, for large logs; on ml-100k (split 0, training.train's other defaults) unnormalised weights
    # give test AUC 0.6867, softmax 0.7081 (bench/README.md, "Issue 18: defaults by evidence")
    attention_softmax: bool = True
    attention: AttentionKind = "mlp"  # DIN: how a behaviour is scored against the candidate (models/attention.py)
    attention_heads: int = 4  # DIN, attention "multihead": heads (they must divide behaviour_dim)
    attention_positions: int = 50  # DIN, attention "position": recency ranks with their own embedding
    dropout: float = 0.0
    first_order: bool = True  # add per-item and per-category bias terms to the logit (a "wide" part)
    history_feedback: bool = False  # add a feedback embedding (liked / not / unknown) to each history behaviour
    evolution: Evolution = "augru"  # DIEN only
    dien_pooling: Literal["sum", "attention"] = "sum"  # DIEN: the behaviour summary beside the final interest
    aux_hidden: tuple[int, ...] = field(default=(100, 50))  # DIEN auxiliary net
    # --- DSIN (issue 17) ---------------------------------------------------------------------------------
    sessions: int = SESSIONS  # K most recent sessions
    session_length: int = SESSION_LENGTH  # T behaviours per session (its most recent ones)
    session_gap: int = SESSION_GAP_SECONDS  # a gap of more than this many seconds starts a new session
    session_chunks: bool = False  # a session longer than T becomes sessions of T (sessions.SessionSpec.chunked)
    session_heads: int = 8  # heads of the session interest extractor's self-attention (they split D)
    bias_encoding: bool = True  # BE(k, t, c) added to the sessions' behaviours (paper eq. 2)

    @property
    def behaviour_dim(self) -> int:
        """D: an item is represented by concat(item-id embedding, category embedding)."""
        return self.item_dim + self.category_dim

    @property
    def user_repr_dim(self) -> int:
        return self.user_dim * len(self.user_feature_cardinalities)

    @property
    def session_spec(self) -> SessionSpec:
        return SessionSpec(self.sessions, self.session_length, self.session_gap, self.session_chunks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        tuples = {"user_feature_cardinalities", "mlp_hidden", "attention_hidden", "aux_hidden"}
        fields: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in d.items()}
        return cls(**fields)
