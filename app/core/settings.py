"""All configuration, read once from MODELPRESS_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", env_file=None, extra="ignore")

    data_dir: Path = Field(
        Path("var"),
        validate_default=True,
        description="Root of the embedded default's files; a relative path is made absolute once, against the "
        "working directory of the command that reads the settings (`modelpress serve` hands the absolute path "
        "to its API and worker processes).",
    )
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite under data_dir.")
    broker_url: str = Field("", description="Celery broker URL; default: kombu filesystem transport.")
    store_url: str = Field("", description="file:///path or s3://bucket/prefix; default: data_dir/store.")
    db_pool_size: int = Field(
        20, ge=1, description="Database connections each process keeps open; as many again may open under load."
    )
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"

    max_upload_bytes: int = Field(4 * 1024**3, gt=0, description="Uploads past this answer 413.")
    default_queue: str = Field("gpu", description="Queue the compression jobs are sent to.")

    heartbeat_interval_s: float = Field(5.0, gt=0)
    stale_after_s: float = Field(60.0, gt=0, description="A running job without heartbeat this long is reaped.")
    requeue_after_s: float = Field(120.0, gt=0, description="A queued job unclaimed this long is re-sent.")
    max_attempts: int = Field(2, ge=1, description="Runs a job gets before a lost worker fails it.")
    janitor_interval_s: float = Field(10.0, gt=0)
    janitor_enabled: bool = True
    calibration_max_samples: int = Field(512, ge=1, description="Calibration samples a job uses at most.")
    evaluation_max_samples: int = Field(10_000, ge=1, description="Evaluation samples a job uses at most.")
    seq_len: int = Field(512, ge=8, description="Token window for text data.")
    benchmark_budget_s: float = Field(10.0, gt=0, description="ONNX Runtime timing budget per model and batch.")
    fault_stage_delay_s: float = Field(
        0.0, ge=0, description="Fault injection for chaos tests: sleep this long in each worker stage."
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'modelpress.db'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.data_dir / "broker"

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"file://{self.data_dir / 'store'}"

    @property
    def is_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")


@lru_cache
def get_settings() -> Settings:
    return Settings()
