"""Database operations, keyword-only. Routes and the worker call these; nothing else writes rows."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session, defer

from app.core.security import generate_api_key
from app.core.settings import get_settings
from app.db.models import ApiKey, Artifact, Dataset, Job, Model, Project, utcnow


def get_or_create_project(*, session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def create_api_key(*, session: Session, project: Project) -> str:
    key, prefix, key_hash = generate_api_key()
    session.add(ApiKey(project_id=project.id, prefix=prefix, key_hash=key_hash))
    session.flush()
    return key


# The statements every request runs are built once: building and hashing one cost as much as running it.
_VALID_KEY = (ApiKey.key_hash == bindparam("key_hash")) & ApiKey.revoked_at.is_(None)
_PROJECT_FOR_KEY = select(Project).join(ApiKey, ApiKey.project_id == Project.id).where(_VALID_KEY)
_JOB_FOR_KEY = (
    select(Job, Model.filename)
    .join(ApiKey, ApiKey.project_id == Job.project_id)
    .join(Model, Model.id == Job.model_id)
    .where(Job.id == bindparam("job_id"), _VALID_KEY)
    .options(defer(Job.report))  # loaded only when the body is rebuilt (status polling serves a cached one)
)
_JOB_ARTIFACTS = select(Artifact).where(Artifact.job_id == bindparam("job_id")).order_by(Artifact.kind)


def project_for_key_hash(*, session: Session, key_hash: str) -> Project | None:
    """The project of the unrevoked API key with this hash."""
    return session.scalar(_PROJECT_FOR_KEY, {"key_hash": key_hash})


def job_for_key_hash(*, session: Session, key_hash: str, job_id: str) -> tuple[Job, str] | None:
    """(the job, its model's file name), if the unrevoked key with this hash belongs to its project: key
    check and read in one query."""
    row = session.execute(_JOB_FOR_KEY, {"key_hash": key_hash, "job_id": job_id}).first()
    return (row[0], row[1]) if row is not None else None


def model_filenames(*, session: Session, model_ids: set[str]) -> dict[str, str]:
    """Model id -> uploaded file name, for a page of jobs in one query."""
    rows = session.execute(select(Model.id, Model.filename).where(Model.id.in_(model_ids))).all() if model_ids else []
    return {model_id: filename for model_id, filename in rows}


def get_owned(*, session: Session, cls: type, project_id: str, ident: str) -> Any:
    """The object of `cls` with this id in this project, else None (another project's id looks absent)."""
    obj = session.get(cls, ident)
    return obj if obj is not None and obj.project_id == project_id else None


def list_owned(*, session: Session, cls: type, project_id: str, sha256: str | None = None, limit: int = 100) -> Any:
    query = select(cls).where(cls.project_id == project_id)  # type: ignore[attr-defined]
    if sha256:
        query = query.where(cls.sha256 == sha256)  # type: ignore[attr-defined]
    return session.scalars(query.order_by(cls.created_at.desc()).limit(limit)).all()  # type: ignore[attr-defined]


def find_job_by_idempotency_key(*, session: Session, project_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.project_id == project_id, Job.idempotency_key == key))


def release_idempotency_key(*, session: Session, job: Job) -> None:
    """The key moves to a new job (flushed now, so the unique index sees it before the insert)."""
    job.idempotency_key = None
    session.flush()


def list_jobs(
    *,
    session: Session,
    project_id: str,
    status: str | None = None,
    method: str | None = None,
    model_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[Sequence[Job], int]:
    query = select(Job).where(Job.project_id == project_id)
    if status:
        query = query.where(Job.status == status)
    if method:
        query = query.where(Job.method == method)
    if model_id:
        query = query.where(Job.model_id == model_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)).all()
    return rows, total


def job_artifacts(*, session: Session, job_id: str) -> Sequence[Artifact]:
    return session.scalars(_JOB_ARTIFACTS, {"job_id": job_id}).all()


def mark_dispatched(*, session: Session, job_id: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(enqueued_at=utcnow(), dispatches=Job.dispatches + 1)
    )


def claim_job(*, session: Session, job_id: str, worker_host: str, worker_name: str | None = None) -> bool:
    """queued -> running, only once: a redelivered message finds the row already claimed. The claim's
    event names the worker (its Celery node name, e.g. `gpu1@host`) and the process."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
        .values(
            status="running",
            attempts=Job.attempts + 1,
            worker_host=worker_host,
            started_at=now,
            heartbeat_at=now,
            stage="claimed",
            progress=0.0,
            message=f"claimed by {worker_name or 'worker'} ({worker_host})"[:500],
        )
    )
    if result.rowcount == 1:
        enqueue_job_event(session=session, job_id=job_id)
    return result.rowcount == 1


def update_running_job(*, session: Session, job_id: str, worker_host: str, log: bool = False, **values: Any) -> bool:
    """Progress/heartbeat write that only lands while this worker still owns the running job."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.worker_host == worker_host)
        .values(heartbeat_at=utcnow(), **values)
    )
    if result.rowcount == 1 and log:
        job = session.get(Job, job_id)
        if job is not None:
            session.refresh(job)
            log_job_event(session=session, job=job)
    return result.rowcount == 1


def finish_job(*, session: Session, job_id: str, worker_host: str, status: str, **values: Any) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.worker_host == worker_host)
        .values(status=status, finished_at=utcnow(), heartbeat_at=utcnow(), **values)
    )
    if result.rowcount == 1:
        enqueue_job_event(session=session, job_id=job_id)
    return result.rowcount == 1


def request_cancel(*, session: Session, job: Job) -> None:
    """A queued job is cancelled at once; a running one is flagged and its worker stops at the next check.

    A running job whose worker already stopped heartbeating has nobody left to see the flag: it ends now.
    """
    now = utcnow()
    _cancel_where(session, job.id, Job.status == "queued", message="cancelled on request")
    session.execute(update(Job).where(Job.id == job.id, Job.status == "running").values(cancel_requested=True))
    stale_before = now - timedelta(seconds=get_settings().stale_after_s)
    dead_worker = (Job.status == "running", Job.heartbeat_at < stale_before)
    _cancel_where(session, job.id, *dead_worker, message="cancelled on request; its worker had stopped heartbeating")
    session.refresh(job)


def _cancel_where(session: Session, job_id: str, *conditions: Any, message: str) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, *conditions)
        .values(status="cancelled", cancel_requested=True, finished_at=utcnow(), stage="cancelled", message=message)
    )
    if result.rowcount == 1:
        enqueue_job_event(session=session, job_id=job_id)
    return result.rowcount == 1


def stale_running_jobs(*, session: Session, before: datetime) -> Sequence[Job]:
    return session.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < before)).all()


def unclaimed_queued_jobs(*, session: Session, before: datetime) -> Sequence[Job]:
    return session.scalars(
        select(Job).where(Job.status == "queued", (Job.enqueued_at.is_(None)) | (Job.enqueued_at < before))
    ).all()


def reap_lost_job(*, session: Session, job: Job, before: datetime, max_attempts: int) -> str | None:
    """A running job whose worker stopped heartbeating before `before`: cancelled if that was asked,
    queued again while attempts are left, else failed `worker_lost`. Returns the new status, or None
    when the row changed meanwhile (a heartbeat, a cancel request, another janitor)."""
    values = _lost_job_outcome(job, max_attempts)
    result = session.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.status == "running",
            Job.worker_host == job.worker_host,
            Job.heartbeat_at < before,
            Job.cancel_requested.is_(job.cancel_requested),
        )
        .values(**values)
    )
    if result.rowcount != 1:
        return None
    enqueue_job_event(session=session, job_id=job.id)
    return str(values["status"])


def _lost_job_outcome(job: Job, max_attempts: int) -> dict[str, Any]:
    lost = f"worker {job.worker_host} stopped heartbeating"
    if job.cancel_requested:
        message = f"cancelled on request; {lost}"
        return {"status": "cancelled", "stage": "cancelled", "finished_at": utcnow(), "message": message[:500]}
    if job.attempts < max_attempts:
        return {
            "status": "queued",
            "stage": "requeued",
            "worker_host": None,
            "progress": 0.0,
            "enqueued_at": None,
            "message": f"{lost}; retrying"[:500],
        }
    return {
        "status": "failed",
        "finished_at": utcnow(),
        "error_code": "worker_lost",
        "error_message": f"{lost} during stage {job.stage!r}; gave up after {job.attempts} attempt(s)",
        "message": "failed",
    }


def count_stale(*, session: Session, before: datetime) -> dict[str, int]:
    """Workers and running jobs whose last heartbeat is older than `before`."""
    from app.db.models import WorkerHeartbeat

    workers = select(func.count()).where(WorkerHeartbeat.last_seen_at < before)
    jobs = select(func.count()).where(Job.status == "running", Job.heartbeat_at < before)
    return {"stale_workers": session.scalar(workers) or 0, "stale_running_jobs": session.scalar(jobs) or 0}


def count_jobs_by_status(*, session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
    return {status: count for status, count in rows}


def finished_job_durations(*, session: Session) -> list[float]:
    rows = session.execute(
        select(Job.started_at, Job.finished_at).where(Job.finished_at.is_not(None), Job.started_at.is_not(None))
    ).all()
    return [max(0.0, (end - start).total_seconds()) for start, end in rows]


def create_artifact(
    *, session: Session, project_id: str, job_id: str, kind: str, filename: str, sha256: str, size_bytes: int
) -> Artifact:
    artifact = Artifact(
        project_id=project_id,
        job_id=job_id,
        kind=kind,
        filename=filename,
        sha256=sha256,
        size_bytes=size_bytes,
    )
    session.add(artifact)
    session.flush()
    return artifact


def get_model(*, session: Session, project_id: str, model_id: str) -> Model | None:
    return get_owned(session=session, cls=Model, project_id=project_id, ident=model_id)


def get_dataset(*, session: Session, project_id: str, dataset_id: str) -> Dataset | None:
    return get_owned(session=session, cls=Dataset, project_id=project_id, ident=dataset_id)


def enqueue_job_event(*, session: Session, job_id: str) -> int:
    """Outbox rows for every active webhook of the job's project that wants this status. Same transaction."""
    from app.db.models import Webhook, WebhookDelivery

    job = session.get(Job, job_id)
    if job is None:
        return 0
    session.refresh(job)
    log_job_event(session=session, job=job)
    event = f"job.{job.status}"
    hooks = session.scalars(select(Webhook).where(Webhook.project_id == job.project_id, Webhook.active.is_(True)))
    payload = {
        "event": event,
        "job": {
            "id": job.id,
            "status": job.status,
            "stage": job.stage,
            "method": job.method,
            "model_id": job.model_id,
            "verdict": job.verdict,
            "error_code": job.error_code,
            "attempts": job.attempts,
        },
        "occurred_at": utcnow().isoformat(),
    }
    count = 0
    for hook in hooks:
        if not hook.events or event in hook.events:
            session.add(WebhookDelivery(webhook_id=hook.id, job_id=job.id, event=event, payload=payload))
            count += 1
    return count


def claim_due_deliveries(*, session: Session, token: str, lease_until: datetime, limit: int) -> Sequence[Any]:
    """Claim up to `limit` due deliveries for one sender; returns its (delivery, webhook) rows.

    An unexpired claim keeps other senders off a row; the claim counts as an attempt, so a delivery whose
    sender keeps dying still runs out of attempts. SKIP LOCKED lets concurrent PostgreSQL senders pass each
    other's rows by; the conditional UPDATE alone decides on SQLite, which serialises writers.
    """
    from sqlalchemy import or_

    from app.db.models import Webhook, WebhookDelivery

    now = utcnow()
    unclaimed = or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now)
    due = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now, unclaimed)
        .order_by(WebhookDelivery.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = session.scalars(due).all()
    if not ids:
        return []
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(ids), WebhookDelivery.status == "pending", unclaimed)
        .values(claim_token=token, claimed_until=lease_until, attempts=WebhookDelivery.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    claimed = select(WebhookDelivery, Webhook).join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
    return session.execute(claimed.where(WebhookDelivery.claim_token == token)).all()


def settle_delivery(*, session: Session, delivery_id: str, token: str, values: dict[str, Any]) -> bool:
    """Record an attempt's outcome and drop the claim, if this sender still holds it."""
    from app.db.models import WebhookDelivery

    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.claim_token == token)
        .values(**values, claim_token=None, claimed_until=None)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release_deliveries(*, session: Session, delivery_ids: Sequence[str], token: str) -> None:
    """Hand back claimed deliveries that were not sent: due again at once, the claim's attempt undone."""
    from app.db.models import WebhookDelivery

    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(delivery_ids), WebhookDelivery.claim_token == token)
        .values(claim_token=None, claimed_until=None, attempts=WebhookDelivery.attempts - 1)
    )


def touch_worker(*, session: Session, name: str, queues: str, device: str) -> None:
    """The worker process's heartbeat row (its pool children report the current job separately)."""
    from app.db.models import WorkerHeartbeat

    row = session.get(WorkerHeartbeat, name)
    if row is None:
        session.add(WorkerHeartbeat(name=name, queues=queues, device=device))
        return
    row.last_seen_at, row.queues, row.device = utcnow(), queues, device


def set_worker_job(*, session: Session, name: str, job_id: str | None) -> None:
    from app.db.models import WorkerHeartbeat

    result = session.execute(update(WorkerHeartbeat).where(WorkerHeartbeat.name == name).values(current_job_id=job_id))
    if result.rowcount == 0:  # the job can start before the worker's first heartbeat wrote its row
        session.add(WorkerHeartbeat(name=name, queues="", device="", current_job_id=job_id))


def log_job_event(*, session: Session, job: Job, message: str | None = None) -> None:
    from app.db.models import JobEvent

    session.add(JobEvent(job_id=job.id, status=job.status, stage=job.stage, message=message or job.message))


def job_events(*, session: Session, job_id: str) -> Sequence[Any]:
    from app.db.models import JobEvent

    return session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
