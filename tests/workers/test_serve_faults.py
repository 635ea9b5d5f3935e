"""`modelpress serve` on the embedded default (SQLite + filesystem broker) keeps running jobs when its pool
processes are SIGKILLed while idle, and restarts a worker that stops taking work.

With this broker Celery runs billiard's blocking pool, whose idle pool process waits for a job holding a
lock shared with its replacement; killed there, it left the lock held and the worker never ran another
job (the chaos benchmark ended with 55 of 100 jobs `queued`). workers/pool.py makes that lock one the
kernel releases; the supervisor in `serve` restarts a worker whose consumer loop stops reporting progress.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.conftest import ApiClient
from tests.workers.test_end_to_end import kill_group, serve, submit, upload_inputs

FAST = {"MODELPRESS_BENCHMARK_BUDGET_S": "0.2", "MODELPRESS_HEARTBEAT_INTERVAL_S": "0.5"}


def children(pid: int) -> list[int]:
    """Children of every thread of `pid` (billiard re-forks a killed pool process from a helper thread)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def wait_until(condition, timeout_s: float, what: str, log: Path):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    tail = log.read_text()[-4000:]
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n--- serve log ---\n{tail}")


def pool_of_each(workers: list[int]) -> list[int] | None:
    """One pool process per worker (each runs `-c 1`), or None while one is being replaced."""
    pools = [children(worker) for worker in workers]
    return [pool[0] for pool in pools] if all(len(pool) == 1 for pool in pools) else None


def statuses(api: ApiClient, job_ids: list[str]) -> dict[str, str]:
    return {job_id: api.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in job_ids}


def all_finished(api: ApiClient, job_ids: list[str]) -> bool:
    return all(status in ("succeeded", "failed", "cancelled") for status in statuses(api, job_ids).values())


def kill_idle_pools(worker_pids: list[int], log: Path) -> None:
    """SIGKILL every worker's pool process while it waits for its next job (the moment that wedged the
    worker), then wait for the replacements to be waiting in turn."""
    pools = wait_until(lambda: pool_of_each(worker_pids), 30, "idle pool processes", log)
    time.sleep(1.0)
    for pid in pools:
        os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        now = pool_of_each(worker_pids)
        return now is not None and not set(now) & set(pools)

    wait_until(replaced, 30, "replacement pool processes", log)
    time.sleep(1.0)


def start_serve(tmp_path: Path, workers: int) -> tuple[object, ApiClient, list[int], Path]:
    port, log = 19500 + os.getpid() % 400, tmp_path / "serve.log"
    server = serve(port, log, workers=workers)
    api = ApiClient(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30))
    worker_pids = wait_until(lambda: len(children(server.pid)) == workers and children(server.pid), 30, "workers", log)
    wait_until(lambda: pool_of_each(worker_pids), 120, "the workers' pool processes", log)
    return server, api, sorted(worker_pids), log


def test_jobs_run_while_idle_pool_processes_are_sigkilled_repeatedly(service_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(db="sqlite", broker="embedded", **FAST)
    server, api, worker_pids, log = start_serve(tmp_path, workers=2)
    try:
        model_id, dataset_id = upload_inputs(api, tmp_path)
        job_ids: list[str] = []
        for round_ in range(3):
            kill_idle_pools(worker_pids, log)
            job_ids += [submit(api, model_id, dataset_id), submit(api, model_id, dataset_id, bits=8)]
            wait_until(lambda ids=list(job_ids): all_finished(api, ids), 60, f"jobs after kill round {round_}", log)
        assert Counter(statuses(api, job_ids).values()) == {"succeeded": 6}
        assert sorted(children(server.pid)) == worker_pids, "a worker was restarted: its pool did not recover by itself"
        assert "reported no progress" not in log.read_text()
        artifacts = [a["id"] for job_id in job_ids for a in api.get(f"/v1/jobs/{job_id}").json()["artifacts"]]
        assert len(artifacts) == len(set(artifacts)) == 6 * 3
    finally:
        kill_group(server)  # type: ignore[arg-type]


def test_serve_restarts_a_worker_that_stopped_taking_work(service_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A pool process stopped (SIGSTOP) while idle never takes the job its worker hands it: the worker's
    consumer goes silent, `serve` restarts it, and the job runs on the new worker."""
    service_env(
        db="sqlite",
        broker="embedded",
        **FAST,
        MODELPRESS_WORKER_STALL_AFTER_S="4",
        MODELPRESS_JANITOR_ENABLED="true",
        MODELPRESS_JANITOR_INTERVAL_S="1",
        MODELPRESS_REQUEUE_AFTER_S="5",
    )
    server, api, (worker,), log = start_serve(tmp_path, workers=1)
    (stopped,) = wait_until(lambda: pool_of_each([worker]), 30, "the pool process", log)
    try:
        model_id, dataset_id = upload_inputs(api, tmp_path)
        time.sleep(1.0)
        os.kill(stopped, signal.SIGSTOP)
        job_id = submit(api, model_id, dataset_id)
        wait_until(lambda: all_finished(api, [job_id]), 90, "the job on the restarted worker", log)
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        assert children(server.pid) != [worker], "the stalled worker was replaced"
        assert "worker 0 reported no progress" in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGKILL)
        kill_group(server)  # type: ignore[arg-type]
