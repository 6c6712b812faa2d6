"""Service configuration: one pydantic-settings object, read from the environment and validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import impressions


class Settings(BaseSettings):
    """Every knob of the service. Environment variables have the same names, upper-cased."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", frozen=True)

    model_repository: Path = Field(Path("runs/repository"), description="root of the exported model repository")
    default_model: str = Field("din", min_length=1, description="model used when a request names none")
    redis_url: str | None = Field(None, description="behaviour store; unset → embedded in-process store")
    redis_key_prefix: str = Field("ctr:hist:", description="prefix of the per-user behaviour lists")
    store_timeout_ms: float = Field(50.0, gt=0, description="bound on one store round trip")
    history_cap: int = Field(200, ge=1, le=100_000, description="behaviours kept per user")
    history_ttl_s: int = Field(30 * 24 * 3600, ge=1, description="a user's behaviours expire after this idle time")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="larger request bodies get 413")
    max_batch_candidates: int = Field(4096, ge=1, description="a batch closes at this many candidates")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="a batch waits at most this long to fill (0: batches form while a run is busy)"
    )
    queue_limit: int = Field(128, ge=1, description="requests waiting for inference; beyond → 503")
    request_timeout_ms: float = Field(1000.0, gt=0, description="a request still queued after this gets 504")
    inference_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="ONNX Runtime runs in flight at once, each on a thread of its own; 0: one at a time on the "
        "event loop's thread (no hand-off between threads, nothing overlaps a run); unset: 0 for a CPU model when "
        "WORKERS > 1 (each process has its core), else 1",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per run; 0 = its default (one per core), or cores / WORKERS"
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="scorer processes behind the one port, under uvicorn's supervisor (one process is bound by its "
        "GIL at ≈ 1.3 cores); more than 1 needs REDIS_URL, and INTRA_OP_THREADS=0 then means cores / WORKERS each",
    )
    provider: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when it works, else CPU")
    model_poll_interval_s: float = Field(
        0.0, ge=0, description="look for new versions in the repository this often (0: only POST /admin/... loads)"
    )
    deployment_sync_interval_s: float = Field(
        1.0,
        ge=0,
        description="with REDIS_URL: how often this process checks the deployment shared through Redis (admin "
        "changes made on another worker or replica, kept across restarts); 0: this process neither reads nor "
        "shares it",
    )
    deployment_key: str = Field(
        "ctr:deployment", min_length=1, description="Redis key prefix of the shared deployment (one per service)"
    )
    api_key: SecretStr | None = Field(
        None, description="bearer key(s), comma-separated, required by /events, /users/* and /admin/*"
    )
    score_requires_key: bool = Field(False, description="require the API key on /score too")

    # the impression log (issue 20): what was served, and what came of it, for training on exactly that
    impression_log: bool | None = Field(
        None,
        description="log every answered /score request and every /events outcome; unset: on with REDIS_URL (to "
        "Redis Streams), off without (true then writes rotating JSON-lines files under IMPRESSION_LOG_DIR)",
    )
    impression_log_sample: float = Field(
        1.0, ge=0, le=1, description="share of impressions logged, decided per impression (its outcomes still join)"
    )
    impression_stream: str = Field(impressions.IMPRESSIONS_STREAM, min_length=1, description="impressions stream key")
    outcome_stream: str = Field(impressions.OUTCOMES_STREAM, min_length=1, description="outcomes stream key")
    impression_log_maxlen: int = Field(
        100_000, ge=1, description="entries kept per stream, trimmed approximately (XADD MAXLEN ~)"
    )
    impression_log_max_age_s: float | None = Field(
        None, gt=0, description="set: trim by age instead (XADD MINID ~ now minus this), not by length"
    )
    impression_log_queue: int = Field(
        10_000, ge=1, description="impressions waiting for the background writer; beyond, new ones are dropped"
    )
    impression_log_batch: int = Field(256, ge=1, description="impressions written per round trip (one pipeline)")
    impression_log_timeout_ms: float = Field(1000.0, gt=0, description="bound on one batch write")
    impression_log_dir: Path = Field(
        Path("runs/impressions"), description="without REDIS_URL: where impressions.jsonl and outcomes.jsonl go"
    )
    impression_log_file_bytes: int = Field(
        100_000_000, ge=1024, description="a log file rotates at this size (impressions.jsonl.1, .2, ...)"
    )
    impression_log_file_backups: int = Field(5, ge=1, description="rotated files kept per log")

    @field_validator("api_key")
    @classmethod
    def _keys_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        return value if _split_keys(value) else None  # API_KEY="" (or " , ") means no key, as if unset

    @model_validator(mode="after")
    def _workers_share_one_store(self) -> Settings:
        if self.workers > 1 and not self.redis_url:
            raise ValueError(
                f"WORKERS={self.workers} needs REDIS_URL: the embedded behaviour store lives inside one process, "
                "so behaviours posted to one worker would be invisible to the others"
            )
        return self

    @property
    def logs_impressions(self) -> bool:
        return self.impression_log if self.impression_log is not None else self.redis_url is not None

    @property
    def api_keys(self) -> list[bytes]:
        return _split_keys(self.api_key)


def _split_keys(value: SecretStr | None) -> list[bytes]:
    """The comma-separated keys of API_KEY, blanks dropped."""
    if value is None:
        return []
    return [k.strip().encode() for k in value.get_secret_value().split(",") if k.strip()]
