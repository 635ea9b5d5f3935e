"""Keeps the promise that nothing accepted is lost and nothing stays `running` forever.

- reap: a running job whose worker stopped heartbeating is queued again (and re-sent) while it has
  attempts left, else failed with `worker_lost` and the stage it died in;
- resend: a queued job that no worker claimed within `requeue_after_s` is sent again (the broker may
  have lost it, e.g. Redis restarted empty). A duplicate message is harmless: claims are conditional.
All updates are conditional, so several API replicas can run this at once.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from app.core.queue import send_job
from app.core.settings import get_settings
from app.db import crud
from app.db.models import utcnow
from app.db.session import session_scope

log = logging.getLogger(__name__)


def reap_stale_jobs() -> dict[str, int]:
    settings = get_settings()
    before = utcnow() - timedelta(seconds=settings.stale_after_s)
    requeued = failed = 0
    with session_scope() as session:
        for job in crud.stale_running_jobs(session=session, before=before):
            if job.attempts < settings.max_attempts:
                requeued += crud.requeue_stale_job(session=session, job=job, before=before)
            else:
                failed += crud.fail_stale_job(session=session, job=job, before=before)
    return {"requeued": requeued, "failed": failed}


def resend_unclaimed_jobs() -> int:
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
    return sent


def run_janitor_once() -> dict[str, int]:
    """One pass: reap first (a requeued job has no `enqueued_at`), so it is re-sent in the same pass."""
    from app.core.webhooks import deliver_due

    reaped = reap_stale_jobs()
    return {**reaped, "resent": resend_unclaimed_jobs(), **deliver_due()}


def start_janitor_thread(stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        interval = get_settings().janitor_interval_s
        while not stop.wait(interval):
            try:
                run_janitor_once()
            except Exception:
                log.exception("janitor pass failed; retrying next interval")

    thread = threading.Thread(target=loop, name="modelpress-janitor", daemon=True)
    thread.start()
    return thread
