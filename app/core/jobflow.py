"""Job creation and presentation: validate, record, enqueue. No compute happens here."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import APIError, not_found, validation_details
from app.core.inspect import check_dataset_matches_model
from app.core.queue import route_job, send_job
from app.core.report_view import job_summary
from app.db import crud
from app.db.models import Dataset, Job, Model, Project
from app.schemas.api import ArtifactOut, JobCreate, JobError, JobOut, PreflightOut
from compression.configs import CONFIG_CLASSES, PIPELINE_STEP_CLASSES, MethodConfigBase, parse_config
from compression.method_docs import valid_keys

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = ("failed", "cancelled")  # a job in these gives its Idempotency-Key to a new job


def validate_config(method: str, config: dict[str, Any]) -> MethodConfigBase:
    if method not in CONFIG_CLASSES:
        raise APIError(422, "unknown_method", f"unknown method {method!r}", {"known": sorted(CONFIG_CLASSES)})
    try:
        return parse_config(method, config)
    except ValidationError as exc:
        details = _config_error_details(method, exc)
        raise APIError(422, "invalid_config", f"config for {method} failed validation", details) from exc


def _config_error_details(method: str, exc: ValidationError) -> list[dict[str, Any]]:
    """One item per error with its `config.` path (a pipeline step's: `config.steps.1.config.bits`; the
    method tags pydantic puts in its locations are left out); an unknown key also lists the valid keys there."""
    details = validation_details(list(exc.errors()))
    for item in details:
        located = item["path"].split(".")
        parts = [p for p in located[1:] if p not in PIPELINE_STEP_CLASSES] if located[:1] == [method] else located
        item["path"] = "config." + ".".join(parts)
        if item["type"] == "extra_forbidden":
            item["valid"] = valid_keys(*_model_at(method, located[1:-1]))
            item["message"] += f"; valid keys: {', '.join(item['valid'])}"
    return details


def _model_at(method: str, located: list[str]) -> tuple[type[BaseModel], list[str]]:
    """(the config model an error location is in, the path inside it): a pipeline step's own model after the
    step's method tag, else the method's config class."""
    tags = [index for index, part in enumerate(located) if part in PIPELINE_STEP_CLASSES]
    if method == "pipeline" and tags:
        return PIPELINE_STEP_CLASSES[located[tags[0]]], located[tags[0] + 1 :]
    return CONFIG_CLASSES[method], located


def resolve_inputs(
    *, session: Session, project: Project, body: JobCreate
) -> tuple[Model, Dataset | None, Dataset | None]:
    model = crud.get_model(session=session, project_id=project.id, model_id=body.model_id)
    if model is None:
        raise not_found("model", body.model_id)
    datasets = []
    for ident in (body.calibration_id, body.evaluation_id):
        dataset = None if ident is None else crud.get_dataset(session=session, project_id=project.id, dataset_id=ident)
        if ident is not None and dataset is None:
            raise not_found("dataset", ident)
        datasets.append(dataset)
    return model, datasets[0], datasets[1]


def preflight_checks(
    *, model: Model, config: MethodConfigBase, calibration: Dataset | None, evaluation: Dataset | None
) -> list[dict[str, Any]]:
    """Torch-free checks the API can answer in milliseconds; each {name, ok, message}."""
    checks = [
        _check(
            "calibration_present",
            calibration is not None or evaluation is not None or not config.needs_calibration,
            f"{config.method} {'needs' if config.needs_calibration else 'does not need'} calibration data",
        ),
    ]
    for role, dataset in (("calibration", calibration), ("evaluation", evaluation)):
        if dataset is None:
            continue
        problems = check_dataset_matches_model(
            model.info.get("inputs", []), model.format, model.info, dataset.kind, dataset.info
        )
        checks.append(_check(f"{role}_matches_model", not problems, "; ".join(problems) or "inputs match"))
    return checks


def _check(name: str, ok: bool, message: str) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "message": message}


def raise_on_failed_checks(checks: list[dict[str, Any]]) -> None:
    failed = [c for c in checks if not c["ok"]]
    if not failed:
        return
    first = failed[0]["name"]
    code = {"calibration_present": "calibration_required"}.get(first, "dataset_mismatch")
    raise APIError(422, code, "; ".join(c["message"] for c in failed), {"checks": failed})


def estimate(model: Model, config: MethodConfigBase) -> dict[str, Any]:
    """Rough worker cost: weights in fp32 a few times over, plus a per-parameter time."""
    params = model.param_count or model.size_bytes // 4
    copies = 3.0 if config.method.startswith("quant") or config.method == "mixed_precision" else 2.5
    seconds_per_mparam = {"quant_decoupleq": 4.0, "quant_gptq": 1.0, "mixed_precision": 6.0}.get(config.method, 0.5)
    return {
        "peak_memory_bytes": int(params * 4 * copies + 512 * 1024**2),
        "seconds": round(10 + params / 1e6 * seconds_per_mparam, 1),
        "basis": "parameter count; the worker re-estimates after loading",
    }


def dry_run(
    *,
    store: Any,
    model: Model,
    config: MethodConfigBase,
    calibration: Dataset | None,
    evaluation: Dataset | None,
    checks: list[dict[str, Any]],
) -> PreflightOut:
    """Torch-free checks, then the worker's own pre-flight when this process can run it."""
    from app.core.deep_preflight import deep_preflight

    deep = deep_preflight(
        store=store,
        model=model,
        method=config.method,
        config=config.model_dump(mode="json", exclude={"method"}),
        calibration=calibration,
        evaluation=evaluation,
    )
    if deep is None:
        note = _check("deep_preflight", True, "torch is not installed beside the API: the worker re-checks first")
        return PreflightOut(
            ok=all(c["ok"] for c in checks), deep=False, checks=[*checks, note], estimate=estimate(model, config)
        )
    names = {c["name"] for c in checks}
    merged = [*checks, *(c for c in deep.get("checks", []) if c["name"] not in names)]
    return PreflightOut(
        ok=all(c["ok"] for c in merged),
        deep=True,
        checks=merged,
        estimate=deep.get("estimates") or estimate(model, config),
        skipped_layers=deep.get("skipped_layers"),
        details={k: deep.get(k) for k in ("format", "task", "params", "quantizable_layers")},
    )


def raise_if_preflight_failed(result: PreflightOut) -> None:
    """A failed pre-flight is a 422 whose code names the first failed check (`unsupported_operator`, ...)."""
    failed = [c for c in result.checks if not c["ok"]]
    if not failed:
        return
    first = failed[0]
    prefix, _, rest = str(first["message"]).partition(": ")
    code = prefix if rest and prefix.replace("_", "").isalpha() and prefix.islower() else None
    code = code or {"calibration_present": "calibration_required"}.get(first["name"], "preflight_failed")
    raise APIError(422, code, "; ".join(str(c["message"]) for c in failed), result.model_dump(mode="json"))


def request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def create_job(
    *,
    session: Session,
    project: Project,
    body: JobCreate,
    config: MethodConfigBase,
    idempotency_key: str | None,
    params: int | None = None,
) -> tuple[Job, bool]:
    """Commit the job row (or find the idempotent twin); returns (job, created).

    An Idempotency-Key names one request: replayed with another body it is a 409. It replays the job
    while that job is queued, running or succeeded; once its job failed or was cancelled, the same
    request runs again as a new job, which takes the key over (the dead job keeps no key).
    """
    digest = request_hash(body)
    if idempotency_key:
        replayed = _replay_or_release(session=session, project=project, key=idempotency_key, digest=digest)
        if replayed is not None:
            return replayed, False
    queue, why = route_job(requested=body.queue, config=config, params=params)
    job = Job(
        project_id=project.id,
        model_id=body.model_id,
        calibration_id=body.calibration_id,
        evaluation_id=body.evaluation_id,
        method=config.method,
        config=config.model_dump(mode="json", exclude={"method"}),
        gate=body.gate.model_dump(mode="json", exclude_none=True) if body.gate else None,
        queue=queue,
        idempotency_key=idempotency_key,
        request_hash=digest,
        stage="queued",
        message=f"queued on {queue}: {why}",
    )
    session.add(job)
    try:
        session.flush()
        crud.enqueue_job_event(session=session, job_id=job.id)
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = crud.find_job_by_idempotency_key(session=session, project_id=project.id, key=idempotency_key or "")
        if existing is None:
            raise
        return _same_request(existing, digest), False
    return job, True


def _replay_or_release(*, session: Session, project: Project, key: str, digest: str) -> Job | None:
    """The job this key names, to replay; None when there is none or it died (then the key is freed)."""
    existing = crud.find_job_by_idempotency_key(session=session, project_id=project.id, key=key)
    if existing is None:
        return None
    _same_request(existing, digest)
    if existing.status not in RETRYABLE_STATUSES:
        return existing
    crud.release_idempotency_key(session=session, job=existing)
    return None


def _same_request(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise APIError(409, "idempotency_conflict", "this Idempotency-Key was used with a different request")
    return job


def dispatch(*, session: Session, job: Job) -> None:
    """Send the task after the row is committed. A failed send is not an error: the janitor re-sends."""
    try:
        send_job(job.id, queue=job.queue, dispatch=job.dispatches + 1)
    except Exception as exc:  # broker down: the row is the truth, the janitor retries
        log.warning("could not send job %s now (%s); the janitor will re-send it", job.id, exc)
        return
    crud.mark_dispatched(session=session, job_id=job.id)
    session.commit()
    session.refresh(job)


def job_out(*, session: Session, job: Job, model_filename: str | None = None) -> JobOut:
    """The API's view of a job; `model_filename` when the caller read it with the job (status polling)."""
    artifacts = [ArtifactOut.model_validate(a) for a in crud.job_artifacts(session=session, job_id=job.id)]
    error = JobError(code=job.error_code, message=job.error_message) if job.error_code else None
    summary = job_summary(job.report) if job.report else None
    if model_filename is None:
        model = session.get(Model, job.model_id)
        model_filename = model.filename if model else None
    return JobOut(
        id=job.id,
        status=job.status,
        stage=job.stage,
        progress=job.progress,
        message=job.message,
        method=job.method,
        model_id=job.model_id,
        model_filename=model_filename,
        calibration_id=job.calibration_id,
        evaluation_id=job.evaluation_id,
        config=job.config,
        gate=job.gate,
        queue=job.queue,
        error=error,
        verdict=job.verdict,
        summary=summary,
        artifacts=artifacts,
        attempts=job.attempts,
        worker_host=job.worker_host,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at,
    )
