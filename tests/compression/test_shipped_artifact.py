"""The shipped artifact is what is measured: the task metric comes from the exported ONNX in ONNX Runtime,
the PyTorch model only cross-checks it; the export check is an always-on gate check with one tolerance;
an export that would ship something other than what was measured fails with a code; every other artifact
is compared with the ONNX; S and Z have one precision (fp32) in every artifact."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from safetensors import safe_open
from torch import nn

from compression.io import ExportOptions, export_artifacts
from compression.io.artifact_checks import EXPORT_TOLERANCE, check_artifacts, load_packed_model, torch_outputs
from compression.io.errors import ExportError
from compression.io.model import InputSpec, LoadedModel, load_model
from compression.job import JobError, JobSpec, run_job
from compression.pipeline import export as export_pipeline
from compression.primitives.layers import get_weight_matrix
from compression.primitives.quant import round_to_nearest
from compression.types import CompressionResult, QuantizedLayer
from tests.helpers import files

warnings.filterwarnings("ignore")
EXACT = ExportOptions(accuracy_level=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("shipped")
    rng = np.random.default_rng(0)
    evaluation = rng.standard_normal((96, 8)).astype(np.float32)
    return {
        "model": files.tiny_onnx(folder / "tiny.onnx"),
        "calib": files.npz(folder / "calib.npz", input=rng.standard_normal((48, 8)).astype(np.float32)),
        "eval": files.npz(folder / "eval.npz", input=evaluation, labels=rng.integers(0, 3, 96)),
    }


def _spec(tiny: dict[str, Path], work: Path, **overrides) -> JobSpec:  # type: ignore[no-untyped-def]
    fields = {
        "model_path": tiny["model"],
        "method": "quant_rtn",
        "config": {"bits": 4, "group_size": None},
        "calibration_path": tiny["calib"],
        "evaluation_path": tiny["eval"],
        "gate": {"max_metric_drop": 1.0},
        "work_dir": work,
        "benchmark_repeats": 5,
        "benchmark_budget_s": 0.2,
    }
    return JobSpec(**{**fields, **overrides})


def _run(spec: JobSpec):  # type: ignore[no-untyped-def]
    return run_job(spec, progress=lambda *_: None, should_cancel=lambda: False)


def _ort_accuracy(onnx_path: Path, data: Path) -> float:
    """The accuracy of an ONNX file on a labelled .npz, with a session of our own (nothing from the job)."""
    with np.load(data) as arrays:
        logits = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
            None, {"input": arrays["input"]}
        )[0]
        return float((logits.argmax(1) == arrays["labels"]).mean())


def test_the_metric_is_the_shipped_onnx_measured_in_onnx_runtime(tiny: dict[str, Path], tmp_path: Path) -> None:
    output = _run(_spec(tiny, tmp_path))
    report = output.report
    fidelity = report["fidelity"]
    assert fidelity["measured_on"] == "onnx" and fidelity["metric"]["name"] == "accuracy"
    assert fidelity["metric"]["compressed"] == _ort_accuracy(output.artifacts["onnx"], tiny["eval"])
    assert fidelity["metric"]["original"] == _ort_accuracy(tiny["model"], tiny["eval"])
    cross = fidelity["cross_check"]
    assert cross["measured_on"] == "torch" and cross["metric"]["name"] == "accuracy"
    assert cross["onnx_minus_torch"]["metric_compressed"] == 0.0  # the export is exact at accuracy_level 0
    checks = {check["name"]: check for check in report["gate"]["checks"]}
    assert checks["export_check"]["passed"] and checks["export_check"]["limit"] == EXPORT_TOLERANCE
    assert report["export_check"]["max_rel_error"] < 1e-5 and report["export_check"]["compared_to"] == "torch"
    packed = report["export_check"]["artifacts"]["safetensors"]
    assert packed["compared_to"] == "onnx" and packed["passed"] and packed["max_rel_error"] < 1e-5


def _corrupt_scales(export):  # type: ignore[no-untyped-def]
    """export_artifacts, then every quantized layer's scales in the ONNX tripled (a broken export)."""

    def corrupted(result, loaded, out_dir, **kwargs):  # type: ignore[no-untyped-def]
        paths = export(result, loaded, out_dir, **kwargs)
        model = onnx.load(str(paths["onnx"]))
        for init in model.graph.initializer:
            if init.name.endswith("_scales"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3, init.name))
        onnx.save(model, str(paths["onnx"]))
        return paths

    return corrupted


def test_a_diverging_artifact_fails_the_export_check(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_pipeline, "export_artifacts", _corrupt_scales(export_pipeline.export_artifacts))
    output = _run(_spec(tiny, tmp_path / "gated"))
    report = output.report
    check = next(c for c in report["gate"]["checks"] if c["name"] == "export_check")
    assert not check["passed"] and check["measured"] > EXPORT_TOLERANCE
    assert report["gate"]["verdict"] == "fail"  # the metric drop alone (limit 1.0) would pass
    assert next(c for c in report["gate"]["checks"] if c["name"] == "max_metric_drop")["passed"]
    assert not report["export_check"]["artifacts"]["safetensors"]["passed"]  # the packed file is not the ONNX
    # what was measured is the broken file that ships, not the PyTorch model
    assert report["fidelity"]["metric"]["compressed"] == _ort_accuracy(output.artifacts["onnx"], tiny["eval"])
    with pytest.raises(JobError) as error:
        _run(_spec(tiny, tmp_path / "ungated", gate=None))
    assert error.value.code == "export_mismatch"


class _Layers(nn.Module):
    """x[N, 8] through the layers named in `used`; the others exist (and get quantized) but are not called."""

    def __init__(self, used: tuple[str, ...], equal: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        if equal:
            self.b.load_state_dict(self.a.state_dict())
        self.used = used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(getattr(self, name)(x * (i + 1)) for i, name in enumerate(self.used))


class _Doubled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, 2 * self.weight, self.bias)  # the graph holds 2W, not W


class _Transformed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = _Doubled(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


class _StaticBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x).reshape(4, 2, 4).sum(1)  # the batch of 4 is written into the graph


def _rtn(model: nn.Module, names: list[str]) -> tuple[CompressionResult, LoadedModel]:
    """W4 per-channel RTN on the named Linear layers, and the model as the torch-export path sees it."""
    model = copy.deepcopy(model).eval()
    quantized = {}
    for name in names:
        module = model.get_submodule(name)
        codes, scales, zeros = round_to_nearest(get_weight_matrix(module).float(), 4, None, False)
        quantized[name] = QuantizedLayer(name, "linear", 4, None, codes, scales, zeros, tuple(module.weight.shape))
        module.weight.data = quantized[name].dequantize()
    loaded = LoadedModel("hf_dir", model, [InputSpec("x", (None, 8), "float32")], "generic")
    return CompressionResult(model, "test_rtn", quantized), loaded


def _export(model: nn.Module, names: list[str], out: Path) -> dict[str, Path]:
    result, loaded = _rtn(model, names)
    return export_artifacts(result, loaded, out, example={"x": torch.randn(4, 8)}, manifest={}, options=EXACT)


def test_layers_with_equal_weights_each_get_their_own_quantized_node(tmp_path: Path) -> None:
    paths = _export(_Layers(("a", "b"), equal=True), ["a", "b"], tmp_path)
    assert sum(node.op_type == "MatMulNBits" for node in onnx.load(str(paths["onnx"])).graph.node) == 2


def test_a_layer_outside_the_forward_pass_is_recorded_unused(tmp_path: Path) -> None:
    import json

    paths = _export(_Layers(("a", "b")), ["a", "b", "c"], tmp_path)  # c is never called
    layers = json.loads(paths["manifest"].read_text())["layers"]
    assert layers["a"]["onnx_storage"] == layers["b"]["onnx_storage"] == "MatMulNBits"
    assert layers["c"]["onnx_storage"].startswith("unused")


@pytest.mark.parametrize(
    ("model", "names", "code"),
    [
        (_Transformed(), ["a"], "export_layer_missing"),  # its weights are not in the graph as they are
        (_Layers(("a",), equal=True), ["a", "b"], "export_node_collision"),  # b equals a: one node for two
        (_StaticBatch(), ["a"], "export_dynamic_shapes_failed"),  # no silent retry with static shapes
    ],
    ids=["missing", "collision", "static"],
)
def test_an_export_that_would_not_ship_what_was_measured_fails_with_a_code(
    tmp_path: Path, model: nn.Module, names: list[str], code: str
) -> None:
    with pytest.raises(ExportError) as error:
        _export(model, names, tmp_path)
    assert error.value.code == code, error.value.message


def test_scales_and_zeros_ship_in_the_precision_the_onnx_and_evaluation_use(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    loaded = load_model(tiny["model"], work_dir=tmp_path / "load")
    result, _ = _rtn(loaded.module, ["fc1", "fc2"])
    example = {"input": torch.randn(16, 8, generator=torch.Generator().manual_seed(1))}
    paths = export_artifacts(result, loaded, tmp_path / "out", example=example, manifest={}, options=EXACT)
    with safe_open(str(paths["safetensors"]), framework="pt") as packed:
        for name, layer in result.quantized.items():
            scales, zeros = packed.get_tensor(f"{name}.scales"), packed.get_tensor(f"{name}.zeros")
            assert scales.dtype == zeros.dtype == torch.float32
            assert torch.equal(scales, layer.scales.float()) and torch.equal(zeros, layer.zeros.float())
    onnx_scales = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(paths["onnx"])).graph.initializer}
    assert all(array.dtype == np.float32 for name, array in onnx_scales.items() if name.endswith("_scales"))
    rebuilt = torch_outputs(load_packed_model(paths["safetensors"], result.model), example)[0]
    onnx_out = ort.InferenceSession(str(paths["onnx"])).run(None, {"input": example["input"].numpy()})[0]
    np.testing.assert_allclose(rebuilt, onnx_out, rtol=0, atol=1e-5 * np.abs(onnx_out).max())


def test_a_packed_file_that_differs_from_the_onnx_is_reported(tiny: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    loaded = load_model(tiny["model"], work_dir=tmp_path / "load")
    result, _ = _rtn(loaded.module, ["fc1", "fc2"])
    example = {"input": torch.randn(16, 8, generator=torch.Generator().manual_seed(1))}
    paths = export_artifacts(result, loaded, tmp_path / "out", example=example, manifest={}, options=EXACT)
    onnx_out = [ort.InferenceSession(str(paths["onnx"])).run(None, {"input": example["input"].numpy()})[0]]
    assert check_artifacts(paths, onnx_out, example, result)["safetensors"]["passed"]
    with safe_open(str(paths["safetensors"]), framework="pt") as packed:
        metadata = packed.metadata()
    tensors = load_file(str(paths["safetensors"]))
    tensors["fc1.scales"] = tensors["fc1.scales"] * 2
    save_file(tensors, str(paths["safetensors"]), metadata=metadata)
    check = check_artifacts(paths, onnx_out, example, result)["safetensors"]
    assert not check["passed"] and check["max_rel_error"] > EXPORT_TOLERANCE and check["compared_to"] == "onnx"


@pytest.mark.slow
def test_a_causal_lm_perplexity_is_measured_on_its_onnx(tmp_path: Path) -> None:
    """A tiny Gemma-3 (Hugging Face directory) goes through ONNX Runtime too: perplexity from the exported
    graph, the PyTorch model as the cross-check, the packed and HF artifacts compared with the ONNX."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=64, sliding_window=16,
    )  # fmt: skip
    transformers.Gemma3ForCausalLM(config).save_pretrained(tmp_path / "lm")
    rng = np.random.default_rng(0)
    ids = {split: rng.integers(0, 128, (n, 24)) for split, n in (("calib", 8), ("eval", 6))}
    data = {k: files.npz(tmp_path / f"{k}.npz", input_ids=v, attention_mask=np.ones_like(v)) for k, v in ids.items()}
    spec = JobSpec(
        model_path=tmp_path / "lm",
        method="quant_rtn",
        config={"bits": 4, "group_size": 32},
        calibration_path=data["calib"],
        evaluation_path=data["eval"],
        gate={"max_metric_drop": 1000.0},
        work_dir=tmp_path / "work",
        seq_len=24,
        benchmark_repeats=5,
        benchmark_budget_s=0.2,
    )
    report = _run(spec).report
    fidelity = report["fidelity"]
    assert fidelity["measured_on"] == "onnx" and fidelity["metric"]["name"] == "perplexity"
    torch_side = fidelity["cross_check"]["metric"]
    assert fidelity["metric"]["compressed"] == pytest.approx(torch_side["compressed"], rel=1e-4)
    assert fidelity["metric"]["original"] == pytest.approx(torch_side["original"], rel=1e-4)
    assert report["export_check"]["passed"] and report["export_check"]["max_rel_error"] < 1e-4
    # RTN's default integer zero points map onto GPTQ's qzeros: the ort_genai model ships and is run-checked
    assert set(report["export_check"]["artifacts"]) == {"safetensors", "hf_dir", "ort_genai"}
    assert all(check["passed"] for check in report["export_check"]["artifacts"].values())


def test_an_onnx_with_a_static_batch_is_measured_row_by_row(tmp_path: Path) -> None:
    from compression.io.ort_model import OrtModel

    model = onnx.load(str(files.tiny_onnx(tmp_path / "tiny.onnx")))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(tmp_path / "static.onnx"))
    runner, dynamic = OrtModel.open(tmp_path / "static.onnx"), OrtModel.open(tmp_path / "tiny.onnx")
    rows = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    assert runner.static_batch == 1 and dynamic.static_batch is None
    torch.testing.assert_close(runner(input=rows), dynamic(input=rows))
    assert runner(input=rows.double()).dtype == torch.float32  # fed as the graph's dtype
