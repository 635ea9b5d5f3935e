"""Progress, heartbeat and cancellation for one running job, written to its DB row."""

from __future__ import annotations

import threading
import time

from app.core.settings import get_settings
from app.db import crud
from app.db.models import Job
from app.db.session import session_scope

STAGE_WEIGHTS = {"load": 0.1, "compress": 0.5, "evaluate": 0.15, "export": 0.1, "benchmark": 0.15}


class JobCancelled(Exception):
    """Raised from a progress callback once the job's cancel flag is seen."""


class LostOwnership(Exception):
    """The row no longer says this worker runs the job (reaped and handed to another worker)."""


class JobReporter:
    def __init__(self, job_id: str, worker_host: str) -> None:
        self.job_id, self.worker_host = job_id, worker_host
        self.settings = get_settings()
        self._stop = threading.Event()
        self._last_write = 0.0
        self._stage: str | None = None
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> JobReporter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            with session_scope() as session:
                crud.update_running_job(session=session, job_id=self.job_id, worker_host=self.worker_host)

    def cancelled(self) -> bool:
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            return bool(job is None or job.cancel_requested)

    def progress(self, stage: str, fraction: float, message: str) -> None:
        """Called by the library; throttled to one DB write per half second unless the stage changes."""
        new_stage = stage != self._stage
        if new_stage and self.settings.fault_stage_delay_s:
            time.sleep(self.settings.fault_stage_delay_s)  # fault injection for the chaos tests only
        now = time.monotonic()
        if not new_stage and now - self._last_write < 0.5:
            return
        self._stage, self._last_write = stage, now
        with session_scope() as session:
            owned = crud.update_running_job(
                session=session,
                job_id=self.job_id,
                worker_host=self.worker_host,
                stage=stage,
                progress=round(min(max(fraction, 0.0), 1.0), 4),
                message=message[:500],
                log=new_stage,
            )
        if not owned:
            raise LostOwnership(self.job_id)
        if self.cancelled():
            raise JobCancelled(self.job_id)
