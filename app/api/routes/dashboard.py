"""The ops dashboard: one static page (`/dashboard`) polling JSON endpoints with the same API keys."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import ProjectDep, SessionDep
from app.core.errors import error_responses, not_found
from app.core.metrics import safe_queue_depths
from app.core.settings import get_settings
from app.db import crud
from app.db.models import Job, WorkerHeartbeat, utcnow

router = APIRouter(tags=["dashboard"], responses=error_responses(401, 422))
page_router = APIRouter(include_in_schema=False)
PAGE = Path(__file__).resolve().parents[2] / "templates" / "dashboard.html"


@page_router.get("/dashboard", response_class=HTMLResponse)
def dashboard_page() -> str:
    return PAGE.read_text()


@router.get("/dashboard/summary")
def dashboard_summary(project: ProjectDep, session: SessionDep) -> dict[str, Any]:
    now = utcnow()
    jobs = session.scalars(
        select(Job).where(Job.project_id == project.id, Job.created_at >= now - timedelta(days=7))
    ).all()
    counts: dict[str, int] = {}
    verdicts: dict[str, int] = {}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
        if job.status == "succeeded" and job.verdict:
            verdicts[job.verdict] = verdicts.get(job.verdict, 0) + 1
    finished = [j for j in jobs if j.finished_at and j.started_at]
    return {
        "now": now,
        "heartbeat_stale_after_s": _heartbeat_stale_after_s(),
        "counts": counts,
        "verdicts": verdicts,
        "queues": safe_queue_depths(),
        "workers": _workers(session, project.id, now),
        "failures": [
            _failure(j) for j in sorted(jobs, key=lambda j: j.created_at, reverse=True) if j.status == "failed"
        ][:20],
        "throughput": _throughput(finished, now),
        "durations": [
            {"id": j.id, "method": j.method, "seconds": _seconds(j.started_at, j.finished_at)}
            for j in sorted(finished, key=lambda j: j.finished_at)[-50:]
        ],
    }


def _heartbeat_stale_after_s() -> float:
    """A running job whose last heartbeat is older than this is marked stale: three beats missed (or the
    janitor's own limit, when that is shorter)."""
    settings = get_settings()
    return min(3 * settings.heartbeat_interval_s, settings.stale_after_s)


def _seconds(start: Any, end: Any) -> float:
    return round((end - start).total_seconds(), 2)


def _workers(session: Session, project_id: str, now: Any) -> list[dict[str, Any]]:
    """Every worker, but a current job only when it is this project's: other tenants' ids stay hidden."""
    rows = session.scalars(select(WorkerHeartbeat)).all()
    busy = {r.current_job_id for r in rows if r.current_job_id}
    own = set(session.scalars(select(Job.id).where(Job.id.in_(busy), Job.project_id == project_id))) if busy else set()
    return [_worker(row, now, row.current_job_id if row.current_job_id in own else None) for row in rows]


def _worker(row: WorkerHeartbeat, now: Any, current_job_id: str | None) -> dict[str, Any]:
    return {
        "name": row.name,
        "queues": row.queues,
        "device": row.device,
        "current_job_id": current_job_id,
        "heartbeat_age_s": round(_seconds(row.last_seen_at, now), 1),
    }


def _failure(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "method": job.method,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "finished_at": job.finished_at,
    }


def _throughput(finished: list[Job], now: Any) -> list[dict[str, Any]]:
    """Jobs finished per hour over the last 24 hours, oldest first."""
    buckets = [0] * 24
    for job in finished:
        age_h = int(_seconds(job.finished_at, now) // 3600)
        if 0 <= age_h < 24:
            buckets[23 - age_h] += 1
    return [{"hours_ago": 23 - i, "finished": n} for i, n in enumerate(buckets)]


@router.get("/jobs/{job_id}/events", responses=error_responses(404))
def job_events(job_id: str, project: ProjectDep, session: SessionDep) -> list[dict[str, Any]]:
    job = crud.get_owned(session=session, cls=Job, project_id=project.id, ident=job_id)
    if job is None:
        raise not_found("job", job_id)
    return [
        {"at": e.at, "status": e.status, "stage": e.stage, "message": e.message}
        for e in crud.job_events(session=session, job_id=job_id)
    ]
