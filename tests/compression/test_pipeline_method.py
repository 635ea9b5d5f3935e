"""The `pipeline` method: its config's validation, and prune_structured -> quant_int8 through run_job on the
Fashion-MNIST ResNet (ONNX upload), one report with each step's numbers and one gate."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from compression import registry
from compression.configs import PipelineConfig, parse_config
from compression.job import JobSpec, run_job
from compression.types import Batches
from compression.zoo.fmnist_resnet import export_fmnist_onnx, load_fashion_mnist

warnings.filterwarnings("ignore")
PRUNE = {"method": "prune_structured", "config": {"recovery": "distillation", "distillation_steps": 20}}


def _error(config: dict) -> dict:
    with pytest.raises(ValidationError) as caught:
        parse_config("pipeline", config)
    (error,) = caught.value.errors()
    return {"type": error["type"], "loc": error["loc"]}


def test_steps_are_validated_with_their_own_config_classes() -> None:
    config = parse_config("pipeline", {"steps": [PRUNE, {"method": "quant_int8"}], "skip_layers": ["fc"]})
    assert isinstance(config, PipelineConfig)
    prune, int8 = config.step_configs()
    assert prune.distillation_steps == 20 and prune.skip_layers == ["fc"] and int8.skip_layers == ["fc"]
    assert config.calibration_cap(512) == prune.max_calibration_samples  # pruning's recovery reads more
    assert [s.method for s in PipelineConfig().steps] == ["prune_structured", "quant_int8"]  # the default
    bad_step = {"steps": [{"method": "quant_rtn", "config": {"bits": 5}}]}
    assert _error(bad_step) == {"type": "literal_error", "loc": ("pipeline", "steps", 0, "quant_rtn", "config", "bits")}
    assert _error({"steps": [{"method": "nope"}]}) == {"type": "unknown_method", "loc": ("pipeline", "steps", 0)}
    assert _error({"steps": [{"method": "pipeline"}]})["type"] == "nested_pipeline"
    assert _error({"steps": [{"method": "quant_int8"}, PRUNE]})["type"] == "graph_step_not_last"


def test_built_in_graph_writers_are_declared_on_their_config_classes() -> None:
    for key in registry.known_methods():
        spec = registry.get_spec(key)
        assert (spec.write_onnx is not None) == spec.config_class.ships_own_graph, key
    assert registry.get_spec("pipeline").onnx_writer(PipelineConfig()) is registry.get_spec("quant_int8").write_onnx


def test_library_call_runs_each_step_on_the_previous_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.body(image).mean((2, 3))

    calib = Batches([{"image": torch.randn(8, 1, 12, 12)} for _ in range(2)])
    steps = [
        {"method": "prune_structured", "config": {"target": {"metric": "ratio", "reduction": 0.5}, "round_to": 1}},
        {"method": "quant_rtn", "config": {"bits": 8, "group_size": None}},
    ]
    result = registry.compress(Keyword().eval(), calib, parse_config("pipeline", {"steps": steps}))
    prune, rtn = result.stats["steps"]
    assert prune["report_section"]["channels"]["body.0"] == [16, 8]
    assert prune["flops_per_sample"] < result.stats["flops_per_sample_before"]
    assert rtn["flops_per_sample"] == prune["flops_per_sample"] and rtn["quantized_layers"] == 2
    assert result.quantized["body.0"].codes.shape[0] == 8  # quantized after pruning: the pruned shapes
    assert rtn["size_bytes"] < prune["size_bytes"]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pipeline")
    images, labels = load_fashion_mnist("test", limit=256)
    calib, calib_labels = load_fashion_mnist("train", limit=256)
    np.savez(folder / "eval.npz", input=images.numpy(), labels=labels.numpy())
    np.savez(folder / "calib.npz", input=calib.numpy(), labels=calib_labels.numpy())
    return {
        "model": export_fmnist_onnx(folder / "resnet.onnx"),
        "eval": folder / "eval.npz",
        "calib": folder / "calib.npz",
    }


@pytest.mark.slow
def test_prune_then_int8_runs_as_one_job(resnet: dict[str, Path], tmp_path: Path) -> None:
    spec = JobSpec(
        model_path=resnet["model"],
        method="pipeline",
        config={"steps": [PRUNE, {"method": "quant_int8", "config": {"diagnose": 2}}]},
        calibration_path=resnet["calib"],
        evaluation_path=resnet["eval"],
        gate={"max_metric_drop": 0.5},
        work_dir=tmp_path,
        calibration_samples=128,
        benchmark_repeats=5,
        benchmark_budget_s=1.0,
    )
    output = run_job(spec, progress=lambda *_: None, should_cancel=lambda: False)
    report = output.report
    prune, int8 = report["stats"]["steps"]
    assert (prune["method"], int8["method"]) == ("prune_structured", "quant_int8")
    # the prune step read all 256 calibration images (its own cap), quant_int8 the job's 128
    assert report["data"]["calibration"]["samples"] == 256 and report["data"]["calibration"]["cap"] == 8192
    assert prune["report_section"]["recovery"]["samples"] == {"train": 231, "held_out": 25}
    assert int8["report_section"]["calibration_samples"] == 128
    assert prune["flops_per_sample"] < 0.6 * report["stats"]["flops_per_sample_before"]
    assert int8["flops_per_sample"] == prune["flops_per_sample"]  # the graph keeps the pruned model's MACs
    assert int8["size_bytes"] < 0.5 * prune["size_bytes"] and all(s["seconds"] > 0 for s in (prune, int8))
    assert report["stats"]["flops_per_sample_after"] == int8["flops_per_sample"]
    assert report["gate"]["verdict"] in ("pass", "fail") and report["gate"]["checks"][0]["name"] == "max_metric_drop"
    assert report["fidelity"]["metric"]["compressed"] > 0.7
    ops = {node.op_type for node in onnx.load(str(output.artifacts["onnx"])).graph.node}
    assert "QuantizeLinear" in ops  # the last step's own graph is the artifact
    assert any(note.startswith("pipeline prune_structured -> quant_int8") for note in report["variant_notes"])
