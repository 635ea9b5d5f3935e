"""A worker starting sweeps the job temp dirs a SIGKILLed worker left (no `finally` runs on kill -9)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from app.db import crud
from app.db.models import Job, Model
from app.db.session import session_scope
from workers.pipeline import job_temp_prefix, sweep_orphaned_temp_dirs


def job_dir(root: Path, pid: int | None = None, **job: object) -> Path:
    with session_scope() as session:
        project = crud.get_or_create_project(session=session, name="default")
        model = Model(project_id=project.id, filename="m.onnx", format="onnx", sha256="sha256:00", size_bytes=1)
        session.add(model)
        session.flush()
        row = Job(project_id=project.id, model_id=model.id, method="quant_rtn", **job)
        session.add(row)
        session.flush()
        job_id = row.id
    prefix = job_temp_prefix(job_id)
    if pid is not None:
        prefix = prefix.replace(f"-{os.getpid()}-", f"-{pid}-")
    path = root / f"{prefix}abc123"
    (path / "out").mkdir(parents=True)
    (path / "out" / "model.onnx").write_bytes(b"partial")
    return path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_sweep_removes_dirs_of_jobs_not_running_in_a_live_local_process(service_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env()
    root = tmp_path / "tmp"
    here = socket.gethostname()
    live = job_dir(root, status="running", worker_host=f"{here}:{os.getpid()}")
    gone = dead_pid()
    orphans = [
        job_dir(root, pid=gone, status="running", worker_host=f"{here}:{gone}"),
        job_dir(root, pid=gone, status="running", worker_host=f"{here}:{os.getpid()}"),  # running again, here
        job_dir(root, pid=1, status="running", worker_host=f"{here}:{os.getpid()}"),
        job_dir(root, status="queued"),  # requeued after its worker died
        job_dir(root, status="succeeded", worker_host=f"{here}:{os.getpid()}"),
        job_dir(root, status="running", worker_host=f"another-host:{os.getpid()}"),
    ]
    # a job this database does not know: another service sharing /tmp, kept while its process lives
    foreign_live = root / f"{job_temp_prefix(uuid.uuid4().hex)}xyz"
    foreign_dead = root / f"{job_temp_prefix(uuid.uuid4().hex)}xyz".replace(f"-{os.getpid()}-", f"-{gone}-")
    for path in (foreign_live, foreign_dead):
        path.mkdir()
    unrelated = [root / "modelpress-notajob", root / "other"]
    for path in unrelated:
        path.mkdir()

    removed = sweep_orphaned_temp_dirs(root)
    assert sorted(removed) == sorted([*orphans, foreign_dead])
    assert live.is_dir() and foreign_live.is_dir() and all(path.is_dir() for path in unrelated)
    assert not any(path.exists() for path in orphans)
