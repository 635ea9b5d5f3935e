"""Jobs: create (202), get, list, cancel, report, artifacts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import HTMLResponse, StreamingResponse

from app.api.deps import ProjectDep, SessionDep, StoreDep
from app.core import jobflow
from app.core.errors import APIError, not_found
from app.core.report_html import render_report_html
from app.db import crud
from app.db.models import JOB_STATUSES, Artifact, Job
from app.schemas.api import JobCreate, JobOut, JobPage, PreflightOut

router = APIRouter(tags=["jobs"])


def _owned_job(session: SessionDep, project: ProjectDep, job_id: str) -> Job:
    job = crud.get_owned(session=session, cls=Job, project_id=project.id, ident=job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.post("/jobs", status_code=202, response_model=JobOut | PreflightOut)
def create_job(
    body: JobCreate,
    project: ProjectDep,
    session: SessionDep,
    response: Response,
    dry_run: bool = False,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    config = jobflow.validate_config(body.method, body.config)
    model, calibration, evaluation = jobflow.resolve_inputs(session=session, project=project, body=body)
    checks = jobflow.preflight_checks(
        model=model, config=config, calibration=calibration, evaluation=evaluation
    )
    if dry_run:
        response.status_code = 200
        ok = all(c["ok"] for c in checks)
        return PreflightOut(ok=ok, checks=checks, estimate=jobflow.estimate(model, config))
    jobflow.raise_on_failed_checks(checks)
    job, created = jobflow.create_job(
        session=session, project=project, body=body, config=config, idempotency_key=idempotency_key
    )
    if created:
        jobflow.dispatch(session=session, job=job)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return jobflow.job_out(session=session, job=job)


@router.get("/jobs", response_model=JobPage)
def list_jobs(
    project: ProjectDep,
    session: SessionDep,
    status: str | None = None,
    method: str | None = None,
    model_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Any:
    if status is not None and status not in JOB_STATUSES:
        raise APIError(422, "invalid_filter", f"status must be one of {list(JOB_STATUSES)}")
    rows, total = crud.list_jobs(
        session=session,
        project_id=project.id,
        status=status,
        method=method,
        model_id=model_id,
        limit=limit,
        offset=offset,
    )
    items = [jobflow.job_out(session=session, job=job) for job in rows]
    return JobPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, project: ProjectDep, session: SessionDep) -> Any:
    return jobflow.job_out(session=session, job=_owned_job(session, project, job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, project: ProjectDep, session: SessionDep) -> Any:
    job = _owned_job(session, project, job_id)
    if job.status in ("succeeded", "failed", "cancelled"):
        raise APIError(409, "job_finished", f"job is already {job.status}")
    crud.request_cancel(session=session, job=job)
    session.commit()
    return jobflow.job_out(session=session, job=job)


def _report(job: Job) -> dict[str, Any]:
    if job.report is None:
        raise APIError(409, "report_not_ready", f"job is {job.status}; the report exists once it succeeds")
    return job.report


@router.get("/jobs/{job_id}/report")
def get_report(job_id: str, project: ProjectDep, session: SessionDep) -> Any:
    return _report(_owned_job(session, project, job_id))


@router.get("/jobs/{job_id}/report.html", response_class=HTMLResponse)
def get_report_html(job_id: str, project: ProjectDep, session: SessionDep) -> Any:
    job = _owned_job(session, project, job_id)
    return HTMLResponse(render_report_html(job=job, report=_report(job)))


@router.get("/artifacts/{artifact_id}")
def download_artifact(artifact_id: str, project: ProjectDep, session: SessionDep, store: StoreDep) -> Any:
    artifact = crud.get_owned(session=session, cls=Artifact, project_id=project.id, ident=artifact_id)
    if artifact is None:
        raise not_found("artifact", artifact_id)
    headers = {
        "Content-Disposition": f'attachment; filename="{artifact.filename}"',
        "Content-Length": str(artifact.size_bytes),
        "ETag": f'"{artifact.sha256}"',
        "X-Content-SHA256": artifact.sha256.removeprefix("sha256:"),
    }
    return StreamingResponse(
        store.iter_bytes(artifact.sha256), media_type="application/octet-stream", headers=headers
    )
