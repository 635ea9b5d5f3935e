"""Process-local state of this worker, read by its heartbeat thread."""

current_job_id: str | None = None
