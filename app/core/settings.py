"""All configuration, read once from MODELPRESS_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from compression.archives import ArchiveLimits


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
    default_queue: Literal["auto", "gpu", "cpu"] = Field(
        "auto",
        description="Queue a job goes to when its request names none. auto: `gpu` for a method that gains from a "
        "GPU (Hessians, training) on a model of at least gpu_min_params parameters, else `cpu`.",
    )
    gpu_min_params: int = Field(
        10_000_000, ge=0, description="With default_queue=auto, smaller models go to `cpu` whatever the method."
    )
    worker_queues: str = Field(
        "gpu,cpu", description="Queues `modelpress worker` (and `serve`'s workers) consume, comma-separated."
    )
    worker_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device a worker's jobs run on; auto: CUDA when this worker sees a GPU, else CPU."
    )
    worker_max_tasks_per_child: int | None = Field(
        None,
        ge=0,
        description="Jobs a worker pool process runs before it is replaced (0: no limit); unset: 1 on a CUDA "
        "worker, so each job starts in a fresh process with a fresh CUDA context, and no limit on CPU.",
    )

    heartbeat_interval_s: float = Field(5.0, gt=0)
    stale_after_s: float = Field(60.0, gt=0, description="A running job without heartbeat this long is reaped.")
    requeue_after_s: float = Field(120.0, gt=0, description="A queued job unclaimed this long is re-sent.")
    max_attempts: int = Field(2, ge=1, description="Runs a job gets before a lost worker fails it.")
    worker_stall_after_s: float = Field(
        60.0,
        gt=0,
        description="`modelpress serve` restarts a supervised worker whose consumer loop reported no progress this "
        "long (a hung loop, or a pool that never takes the message the worker holds).",
    )
    janitor_interval_s: float = Field(10.0, gt=0)
    janitor_enabled: bool = True
    calibration_max_samples: int = Field(
        512,
        ge=1,
        description="Calibration samples a job uses at most, unless its method states its own cap "
        "(prune_structured: max_calibration_samples; the report's data.calibration.cap says which applied).",
    )
    evaluation_max_samples: int = Field(10_000, ge=1, description="Evaluation samples a job uses at most.")
    seq_len: int = Field(512, ge=8, description="Token window for text data.")
    benchmark_budget_s: float = Field(10.0, gt=0, description="ONNX Runtime timing budget per model and batch.")
    benchmark_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime intra-op threads when timing both models (unset: min(4, cores))."
    )
    webhook_allow_private_targets: bool = Field(
        False,
        description="Allow webhook targets on loopback, private, link-local and other non-public addresses "
        "(self-hosted receivers on the same network). Off: such targets are refused at registration and send.",
    )
    webhook_timeout_s: float = Field(5.0, gt=0, description="Per-request timeout (connect, send, read) of a webhook.")
    webhook_concurrency_per_project: int = Field(
        4, ge=1, description="Webhook requests one project may have in flight at once."
    )
    webhook_claim_lease_s: float = Field(
        120.0, gt=0, description="A claimed webhook delivery its sender did not settle is sent again after this long."
    )
    job_max_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="Resident memory one job may use before it fails with `resource_limit`; "
        "default: 75% of the worker machine's memory (or its container's limit). Set it the same on the API "
        "and the workers when they run on different machines, so job creation can refuse jobs that cannot fit.",
    )
    job_max_seconds: float = Field(
        6 * 3600.0, gt=0, description="Wall time one job may run before it fails with `resource_limit`."
    )
    dry_run_max_concurrent: int = Field(
        1, ge=1, description="Dry runs (`?dry_run=true`) one API process runs at once; more answer 429."
    )
    dry_run_max_memory_bytes: int | None = Field(
        None, gt=0, description="Memory a dry run's subprocess may allocate; default: a quarter of the machine's."
    )
    fault_stage_delay_s: float = Field(
        0.0, ge=0, description="Fault injection for chaos tests: sleep this long in each worker stage."
    )

    @model_validator(mode="after")
    def _lease_outlasts_sends(self) -> Settings:
        # One webhook send can take 4 timeouts (two connects, send, read); a lease must fit a few in a row.
        if self.webhook_claim_lease_s < 6 * self.webhook_timeout_s:
            raise ValueError("MODELPRESS_WEBHOOK_CLAIM_LEASE_S must be at least 6 x MODELPRESS_WEBHOOK_TIMEOUT_S")
        return self

    @field_validator("worker_queues")
    @classmethod
    def _known_queues(cls, value: str) -> str:
        from app.core.queue import parse_queues

        return ",".join(parse_queues(value))

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
    def archive_limits(self) -> ArchiveLimits:
        from compression.archives import ArchiveLimits

        return ArchiveLimits(
            max_unpacked_bytes=self.max_unpacked_bytes or 2 * self.max_upload_bytes,
            max_ratio=self.max_compression_ratio,
        )

    @property
    def is_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def resolved_job_max_memory_bytes(self) -> int:
        from app.core.limits import machine_memory_bytes

        return self.job_max_memory_bytes or int(0.75 * machine_memory_bytes())

    @property
    def known_worker_memory_limit(self) -> int | None:
        """The workers' per-job limit as the API can know it: set explicitly, or local workers (embedded)."""
        if self.job_max_memory_bytes or self.is_embedded_broker:
            return self.resolved_job_max_memory_bytes
        return None

    @property
    def resolved_dry_run_max_memory_bytes(self) -> int:
        from app.core.limits import machine_memory_bytes

        return self.dry_run_max_memory_bytes or machine_memory_bytes() // 4


@lru_cache
def get_settings() -> Settings:
    return Settings()
