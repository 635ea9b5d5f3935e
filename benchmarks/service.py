"""Service benchmark: status polling at 1/8/64 concurrent clients, enqueue-to-start latency, and the
API process's peak RSS while a 1 GB upload streams in. Against the embedded default (`modelpress
serve`: SQLite, filesystem broker) and the PostgreSQL + Redis deployment, one run, same machine.

    .venv/bin/python benchmarks/service.py [--seconds 5] [--upload-mb 1024]

Writes benchmarks/results/service.json; `benchmarks/render_readme.py` puts the table in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.client.demo import wait_ready  # noqa: E402 - after the path insert

RESULTS = ROOT / "benchmarks" / "results" / "service.json"


def start_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    subprocess.run([sys.executable, "-m", "app.cli", "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "1"],
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


async def poll_load(url: str, key: str, job_id: str, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30
    ) as client:

        async def one() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                start = time.perf_counter()
                response = await client.get(f"/v1/jobs/{job_id}")
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200

        await asyncio.gather(*(one() for _ in range(clients)))
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(ordered),
        "errors": errors,
        "throughput_rps": round(len(ordered) / seconds, 1),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 2),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
    }


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
    server = start_server(env, port, tmp / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        key = create_key(env)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        model_path, data_path = tiny_model(tmp)
        model = client.post("/v1/models", files={"file": model_path.open("rb")}).json()
        data = client.post("/v1/datasets", files={"file": data_path.open("rb")}).json()
        job = submit_and_wait(client, model["id"], data["id"])
        polling = [asyncio.run(poll_load(url, key, job["id"], n, args.seconds)) for n in (1, 8, 64)]
        return {
            "deployment": name,
            "polling": polling,
            "enqueue_to_start": enqueue_to_start(client, model["id"], data["id"], args.runs),
            "upload": upload_peak_rss(url, key, server.pid, args.upload_mb),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--upload-mb", type=int, default=1024)
    args = parser.parse_args()
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
                "MODELPRESS_BROKER_URL": "redis://127.0.0.1:6379/9",
            }
            results.append(run_deployment("PostgreSQL + Redis", services, 8802, args, tmp))
        finally:
            drop_postgres_database(pg_url)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "service", "machine": f"{os.cpu_count()} CPUs", "args": vars(args), "results": results}
    RESULTS.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
