"""Export: the ONNX artifact runs in ONNX Runtime and matches the torch fake-quant model; safetensors
round-trips the exact codes; the manifest records what was done."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors import safe_open
from torch import nn

from compression.configs import RTNConfig
from compression.io import ExportOptions, export_artifacts, load_model, verify_onnx
from compression.io.export import sha256_file
from compression.methods.quant_rtn import compress as rtn
from compression.primitives.layers import get_weight_matrix
from compression.primitives.pack import unpack_codes
from compression.primitives.quant import round_to_nearest
from compression.types import CompressionResult, QuantizedLayer
from compression.zoo.fmnist_resnet import export_fmnist_onnx, load_fashion_mnist

warnings.filterwarnings("ignore")
EXACT = ExportOptions(accuracy_level=0)  # fp32 activations in MatMulNBits: comparisons can be tight


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def fake_quantize(
    model: nn.Module, names: list[str], bits: int, group: int | None, symmetric: bool
) -> CompressionResult:
    """Minimal RTN on the named layers (the test's own, independent of the methods' layer planning)."""
    model = copy.deepcopy(model)
    quantized = {}
    for name in names:
        module = model.get_submodule(name)
        codes, scales, zeros = round_to_nearest(get_weight_matrix(module).float(), bits, group, symmetric)
        kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        layer = QuantizedLayer(name, kind, bits, group, codes, scales, zeros, tuple(module.weight.shape))
        module.weight.data = layer.dequantize()
        quantized[name] = layer
    return CompressionResult(model, "test_rtn", quantized)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("resnet")
    return load_model(export_fmnist_onnx(folder / "resnet.onnx"), work_dir=folder / "work")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_fashion_mnist("test", limit=256)[0]


@pytest.mark.parametrize(("bits", "group"), [(2, 16), (3, None), (4, 32), (8, None)])
def test_resnet_export_matches_fake_quant_on_real_images(resnet, images, tmp_path: Path, bits, group) -> None:
    names = resnet.info["quantizable_layers"]  # every conv and the fc
    result = fake_quantize(resnet.module, names, bits, group, symmetric=False)
    paths = export_artifacts(result, resnet, tmp_path, example={"input": images[:4]}, manifest={}, options=EXACT)
    got = _ort(paths["onnx"], {"input": images.numpy()})
    with torch.no_grad():
        want = result.model(input=images).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()
    ops = _op_types(paths["onnx"])
    assert ("MatMulNBits" in ops) == (bits != 3)  # ORT 1.32 has no 3-bit MatMulNBits: dequantize subgraph
    assert "Conv" in ops and ("Gemm" in ops) == (bits == 3)  # option A keeps the node, new weight input


def test_export_with_method_rtn_and_default_options(resnet, images, tmp_path: Path) -> None:
    result = rtn(resnet.module, None, RTNConfig(bits=4, group_size=None, quantize_head=4))
    paths = export_artifacts(result, resnet, tmp_path, example={"input": images[:4]}, manifest={"job": "x"})
    check = verify_onnx(paths["onnx"], result.model, {"input": images})
    assert check["passed"] and check["top1_agreement"] >= 0.99
    size = paths["onnx"].stat().st_size
    assert size < 0.3 * resnet.source_onnx.stat().st_size  # ~4.2 bits vs 32


def test_safetensors_round_trips_codes_and_manifest_records(resnet, tmp_path: Path) -> None:
    result = fake_quantize(resnet.module, ["layer1.conv1", "fc"], 3, 16, symmetric=True)
    result.skipped["stem.0"] = "kept in float for the test"
    example = {"input": torch.randn(2, 1, 28, 28)}
    paths = export_artifacts(result, resnet, tmp_path, example=example, manifest={"seed": 7})
    with safe_open(str(paths["safetensors"]), framework="pt") as handle:
        meta = json.loads(handle.metadata()["layers"])
        for name, layer in result.quantized.items():
            codes = unpack_codes(handle.get_tensor(f"{name}.qweight"), 3, meta[name]["cols"])
            assert torch.equal(codes, layer.codes.to(torch.int8))
            assert handle.get_tensor(f"{name}.scales").dtype == torch.float32  # what the ONNX and evaluation use
            assert torch.equal(handle.get_tensor(f"{name}.scales"), layer.scales.float())
        keys = set(handle.keys())
        assert "layer1.conv1.weight" not in keys and "stem.0.weight" in keys
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["seed"] == 7 and manifest["skipped"] == {"stem.0": "kept in float for the test"}
    assert manifest["layers"]["fc"]["onnx_storage"] == "packed+dequantize"
    assert manifest["artifacts"]["onnx"]["sha256"] == sha256_file(paths["onnx"])
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["libraries"])


def test_changed_float_weights_are_written_back(resnet, tmp_path: Path) -> None:
    model = copy.deepcopy(resnet.module)
    with torch.no_grad():
        model.get_submodule("layer2.bn1").weight.mul_(0.5)
        model.get_submodule("layer3.conv2").weight.mul_(-1.0)
    result = CompressionResult(model, "edit")
    x = torch.randn(3, 1, 28, 28)
    paths = export_artifacts(result, resnet, tmp_path, example={"input": x}, manifest={})
    with torch.no_grad():
        np.testing.assert_allclose(_ort(paths["onnx"], {"input": x.numpy()}), model(input=x).numpy(), atol=1e-4)


def _linear_graph(cols: int) -> onnx.ModelProto:
    """x [b, t, K] -> MatMul(W1 [K, 24]) -> Gemm-like 2-D path with bias (transB = 1 and 0)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((cols, 24)).astype(np.float32)
    w2 = rng.standard_normal((20, 24)).astype(np.float32)  # Gemm transB=1: [N, K]
    w3 = rng.standard_normal((20, 12)).astype(np.float32)  # Gemm transB=0: [K, N]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("ReduceMean", ["h", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("Gemm", ["pooled", "w2", "b2"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["r"]),
        helper.make_node("Gemm", ["r", "w3", "b3"], ["y"]),
    ]
    b2, b3 = rng.standard_normal(20).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    arrays = {"w1": w1, "w2": w2, "w3": w3, "axis1": np.array([1]), "b2": b2, "b3": b3}
    inits = [numpy_helper.from_array(array, name) for name, array in arrays.items()]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 12])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    ("cols", "bits", "group", "symmetric"),
    [
        (64, 4, None, False),  # per-channel: ReduceSum zero term
        (64, 4, 16, False),  # K % G == 0: reshape-and-sum zero term
        (64, 2, 16, False),  # 2 bits: float zero points, no zero term
        (40, 2, None, False),  # 2 bits per channel: float zero points repeated over the blocks
        (40, 4, 16, False),  # K % G != 0: membership-matrix zero term
        (64, 8, 32, True),  # no zero term
        (40, 3, 16, False),  # 3 bits: dequantize subgraph, transposed layout
    ],
)
def test_linear_layers_export_exactly(tmp_path: Path, cols: int, bits: int, group: int | None, symmetric: bool):
    path = tmp_path / "linear.onnx"
    onnx.save(_linear_graph(cols), str(path))
    loaded = load_model(path, work_dir=tmp_path / "work")
    result = fake_quantize(loaded.module, ["w1", "w2", "w3"], bits, group, symmetric)
    x = torch.randn(6, 5, cols)
    paths = export_artifacts(result, loaded, tmp_path / "out", example={"x": x}, manifest={}, options=EXACT)
    with torch.no_grad():
        want = result.model(x=x).numpy()
    np.testing.assert_allclose(_ort(paths["onnx"], {"x": x.numpy()}), want, atol=2e-4 * np.abs(want).max())
    nodes = onnx.load(str(paths["onnx"])).graph.node
    nbits = [node for node in nodes if node.op_type == "MatMulNBits"]
    assert len(nbits) == (0 if bits == 3 else 3)
    assert all(len(node.input) == (4 if bits == 2 else 3) for node in nbits)  # float zero points at 2 bits
    zero_term = any(out.endswith("_zterm") for node in nodes for out in node.output)  # the float-Z correction
    assert zero_term == (bits == 4)


def test_two_bit_zero_points_survive_a_zero_scale(tmp_path: Path) -> None:
    """A constant row is all Z (min/max gives S = 1e-12, a least-squares solve can give exactly 0): its
    float zero point must stay finite and the output exact."""
    path = tmp_path / "linear.onnx"
    onnx.save(_linear_graph(64), str(path))
    loaded = load_model(path, work_dir=tmp_path / "work")
    with torch.no_grad():
        loaded.module.get_submodule("w1").weight[3] = 0.25
    result = fake_quantize(loaded.module, ["w1", "w2", "w3"], 2, 16, symmetric=False)
    result.quantized["w1"].scales[3] = 0.0
    x = torch.randn(6, 5, 64)
    paths = export_artifacts(result, loaded, tmp_path / "out", example={"x": x}, manifest={}, options=EXACT)
    with torch.no_grad():
        want = result.model(x=x).numpy()
    got = _ort(paths["onnx"], {"x": x.numpy()})
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())


def _tiny_bert_rtn4(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A one-layer random BERT saved as a Hugging Face directory, loaded, and RTN-quantized (W4 g32)."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    loaded = load_model(tmp_path / "bert", work_dir=tmp_path / "work")
    return loaded, rtn(loaded.module, None, RTNConfig(bits=4, group_size=32))


@pytest.mark.slow
def test_hf_encoder_export_uses_matmul_nbits(tmp_path: Path) -> None:
    loaded, result = _tiny_bert_rtn4(tmp_path)
    ids = torch.randint(0, 100, (3, 9))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    paths = export_artifacts(result, loaded, tmp_path / "out", example=example, manifest={}, options=EXACT)
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(paths["onnx"])).graph.node) == 6
    assert verify_onnx(paths["onnx"], result.model, example, tolerance=1e-4)["passed"]


def test_hf_dir_artifact_reloads_with_transformers(tmp_path: Path) -> None:
    from compression.io.hf import export_hf_dir

    loaded, result = _tiny_bert_rtn4(tmp_path)
    out = export_hf_dir(result.model, loaded, tmp_path / "hf_model")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    reloaded = load_model(out, work_dir=tmp_path / "work2")
    ids = torch.randint(0, 100, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(reloaded.module(**batch), result.model(**batch))


def test_tied_lm_head_is_written_once_and_recorded(tmp_path: Path) -> None:
    """Gemma ties its output head to the embeddings: the packed artifact holds that storage once and
    names the tie (safetensors refuses aliases), and the ONNX export still matches the model."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=64, sliding_window=16,
    )  # fmt: skip
    transformers.Gemma3ForCausalLM(config).save_pretrained(tmp_path / "lm")
    loaded = load_model(tmp_path / "lm")
    result = rtn(loaded.module, None, RTNConfig(bits=4, group_size=32))
    ids = torch.randint(0, 128, (2, 12))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    paths = export_artifacts(result, loaded, tmp_path / "out", example=example, manifest={}, options=EXACT)
    with safe_open(str(paths["safetensors"]), "pt") as packed:
        names, ties = set(packed.keys()), json.loads(packed.metadata()["tied"])
    assert ties == {"model.lm_head.weight": "model.model.embed_tokens.weight"}
    assert "model.model.embed_tokens.weight" in names and "model.lm_head.weight" not in names
    assert verify_onnx(paths["onnx"], result.model, example)["passed"]
