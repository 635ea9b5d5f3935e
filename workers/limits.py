"""Per-job memory and wall-time limits for the pool child that runs a job.

A thread samples the process's resident memory and the job's elapsed time. Past a limit it records the
job as `failed` with `resource_limit` (limit, observed peak, stage) while this worker still owns it, clears
the dashboard's current job, removes the job's temp dir, then SIGKILLs its own process: the allocation
that overshot may sit inside one long C call, where no exception raised in Python could stop it. Celery's
parent process replaces the pool child and stays up for the next job; the redelivered message finds the job
no longer queued and does nothing, so an over-limit job is never retried into another OOM.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from app.core.limits import RESOURCE_LIMIT, memory_exceeded_message, rss_bytes, time_exceeded_message
from app.core.settings import get_settings
from app.db import crud
from app.db.models import Job
from app.db.session import session_scope

log = logging.getLogger(__name__)
SAMPLE_INTERVAL_S = 0.05
MessageForStage = Callable[[str | None], str]


class JobLimits:
    """Context manager around one job's run in this process."""

    def __init__(self, job_id: str, worker_host: str, *, work_dir: Path, worker_name: str | None) -> None:
        settings = get_settings()
        self.job_id, self.worker_host = job_id, worker_host
        self.work_dir, self.worker_name = work_dir, worker_name
        self.max_memory, self.max_seconds = settings.resolved_job_max_memory_bytes, settings.job_max_seconds
        self.peak_memory = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"limits-{job_id}", daemon=True)

    def __enter__(self) -> JobLimits:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            breach = self._breach()
            if breach is not None:
                self._stop_job(breach)

    def _breach(self) -> MessageForStage | None:
        self.peak_memory = max(self.peak_memory, rss_bytes())
        elapsed = time.monotonic() - self._started
        if self.peak_memory > self.max_memory:
            limit, peak = self.max_memory, self.peak_memory
            return lambda stage: memory_exceeded_message(limit=limit, peak=peak, stage=stage)
        if elapsed > self.max_seconds:
            return lambda stage: time_exceeded_message(limit_s=self.max_seconds, elapsed_s=elapsed, stage=stage)
        return None

    def _stop_job(self, message_for_stage: MessageForStage) -> None:
        try:
            self._record(message_for_stage)
        except Exception:  # the DB may be what failed; the process goes either way
            log.exception("could not record the resource limit of job %s", self.job_id)
        shutil.rmtree(self.work_dir, ignore_errors=True)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)

    def _record(self, message_for_stage: MessageForStage) -> None:
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            stage = job.stage if job is not None else None
            message = message_for_stage(stage)
            log.error("job %s: %s; stopping this pool process", self.job_id, message)
            crud.finish_job(
                session=session,
                job_id=self.job_id,
                worker_host=self.worker_host,
                status="failed",
                error_code=RESOURCE_LIMIT,
                error_message=message,
                message="failed: resource limit",
            )
            if self.worker_name:
                crud.set_worker_job(session=session, name=self.worker_name, job_id=None)
