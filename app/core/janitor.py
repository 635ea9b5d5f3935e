"""Keeps the promise that nothing accepted is lost and nothing stays `running` forever.

- reap: a running job whose worker stopped heartbeating is cancelled if a cancel was asked, queued
  again (and re-sent) while it has attempts left, else failed with `worker_lost` and its stage;
- resend: a queued job that no worker claimed within `requeue_after_s` is sent again (the broker may
  have lost it, e.g. Redis restarted empty). A duplicate message is harmless: claims are conditional;
- deliver_webhooks: due webhook deliveries from the outbox.
All updates are conditional, so several API replicas can run this at once. Each step runs on its own:
one that raises is logged with its traceback and counted (`/readyz`, `/metrics`), and the others run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from app.core.queue import send_job
from app.core.settings import get_settings
from app.db import crud
from app.db.models import utcnow
from app.db.session import session_scope

log = logging.getLogger(__name__)


def stale_before() -> datetime:
    """Heartbeats older than this are from a worker (or job) presumed dead."""
    return utcnow() - timedelta(seconds=get_settings().stale_after_s)


def reap_stale_jobs() -> dict[str, int]:
    before, max_attempts = stale_before(), get_settings().max_attempts
    outcomes = {"requeued": 0, "failed": 0, "cancelled": 0}
    with session_scope() as session:
        for job in crud.stale_running_jobs(session=session, before=before):
            status = crud.reap_lost_job(session=session, job=job, before=before, max_attempts=max_attempts)
            if status is not None:
                outcomes["requeued" if status == "queued" else status] += 1
    return outcomes


def resend_unclaimed_jobs() -> dict[str, int]:
    settings = get_settings()
    before = utcnow() - timedelta(seconds=settings.requeue_after_s)
    sent = 0
    with session_scope() as session:
        for job in crud.unclaimed_queued_jobs(session=session, before=before):
            try:
                send_job(job.id, queue=job.queue, dispatch=job.dispatches + 1)
            except Exception as exc:
                log.warning("broker unavailable, will retry job %s later: %s", job.id, exc)
                break
            crud.mark_dispatched(session=session, job_id=job.id)
            session.commit()
            sent += 1
    return {"resent": sent}


def deliver_webhooks() -> dict[str, int]:
    from app.core.webhooks import deliver_due

    return {f"webhooks_{outcome}": count for outcome, count in deliver_due().items()}


@dataclass
class StepHealth:
    """One janitor step's record in this process."""

    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_ok_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        ok_at = self.last_ok_at.isoformat() if self.last_ok_at else None
        return {**self.__dict__, "last_ok_at": ok_at, "failing": self.consecutive_failures > 0}


# reap first: a requeued job has no `enqueued_at`, so it is re-sent in the same pass
STEPS: dict[str, Callable[[], dict[str, int]]] = {
    "reap": reap_stale_jobs,
    "resend": resend_unclaimed_jobs,
    "deliver_webhooks": deliver_webhooks,
}
HEALTH: dict[str, StepHealth] = {name: StepHealth() for name in STEPS}


def run_janitor_once() -> dict[str, int]:
    """One pass over every step; a failing step is logged and counted, never stops the others."""
    totals: dict[str, int] = {}
    for name, step in STEPS.items():
        health = HEALTH[name]
        health.runs += 1
        try:
            totals.update(step())
        except Exception as exc:
            log.exception("janitor step %r failed; the other steps still run", name)
            health.failures += 1
            health.consecutive_failures += 1
            health.last_error = f"{type(exc).__name__}: {exc}"[:500]
            totals[f"{name}_failed"] = 1
            continue
        health.consecutive_failures, health.last_ok_at = 0, utcnow()
    return totals


def janitor_health() -> dict[str, dict[str, Any]]:
    return {name: health.as_dict() for name, health in HEALTH.items()}


def start_janitor_thread(stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        interval = get_settings().janitor_interval_s
        while not stop.wait(interval):
            try:
                run_janitor_once()
            except Exception:  # run_janitor_once isolates its steps; this only guards the thread itself
                log.exception("janitor pass failed; retrying next interval")

    thread = threading.Thread(target=loop, name="modelpress-janitor", daemon=True)
    thread.start()
    return thread
