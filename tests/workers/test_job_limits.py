"""Per-job limits through a real Celery worker: a job over its memory or wall-time limit ends `failed` with
`resource_limit` and the numbers, it is not retried, and the same worker process then runs the next job.
The memory case runs on PostgreSQL + Redis and on the embedded default (SQLite + filesystem broker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, ApiClient, Workers
from tests.helpers import files
from tests.workers.test_end_to_end import assert_succeeded_with_report, finished, submit, upload_inputs, wait_for


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test run's Redis database (MODELPRESS_TEST_REDIS names one per developer), emptied around the test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


def _bomb_job(api: ApiClient, tmp_path: Path) -> str:
    model = api.upload("/v1/models", files.constant_of_shape_bomb(tmp_path / "bomb.onnx")).json()
    body = {"model_id": model["id"], "method": "quant_rtn", "config": {"bits": 4, "group_size": None}}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _assert_alive_and_runs_next_job(api: ApiClient, tmp_path: Path, workers: Workers) -> None:
    model_id, dataset_id = upload_inputs(api, tmp_path)
    job = wait_for(api, submit(api, model_id, dataset_id), finished, 180, workers)
    assert_succeeded_with_report(api, job)
    assert all(proc.poll() is None for proc in workers.procs), workers.logs()


@pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.services), pytest.param("sqlite", id="embedded")]
)
def test_memory_bomb_fails_with_resource_limit_and_the_worker_runs_the_next_job(  # type: ignore[no-untyped-def]
    service_env, make_api, workers, tmp_path, request, backend
) -> None:
    limit = 1_500_000_000  # above a pool child with torch loaded, below the bomb's 2.5 GB tensor
    broker = request.getfixturevalue("redis_url") if backend == "postgres" else "embedded"
    service_env(db=backend, broker=broker, MODELPRESS_JOB_MAX_MEMORY_BYTES=str(limit))
    api = make_api()
    workers.start("limits")
    job = wait_for(api, _bomb_job(api, tmp_path), finished, 180, workers)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "resource_limit" and job["attempts"] == 1
    message = job["error"]["message"]
    assert f"memory limit of 1.40 GiB ({limit} bytes)" in message and "peak" in message
    peak = int(message.split("peak ")[1].split("(")[1].split(" bytes")[0])
    assert peak > limit and f"during stage {job['stage']!r}" in message
    _assert_alive_and_runs_next_job(api, tmp_path, workers)
    summary = api.get("/v1/dashboard/summary").json()
    assert [w["current_job_id"] for w in summary["workers"]] == [None]
    assert api.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 1, "an over-limit job is not retried"


def test_wall_time_limit_fails_the_job_with_resource_limit(  # type: ignore[no-untyped-def]
    service_env, make_api, workers, tmp_path
) -> None:
    service_env(db="sqlite", broker="embedded", MODELPRESS_JOB_MAX_SECONDS="3", MODELPRESS_FAULT_STAGE_DELAY_S="2")
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    workers.start("limits")
    job = wait_for(api, submit(api, model_id, dataset_id), finished, 180, workers)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "resource_limit" and job["attempts"] == 1
    assert "wall-time limit of 3s" in job["error"]["message"] and job["stage"] in job["error"]["message"]
    assert all(proc.poll() is None for proc in workers.procs), workers.logs()
