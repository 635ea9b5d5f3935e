"""All configuration, read once from MODELPRESS_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from compression.archives import ArchiveLimits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", env_file=None, extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root of the embedded default's files.")
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite under data_dir.")
    broker_url: str = Field("", description="Celery broker URL; default: kombu filesystem transport.")
    store_url: str = Field("", description="file:///path or s3://bucket/prefix; default: data_dir/store.")
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"

    max_upload_bytes: int = Field(4 * 1024**3, gt=0, description="Uploads past this answer 413.")
    max_unpacked_bytes: int = Field(
        0, ge=0, description="Total bytes an archive upload (zip, tar, .npz) may unpack to; 0: 2 x max_upload_bytes."
    )
    max_compression_ratio: float = Field(
        100.0, gt=1, description="Largest unpacked/packed ratio of an archive member over 1 MiB (decompression bombs)."
    )
    max_json_body_bytes: int = Field(1024**2, gt=0, description="JSON request bodies past this answer 413.")
    spool_orphan_age_s: float = Field(
        900.0, gt=0, description="At startup, upload spool files untouched this long are removed."
    )
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

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'modelpress.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"file://{(self.data_dir / 'store').resolve()}"

    @property
    def archive_limits(self) -> ArchiveLimits:
        from compression.archives import ArchiveLimits

        return ArchiveLimits(
            max_unpacked_bytes=self.max_unpacked_bytes or 2 * self.max_upload_bytes,
            max_ratio=self.max_compression_ratio,
        )

    @property
    def is_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")


@lru_cache
def get_settings() -> Settings:
    return Settings()
