"""Jobs: create (202), get, list, cancel, report, artifacts."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Annotated, Any, NamedTuple

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import ApiKeyHashDep, ProjectDep, SessionDep, StoreDep, authenticate
from app.core import jobflow
from app.core.errors import APIError, error_responses, not_found
from app.core.limits import refuse_if_over_worker_memory
from app.core.report_html import render_report_html
from app.db import crud
from app.db.models import JOB_STATUSES, TERMINAL_STATUSES, Artifact, Job, Model
from app.db.session import get_sessionmaker
from app.schemas.api import JobCreate, JobOut, JobPage, PreflightOut

router = APIRouter(tags=["jobs"], responses=error_responses(401, 422))
SQL_BIGINT_MAX = 2**63 - 1  # past this the database driver overflows on OFFSET (a 500, not a 422)


def _owned_job(session: SessionDep, project: ProjectDep, job_id: str) -> Job:
    job = crud.get_owned(session=session, cls=Job, project_id=project.id, ident=job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.post(
    "/jobs", status_code=202, response_model=JobOut | PreflightOut, responses=error_responses(400, 404, 409, 413, 429)
)
def create_job(
    body: JobCreate,
    project: ProjectDep,
    session: SessionDep,
    store: StoreDep,
    response: Response,
    dry_run: bool = False,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    config = jobflow.validate_config(body.method, body.config)
    model, calibration, evaluation = jobflow.resolve_inputs(session=session, project=project, body=body)
    checks = jobflow.preflight_checks(model=model, config=config, calibration=calibration, evaluation=evaluation)
    refuse_if_over_worker_memory(estimate=jobflow.estimate(model, config)["peak_memory_bytes"])
    if dry_run:
        response.status_code = 200
        result = jobflow.dry_run(
            store=store, model=model, config=config, calibration=calibration, evaluation=evaluation, checks=checks
        )
        jobflow.raise_if_preflight_failed(result)
        refuse_if_over_worker_memory(estimate=result.estimate["peak_memory_bytes"])
        return result
    jobflow.raise_on_failed_checks(checks)
    job, created = jobflow.create_job(
        session=session,
        project=project,
        body=body,
        config=config,
        idempotency_key=idempotency_key,
        params=model.param_count,
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
    offset: Annotated[int, Query(ge=0, le=SQL_BIGINT_MAX)] = 0,
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
    names = crud.model_filenames(session=session, model_ids={job.model_id for job in rows})
    items = [jobflow.job_out(session=session, job=job, model_filename=names.get(job.model_id)) for job in rows]
    return JobPage(items=items, total=total, limit=limit, offset=offset)


class JobSnapshot(NamedTuple):
    status: str
    etag: str
    body: bytes


class _Snapshots:
    """The last bodies served, by (job id, updated_at): every change to a job row moves its updated_at, so an
    unchanged job is answered without loading its report or rebuilding its body."""

    def __init__(self, size: int = 4096) -> None:
        self.size, self.lock = size, threading.Lock()
        self.items: OrderedDict[tuple[str, datetime], JobSnapshot] = OrderedDict()

    def get(self, key: tuple[str, datetime]) -> JobSnapshot | None:
        with self.lock:
            found = self.items.get(key)
            if found is not None:
                self.items.move_to_end(key)
            return found

    def put(self, key: tuple[str, datetime], snapshot: JobSnapshot) -> None:
        with self.lock:
            self.items[key] = snapshot
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_snapshots = _Snapshots()


def _read_job(key_hash: str, job_id: str) -> JobSnapshot:
    """Key check and job read in one session and one thread hop: status polling is the hottest call."""
    with get_sessionmaker()() as session:
        found = crud.job_for_key_hash(session=session, key_hash=key_hash, job_id=job_id)
        if found is None:
            authenticate(session=session, key_hash=key_hash)  # 401 for a bad key; else the job is not its project's
            raise not_found("job", job_id)
        job, model_filename = found
        key = (job.id, job.updated_at)
        snapshot = _snapshots.get(key)
        if snapshot is None:
            body = jobflow.job_out(session=session, job=job, model_filename=model_filename).model_dump_json().encode()
            snapshot = JobSnapshot(job.status, etag_of(body), body)
            _snapshots.put(key, snapshot)
    return snapshot


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    responses={304: {"description": "unchanged (ETag)"}, **error_responses(404)},
)
async def get_job(
    job_id: str,
    key_hash: ApiKeyHashDep,
    wait: Annotated[float, Query(ge=0, le=60, description="long-poll: return as soon as the job changes")] = 0,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Any:
    """With `If-None-Match`, an unchanged job answers 304; with `?wait=S`, the call returns when the job
    differs from that ETag (or from its state at the call) or after S seconds."""
    job = await run_in_threadpool(_read_job, key_hash, job_id)
    baseline = if_none_match or job.etag
    deadline = time.monotonic() + wait
    while job.etag == baseline and time.monotonic() < deadline and job.status not in TERMINAL_STATUSES:
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        job = await run_in_threadpool(_read_job, key_hash, job_id)
    if if_none_match == job.etag:
        return Response(status_code=304, headers={"ETag": job.etag})
    headers = {"ETag": job.etag, "Cache-Control": "no-cache"}
    return Response(job.body, media_type="application/json", headers=headers)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409))
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


@router.get("/jobs/{job_id}/report", responses=error_responses(404, 409))
def get_report(job_id: str, project: ProjectDep, session: SessionDep) -> Any:
    return _report(_owned_job(session, project, job_id))


# `response_class=Response` (no media type of its own) keeps the declared errors application/json.
@router.get(
    "/jobs/{job_id}/report.html",
    response_class=Response,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}, **error_responses(404, 409)},
)
def get_report_html(job_id: str, project: ProjectDep, session: SessionDep) -> Any:
    job = _owned_job(session, project, job_id)
    model = session.get(Model, job.model_id)
    html = render_report_html(job=job, report=_report(job), model_filename=model.filename if model else None)
    return HTMLResponse(html)


@router.get(
    "/artifacts/{artifact_id}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        **error_responses(404),
    },
)
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
    return StreamingResponse(store.iter_bytes(artifact.sha256), media_type="application/octet-stream", headers=headers)
