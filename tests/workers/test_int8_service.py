"""quant_int8 through the service: HTTP upload, a real worker process, the QDQ graph as the artifact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.helpers import files
from tests.workers.test_end_to_end import finished, wait_for

pytestmark = pytest.mark.services


def test_quant_int8_job_over_http_ships_a_qdq_graph(service_env, make_api, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(db="sqlite", broker="embedded")
    api = make_api()
    methods = {m["key"]: m for m in api.get("/v1/methods").json()}
    assert methods["quant_int8"]["data"]["calibration"] == "required"
    model = api.upload("/v1/models", files.tiny_onnx(tmp_path / "tiny.onnx")).json()
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((96, 8)).astype(np.float32)
    calib = api.upload("/v1/datasets", files.npz(tmp_path / "c.npz", input=inputs[:64]), model_id=model["id"]).json()
    evaluation = files.npz(tmp_path / "e.npz", input=inputs[64:], labels=rng.integers(0, 3, 32))
    evaluation_id = api.upload("/v1/datasets", evaluation, model_id=model["id"]).json()["id"]
    body = {
        "model_id": model["id"],
        "method": "quant_int8",
        "config": {"diagnose": 2},
        "calibration_id": calib["id"],
        "evaluation_id": evaluation_id,
        "gate": {"max_metric_drop": 0.2},
    }
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    workers.start("embedded")
    job = wait_for(api, response.json()["id"], finished, 240, workers)
    assert job["status"] == "succeeded", job
    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["fidelity"]["top1_agreement"] >= 0.9 and report["stats"]["diagnosis"]["ran"]
    assert [row["status"] for row in report["layers"]] == ["quantized", "quantized"]
    artifact = next(a for a in job["artifacts"] if a["kind"] == "onnx")
    graph = onnx.load_model_from_string(api.get(f"/v1/artifacts/{artifact['id']}").content)
    ops = [node.op_type for node in graph.graph.node]
    assert "QuantizeLinear" in ops and ops.count("DequantizeLinear") >= 2
    assert {a["kind"] for a in job["artifacts"]} == {"onnx", "safetensors", "manifest"}
