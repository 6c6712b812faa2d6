"""The API contract: request and response models (OpenAPI is generated from these)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    PlainValidator,
    StringConstraints,
    WithJsonSchema,
    model_validator,
    with_config,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema
from typing_extensions import TypedDict

MAX_ID_LENGTH = 128


def _integral(value: float) -> int:
    if not value.is_integer():
        raise ValueError("not an integer")
    return int(value)


class JsonInteger:
    """An integer as JSON Schema, and so the OpenAPI document, defines one: any number without a fractional
    part (``3.0`` is one, read as 3); booleans, strings and ``3.5`` are not. Bounds are checked on the int."""

    def __init__(self, ge: int | None = None, le: int | None = None) -> None:
        self.ge, self.le = ge, le

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        whole = core_schema.no_info_after_validator_function(_integral, core_schema.float_schema(strict=True))
        number = core_schema.union_schema(
            [core_schema.int_schema(strict=True), whole],
            custom_error_type="int_type",
        )
        return core_schema.chain_schema([number, core_schema.int_schema(ge=self.ge, le=self.le)])

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        generated = handler(schema)  # the union's anyOf, with what other annotations add (a description)
        bounds = {"minimum": self.ge, "maximum": self.le}
        extra = {k: v for k, v in generated.items() if k != "anyOf"}
        return {"type": "integer", **{k: v for k, v in bounds.items() if v is not None}, **extra}


def _id_from_json(value: Any) -> Any:
    """Ids are strings; JSON integers (3.0 included) are accepted too (booleans are not integers here)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _integral_id(value: float) -> str:
    return str(_integral(value))


ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"
_ID_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": ID_PATTERN}
ID_ERROR = f"an id is a string of 1 to {MAX_ID_LENGTH} characters without control characters, or an integer"


class _IdSchema:
    """An id: a string (no control characters: ids are stored joined by one, app/store.py, and echoed in
    logs) or a JSON integer, read as its decimal string; booleans are not integers here.

    Validated by pydantic-core alone: a union of the string and the integer, reported as one ``id_type``
    error at the field. A Python ``BeforeValidator`` for the integers cost 0.12 ms of the 0.20 ms that
    validating a 200-candidate /score request took (bench/README.md), and a plain union would name its
    branches in every error's location."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        text = core_schema.str_schema(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN, strict=True)
        number = core_schema.no_info_after_validator_function(str, core_schema.int_schema(strict=True))
        integral = core_schema.no_info_after_validator_function(_integral_id, core_schema.float_schema(strict=True))
        return core_schema.union_schema(
            [text, number, integral], custom_error_type="id_type", custom_error_message=ID_ERROR
        )


Id = Annotated[str, _IdSchema, WithJsonSchema({"anyOf": [_ID_STRING, {"type": "integer"}]})]

ModelName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
VERSION_PATTERN = r"^[1-9][0-9]{0,8}$"
VersionNumber = Annotated[
    str,
    BeforeValidator(_id_from_json),
    StringConstraints(pattern=VERSION_PATTERN),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": VERSION_PATTERN},
                {"type": "integer", "minimum": 1, "maximum": 999_999_999},
            ]
        }
    ),
]


# unknown fields are ignored, so callers can send more than the contract (a bid, a trace id) safely
_INPUT_CONFIG = ConfigDict(extra="ignore", strict=True)


class _Input(BaseModel):
    model_config = _INPUT_CONFIG


# A request's candidates and history are TypedDicts, validated by pydantic-core like models: 200 candidates
# as model instances took 260 µs to validate, as dicts 93 µs (bench/README.md). Read them with item["item_id"]
# and item.get("category_id").
class _Item(TypedDict):
    item_id: Id
    category_id: NotRequired[
        Annotated[Id | None, Field(description="looked up in the model's item table when omitted")]
    ]


@with_config(_INPUT_CONFIG)
class Candidate(_Item):
    pass


LABEL = "the behaviour's outcome: 1 liked/clicked, 0 not; models trained with history feedback use it, others ignore it"
Label = Annotated[int, JsonInteger(ge=0, le=1), Field(description=LABEL)]


TIMESTAMP = (
    "Unix seconds of the behaviour; DSIN divides a history into sessions by them (a gap of more than the model's "
    "session gap starts one). A history sent without a timestamp on every item is one session to DSIN"
)


@with_config(_INPUT_CONFIG)
class HistoryItem(_Item):
    label: NotRequired[Label | None]
    timestamp: NotRequired[Annotated[Annotated[int, JsonInteger(ge=0)] | None, Field(description=TIMESTAMP)]]


class ScoreRequest(_Input):
    user_id: Id
    candidates: list[Candidate] = Field(min_length=1, max_length=1000)
    history: list[HistoryItem] | None = Field(
        None, max_length=1000, description="most recent first; replaces the stored history when present"
    )
    user_features: dict[Annotated[str, StringConstraints(max_length=64)], Id] | None = Field(None, max_length=64)
    model: ModelName | None = Field(None, description="DEFAULT_MODEL when omitted")
    version: VersionNumber | None = Field(
        None, description="a loaded version of the model; omitted: the primary (or the traffic split's, per user)"
    )
    return_attention: bool = True


def _float32_row(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


# A row of the graph's float32 output, written by orjson as it is (float32 at its shortest repr); pydantic
# reads it back from a JSON array of numbers and writes it as one.
Float32Row = Annotated[
    np.ndarray,
    PlainValidator(_float32_row),
    PlainSerializer(lambda row: row.tolist()),
    WithJsonSchema({"items": {"type": "number"}, "type": "array"}),
]


# The answer's types are TypedDicts: the route builds them as dict literals that mypy checks against these
# keys and types, and orjson writes them (numpy rows included) with no per-field Python work (bench/README.md).
ATTENTION = (
    "attention[j]: weight given to history[j]. DSIN: the weight of history[j]'s session (session_weights) times "
    "history[j]'s share of that session's interest (the self-attention it receives, averaged over heads and over "
    "the session's behaviours); zero for a behaviour in no kept session"
)
SESSION_WEIGHTS = (
    "DSIN only: the candidate's attention weight on each session of `sessions`, in the same order (a softmax over "
    "the sessions, so they sum to 1 when the history has any)"
)
SESSIONS = (
    "DSIN only: the history indices each session holds (most recent behaviour first), most recent session first; "
    "at most the model's K sessions of T behaviours, so older behaviours may be in none"
)


class Score(TypedDict):
    item_id: str
    probability: float
    attention: NotRequired[Annotated[Float32Row | None, Field(description=ATTENTION)]]
    session_weights: NotRequired[Annotated[Float32Row | None, Field(description=SESSION_WEIGHTS)]]


HistorySource = Literal["store", "request", "none"]


IMPRESSION_ID = (
    "this answer's id, unique: post the user's clicks (and explicit negatives) on its candidates to /events with "
    "it, so they join what was served; an opaque string to callers"
)


class ScoreResponse(TypedDict):
    impression_id: Annotated[str, Field(description=IMPRESSION_ID)]
    model: str
    version: str
    user_id: str
    history_source: HistorySource
    degraded: NotRequired[Annotated[bool, Field(default=False)]]
    history: list[HistoryItem]
    scores: list[Score]
    sessions: NotRequired[Annotated[list[list[int]], Field(description=SESSIONS)]]


# as app/impression_log.py makes them (model.version.random); checked here, so an outcome names a version
IMPRESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}\.[1-9][0-9]{0,8}\.[0-9a-f]{24}$"
ImpressionId = Annotated[str, StringConstraints(pattern=IMPRESSION_ID_PATTERN)]


class Event(_Input):
    # the rule _outcome_has_label checks, in the contract too: a generated client (or the fuzzer) knows it
    model_config = ConfigDict(
        **_INPUT_CONFIG,
        json_schema_extra={
            "if": {"required": ["impression_id"], "properties": {"impression_id": {"type": "string"}}},
            "then": {"required": ["label"], "properties": {"label": {"type": "integer"}}},
        },
    )

    user_id: Id
    item_id: Id
    category_id: Id | None = None
    timestamp: Annotated[int, JsonInteger(ge=0)] | None = Field(
        None, description="seconds; the server's clock when omitted"
    )
    label: Label | None = None
    impression_id: ImpressionId | None = Field(
        None,
        description="the /score answer that showed this item: the entry is then also that impression's outcome "
        "(label required: 1 a click, 0 an explicit negative)",
    )

    @model_validator(mode="after")
    def _outcome_has_label(self) -> Event:
        if self.impression_id is not None and self.label is None:
            raise ValueError("an entry naming an impression_id is an outcome: give its label (1 click, 0 not)")
        return self


class EventsRequest(_Input):
    events: list[Event] = Field(min_length=1, max_length=1000)


class EventsResponse(BaseModel):
    stored: int


class StoredBehaviour(BaseModel):
    item_id: str
    category_id: str | None
    timestamp: int
    label: int | None


class HistoryResponse(BaseModel):
    user_id: str
    history: list[StoredBehaviour]


class VersionInfo(BaseModel):
    version: str
    role: Literal["primary", "split", "standby"] = Field(
        description="primary: answers by default; split: answers the traffic split's users; standby: only when named"
    )
    model_type: str
    provider: str
    graph: str = Field(description="the graph file this provider runs (DIN has a CPU and a CUDA form)")
    max_history: int
    loaded_at: float = Field(description="Unix time the version started loading")
    ready_seconds: float = Field(description="load + warm-up + self-check")
    self_check_max_abs_diff: float | None
    in_flight: int = Field(description="requests being scored by this version now")
    metrics: dict[str, Any] = Field(description="the training run's evaluation, from metadata.json")


class SplitInfo(BaseModel):
    version: str
    percent: float = Field(description="share of users (stable per user id) sent to this version")


class LoadError(BaseModel):
    version: str
    error: str
    at: float


class ModelStatus(BaseModel):
    name: str
    primary: str | None
    split: SplitInfo | None
    pinned: bool = Field(description="an admin chose the version: polling does not move this model forward")
    versions: list[VersionInfo]
    published: list[int] = Field(description="versions in the repository")
    last_error: LoadError | None = Field(description="the latest version that failed to load, if any")
    failures: list[LoadError]


class ModelsResponse(BaseModel):
    default: str
    models: list[ModelStatus]


class LoadRequest(_Input):
    version: Annotated[int, JsonInteger(ge=1)] | None = Field(
        None, description="omitted: the newest published version (and follow new ones)"
    )
    activate: bool = Field(True, description="make it the primary; false: load as a standby")


class UnloadRequest(_Input):
    version: Annotated[int, JsonInteger(ge=1)] | None = Field(None, description="omitted: the whole model")


class RollbackRequest(_Input):
    version: Annotated[int, JsonInteger(ge=1)] | None = Field(
        None, description="omitted: the version that was primary before this one"
    )


class SplitRequest(_Input):
    version: Annotated[int, JsonInteger(ge=1)] = Field(description="loaded first if needed; must not be the primary")
    percent: float = Field(gt=0, le=100)


class ReadyResponse(BaseModel):
    ready: bool
    reasons: list[str] = []


class ErrorResponse(BaseModel):
    detail: Any


# FastAPI answers 400 (not 422) to a body that is not JSON at all; declared so the contract is complete
BAD_BODY: dict[int | str, dict[str, Any]] = {400: {"model": ErrorResponse, "description": "the body is not JSON"}}
