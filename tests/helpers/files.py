"""Small real files for API tests: a tiny ONNX classifier, matching/mismatching .npz, hostile archives."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_onnx(path: Path, *, features: int = 8, classes: int = 3, seed: int = 0) -> Path:
    """x[N, features] -> Gemm -> Relu -> Gemm -> logits[N, classes]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((16, features)).astype(np.float32), "fc1.weight")
    b1 = numpy_helper.from_array(np.zeros(16, np.float32), "fc1.bias")
    w2 = numpy_helper.from_array(rng.standard_normal((classes, 16)).astype(np.float32), "fc2.weight")
    b2 = numpy_helper.from_array(np.zeros(classes, np.float32), "fc2.bias")
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "fc2.weight", "fc2.bias"], ["logits"], transB=1, name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[w1, b1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a model at all, just some words")
    return path


def pickled(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": [1, 2, 3]}, protocol=4))
    return path


def torch_save_zip(path: Path) -> Path:
    """The layout of a torch.save checkpoint (a zip holding data.pkl), without needing torch."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
        archive.writestr("archive/version", "3\n")
    return path


def zip_with_escape(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/config.json", "{}")
        archive.writestr("../../etc/evil.safetensors", b"x")
    return path


def tar_with_link(path: Path) -> Path:
    with tarfile.open(path, "w") as archive:
        data = b"{}"
        info = tarfile.TarInfo("model/config.json")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("model/model.safetensors")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    return path


def onnx_with_op(path: Path, op_type: str) -> Path:
    """A valid ONNX whose only node is `op_type` (for unsupported-operator checks)."""
    node = helper.make_node(op_type, ["input"], ["out"], name=f"the_{op_type.lower()}")
    graph = helper.make_graph(
        [node],
        "one_op",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def channel_shuffle_onnx(path: Path, seed: int = 0) -> Path:
    """Conv -> channel shuffle (Reshape/Transpose/Reshape) -> Conv: channels cannot be pruned independently."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "conv1.weight")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "conv2.weight")
    shape_a = numpy_helper.from_array(np.array([-1, 2, 4, 8, 8], np.int64), "shape_a")
    shape_b = numpy_helper.from_array(np.array([-1, 8, 8, 8], np.int64), "shape_b")
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Reshape", ["c1", "shape_a"], ["r1"], name="split_groups"),
        helper.make_node("Transpose", ["r1"], ["t1"], perm=[0, 2, 1, 3, 4], name="shuffle"),
        helper.make_node("Reshape", ["t1", "shape_b"], ["r2"], name="merge_groups"),
        helper.make_node("Conv", ["r2", "conv2.weight"], ["out"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes,
        "shuffle",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8, 8])],
        initializer=[w1, w2, shape_a, shape_b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def constant_of_shape_bomb(path: Path, *, side: int = 25_000, features: int = 8, classes: int = 3) -> Path:
    """A few hundred bytes of ONNX whose graph materialises a float32 [side, side] tensor (2.5 GB at 25,000)."""
    weight = numpy_helper.from_array(np.ones((classes, features), np.float32), "fc.weight")
    shape = numpy_helper.from_array(np.array([side, side], np.int64), "bomb_shape")
    nodes = [
        helper.make_node("Gemm", ["input", "fc.weight"], ["h"], transB=1, name="fc"),
        helper.make_node(
            "ConstantOfShape", ["bomb_shape"], ["bomb"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
        ),
        helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], keepdims=0),
        helper.make_node("Add", ["h", "bomb_sum"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bomb",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=[weight, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path
