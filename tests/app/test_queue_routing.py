"""Which queue a job goes to: the request's `queue`, else MODELPRESS_DEFAULT_QUEUE, whose `auto` routes by the
job's device need (the method, the model's size). Which queues a worker consumes: --queues / settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.cli import build_parser, worker_command
from app.core.queue import parse_queues
from tests.conftest import ApiClient
from tests.helpers import files


def _inputs(api: ApiClient, tmp_path: Path) -> tuple[str, str]:
    model = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx")).json()
    data = files.npz(tmp_path / "d.npz", input=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    dataset = api.upload("/v1/datasets", data, model_id=model["id"]).json()
    return model["id"], dataset["id"]


def _submit(api: ApiClient, model_id: str, dataset_id: str, method: str, **extra: object) -> dict:
    body = {"model_id": model_id, "method": method, "config": {}, "calibration_id": dataset_id, **extra}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_auto_routing_by_method_and_model_size(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env()
    api = make_api()
    model_id, dataset_id = _inputs(api, tmp_path)
    rtn = _submit(api, model_id, dataset_id, "quant_rtn")
    assert rtn["queue"] == "cpu" and "quant_rtn gains little from a GPU" in rtn["message"]
    gptq = _submit(api, model_id, dataset_id, "quant_gptq")
    assert gptq["queue"] == "cpu" and "under MODELPRESS_GPU_MIN_PARAMS (10,000,000)" in gptq["message"]
    named = _submit(api, model_id, dataset_id, "quant_rtn", queue="gpu")
    assert named["queue"] == "gpu" and named["message"] == "queued on gpu: named in the request"
    events = api.get(f"/v1/jobs/{rtn['id']}/events").json()
    assert events[0]["message"].startswith("queued on cpu:")
    depths = api.get("/v1/dashboard/summary").json()["queues"]
    assert depths == {"cpu": 2, "gpu": 1}, "each message went to its job's queue, once"


def test_gpu_bound_method_on_a_large_enough_model_goes_to_gpu(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(MODELPRESS_GPU_MIN_PARAMS="10")
    api = make_api()
    model_id, dataset_id = _inputs(api, tmp_path)  # 8 x 3 weights + 3 biases: 27 parameters
    for method in ("quant_gptq", "quant_decoupleq", "prune_structured"):
        assert _submit(api, model_id, dataset_id, method)["queue"] == "gpu", method
    for method in ("quant_rtn", "data_free", "prune_unstructured"):
        assert _submit(api, model_id, dataset_id, method)["queue"] == "cpu", method


def test_fixed_default_queue_and_unknown_queue(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(MODELPRESS_DEFAULT_QUEUE="gpu")
    api = make_api()
    model_id, dataset_id = _inputs(api, tmp_path)
    job = _submit(api, model_id, dataset_id, "quant_rtn")
    assert job["queue"] == "gpu" and job["message"] == "queued on gpu: MODELPRESS_DEFAULT_QUEUE"
    bad = api.post("/v1/jobs", json={"model_id": model_id, "method": "quant_rtn", "queue": "tpu"})
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["path"].endswith("queue")


def test_worker_queue_settings_and_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import clear_caches

    assert parse_queues(" cpu, gpu,cpu ") == ["cpu", "gpu"]
    with pytest.raises(ValueError, match="valid: gpu, cpu"):
        parse_queues("gpu,tpu")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--queues", "tpu"])
    assert "unknown queue(s) ['tpu']" in capsys.readouterr().err
    args = build_parser().parse_args(["worker", "--queues", "cpu", "--max-tasks-per-child", "3"])
    assert (args.queues, args.max_tasks_per_child) == ("cpu", 3)
    monkeypatch.setenv("MODELPRESS_WORKER_QUEUES", "cpu")
    clear_caches()
    try:
        command = worker_command(max_tasks_per_child=1)
        assert command[command.index("-Q") + 1] == "cpu"
        assert command[command.index("--max-tasks-per-child") + 1] == "1"
        monkeypatch.setenv("MODELPRESS_WORKER_QUEUES", "gpu,tpu")
        clear_caches()
        with pytest.raises(ValueError, match="unknown queue"):
            worker_command()
    finally:
        monkeypatch.delenv("MODELPRESS_WORKER_QUEUES")
        clear_caches()
