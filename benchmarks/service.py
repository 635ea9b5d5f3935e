"""Service benchmark: status polling at 1/8/64 concurrent clients, enqueue-to-start latency, and the
API process's peak RSS while a 1 GB upload streams in. Against the embedded default (`modelpress
serve`: SQLite, filesystem broker) and the PostgreSQL + Redis deployment, one run, same machine.

    apt-get install -y wrk          # the load generator (Debian package `wrk`)
    .venv/bin/python benchmarks/service.py [--seconds 5] [--upload-mb 1024] [--api-workers 1]

Status polling (`GET /v1/jobs/{id}` on a finished job, with `wrk`) is measured side by side with an
anchor: the leanest FastAPI + SQLAlchemy app answering the same call from the same database (key
hash lookup, job row, its artifacts, the report summary; text SQL, no ORM, no ETag), run by the same
uvicorn on the same machine right after. `ratio` = modelpress req/s / anchor req/s. On a shared CPU
the absolute numbers move from run to run; the ratio, measured back to back, moves less.

Writes benchmarks/results/service.json; `benchmarks/render_readme.py` puts the table in the README.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
from fastapi import FastAPI, Header, HTTPException
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.client.demo import wait_ready  # noqa: E402 - after the path insert

RESULTS = ROOT / "benchmarks" / "results" / "service.json"


def start_server(env: dict[str, str], port: int, log: Path, api_workers: int) -> subprocess.Popen[bytes]:
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
    command = ["serve", "--port", str(port), "--workers", "1", "--api-workers", str(api_workers)]
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *command],
        env=env,
        cwd=ROOT,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def create_key(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "admin", "create-key", "--project", "bench"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().splitlines()[-1]


def tiny_model(directory: Path) -> tuple[Path, Path]:
    from tests.helpers import files

    model = files.tiny_onnx(directory / "tiny.onnx")
    rng = np.random.default_rng(0)
    data = files.npz(directory / "data.npz", input=rng.standard_normal((32, 8)).astype(np.float32))
    return model, data


NOTES = [
    "Polling: `wrk` on GET /v1/jobs/{id} of a finished job; `anchor` = the leanest FastAPI + SQLAlchemy app doing "
    "the same key lookup and job read on the same database (benchmarks/service.py `anchor_app`), measured right "
    "after at each load; ratio = req/s over the anchor's.",
    "One run on a CPU shared with other work: absolute numbers move between runs, the back-to-back ratio less.",
]
SUMMARY_KEYS = ("original", "compressed", "fidelity", "speedup", "size_ratio", "metric_name")
ANCHOR_JOB_SQL = (
    "SELECT id, status, stage, progress, message, method, model_id, calibration_id, evaluation_id, config, gate,"
    " queue, error_code, error_message, verdict, report, attempts, worker_host, created_at, started_at,"
    " finished_at, heartbeat_at FROM jobs WHERE id = :id AND project_id = :project"
)


def anchor_app(database_url: str) -> FastAPI:
    """The anchor: the same key check and job read as `GET /v1/jobs/{id}`, with nothing else around it."""

    engine = create_engine(database_url, pool_size=20, max_overflow=20)
    app = FastAPI()

    def as_json(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str, authorization: Annotated[str | None, Header()] = None) -> Any:
        key_hash = hashlib.sha256((authorization or "").removeprefix("Bearer ").encode()).hexdigest()
        with engine.connect() as db:
            project = db.scalar(
                text("SELECT project_id FROM api_keys WHERE key_hash = :h AND revoked_at IS NULL"), {"h": key_hash}
            )
            if project is None:
                raise HTTPException(401)
            row = db.execute(text(ANCHOR_JOB_SQL), {"id": job_id, "project": project}).mappings().first()
            if row is None:
                raise HTTPException(404)
            artifacts = db.execute(
                text("SELECT id, kind, filename, sha256, size_bytes FROM artifacts WHERE job_id = :id ORDER BY kind"),
                {"id": job_id},
            ).mappings()
            job = {
                **row,
                "config": as_json(row["config"]),
                "gate": as_json(row["gate"]),
                "artifacts": [dict(a) for a in artifacts],
            }
        report = as_json(job.pop("report"))
        job["summary"] = {k: report[k] for k in SUMMARY_KEYS if k in report} if report else None
        return job

    return app


def start_anchor(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, __file__, "--anchor", url, "--port", str(port)]
    return subprocess.Popen(command, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def serve_anchor(database_url: str, port: int) -> None:
    import uvicorn

    uvicorn.run(anchor_app(database_url), host="127.0.0.1", port=port, log_level="info")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return round(float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit], 2)


def wrk_load(url: str, key: str, clients: int, seconds: float) -> dict[str, Any]:
    """`wrk` on one URL: requests, throughput and latency percentiles; errors = socket errors + non-2xx."""
    command = ["wrk", f"-t{min(clients, 2)}", f"-c{clients}", f"-d{round(seconds)}s", "--latency"]
    out = subprocess.run(
        [*command, "-H", f"Authorization: Bearer {key}", url], check=True, capture_output=True, text=True
    ).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, flags=re.M))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    return {
        "clients": clients,
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "errors": errors,
        "throughput_rps": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), 1),  # type: ignore[union-attr]
        "p50_ms": _ms(latency["50"]),
        "p99_ms": _ms(latency["99"]),
    }


def polling_side_by_side(env: dict[str, str], url: str, key: str, job_id: str, seconds: float, tmp: Path):  # type: ignore[no-untyped-def]
    """Each load level on modelpress, then on the anchor (same database, the next port), back to back."""
    anchor_port = int(url.rsplit(":", 1)[1]) + 1
    anchor = start_anchor(database_url(env), anchor_port, tmp / f"anchor-{anchor_port}.log")
    try:
        wait_healthy(f"http://127.0.0.1:{anchor_port}/docs", anchor)
        rows = []
        for clients in (1, 8, 64):
            ours = wrk_load(f"{url}/v1/jobs/{job_id}", key, clients, seconds)
            lean = wrk_load(f"http://127.0.0.1:{anchor_port}/v1/jobs/{job_id}", key, clients, seconds)
            rows.append({**ours, "anchor": lean, "ratio": round(ours["throughput_rps"] / lean["throughput_rps"], 2)})
        return rows
    finally:
        anchor.terminate()
        anchor.wait(timeout=30)


def wait_healthy(url: str, server: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def submit_and_wait(client: httpx.Client, model_id: str, data_id: str) -> dict[str, Any]:
    body = {
        "model_id": model_id,
        "method": "quant_rtn",
        "config": {"bits": 8, "group_size": None},
        "evaluation_id": data_id,
    }
    job = client.post("/v1/jobs", json=body).json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.1)
        job = client.get(f"/v1/jobs/{job['id']}").json()
    return job


def enqueue_to_start(client: httpx.Client, model_id: str, data_id: str, runs: int) -> dict[str, Any]:
    from datetime import datetime

    delays = []
    for _ in range(runs):
        job = submit_and_wait(client, model_id, data_id)
        created, started = (datetime.fromisoformat(job[k]) for k in ("created_at", "started_at"))
        delays.append((started - created).total_seconds())
    return {"runs": runs, "median_s": round(statistics.median(delays), 3), "max_s": round(max(delays), 3)}


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def upload_peak_rss(url: str, key: str, pid: int, megabytes: int) -> dict[str, Any]:
    """Streams `megabytes` of zeros as a multipart upload (refused as not-a-model once fully received)."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    chunk = b"\0" * (1 << 20)

    def body():  # type: ignore[no-untyped-def]
        yield head
        for _ in range(megabytes):
            yield chunk
        yield tail

    before_rss = rss_kb(pid, "VmRSS")
    start = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/models",
        content=body(),
        timeout=600,
        headers={"Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    seconds = time.perf_counter() - start
    return {
        "upload_mb": megabytes,
        "status": response.status_code,
        "seconds": round(seconds, 1),
        "mb_per_s": round(megabytes / seconds, 1),
        "rss_before_mb": round(before_rss / 1024, 1),
        "peak_rss_mb": round(rss_kb(pid, "VmHWM") / 1024, 1),
    }


def run_deployment(name: str, env: dict[str, str], port: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    server = start_server(env, port, tmp / f"{name}.log", args.api_workers)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        key = create_key(env)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        model_path, data_path = tiny_model(tmp)
        model = client.post("/v1/models", files={"file": model_path.open("rb")}).json()
        data = client.post("/v1/datasets", files={"file": data_path.open("rb")}).json()
        job = submit_and_wait(client, model["id"], data["id"])
        polling = polling_side_by_side(env, url, key, job["id"], args.seconds, tmp)
        return {
            "deployment": name,
            "api_workers": args.api_workers,
            "polling": polling,
            "enqueue_to_start": enqueue_to_start(client, model["id"], data["id"], args.runs),
            "upload": upload_peak_rss(url, key, server.pid, args.upload_mb),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def database_url(env: dict[str, str]) -> str:
    return env["MODELPRESS_DATABASE_URL"] or f"sqlite:///{Path(env['MODELPRESS_DATA_DIR']) / 'modelpress.db'}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--upload-mb", type=int, default=1024)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9", help="broker of the PostgreSQL + Redis run")
    parser.add_argument("--api-workers", type=int, default=1, help="`modelpress serve --api-workers`")
    parser.add_argument("--anchor", metavar="DATABASE_URL", help=argparse.SUPPRESS)  # internal: serve the anchor
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.anchor:
        serve_anchor(args.anchor, args.port)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    from tests.conftest import create_postgres_database, drop_postgres_database

    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = {**os.environ, "MODELPRESS_JANITOR_ENABLED": "true"}
        embedded = {
            **base,
            "MODELPRESS_DATA_DIR": str(tmp / "embedded"),
            "MODELPRESS_DATABASE_URL": "",
            "MODELPRESS_BROKER_URL": "",
        }
        results.append(run_deployment("embedded (SQLite + filesystem broker)", embedded, 8801, args, tmp))
        pg_url = create_postgres_database()
        try:
            services = {
                **base,
                "MODELPRESS_DATA_DIR": str(tmp / "services"),
                "MODELPRESS_DATABASE_URL": pg_url,
                "MODELPRESS_BROKER_URL": args.redis_url,
            }
            results.append(run_deployment("PostgreSQL + Redis", services, 8803, args, tmp))
        finally:
            drop_postgres_database(pg_url)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    del args.anchor, args.port
    payload = {
        "benchmark": "service",
        "machine": f"{os.cpu_count()} CPUs",
        "args": vars(args),
        "notes": NOTES,
        "results": results,
    }
    RESULTS.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
