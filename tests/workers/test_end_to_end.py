"""End to end with real components: API (in-process), a real Celery worker process, real PostgreSQL
and Redis; and the embedded default (SQLite + filesystem broker). Then the chaos cases, on both
deployments: SIGKILL the worker mid-job, SIGKILL and restart `modelpress serve` mid-job, cancel a
running job (its worker alive, or killed), and restart a private Redis empty with jobs queued. Every
job must still end `succeeded`, `cancelled`, or `failed` with a reason."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ApiClient, Workers
from tests.helpers import files

pytestmark = pytest.mark.services


def upload_inputs(api: ApiClient, tmp_path: Path) -> tuple[str, str]:
    model = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx")).json()
    rng = np.random.default_rng(0)
    data = files.npz(
        tmp_path / "calib.npz",
        input=rng.standard_normal((64, 8)).astype(np.float32),
        labels=rng.integers(0, 3, 64),
    )
    dataset = api.upload("/v1/datasets", data, model_id=model["id"]).json()
    return model["id"], dataset["id"]


# An accuracy drop of at most half: 4-bit RTN of the tiny classifier keeps its (chance-level) accuracy within
# a few points, so this gate passes; a byte limit no model meets makes the same job fail its gate.
PASSING_GATE = {"max_metric_drop": 0.5}
FAILING_GATE = {"max_metric_drop": 0.5, "max_size_bytes": 1}


def submit(api: ApiClient, model_id: str, dataset_id: str, gate: dict | None = None, **config: object) -> str:
    body = {
        "model_id": model_id,
        "method": "quant_rtn",
        "config": {"bits": 4, "group_size": None, **config},
        "evaluation_id": dataset_id,
        "gate": gate or PASSING_GATE,
    }
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_for(api: ApiClient, job_id: str, done: Callable[[dict], bool], timeout: float, workers: Workers) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} stuck at {job}\n--- worker logs ---\n{workers.logs()}")


def finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def assert_succeeded_with_report(api: ApiClient, job: dict, verdict: str = "pass") -> None:
    assert job["status"] == "succeeded", job
    kinds = {a["kind"] for a in job["artifacts"]}
    assert {"onnx", "safetensors", "manifest"} <= kinds, kinds
    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["original"]["size_bytes"] > 0 and report["compressed"]["size_bytes"] > 0
    onnx_artifact = next(a for a in job["artifacts"] if a["kind"] == "onnx")
    blob = api.get(f"/v1/artifacts/{onnx_artifact['id']}").content
    assert len(blob) == onnx_artifact["size_bytes"]
    import onnxruntime as ort

    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.ones((2, 8), np.float32)})[0]
    assert out.shape == (2, 3) and np.isfinite(out).all()
    assert job["verdict"] == report["gate"]["verdict"] == verdict, report["gate"]
    drop = report["fidelity"]["metric"]["drop"]
    assert report["data"]["used_for"] == {"method": None, "fidelity": "evaluation"}, "RTN calibrates on nothing"
    checks = {c["name"]: (c["measured"], c["passed"]) for c in report["gate"]["checks"]}
    assert checks["max_metric_drop"] == (drop, drop <= 0.5)
    if "max_size_bytes" in checks:
        assert checks["max_size_bytes"] == (report["compressed"]["size_bytes"], False)
    html = api.get(f"/v1/jobs/{job['id']}/report.html")
    assert html.status_code == 200 and "<svg" in html.text


def test_postgres_redis_real_worker_end_to_end(service_env, make_api, redis_db, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(db="postgres", broker=redis_db)
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    workers.start("main")
    job_id = submit(api, model_id, dataset_id)
    job = wait_for(api, job_id, finished, 180, workers)
    assert_succeeded_with_report(api, job)
    assert job["attempts"] == 1 and job["worker_host"]
    metrics = api.client.get("/metrics").text
    assert 'modelpress_jobs{status="succeeded"} 1.0' in metrics
    assert "modelpress_job_duration_seconds_count 1.0" in metrics


def test_embedded_default_end_to_end(service_env, make_api, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(db="sqlite", broker="embedded")
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    workers.start("embedded")
    job = wait_for(api, submit(api, model_id, dataset_id), finished, 180, workers)
    assert_succeeded_with_report(api, job)
    gate_failed = wait_for(api, submit(api, model_id, dataset_id, gate=FAILING_GATE), finished, 180, workers)
    assert_succeeded_with_report(api, gate_failed, verdict="fail")  # a gate failure is not a job failure


CHAOS_ENV = {
    "MODELPRESS_FAULT_STAGE_DELAY_S": "2",
    "MODELPRESS_HEARTBEAT_INTERVAL_S": "0.5",
    "MODELPRESS_STALE_AFTER_S": "3",
    "MODELPRESS_REQUEUE_AFTER_S": "2",
    "MODELPRESS_JANITOR_ENABLED": "true",
    "MODELPRESS_JANITOR_INTERVAL_S": "1",
}


DEPLOYMENTS = ["embedded", "postgres_redis"]


@pytest.fixture
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """service_env arguments for the parametrized deployment; job temp dirs go to a folder of the test's."""
    temp = tmp_path / "worker-tmp"
    temp.mkdir()
    where = {"TMPDIR": str(temp)}
    if request.param == "embedded":
        return {"db": "sqlite", "broker": "embedded", **where}
    return {"db": "postgres", "broker": request.getfixturevalue("redis_db"), **where}


def job_temp_dirs(job_id: str) -> list[Path]:
    return list(Path(os.environ["TMPDIR"]).glob(f"modelpress-{job_id}-*"))


def wait_gone(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not any(p.exists() for p in paths), paths


@pytest.mark.parametrize("deployment", DEPLOYMENTS, indirect=True)
@pytest.mark.parametrize("max_attempts", ["2", "1"])
def test_sigkilled_worker_job_is_retried_or_failed_with_reason(  # type: ignore[no-untyped-def]
    service_env, make_api, deployment, workers, tmp_path, max_attempts
) -> None:
    service_env(**deployment, **CHAOS_ENV, MODELPRESS_MAX_ATTEMPTS=max_attempts)
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    doomed = workers.start("doomed")
    job_id = submit(api, model_id, dataset_id)
    running = wait_for(api, job_id, lambda j: j["status"] == "running", 120, workers)
    left_behind = job_temp_dirs(job_id)
    assert len(left_behind) == 1
    workers.kill(doomed)
    workers.start("rescuer")
    job = wait_for(api, job_id, finished, 180, workers)
    wait_gone(left_behind, 60)  # swept by the rescuer when it started
    if max_attempts == "2":
        assert_succeeded_with_report(api, job)
        assert job["attempts"] == 2 and job["worker_host"] != running["worker_host"]
    else:
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
        assert "stopped heartbeating" in job["error"]["message"]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[[], str]]:
    """A redis-server of our own on another port, so restarting it leaves the shared one alone."""
    port = 6390 + os.getpid() % 50
    procs: list[subprocess.Popen[bytes]] = []

    def restart() -> str:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp_path),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        _wait_redis(port)
        return f"redis://127.0.0.1:{port}/0"

    yield restart
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_redis(port: int) -> None:
    import redis

    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            return
        except redis.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError("private redis did not start")


def test_redis_restarted_empty_queued_jobs_are_resent(service_env, make_api, private_redis, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import redis

    url = private_redis()
    service_env(db="postgres", broker=url, **{**CHAOS_ENV, "MODELPRESS_FAULT_STAGE_DELAY_S": "0"})
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    job_ids = [submit(api, model_id, dataset_id, bits=bits) for bits in (2, 4, 8)]
    assert redis.Redis.from_url(url).llen("cpu") == 3  # quant_rtn routes to cpu
    private_redis()  # restart: the queue is gone
    assert redis.Redis.from_url(url).llen("cpu") == 0
    workers.start("after-restart")
    for job_id in job_ids:
        job = wait_for(api, job_id, finished, 240, workers)
        assert job["status"] == "succeeded", job


def serve(port: int, log: Path, workers: int = 1) -> subprocess.Popen[bytes]:
    """`modelpress serve` (API, janitor, supervised workers) in its own process group."""
    import httpx

    from app.cli import ROOT

    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", str(workers)],
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=open(log, "ab"),  # noqa: SIM115 - inherited by the child, closed with it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"serve did not start:\n{log.read_text()[-3000:]}")


def kill_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, indirect=True)
def test_job_running_when_serve_is_killed_and_restarted_is_recovered(  # type: ignore[no-untyped-def]
    service_env, deployment, workers, tmp_path
) -> None:
    import httpx

    service_env(**deployment, **CHAOS_ENV, MODELPRESS_MAX_ATTEMPTS="2")
    port, log = 19000 + os.getpid() % 1000, tmp_path / "serve.log"
    servers = [serve(port, log)]
    try:
        api = ApiClient(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30))
        model_id, dataset_id = upload_inputs(api, tmp_path)
        job_id = submit(api, model_id, dataset_id)
        first = wait_for(api, job_id, lambda j: j["status"] == "running", 120, workers)
        kill_group(servers[0])  # API, janitor and worker all die with the job running
        servers.append(serve(port, log))
        job = wait_for(api, job_id, finished, 180, workers)
    finally:
        for process in servers:
            kill_group(process)
    assert job["status"] == "succeeded", (job, log.read_text()[-3000:])
    assert job["attempts"] == 2 and job["worker_host"] != first["worker_host"]


def webhook_events(api: ApiClient, hook_id: str) -> list[str]:
    return [d["event"] for d in api.get(f"/v1/webhooks/{hook_id}/deliveries").json()]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, indirect=True)
def test_cancel_running_job_ends_cancelled_with_webhook(  # type: ignore[no-untyped-def]
    service_env, make_api, deployment, workers, tmp_path
) -> None:
    service_env(
        **deployment,
        MODELPRESS_FAULT_STAGE_DELAY_S="2",
        MODELPRESS_HEARTBEAT_INTERVAL_S="0.5",
        MODELPRESS_WEBHOOK_ALLOW_PRIVATE_TARGETS="true",  # the hook points at a local port
    )
    api = make_api()
    hook = api.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}).json()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    workers.start("main")
    job_id = submit(api, model_id, dataset_id)
    wait_for(api, job_id, lambda j: j["status"] == "running", 120, workers)
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    job = wait_for(api, job_id, finished, 120, workers)
    assert (job["status"], job["stage"], job["error"]) == ("cancelled", "cancelled", None), job
    events = webhook_events(api, hook["id"])
    assert "job.cancelled" in events and "job.failed" not in events, events
    summary = api.get("/v1/dashboard/summary").json()
    assert summary["counts"] == {"cancelled": 1} and summary["failures"] == []
    metrics = api.client.get("/metrics").text  # type: ignore[attr-defined]
    assert 'modelpress_jobs{status="cancelled"} 1.0' in metrics
    assert 'modelpress_jobs{status="failed"} 0.0' in metrics


@pytest.mark.parametrize("deployment", DEPLOYMENTS, indirect=True)
def test_cancel_running_job_whose_worker_was_killed_ends_cancelled(  # type: ignore[no-untyped-def]
    service_env, make_api, deployment, workers, tmp_path
) -> None:
    service_env(**deployment, **CHAOS_ENV)
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    doomed = workers.start("doomed")
    job_id = submit(api, model_id, dataset_id)
    wait_for(api, job_id, lambda j: j["status"] == "running", 120, workers)
    workers.kill(doomed)
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    job = wait_for(api, job_id, finished, 60, workers)
    assert (job["status"], job["error"]) == ("cancelled", None), job
    assert "stopped heartbeating" in (job["message"] or ""), job


@pytest.mark.parametrize("deployment", DEPLOYMENTS, indirect=True)
def test_cancel_seen_by_the_library_ends_cancelled_not_failed(  # type: ignore[no-untyped-def]
    service_env, make_api, deployment, tmp_path
) -> None:
    """The library polls the cancel flag itself and stops with code `cancelled`: the job ends `cancelled`."""
    from app.db import crud
    from app.db.session import session_scope
    from workers.pipeline import run_claimed_job, worker_host

    service_env(**deployment)
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    job_id = submit(api, model_id, dataset_id)
    with session_scope() as session:
        assert crud.claim_job(session=session, job_id=job_id, worker_host=worker_host())
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "running"
    run_claimed_job(job_id, worker_host())
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["stage"], job["error"]) == ("cancelled", "cancelled", None), job


def pool_children(worker: subprocess.Popen[bytes]) -> list[int]:
    """The worker's pool processes; billiard re-forks them from a helper thread, so read every thread's."""
    found = []
    for task in Path(f"/proc/{worker.pid}/task").glob("*"):
        found += [int(pid) for pid in (task / "children").read_text().split()]
    return found


@pytest.mark.parametrize("deployment", DEPLOYMENTS, indirect=True)
def test_sigkilled_pool_process_is_replaced_and_the_worker_keeps_working(  # type: ignore[no-untyped-def]
    service_env, make_api, deployment, workers, tmp_path
) -> None:
    """Only the pool child dies (the worker lives on and forks a new one, right after its start)."""
    service_env(**deployment, **CHAOS_ENV, MODELPRESS_MAX_ATTEMPTS="2")
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    worker = workers.start("main")
    job_id = submit(api, model_id, dataset_id)
    wait_for(api, job_id, lambda j: j["status"] == "running", 120, workers)
    for pid in pool_children(worker):
        os.kill(pid, signal.SIGKILL)
    later = submit(api, model_id, dataset_id, bits=8)
    job = wait_for(api, job_id, finished, 120, workers)
    assert (job["status"], job["attempts"]) == ("succeeded", 2), job
    assert wait_for(api, later, finished, 120, workers)["status"] == "succeeded"
    assert worker.poll() is None
