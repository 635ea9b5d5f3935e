"""Scale-out with real components: two Celery worker processes (a `gpu` pool and a `cpu` pool) against one
PostgreSQL, one Redis and one S3-compatible HTTP server (moto's server mode, in its own process); and the
S3 store end to end through `modelpress serve` over HTTP: upload, job, artifacts downloaded."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ApiClient, Workers
from tests.workers.test_end_to_end import (
    assert_succeeded_with_report,
    finished,
    submit,
    upload_inputs,
    wait_for,
)

pytestmark = pytest.mark.services
BUCKET, PREFIX = "modelpress-test", "store"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def keys(self) -> set[str]:
        listing = self.client().list_objects_v2(Bucket=BUCKET)
        return {item["Key"] for item in listing.get("Contents", [])}

    def env(self) -> dict[str, str]:
        return {
            "MODELPRESS_STORE_URL": f"s3://{BUCKET}/{PREFIX}",
            "MODELPRESS_S3_ENDPOINT_URL": self.endpoint,
            **CREDENTIALS,
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """moto's S3-compatible HTTP server as a separate process, with an empty bucket."""
    port = _free_port()
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    server = S3Server(f"http://127.0.0.1:{port}", process)
    for _ in range(200):
        try:
            server.client().create_bucket(Bucket=BUCKET)
            break
        except Exception:
            time.sleep(0.1)
    else:
        raise RuntimeError(f"moto server did not start: {(tmp_path / 'moto.log').read_text()}")
    yield server
    process.terminate()
    process.wait(timeout=10)
    log.close()


def wait_for_workers(api: ApiClient, names: set[str], timeout: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = api.get("/v1/dashboard/summary").json()["workers"]
        if {w["name"].split("@")[0] for w in workers} >= names:
            return workers
        time.sleep(0.5)
    raise AssertionError(f"workers {names} never reported")


def claims(api: ApiClient, job_id: str) -> list[str]:
    events = api.get(f"/v1/jobs/{job_id}/events").json()
    return [e["message"] for e in events if (e["message"] or "").startswith("claimed by ")]


def ignored_deliveries(log_dir: Path, expected: int, timeout: float = 60) -> int:
    """Deliveries the workers dropped because the job was claimed already (the duplicates queued behind the
    jobs may still be on their way when the last job finishes: wait for them)."""
    deadline, count = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        logs = [path.read_text(errors="replace") for path in log_dir.glob("worker-*.log")]
        count = sum(text.count("already claimed or not queued; message ignored") for text in logs)
        if count >= expected:
            break
        time.sleep(0.5)
    return count


def stored_keys(*addresses: str) -> set[str]:
    return {f"{PREFIX}/sha256/{address.removeprefix('sha256:')}" for address in addresses}


def test_two_worker_pools_share_one_store_and_run_each_job_once(  # type: ignore[no-untyped-def]
    service_env, make_api, redis_db, workers: Workers, s3_server: S3Server, tmp_path
) -> None:
    from app.core.queue import send_job
    from app.db.models import Artifact
    from app.db.session import session_scope

    env = service_env(db="postgres", broker=redis_db, MODELPRESS_BENCHMARK_BUDGET_S="0.2", **s3_server.env())
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    # the gpu pool replaces its pool process after every job, as a CUDA worker does by default
    workers.start("gpupool", queues="gpu", MODELPRESS_WORKER_MAX_TASKS_PER_CHILD="1")
    workers.start("cpupool", queues="cpu")
    pools = {w["name"].split("@")[0]: w for w in wait_for_workers(api, {"gpupool", "cpupool"})}
    assert pools["gpupool"]["queues"] == "gpu" and pools["cpupool"]["queues"] == "cpu"

    routed = {submit(api, model_id, dataset_id, bits=bits): "cpu" for bits in (3, 8)}  # quant_rtn: auto -> cpu
    for bits in (2, 4):
        body = {"model_id": model_id, "method": "quant_rtn", "config": {"bits": bits, "group_size": None}}
        body |= {"evaluation_id": dataset_id, "gate": {"max_metric_drop": 0.5}, "queue": "gpu"}
        job = api.post("/v1/jobs", json=body).json()
        routed[job["id"]] = "gpu"
    # every job is also delivered to the other pool (a duplicate, as a re-send after a lost ack would be)
    for job_id, queue in routed.items():
        send_job(job_id, queue="gpu" if queue == "cpu" else "cpu", dispatch=2)

    jobs = {job_id: wait_for(api, job_id, finished, 240, workers) for job_id in routed}
    ran_on: dict[str, list[str]] = {"gpupool": [], "cpupool": []}
    for job_id, job in jobs.items():
        assert job["queue"] == routed[job_id]
        assert_succeeded_with_report(api, job)
        assert job["attempts"] == 1, job
        (claim,) = claims(api, job_id)  # claimed exactly once, by one worker
        ran_on[claim.removeprefix("claimed by ").split("@")[0]].append(job["worker_host"])
    assert ran_on["gpupool"] and ran_on["cpupool"], f"jobs were not spread across the pools: {ran_on}"
    assert "jobs per pool process: 1" in (tmp_path / "worker-gpupool.log").read_text()
    assert len(set(ran_on["gpupool"])) == len(ran_on["gpupool"]), "max_tasks_per_child=1: a fresh process per job"
    assert len(set(ran_on["cpupool"])) == 1, "no limit on the cpu pool: its one pool process ran every job"
    assert ignored_deliveries(tmp_path, len(routed)) == len(routed), "every duplicate was refused by the claim"
    assert all(api.get(f"/v1/jobs/{job_id}").json()["attempts"] == 1 for job_id in routed)

    with session_scope() as session:
        artifacts = session.query(Artifact).all()
    per_job_kind = Counter((a.job_id, a.kind) for a in artifacts)
    assert set(per_job_kind.values()) == {1} and {job_id for job_id, _ in per_job_kind} == set(routed)
    model = api.get(f"/v1/models/{model_id}").json()
    dataset_sha = api.get(f"/v1/datasets/{dataset_id}").json()["sha256"]
    everything = stored_keys(model["sha256"], dataset_sha, *(a.sha256 for a in artifacts))
    assert s3_server.keys() == everything, "uploads and artifacts are in the one bucket, nothing else is"
    assert not (Path(env["MODELPRESS_DATA_DIR"]) / "store").exists(), "nothing went to a local store"


def _http(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _wait_http(client: httpx.Client, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
        if finished(job):
            return job
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_s3_store_end_to_end_through_the_service(  # type: ignore[no-untyped-def]
    live_server: Callable[..., tuple[str, ApiClient]], s3_server: S3Server, tmp_path
) -> None:
    from tests.helpers import files

    url, api = live_server(workers=1, MODELPRESS_BENCHMARK_BUDGET_S="0.2", **s3_server.env())
    with _http(url, api.key) as client:
        assert client.get("/readyz").json()["checks"]["store"] is True
        model_file = files.tiny_onnx(tmp_path / "tiny.onnx")
        with open(model_file, "rb") as fh:
            model = client.post("/v1/models", files={"file": ("tiny.onnx", fh)}).json()
        assert model["sha256"] == "sha256:" + hashlib.sha256(model_file.read_bytes()).hexdigest()
        assert s3_server.keys() == stored_keys(model["sha256"]), "the upload went to the S3 server"
        body = {"model_id": model["id"], "method": "quant_rtn", "config": {"bits": 8, "group_size": None}}
        job = _wait_http(client, client.post("/v1/jobs", json=body).json()["id"])
        assert job["status"] == "succeeded", job
        assert {a["kind"] for a in job["artifacts"]} >= {"onnx", "safetensors", "manifest"}
        s3 = s3_server.client()
        for artifact in job["artifacts"]:
            response = client.get(f"/v1/artifacts/{artifact['id']}")
            digest = hashlib.sha256(response.content).hexdigest()
            assert response.status_code == 200 and response.headers["X-Content-SHA256"] == digest
            assert artifact["sha256"] == f"sha256:{digest}" and len(response.content) == artifact["size_bytes"]
            (key,) = stored_keys(artifact["sha256"])
            assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == response.content
        s3_server.process.terminate()
        s3_server.process.wait(timeout=10)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["store"] is False, "the API reads that server"
