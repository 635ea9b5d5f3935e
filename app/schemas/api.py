"""Request and response bodies of the v1 API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from compression.configs import Gate


def _assume_utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# SQLite hands timestamps back without their offset; every one the app writes is UTC, and the API
# promises RFC 3339 date-times (with an offset), so a naive value is read as UTC.
UTCDateTime = Annotated[datetime, AfterValidator(_assume_utc)]


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable, e.g. `invalid_config`, `not_found`")
    message: str
    details: Any = Field(
        default=None, description="for validation errors a list of {path, message, type}; else code-specific"
    )


class ErrorOut(BaseModel):
    """Every 4xx/5xx answer: `{"error": {"code", "message", "details"}}`."""

    error: ErrorBody


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ModelOut(_Out):
    id: str
    filename: str
    format: str
    sha256: str
    size_bytes: int
    param_count: int | None
    info: dict[str, Any]
    created_at: UTCDateTime


class DatasetOut(_Out):
    id: str
    filename: str
    kind: str
    sha256: str
    size_bytes: int
    info: dict[str, Any]
    created_at: UTCDateTime


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str
    method: str
    config: dict[str, Any] = Field(default_factory=dict)
    calibration_id: str | None = None
    evaluation_id: str | None = None
    gate: Gate | None = None
    queue: Literal["gpu", "cpu"] | None = None


class ArtifactOut(_Out):
    id: str
    kind: str
    filename: str
    sha256: str
    size_bytes: int


class JobError(BaseModel):
    code: str
    message: str | None


class JobOut(BaseModel):
    id: str
    status: str
    stage: str | None
    progress: float
    message: str | None
    method: str
    model_id: str
    model_filename: str | None = Field(None, description="the uploaded model's file name")
    calibration_id: str | None
    evaluation_id: str | None
    config: dict[str, Any]
    gate: dict[str, Any] | None
    queue: str
    error: JobError | None
    verdict: str | None
    summary: dict[str, Any] | None = Field(
        description="original, compressed, fidelity, speedup, speedup_ci95, size_ratio, metric {name, delta, worse}"
    )
    artifacts: list[ArtifactOut]
    attempts: int
    worker_host: str | None
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None
    heartbeat_at: UTCDateTime | None


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class PreflightOut(BaseModel):
    ok: bool
    deep: bool = Field(description="true when the model and data were loaded for real (torch beside the API)")
    checks: list[dict[str, Any]]
    estimate: dict[str, Any]
    skipped_layers: dict[str, str] | list[Any] | None = None
    details: dict[str, Any] | None = None


class ConfigCheck(BaseModel):
    """A method config (and gate) checked before anything is uploaded."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(default_factory=dict)
    gate: Gate | None = None


class ConfigCheckOut(BaseModel):
    method: str
    config: dict[str, Any] = Field(description="the config with every default filled in")
    needs_calibration: bool


class DataNeedsOut(BaseModel):
    calibration: Literal["required", "optional", "none"] = Field(
        description="required: the job needs calibration data (or uses the evaluation set); optional: used when "
        "given; none: never read"
    )
    kinds: list[str] = Field(description="dataset kinds the method reads (npz, text)")


class MethodOut(BaseModel):
    key: str
    summary: str
    needs_calibration: bool
    data: DataNeedsOut
    config_schema: dict[str, Any]
