"""A pipeline (prune_structured -> quant_int8) through the service: HTTP upload, a real worker process,
one report with every step's numbers and one gate verdict, the QDQ graph as the artifact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from compression.zoo import fmnist_resnet
from tests.workers.test_end_to_end import finished, wait_for

pytestmark = pytest.mark.services


def test_prune_then_int8_pipeline_over_http(service_env, make_api, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(db="sqlite", broker="embedded", MODELPRESS_BENCHMARK_BUDGET_S="1")
    api = make_api()
    assert "pipeline" in {m["key"] for m in api.get("/v1/methods").json()}
    model = api.upload("/v1/models", fmnist_resnet.export_fmnist_onnx(tmp_path / "resnet.onnx")).json()
    images, labels = fmnist_resnet.load_fashion_mnist("train", limit=384)
    calib, evaluation = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, input=images[:256].numpy(), labels=labels[:256].numpy())
    np.savez(evaluation, input=images[256:].numpy(), labels=labels[256:].numpy())
    ids = [api.upload("/v1/datasets", path, model_id=model["id"]).json()["id"] for path in (calib, evaluation)]
    steps = [
        {"method": "prune_structured", "config": {"recovery": "distillation", "distillation_steps": 16}},
        {"method": "quant_int8", "config": {"diagnose": 0}},
    ]
    body = {
        "model_id": model["id"],
        "method": "pipeline",
        "config": {"steps": steps},
        "calibration_id": ids[0],
        "evaluation_id": ids[1],
        "gate": {"max_metric_drop": 0.5},
    }
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    workers.start("embedded")
    job = wait_for(api, response.json()["id"], finished, 600, workers)
    assert job["status"] == "succeeded", job
    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    prune, int8 = report["stats"]["steps"]
    assert (prune["method"], int8["method"]) == ("prune_structured", "quant_int8")
    recovery = prune["report_section"]["recovery"]
    assert recovery["steps"] == 16 and recovery["samples"]["train"] + recovery["samples"]["held_out"] == 256
    assert prune["flops_per_sample"] < 0.6 * report["stats"]["flops_per_sample_before"]
    assert int8["size_bytes"] < prune["size_bytes"] and int8["report_section"]["calibration_samples"] <= 256
    assert report["gate"]["verdict"] in ("pass", "fail") and report["method"] == "pipeline"
    artifact = next(a for a in job["artifacts"] if a["kind"] == "onnx")
    graph = onnx.load_model_from_string(api.get(f"/v1/artifacts/{artifact['id']}").content)
    assert "QuantizeLinear" in {node.op_type for node in graph.graph.node}
