"""Request and response bodies of the v1 API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from compression.configs import Gate


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
    created_at: datetime


class DatasetOut(_Out):
    id: str
    filename: str
    kind: str
    sha256: str
    size_bytes: int
    info: dict[str, Any]
    created_at: datetime


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
    calibration_id: str | None
    evaluation_id: str | None
    config: dict[str, Any]
    gate: dict[str, Any] | None
    queue: str
    error: JobError | None
    verdict: str | None
    summary: dict[str, Any] | None
    artifacts: list[ArtifactOut]
    attempts: int
    worker_host: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


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


class MethodOut(BaseModel):
    key: str
    summary: str
    needs_calibration: bool
    config_schema: dict[str, Any]
