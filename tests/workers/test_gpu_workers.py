"""GPU workers: the prefork parent never touches CUDA, a CUDA worker runs each job in a fresh pool process,
and a GPU out-of-memory error fails the job as `gpu_out_of_memory` with the numbers. The CPU-runnable parts
run everywhere; the ones marked `gpu` run where CUDA is visible (skipped with the reason elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.cli import ROOT
from compression import registry
from compression.configs import RTNConfig
from compression.methods.spec import MethodSpec
from tests.conftest import ApiClient
from tests.workers.test_end_to_end import finished, submit, upload_inputs, wait_for

# torch's own wording (c10/cuda/CUDACachingAllocator.cpp), numbers included
OOM_TEXT = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB of which "
    "1.06 GiB is free. Including non-PyTorch memory, this process has 14.70 GiB memory in use."
)
PARENT = """
import json, sys, torch

def touched(*args, **kwargs):
    raise AssertionError("the prefork parent called into torch.cuda")

torch.backends.cuda.is_built = lambda: True  # act as a CUDA build: the probe may not take its CPU-build exit
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "mem_get_info"):
    setattr(torch.cuda, name, touched)
torch._C._cuda_getDeviceCount = touched
from workers import celery_app

class Sender:
    hostname, max_tasks_per_child = "probe@test", None

celery_app._export_node_name(sender=Sender)
print(json.dumps([celery_app._detected["device"], Sender.max_tasks_per_child]))
"""


def _parent_probe(tmp_path: Path, **env: str) -> list:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_WORKER_")}
    done = subprocess.run(
        [sys.executable, "-c", PARENT],
        cwd=ROOT,
        env={**clean, "MODELPRESS_DATA_DIR": str(tmp_path / "var"), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_prefork_parent_finds_its_device_without_touching_torch_cuda(tmp_path: Path) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # what a fresh interpreter sees
    assert _parent_probe(tmp_path) == [expected, 1 if expected == "cuda" else None]
    assert _parent_probe(tmp_path, MODELPRESS_WORKER_DEVICE="cuda") == ["cuda", 1]
    assert _parent_probe(tmp_path, MODELPRESS_WORKER_DEVICE="cuda", MODELPRESS_WORKER_MAX_TASKS_PER_CHILD="0") == [
        "cuda",
        None,
    ]
    assert _parent_probe(tmp_path, MODELPRESS_WORKER_MAX_TASKS_PER_CHILD="5") == [expected, 5]


def _raise_oom(*args: object, **kwargs: object) -> None:
    raise torch.cuda.OutOfMemoryError(OOM_TEXT)


@pytest.fixture
def rtn_replaced() -> Iterator[dict[str, MethodSpec]]:
    """quant_rtn's spec swapped for one the test sets (its compress, its pick); the built-in comes back after."""
    holder: dict[str, MethodSpec] = {}
    yield holder
    registry.unregister(RTNConfig)


def _run_in_this_process(job_id: str) -> None:
    from app.db import crud
    from app.db.session import session_scope
    from workers.pipeline import run_claimed_job, worker_host

    with session_scope() as session:
        assert crud.claim_job(session=session, job_id=job_id, worker_host=worker_host(), worker_name="test@host")
    run_claimed_job(job_id, worker_host(), "test@host")


def _error(api: ApiClient, job_id: str) -> dict:
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed", job
    return job["error"]


def test_gpu_out_of_memory_is_reported_with_the_numbers(service_env, make_api, rtn_replaced, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env()
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    registry.register(MethodSpec(config_class=RTNConfig, compress=_raise_oom))  # type: ignore[arg-type]
    job_id = submit(api, model_id, dataset_id)
    _run_in_this_process(job_id)
    error = _error(api, job_id)
    assert error["code"] == "gpu_out_of_memory"
    assert "GPU out of memory in quant_rtn (compress stage)" in error["message"]
    assert "tried to allocate 2.00 GiB; GPU total capacity 15.77 GiB, 1.06 GiB free" in error["message"]

    def pick_wrapped(result: object, run: object) -> object:
        try:
            _raise_oom()
        except torch.cuda.OutOfMemoryError as oom:
            raise RuntimeError("candidate evaluation failed") from oom

    registry.unregister(RTNConfig)
    plain = registry.get_spec("quant_rtn")  # the built-in again
    registry.register(MethodSpec(config_class=RTNConfig, compress=plain.compress, pick=pick_wrapped))  # type: ignore[arg-type]
    later = submit(api, model_id, dataset_id, bits=8)
    _run_in_this_process(later)
    error = _error(api, later)
    assert error["code"] == "gpu_out_of_memory", "found behind the wrapping error, outside the compress call"
    assert "tried to allocate 2.00 GiB" in error["message"] and "stage" in error["message"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a worker that sees no GPU; this machine has one")
def test_worker_told_to_use_cuda_without_a_gpu_fails_the_job_clearly(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(MODELPRESS_WORKER_DEVICE="cuda")
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    job_id = submit(api, model_id, dataset_id)
    _run_in_this_process(job_id)
    error = _error(api, job_id)
    assert error["code"] == "device_unavailable" and "sees no CUDA device" in error["message"]


# ---------------------------------------------------------------- where CUDA is visible


@pytest.mark.gpu
@pytest.mark.services
def test_cuda_worker_runs_jobs_on_the_gpu_in_fresh_pool_processes(service_env, make_api, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A real worker: device found without CUDA in the parent, each job in a new pool process on `cuda`;
    the second job on a re-forked process would fail with "Cannot re-initialize CUDA" if the parent held CUDA."""
    service_env(MODELPRESS_BENCHMARK_BUDGET_S="0.2")
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    workers.start("cuda", queues="gpu")
    jobs = []
    for bits in (4, 8):
        body = {"model_id": model_id, "method": "quant_gptq", "config": {"bits": bits, "group_size": None}}
        response = api.post("/v1/jobs", json={**body, "calibration_id": dataset_id, "queue": "gpu"})
        jobs.append(wait_for(api, response.json()["id"], finished, 300, workers))
    for job in jobs:
        assert job["status"] == "succeeded", job
        assert api.get(f"/v1/jobs/{job['id']}/report").json()["device"] == "cuda"
    assert jobs[0]["worker_host"] != jobs[1]["worker_host"], "one job per pool process on CUDA"
    (worker,) = api.get("/v1/dashboard/summary").json()["workers"]
    assert worker["device"] == "cuda"


@pytest.mark.gpu
def test_real_cuda_out_of_memory_reports_the_device_numbers(service_env, make_api, rtn_replaced, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def allocate_too_much(*args: object, **kwargs: object) -> None:
        _free, total = torch.cuda.mem_get_info()
        torch.empty(int(total * 2), dtype=torch.uint8, device="cuda")

    service_env()
    api = make_api()
    model_id, dataset_id = upload_inputs(api, tmp_path)
    registry.register(MethodSpec(config_class=RTNConfig, compress=allocate_too_much))  # type: ignore[arg-type]
    job_id = submit(api, model_id, dataset_id)
    _run_in_this_process(job_id)
    error = _error(api, job_id)
    assert error["code"] == "gpu_out_of_memory"
    assert "tried to allocate" in error["message"] and "GiB total" in error["message"]
    assert "peak allocated by this job" in error["message"]
