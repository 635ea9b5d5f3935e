"""quant_int8: static W8A8 QDQ graphs built with ONNX Runtime's toolkit, measured and shipped as run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from pydantic import ValidationError

from compression import registry
from compression.configs import Int8Config
from compression.io.ort_module import OrtGraphModule
from compression.job import JobSpec, run_job
from compression.methods.quant_int8 import compress
from compression.types import Batches
from compression.zoo.fmnist_resnet import (
    export_fmnist_onnx,
    fashion_mnist_available,
    load_fashion_mnist,
    load_pretrained,
)

warnings.filterwarnings("ignore")
INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger"}


def _images(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    if fashion_mnist_available():
        return load_fashion_mnist(split, limit=limit)
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    return torch.randn(limit, 1, 28, 28, generator=generator), torch.randint(0, 10, (limit,), generator=generator)


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("int8")
    images, labels = _images("test", 256)
    np.savez(folder / "eval.npz", input=images.numpy(), labels=labels.numpy())
    np.savez(folder / "calib.npz", input=_images("train", 128)[0].numpy())
    return {
        "model": export_fmnist_onnx(folder / "resnet.onnx"),
        "eval": folder / "eval.npz",
        "calib": folder / "calib.npz",
    }


def _never() -> bool:
    return False


def _job(files: dict[str, Path], work: Path, config: dict, **extra: object):  # type: ignore[no-untyped-def]
    spec = JobSpec(
        model_path=files["model"],
        method="quant_int8",
        config=config,
        calibration_path=files["calib"],
        evaluation_path=files["eval"],
        gate={"max_metric_drop": 0.02},
        work_dir=work,
        benchmark_repeats=20,
        benchmark_budget_s=1.0,
        **extra,
    )
    return run_job(spec, progress=lambda *_: None, should_cancel=_never)


def optimized_ops(path: Path, work: Path) -> set[str]:
    """The op types ONNX Runtime actually runs for `path` (its optimized graph, saved)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(work / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {node.op_type for node in onnx.load(str(work / "optimized.onnx")).graph.node}


def float_weight_nodes(path: Path) -> set[str]:
    """Weight nodes whose weight is a float initializer (not behind a DequantizeLinear)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        n.name
        for n in model.graph.node
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits and inits[n.input[1]].dtype == np.float32
    }


@pytest.mark.slow
def test_resnet_job_ships_the_qdq_graph_it_measured(resnet_files: dict[str, Path], tmp_path: Path) -> None:
    output = _job(resnet_files, tmp_path, {"diagnose": 4})
    report = output.report
    json.dumps(report, allow_nan=False)
    onnx_path = output.artifacts["onnx"]
    ops = [n.op_type for n in onnx.load(str(onnx_path)).graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    assert {"QLinearConv", "QGemm"} <= optimized_ops(onnx_path, tmp_path)  # integer kernels, not float fallbacks
    metric = report["fidelity"]["metric"]
    assert metric["name"] == "accuracy" and metric["drop"] <= 0.02 and report["gate"]["verdict"] == "pass"
    if fashion_mnist_available():
        assert metric["compressed"] >= 0.88
    assert report["fidelity"]["top1_agreement"] >= 0.95
    rows = {row["name"]: row for row in report["layers"]}
    assert all(row["status"] == "quantized" and row["bits"] == 8 for row in rows.values())
    assert set(rows) == {
        "stem.0",
        "layer1.conv1",
        "layer1.conv2",
        "layer2.conv1",
        "layer2.conv2",
        "layer2.shortcut.0",
        "layer3.conv1",
        "layer3.conv2",
        "layer3.shortcut.0",
        "fc",
    }
    assert report["compressed"]["size_bytes"] < 0.45 * report["original"]["size_bytes"]
    assert report["export_check"]["passed"] and report["export_check"]["max_rel_error"] == 0.0
    diagnosis = report["stats"]["diagnosis"]
    tested = [node for node in diagnosis["nodes"] if "gain_db" in node]
    assert len(tested) == 4 and diagnosis["output_sqnr_db"] > 20
    assert report["latency"]["speedup"] > 0 and len(report["latency"]["speedup_ci95"]) == 2


@pytest.mark.slow
def test_skip_layers_and_auto_skip_stay_float(resnet_files: dict[str, Path], tmp_path: Path) -> None:
    config = {"skip_layers": ["layer1.*", "fc"], "diagnose": 3, "auto_skip": 1, "calibration": "percentile"}
    report = _job(resnet_files, tmp_path, config).report
    rows = {row["name"]: row for row in report["layers"]}
    for name in ("layer1.conv1", "layer1.conv2", "fc"):
        assert rows[name]["status"] == "float" and "skip_layers" in rows[name]["reason"]
    auto = report["stats"]["auto_skipped"]
    float_nodes = float_weight_nodes(Path(report_artifact(tmp_path)))
    assert {"/layer1/conv1/Conv", "/layer1/conv2/Conv", "/fc/Gemm"} <= float_nodes
    assert set(auto) <= float_nodes and len(auto) <= 1
    gains = [n for n in report["stats"]["diagnosis"]["nodes"] if n.get("gain_db") is not None]
    if auto:  # the skipped node is the tested one whose exclusion gained most
        assert auto[0] == max(gains, key=lambda n: n["gain_db"])["node"]
        assert rows[next(n["layer"] for n in gains if n["node"] == auto[0])]["status"] == "float"
    else:
        assert all(n["gain_db"] < 0.1 for n in gains)
    assert report["fidelity"]["top1_agreement"] >= 0.95


def report_artifact(work: Path) -> Path:
    return work / "artifacts" / "model.onnx"


def _batches(images: torch.Tensor, rows: int = 32) -> Batches:
    return Batches(inputs=[{"input": images[i : i + rows]} for i in range(0, len(images), rows)])


@pytest.mark.slow
def test_calibration_methods_set_different_ranges_and_all_keep_the_model() -> None:
    model = load_pretrained().eval()
    calib, held = _batches(_images("train", 96)[0]), _images("test", 128)[0]
    with torch.no_grad():
        want = model(held).argmax(1)
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        result = compress(model, calib, Int8Config(calibration=method, diagnose=0))
        assert isinstance(result.model, OrtGraphModule) and result.stats["calibration"] == method
        agreement = float((result.model(input=held).argmax(1) == want).float().mean())
        assert agreement >= 0.9, (method, agreement)
        graph = result.model.graph()
        inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
        scales[method] = np.array([inits[n.input[1]] for n in graph.graph.node if n.op_type == "QuantizeLinear"])
    assert not np.allclose(scales["minmax"], scales["percentile"])
    assert not np.allclose(scales["minmax"], scales["entropy"])


WORDS = [f"w{i}" for i in range(190)]


def _tiny_bert(path: Path) -> Path:
    """A random two-block BERT with a word-level tokenizer, saved as a Hugging Face directory."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(path)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(path)
    return path


def _sentences(path: Path, count: int, seed: int) -> Path:
    """One sentence per line, 3 to 30 words: text batches are padded per batch, so lengths differ."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 31))) for _ in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_transformer_encoder_job_runs_integer_matmuls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"  # ONNX Runtime's shape inference dumps files into the working directory on failure
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    files = {
        "model": _tiny_bert(tmp_path / "bert"),
        "calib": _sentences(tmp_path / "calib.txt", 96, 0),
        "eval": _sentences(tmp_path / "eval.txt", 64, 1),
    }
    output = _job(files, tmp_path / "work", {"diagnose": 2, "calibration": "entropy"}, batch_size=16)
    report = output.report
    assert set(output.artifacts) == {"onnx", "safetensors", "manifest"}  # the QDQ graph, no float HF copy
    assert {"QLinearMatMul"} & optimized_ops(output.artifacts["onnx"], tmp_path)
    assert report["fidelity"]["samples"] == 64  # every batch ran, whatever its padded length
    assert not list(cwd.iterdir()), "the job wrote into the working directory"
    assert report["fidelity"]["metric"]["name"] == "mean_cosine" and report["fidelity"]["mean_cosine"] >= 0.98
    quantized = [row for row in report["layers"] if row["status"] == "quantized"]
    assert len(quantized) == 12 and all(row["bits"] == 8 for row in quantized)  # 6 Linear layers x 2 blocks
    assert any("two activations" in reason for reason in report["skipped"].values())


def test_config_is_validated_and_registered() -> None:
    with pytest.raises(ValidationError):
        Int8Config(diagnose=2, auto_skip=3)
    with pytest.raises(ValidationError):
        Int8Config(calibration="kl")
    spec = registry.get_spec("quant_int8")
    assert spec.data["calibration"] == "required" and spec.write_onnx is not None
