"""claim -> load -> compress -> evaluate -> export -> benchmark -> persist, for one job id."""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from app.core.redact import redact_paths, short_traceback
from app.core.settings import get_settings
from app.db import crud
from app.db.models import Dataset, Job, Model
from app.db.session import session_scope
from app.storage.store import get_store
from workers.device import job_device
from workers.limits import JobLimits
from workers.reporter import JobCancelled, JobReporter, LostOwnership

log = logging.getLogger(__name__)
TEMP_DIR = re.compile(r"modelpress-(?P<job>[0-9a-f]{32})-(?P<pid>\d+)-")


def worker_host() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def job_temp_prefix(job_id: str) -> str:
    """Names the job and the process running it, so a sweep tells one run's dir from another's."""
    return f"modelpress-{job_id}-{os.getpid()}-"


def _show_on_dashboard(worker_name: str | None, job_id: str | None) -> None:
    """Best effort: the dashboard's "current job" column must never fail a job."""
    if not worker_name:
        return
    try:
        with session_scope() as session:
            crud.set_worker_job(session=session, name=worker_name, job_id=job_id)
    except Exception:
        log.warning("could not record the current job of worker %s", worker_name, exc_info=True)


def execute_job(job_id: str, worker_name: str | None = None) -> None:
    host = worker_host()
    with session_scope() as session:
        if not crud.claim_job(session=session, job_id=job_id, worker_host=host, worker_name=worker_name):
            log.info("job %s already claimed or not queued; message ignored", job_id)
            return
    run_claimed_job(job_id, host, worker_name)


def run_claimed_job(job_id: str, host: str, worker_name: str | None = None) -> None:
    """Runs a job this process has claimed and ends it: succeeded, cancelled, or failed with a reason."""
    _show_on_dashboard(worker_name, job_id)
    with (
        tempfile.TemporaryDirectory(prefix=job_temp_prefix(job_id)) as tmp,
        JobLimits(job_id, host, work_dir=Path(tmp), worker_name=worker_name),
        JobReporter(job_id, host) as reporter,
    ):
        try:
            output = _run(job_id, Path(tmp), reporter)
            _persist_success(job_id, host, output)
        except LostOwnership:
            log.warning("job %s was reaped from this worker; dropping its result", job_id)
        except Exception as exc:  # every failure ends the job with a reason
            if _is_cancellation(exc):
                _finish(job_id, host, "cancelled", stage="cancelled", message="cancelled on request")
            else:
                _fail(job_id, host, exc)
        finally:
            _show_on_dashboard(worker_name, None)


def _is_cancellation(exc: Exception) -> bool:
    """The reporter raises JobCancelled; the library, polling the same flag, stops with code `cancelled`."""
    return isinstance(exc, JobCancelled) or getattr(exc, "code", None) == "cancelled"


def sweep_orphaned_temp_dirs(temp_root: Path | None = None) -> list[Path]:
    """Remove job temp dirs a killed worker left behind (no `finally` runs on SIGKILL).

    A dir whose process is dead is removed. A live process's dir is removed only when this database
    knows its job and that job is not running in that process (finished, requeued, running elsewhere);
    a job this database does not know belongs to another service sharing the temp dir, and stays.
    """
    root = temp_root or Path(tempfile.gettempdir())
    dirs = {path: match for path in root.iterdir() if (match := TEMP_DIR.match(path.name)) and path.is_dir()}
    removed = []
    with session_scope() as session:
        for path, match in dirs.items():
            job = session.get(Job, match["job"])
            owner = f"{socket.gethostname()}:{match['pid']}"
            ours_elsewhere = job is not None and (job.status != "running" or job.worker_host != owner)
            if ours_elsewhere or not _alive(int(match["pid"])):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """A killed process can linger as a zombie until reaped: that is dead too."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs: the signal check is all there is
    return state not in ("Z", "X")


def _run(job_id: str, work_dir: Path, reporter: JobReporter) -> Any:
    from compression.job import JobSpec, run_job

    spec_fields = _fetch_inputs(job_id, work_dir)
    reporter.progress("load", 0.0, "inputs fetched")
    settings = get_settings()
    spec = JobSpec(
        work_dir=work_dir / "out",
        device=job_device(settings),
        calibration_samples=settings.calibration_max_samples,
        evaluation_samples=settings.evaluation_max_samples,
        seq_len=settings.seq_len,
        benchmark_budget_s=settings.benchmark_budget_s,
        benchmark_threads=settings.benchmark_threads,
        max_memory_bytes=settings.resolved_job_max_memory_bytes,
        archive_limits=settings.archive_limits,
        **spec_fields,
    )
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    return run_job(spec, progress=reporter.progress, should_cancel=reporter.cancelled)


def _fetch_inputs(job_id: str, work_dir: Path) -> dict[str, Any]:
    store = get_store()
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        model = session.get(Model, job.model_id)
        assert model is not None
        fields: dict[str, Any] = {
            "model_path": store.fetch(model.sha256, work_dir / _safe_name(model.filename, "model"))
        }
        for role, ident in (("calibration", job.calibration_id), ("evaluation", job.evaluation_id)):
            dataset = session.get(Dataset, ident) if ident else None
            fields[f"{role}_path"] = (
                store.fetch(dataset.sha256, work_dir / f"{role}_path-{_safe_name(dataset.filename, 'data')}")
                if dataset
                else None
            )
            # ids and hashes let the job see one dataset given for both roles and split it
            fields[f"{role}_id"] = dataset.id if dataset else None
            fields[f"{role}_sha256"] = dataset.sha256 if dataset else None
        return {**fields, "method": job.method, "config": dict(job.config), "gate": job.gate}


def _safe_name(filename: str, fallback: str) -> str:
    name = Path(filename).name
    return name if name and name not in (".", "..") else fallback


def _persist_success(job_id: str, host: str, output: Any) -> None:
    store = get_store()
    report = json_safe(output.report)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        for kind, path in output.artifacts.items():
            path, address, size = _put(store, Path(path))
            crud.create_artifact(
                session=session,
                project_id=job.project_id,
                job_id=job_id,
                kind=kind,
                filename=Path(path).name,
                sha256=address,
                size_bytes=size,
            )
        verdict = (report.get("gate") or {}).get("verdict") if job.gate else None
        if not crud.finish_job(
            session=session,
            job_id=job_id,
            worker_host=host,
            status="succeeded",
            stage="done",
            progress=1.0,
            report=report,
            verdict=verdict,
            message="done",
        ):
            session.rollback()  # reaped meanwhile: its artifacts must not attach to a job we no longer own


def _put(store: Any, path: Path) -> tuple[Path, str, int]:
    """Store one artifact; a directory (the Hugging Face model) is zipped beside it, inside the job's temp dir."""
    if path.is_dir():
        path = Path(shutil.make_archive(str(path), "zip", root_dir=path))
    address, size = store.put_file(path)
    return path, address, size


def _finish(job_id: str, host: str, status: str, **values: Any) -> None:
    with session_scope() as session:
        crud.finish_job(session=session, job_id=job_id, worker_host=host, status=status, **values)


def _fail(job_id: str, host: str, exc: Exception) -> None:
    """Record the failure with its paths redacted; the full traceback goes to the worker log, a short one to
    the job's events."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        code, message = _failure(exc, stage=job.stage if job is not None else None)
        log.error("job %s failed (%s)", job_id, code, exc_info=exc)
        if crud.finish_job(
            session=session,
            job_id=job_id,
            worker_host=host,
            status="failed",
            error_code=code,
            error_message=message[:4000],
            message="failed",
        ):
            job = session.get(Job, job_id)
            assert job is not None
            crud.log_job_event(session=session, job=job, message=f"traceback: {short_traceback(exc, limit=489)}")


def _failure(exc: Exception, *, stage: str | None) -> tuple[str, str]:
    """(code, message) of a failed job; a CUDA out-of-memory error anywhere in the chain is
    `gpu_out_of_memory` with the numbers, whichever stage hit it and however it was wrapped."""
    from compression.devices import GPU_OUT_OF_MEMORY, gpu_oom_in, gpu_oom_message

    code = getattr(exc, "code", None) or "internal_error"
    message = str(getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
    oom = gpu_oom_in(exc)
    if oom is not None and code != GPU_OUT_OF_MEMORY:
        code, message = GPU_OUT_OF_MEMORY, gpu_oom_message(oom, where=f"the {stage or 'job'} stage")
    return code, redact_paths(message)


def json_safe(value: Any) -> Any:
    """Non-finite floats become None so the report stores in any JSON column (Postgres refuses NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
