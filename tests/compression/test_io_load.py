"""Loading: format detection from content, the ONNX -> torch converter, refusals with stable codes."""

from __future__ import annotations

import io
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compression.io import InputSpec, ModelLoadError, load_model
from compression.io.detect import detect_format
from compression.zoo.fmnist_resnet import export_fmnist_onnx, load_pretrained

warnings.filterwarnings("ignore")


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_fmnist_onnx(tmp_path_factory.mktemp("onnx") / "resnet.onnx")


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_onnx_resnet_becomes_real_layers_and_matches(resnet_onnx: Path, tmp_path: Path) -> None:
    loaded = load_model(resnet_onnx, work_dir=tmp_path)
    assert loaded.format == "onnx" and loaded.task == "classifier"
    assert loaded.input_specs == [InputSpec("input", (None, 1, 28, 28), "float32")]
    modules = dict(loaded.module.named_modules())
    assert isinstance(modules["layer2.shortcut.0"], nn.Conv2d) and modules["layer2.shortcut.0"].stride == (
        2,
        2,
    )
    assert isinstance(modules["fc"], nn.Linear)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in modules.values()) == 9  # tied BN biases untied
    assert loaded.info["params"] == sum(p.numel() for p in load_pretrained().parameters())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        ours, reference = loaded.module(input=x), load_pretrained()(x)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(ours.numpy(), _ort(resnet_onnx, {"input": x.numpy()}), atol=1e-4)


def test_converted_weights_are_live(resnet_onnx: Path, tmp_path: Path) -> None:
    loaded = load_model(resnet_onnx, work_dir=tmp_path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = loaded.module(input=x)
        loaded.module.get_submodule("fc").weight.mul_(2.0)
        after = loaded.module(input=x)
    assert not torch.allclose(before, after)


def _transformer_like_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    b1 = rng.standard_normal(32).astype(np.float32)
    w2 = rng.standard_normal((32, 16)).astype(np.float32)
    gamma, beta = np.ones(16, np.float32), np.zeros(16, np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["ln", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Gelu", ["hb"], ["g"], domain=""),
        helper.make_node("MatMul", ["g", "w2"], ["o"]),
        helper.make_node("Shape", ["o"], ["shape"]),
        helper.make_node("Transpose", ["o"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Softmax", ["t"], ["s"], axis=-1),
        helper.make_node("ReduceMean", ["s", "axes"], ["y"], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [
            (w1, "w1"),
            (b1, "b1"),
            (w2, "w2"),
            (gamma, "gamma"),
            (beta, "beta"),
            (np.array([1]), "axes"),
        ]
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_matmul_with_constant_weight_becomes_linear(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save(_transformer_like_graph(), str(path))
    loaded = load_model(path, work_dir=tmp_path)
    linear = loaded.module.get_submodule("w1")
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (32, 16)
    assert loaded.info["layer_initializers"]["w1"] == {"weight": "w1"}
    x = np.random.default_rng(1).standard_normal((3, 6, 16)).astype(np.float32)
    with torch.no_grad():
        ours = loaded.module(x=torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, _ort(path, {"x": x}), atol=1e-5)


def test_pt2_is_exported_through_onnx(tmp_path: Path) -> None:
    model = load_pretrained()
    program = torch.export.export(model, (torch.zeros(4, 1, 28, 28),))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    assert detect_format(tmp_path / "m.pt2") == "torch_export"
    loaded = load_model(tmp_path / "m.pt2", work_dir=tmp_path / "work")
    assert loaded.format == "torch_export" and loaded.source_onnx is not None
    assert isinstance(loaded.module.get_submodule("layer1.conv1"), nn.Conv2d)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(input=x), model(x), atol=1e-4, rtol=1e-4)


def test_onnx_zip_with_external_data(resnet_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(resnet_onnx))
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for name in ("m.onnx", "m.data"):
            bundle.write(folder / name, f"model/{name}")
    loaded = load_model(archive, work_dir=tmp_path / "work")
    assert loaded.format == "onnx"
    assert loaded.info["params"] == sum(p.numel() for p in load_pretrained().parameters())


def _tiny_bert_dir(path: Path) -> Path:
    import transformers

    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    return path


def test_hf_dir_and_tar_load_as_mean_pooled_encoder(tmp_path: Path) -> None:
    folder = _tiny_bert_dir(tmp_path / "bert")
    loaded = load_model(folder, work_dir=tmp_path / "w1")
    assert loaded.format == "hf_dir" and loaded.task == "encoder"
    assert loaded.info["output"] == "mean_pooled_embeddings"
    ids = torch.randint(0, 100, (2, 7))
    out = loaded.module(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.shape == (2, 32)
    archive = tmp_path / "bert.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        bundle.add(folder, arcname="bert")
    again = load_model(archive, work_dir=tmp_path / "w2")
    torch.testing.assert_close(again.module(input_ids=ids, attention_mask=torch.ones_like(ids)), out)


def test_hf_dir_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    folder = _tiny_bert_dir(tmp_path / "bert")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as error:
        load_model(folder, work_dir=tmp_path / "w")
    assert error.value.code == "pickle_refused"


def test_torch_save_pickle_is_refused(tmp_path: Path) -> None:
    zipped, legacy = tmp_path / "state.pt", tmp_path / "legacy.pt"
    torch.save(load_pretrained().state_dict(), zipped)
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
    legacy.write_bytes(buffer.getvalue())
    for path in (zipped, legacy):
        with pytest.raises(ModelLoadError) as error:
            load_model(path, work_dir=tmp_path / "w")
        assert error.value.code == "pickle_refused"
        assert "ONNX" in error.value.message


def test_truncated_onnx_is_invalid(resnet_onnx: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(resnet_onnx.read_bytes()[:4000])
    with pytest.raises(ModelLoadError) as error:
        load_model(truncated, work_dir=tmp_path / "w")
    assert error.value.code == "invalid_model"


def test_unsupported_operator_is_named(tmp_path: Path) -> None:
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["out"])
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 4]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.INT64, [None, 3])],
    )
    path = tmp_path / "nms.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelLoadError) as error:
        load_model(path, work_dir=tmp_path / "w")
    assert error.value.code == "unsupported_operator"
    assert "NonMaxSuppression" in error.value.message
