"""Chaos benchmark: 100 small jobs through `modelpress serve` while its workers' pool processes are
SIGKILLed every ~10 s, `serve` itself is SIGKILLed (with its workers) and restarted once, and, on the
PostgreSQL + Redis deployment, Redis is restarted empty once (a private redis-server on its own port).
Every accepted job must end `succeeded`, `cancelled` or `failed` with a reason; none may stay stuck,
and no job may end with two sets of artifacts.

    .venv/bin/python benchmarks/chaos.py [--jobs 100] [--every 1.5] [--drain-timeout 300]

Writes benchmarks/results/chaos.json; `benchmarks/render_readme.py` puts the table in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.client.demo import wait_ready  # noqa: E402 - after the path insert
from benchmarks.service import create_key, tiny_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "chaos.json"
REDIS_PORT = 6395
# shortened from the defaults (heartbeat 5, stale 60, requeue 120, janitor 10) so recovery fits the run
CHAOS_SETTINGS = {
    "MODELPRESS_HEARTBEAT_INTERVAL_S": "1",
    "MODELPRESS_STALE_AFTER_S": "5",
    "MODELPRESS_REQUEUE_AFTER_S": "30",
    "MODELPRESS_JANITOR_INTERVAL_S": "2",
    "MODELPRESS_MAX_ATTEMPTS": "3",
    "MODELPRESS_BENCHMARK_BUDGET_S": "0.2",
    "MODELPRESS_JANITOR_ENABLED": "true",
}
TERMINAL = ("succeeded", "failed", "cancelled")


class Serve:
    """`modelpress serve --workers 2` in its own process group, so a kill takes its workers too."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port), "--workers", "2"],
            env=self.env,
            cwd=ROOT,
            stdout=open(self.log, "ab"),  # noqa: SIM115 - inherited by the server, closed with it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_ready(f"http://127.0.0.1:{self.port}", self.process)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def pool_processes(self) -> list[int]:
        """The Celery pool children (grandchildren of serve) that run the jobs."""
        if not self.process:
            return []
        return [pool for worker in _children(self.process.pid) for pool in _children(worker)]


def _children(pid: int) -> list[int]:
    """Children of every thread: billiard re-forks a killed pool process from a helper thread."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


class PrivateRedis:
    """A redis-server of our own (no persistence): restarting it loses every queued message."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.process = folder, None  # type: ignore[var-annotated]

    def start(self) -> str:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
        )
        import redis

        for _ in range(100):
            try:
                redis.Redis(port=REDIS_PORT).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        return f"redis://127.0.0.1:{REDIS_PORT}/0"

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)

    def restart_empty(self) -> None:
        self.stop()
        self.start()


def chaos(serve: Serve, redis: PrivateRedis | None, stop: threading.Event, every_s: float) -> list[str]:
    """SIGKILL a pool process every ~`every_s`; restart serve once at ~45 s and Redis once at ~80 s."""
    events: list[str] = []
    start, restarted_serve, restarted_redis = time.monotonic(), False, redis is None
    while not stop.wait(every_s * random.uniform(0.8, 1.2)):
        elapsed = time.monotonic() - start
        if not restarted_serve and elapsed > 45:
            serve.kill()
            serve.start()
            restarted_serve = True
            events.append(f"{elapsed:.0f}s serve SIGKILLed with its workers and restarted")
        elif not restarted_redis and elapsed > 80 and redis is not None:
            redis.restart_empty()
            restarted_redis = True
            events.append(f"{elapsed:.0f}s redis restarted empty")
        elif pools := serve.pool_processes():
            victim = random.choice(pools)
            try:
                os.kill(victim, signal.SIGKILL)
                events.append(f"{elapsed:.0f}s SIGKILL pool process {victim}")
            except ProcessLookupError:
                pass
    return events


def submit_all(client: httpx.Client, model_id: str, data_id: str, jobs: int, every_s: float) -> tuple[list[str], int]:
    accepted, refused = [], 0
    for index in range(jobs):
        body = {
            "model_id": model_id,
            "method": "quant_rtn",
            "config": {"bits": 8, "group_size": None},
            "evaluation_id": data_id,
        }
        response = _post_retrying(client, body, key=f"chaos-{index}")
        if response is not None and response.status_code == 202:
            accepted.append(response.json()["id"])
        else:
            refused += 1
        time.sleep(every_s)
    return sorted(set(accepted)), refused


def _post_retrying(client: httpx.Client, body: dict[str, Any], key: str) -> httpx.Response | None:
    """While serve restarts the port refuses; the same Idempotency-Key makes the retry safe."""
    for _ in range(60):
        try:
            return client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            time.sleep(1)
    return None


def job_rows(database_url: str, job_ids: list[str]) -> tuple[list[dict[str, Any]], Counter[tuple[str, str]]]:
    """Each job's row and the artifacts per (job, kind), read straight from the database."""
    import sqlalchemy as sa

    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            jobs = connection.execute(
                sa.text("SELECT id, status, error_code, attempts, dispatches FROM jobs WHERE id IN :ids").bindparams(
                    sa.bindparam("ids", expanding=True)
                ),
                {"ids": job_ids},
            )
            rows = [dict(row._mapping) for row in jobs]
            artifacts = Counter(
                (row.job_id, row.kind) for row in connection.execute(sa.text("SELECT job_id, kind FROM artifacts"))
            )
    finally:
        engine.dispose()
    return rows, artifacts


def drain(database_url: str, job_ids: list[str], timeout_s: float) -> float | None:
    """Seconds until every accepted job is terminal, or None at the timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        rows, _ = job_rows(database_url, job_ids)
        if len(rows) == len(job_ids) and all(row["status"] in TERMINAL for row in rows):
            return time.monotonic() - start
        time.sleep(1)
    return None


def summarize(database_url: str, job_ids: list[str]) -> dict[str, Any]:
    rows, artifacts = job_rows(database_url, job_ids)
    statuses = Counter(row["status"] for row in rows)
    failed = [row for row in rows if row["status"] == "failed"]
    succeeded = {row["id"] for row in rows if row["status"] == "succeeded"}
    return {
        "succeeded": statuses["succeeded"],
        "failed_with_reason": sum(1 for row in failed if row["error_code"]),
        "failed_without_reason": sum(1 for row in failed if not row["error_code"]),
        "failure_codes": dict(Counter(row["error_code"] for row in failed)),
        "cancelled": statuses["cancelled"],
        "stuck": sum(1 for row in rows if row["status"] not in TERMINAL) + len(job_ids) - len(rows),
        "duplicate_artifacts": sum(1 for count in artifacts.values() if count > 1),
        "succeeded_without_artifacts": sum(1 for job in succeeded if not any(k[0] == job for k in artifacts)),
        "retried_jobs": sum(1 for row in rows if row["attempts"] > 1),
        "max_attempts_seen": max((row["attempts"] for row in rows), default=0),
        "dispatches": sum(row["dispatches"] for row in rows),
    }


def run_deployment(name: str, env: dict[str, str], database_url: str, redis: PrivateRedis | None, args: Any) -> dict:
    tmp = Path(env["MODELPRESS_DATA_DIR"])
    tmp.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
    serve = Serve(env, args.port, tmp / "serve.log")
    serve.start()
    stop = threading.Event()
    events: list[str] = []
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{args.port}", headers={"Authorization": f"Bearer {create_key(env)}"}, timeout=60
        )
        model_path, data_path = tiny_model(tmp)
        model = client.post("/v1/models", files={"file": model_path.open("rb")}).json()
        data = client.post("/v1/datasets", files={"file": data_path.open("rb")}).json()
        chaos_thread = threading.Thread(target=lambda: events.extend(chaos(serve, redis, stop, args.kill_every)))
        started = time.monotonic()
        chaos_thread.start()
        job_ids, refused = submit_all(client, model["id"], data["id"], args.jobs, args.every)
        stop.set()
        chaos_thread.join()
        drained = drain(database_url, job_ids, args.drain_timeout)
        total_s = None if drained is None else round(time.monotonic() - started, 1)
        return {
            "deployment": name,
            "accepted": len(job_ids),
            "refused": refused,
            **summarize(database_url, job_ids),
            "drain_after_last_submit_s": None if drained is None else round(drained, 1),
            "first_submit_to_drained_s": total_s,
            "kills": sum("SIGKILL pool" in e for e in events),
            "events": events,
        }
    finally:
        stop.set()
        serve.kill()


def table(results: list[dict[str, Any]]) -> dict[str, Any]:
    columns = [
        "deployment",
        "accepted",
        "succeeded",
        "failed with a reason",
        "stuck",
        "duplicate artifacts",
        "pool kills",
        "retried jobs",
        "first submit → drained s",
    ]
    keys = ["accepted", "succeeded", "failed_with_reason", "stuck", "duplicate_artifacts", "kills", "retried_jobs"]
    rows = [[r["deployment"], *(r[k] for k in keys), r["first_submit_to_drained_s"]] for r in results]
    return {"columns": columns, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--every", type=float, default=1.5, help="seconds between submissions")
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--port", type=int, default=8811)
    parser.add_argument("--keep-dir", type=Path, default=None, help="keep data, logs and DB here for inspection")
    parser.add_argument("--only", choices=["embedded", "postgres_redis"], default=None)
    args = parser.parse_args()
    from tests.conftest import create_postgres_database, drop_postgres_database

    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = args.keep_dir or Path(tmp_name)
        base = {**os.environ, **CHAOS_SETTINGS, "TMPDIR": str(tmp)}
        embedded_dir = tmp / "embedded"
        embedded = {
            **base,
            "MODELPRESS_DATA_DIR": str(embedded_dir),
            "MODELPRESS_DATABASE_URL": "",
            "MODELPRESS_BROKER_URL": "",
        }
        sqlite_url = f"sqlite:///{embedded_dir / 'modelpress.db'}"
        if args.only != "postgres_redis":
            results.append(run_deployment("embedded (SQLite + filesystem broker)", embedded, sqlite_url, None, args))
        if args.only == "embedded":
            return
        redis, pg_url = PrivateRedis(tmp), create_postgres_database()
        try:
            services = {
                **base,
                "MODELPRESS_DATA_DIR": str(tmp / "services"),
                "MODELPRESS_DATABASE_URL": pg_url,
                "MODELPRESS_BROKER_URL": redis.start(),
            }
            results.append(run_deployment("PostgreSQL + Redis", services, pg_url, redis, args))
        finally:
            redis.stop()
            drop_postgres_database(pg_url)
    payload = {
        "benchmark": "chaos",
        "machine": f"{os.cpu_count()} CPUs, shared with other work while it ran",
        "args": {key: value for key, value in vars(args).items() if key != "keep_dir"},  # a local folder
        "settings": CHAOS_SETTINGS,
        "results": results,
        "table": table(results),
        "notes": [
            f"settings shortened via env for the run: {CHAOS_SETTINGS}",
            "each deployment: `modelpress serve --workers 2`, one job submitted every "
            f"{args.every} s (quant_rtn 8-bit on a tiny ONNX model); a random pool process SIGKILLed every "
            f"~{args.kill_every} s while jobs are submitted; serve SIGKILLed with its workers and restarted once; "
            "on PostgreSQL + Redis only, Redis (a private server, no persistence) restarted empty once",
            "duplicate artifacts: (job, kind) pairs stored more than once; stuck: accepted jobs not "
            "succeeded/failed/cancelled when the run ended",
            "the machine's CPUs were shared with other work during the run, so times are indicative",
        ],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload["table"], indent=2))


if __name__ == "__main__":
    main()
