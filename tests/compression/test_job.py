"""The job runner end to end on the fixture ResNet exported to ONNX, with the real quant_rtn method."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from compression.configs import RTNConfig
from compression.io.loaded import LoadedModel
from compression.job import JobError, JobSpec, run_job
from compression.pipeline.data import latency_batches, rows_per_forward
from compression.pipeline.preflight import preflight
from compression.zoo.fmnist_resnet import export_fmnist_onnx, load_fashion_mnist

warnings.filterwarnings("ignore")
STAGE_ORDER = ["load", "compress", "export", "evaluate", "benchmark"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("job")
    # Required (scripts/setup.sh installs it): a missing dataset raises, it is never replaced by noise.
    images, labels = load_fashion_mnist("test", limit=256)
    calib = load_fashion_mnist("train", limit=64)[0]
    np.savez(folder / "eval.npz", input=images.numpy(), labels=labels.numpy())
    np.savez(folder / "calib.npz", input=calib.numpy())
    return {
        "model": export_fmnist_onnx(folder / "resnet.onnx"),
        "eval": folder / "eval.npz",
        "calib": folder / "calib.npz",
    }


def _spec(inputs: dict[str, Path], work: Path, **overrides) -> JobSpec:
    fields = {
        "model_path": inputs["model"],
        "method": "quant_rtn",
        "config": {"bits": 4, "group_size": None},
        "calibration_path": inputs["calib"],
        "evaluation_path": inputs["eval"],
        "gate": None,
        "work_dir": work,
        "benchmark_repeats": 5,
    }
    return JobSpec(**{**fields, **overrides})


def _never() -> bool:
    return False


@pytest.mark.slow
def test_run_job_end_to_end(inputs: dict[str, Path], tmp_path: Path) -> None:
    events: list[tuple[str, float, str]] = []
    gate = {"max_metric_drop": 0.05, "max_size_bytes": 150_000}
    output = run_job(_spec(inputs, tmp_path, gate=gate), progress=lambda *e: events.append(e), should_cancel=_never)
    stages = list(dict.fromkeys(stage for stage, _, _ in events))
    fractions = [fraction for _, fraction, _ in events]
    assert stages == STAGE_ORDER and fractions == sorted(fractions) and fractions[-1] == 1.0
    report = output.report
    json.dumps(report, allow_nan=False)
    assert set(output.artifacts) == {"onnx", "safetensors", "manifest"}
    assert all(path.is_file() for path in output.artifacts.values())
    assert report["export_check"]["passed"]
    assert report["compressed"]["size_bytes"] < 0.3 * report["original"]["size_bytes"]
    assert report["compressed"]["bits"]["nominal_bits"] == 4.0
    assert report["fidelity"]["top1_agreement"] > 0.85 and report["fidelity"]["metric"]["name"] == "accuracy"
    statuses = {row["name"]: row["status"] for row in report["layers"]}
    assert statuses["layer1.conv1"] == "quantized" and statuses["fc"] == "float"
    assert report["data"]["used_for"] == {"method": "calibration", "fidelity": "evaluation"}
    assert {"1", "32"} <= set(report["latency"]["original"]["batches"])
    assert [c["name"] for c in report["gate"]["checks"]] == ["max_metric_drop", "max_size_bytes", "export_check"]
    assert report["gate"]["checks"][1]["passed"] and report["gate"]["checks"][2]["passed"]
    # the metric is the shipped ONNX's in ONNX Runtime; the PyTorch fake-quant model only cross-checks it
    fidelity = report["fidelity"]
    assert fidelity["measured_on"] == "onnx" and fidelity["cross_check"]["measured_on"] == "torch"
    assert abs(fidelity["cross_check"]["onnx_minus_torch"]["metric_compressed"]) <= 2 / fidelity["samples"]
    assert report["export_check"]["artifacts"]["safetensors"]["passed"]
    assert report["export_check"]["artifacts"]["safetensors"]["compared_to"] == "onnx"
    manifest = json.loads(output.artifacts["manifest"].read_text())
    assert manifest["config"]["bits"] == 4 and manifest["inputs"]["model"].startswith("sha256:")


def test_no_data_uses_synthetic_inputs_and_the_verdict_is_inconclusive(inputs: dict[str, Path], tmp_path: Path) -> None:
    gate = {"max_metric_drop": 0.5}
    spec = _spec(inputs, tmp_path, calibration_path=None, evaluation_path=None, config={"bits": 8}, gate=gate)
    report = run_job(spec, progress=lambda *e: None, should_cancel=_never).report
    assert report["data"]["used_for"]["fidelity"] == "synthetic"
    assert any("synthetic" in note and "inconclusive" in note for note in report["data"]["notes"])
    assert report["fidelity"]["metric"]["name"] == "top1_agreement"
    assert report["fidelity"]["top1_agreement"] > 0.9  # 8-bit barely moves the logits
    assert report["gate"]["checks"][0]["passed"]  # the check passes on random inputs; the verdict still is not
    assert report["gate"]["verdict"] == "inconclusive"


def test_evaluation_set_alone_is_split_for_a_method_that_calibrates(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RTNConfig, "needs_calibration", True)
    with pytest.raises(JobError) as error:
        spec = _spec(inputs, tmp_path / "a", calibration_path=None, evaluation_path=None)
        run_job(spec, progress=lambda *e: None, should_cancel=_never)
    assert error.value.code == "calibration_required"
    spec = _spec(inputs, tmp_path / "b", calibration_path=None, calibration_samples=32)
    report = run_job(spec, progress=lambda *e: None, should_cancel=_never).report
    split = report["data"]["split"]
    # 256 samples: k = 5, so 51 held out; the other 205 capped at calibration_samples
    assert {key: split[key] for key in ("from", "calibration", "evaluation")} == {
        "from": "evaluation",
        "calibration": 32,
        "evaluation": 51,
    }
    assert report["data"]["used_for"] == {"method": "calibration", "fidelity": "evaluation"}
    assert report["fidelity"]["samples"] == 51 and report["data"]["method_data"]["samples"] == 32
    assert any("held-out" in note for note in report["data"]["notes"])


def test_cancel_stops_the_job(inputs: dict[str, Path], tmp_path: Path) -> None:
    seen: list[str] = []
    with pytest.raises(JobError) as error:
        run_job(
            _spec(inputs, tmp_path),
            progress=lambda stage, *_: seen.append(stage),
            should_cancel=lambda: "compress" in seen,
        )
    assert error.value.code == "cancelled" and "evaluate" not in seen


def test_bad_inputs_fail_with_stable_codes(inputs: dict[str, Path], tmp_path: Path) -> None:
    pickle_path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(1)}, pickle_path)
    cases = [
        (_spec(inputs, tmp_path, model_path=pickle_path), "pickle_refused"),
        (_spec(inputs, tmp_path, config={"bits": 5}), "invalid_config"),
        (_spec(inputs, tmp_path, method="quant_magic"), "unknown_method"),
        (_spec(inputs, tmp_path, evaluation_path=inputs["model"]), "invalid_dataset"),
    ]
    for spec, code in cases:
        with pytest.raises(JobError) as error:
            run_job(spec, progress=lambda *e: None, should_cancel=_never)
        assert error.value.code == code, error.value.message


def test_preflight_reports_checks_skips_and_estimates(inputs: dict[str, Path], tmp_path: Path) -> None:
    answer = preflight(inputs["model"], "quant_gptq", {"bits": 2}, None, inputs["eval"], work_dir=tmp_path)
    assert answer["ok"] and answer["format"] == "onnx" and answer["quantizable_layers"] == 10
    calibration = next(c for c in answer["checks"] if c["name"] == "calibration_present")
    assert "evaluation set will be used" in calibration["message"]
    assert answer["skipped_layers"] == [{"name": "fc", "reason": answer["skipped_layers"][0]["reason"]}]
    assert answer["estimates"]["peak_memory_bytes"] > 4 * answer["params"]
    refused = preflight(inputs["model"], "quant_gptq", {"bits": 2}, None, None, work_dir=tmp_path)
    assert not refused["ok"]
    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((2, 1, 28, 28), np.float32))
    mismatch = preflight(inputs["model"], "quant_rtn", {}, tmp_path / "wrong.npz", None, work_dir=tmp_path)
    failed = [c for c in mismatch["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["calibration_matches_model"]
    assert "dataset_mismatch" in failed[0]["message"]


def test_causal_lm_batches_are_sized_by_their_logits() -> None:
    """One 512-token row of a 262k-vocabulary LM already makes 512 MB of logits: one row per forward,
    and ORT is timed at batch 1 only; a small vocabulary keeps the usual sizes."""

    def lm(vocab: int) -> LoadedModel:
        return LoadedModel("hf_dir", torch.nn.Identity(), [], "causal_lm", info={"vocab_size": vocab})

    assert rows_per_forward(lm(262_144), 512, 8) == 1 and latency_batches(lm(262_144), 512) == (1,)
    assert rows_per_forward(lm(262_144), 128, 8) == 4 and latency_batches(lm(262_144), 128) == (1, 4)
    assert rows_per_forward(lm(1_000), 512, 8) == 8 and latency_batches(lm(1_000), 512) == (1, 32)
    encoder = LoadedModel("hf_dir", torch.nn.Identity(), [], "encoder", info={})
    assert rows_per_forward(encoder, 512, 64) == 64
