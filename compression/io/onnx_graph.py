"""Scan an ONNX graph for weight layers (Conv, Gemm, MatMul, BatchNormalization with constant weights).

Shared by the ONNX -> torch converter (which turns each into a real nn.Conv2d / nn.Linear /
nn.BatchNorm2d) and by the exporter (which rewrites those nodes' initializers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import helper, numpy_helper


@dataclass
class WeightLayer:
    """One graph node whose weights live in initializers.

    kind: "conv" | "linear" | "batchnorm" | "layernorm". For linear, `transposed` means the initializer is [K, N]
    (MatMul, or Gemm with transB=0) while nn.Linear.weight is [N, K].
    initializers: role ("weight", "bias", "running_mean", "running_var") -> initializer name.
    """

    name: str
    kind: str
    node_index: int
    node_name: str
    initializers: dict[str, str] = field(default_factory=dict)
    transposed: bool = False


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def module_path_from_initializer(initializer: str) -> str:
    """`layer1.conv1.weight` -> `layer1.conv1`; characters that cannot be module names become `_`."""
    stem = re.sub(r"[._/:]?weight$", "", initializer) or initializer
    parts = [re.sub(r"[^0-9A-Za-z_]", "_", part) for part in stem.strip("/").split(".")]
    return ".".join(part or "_" for part in parts)


def _float_initializer(name: str, initializers: dict[str, onnx.TensorProto]) -> bool:
    tensor = initializers.get(name)
    return tensor is not None and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def _classify(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[str, dict[str, str], bool] | None:
    inputs = list(node.input)
    attrs = node_attributes(node)
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Conv" and len(inputs) > 1 and _float_initializer(inputs[1], inits):
        if len(inits[inputs[1]].dims) not in (3, 4):
            return None
        roles = {"weight": inputs[1]}
        if len(inputs) > 2 and inputs[2]:
            if not _float_initializer(inputs[2], inits):
                return None
            roles["bias"] = inputs[2]
        return "conv", roles, False
    if node.op_type == "Gemm" and _float_initializer(inputs[1], inits) and len(inits[inputs[1]].dims) == 2:
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        roles = {"weight": inputs[1]}
        if len(inputs) > 2 and inputs[2]:
            if not _float_initializer(inputs[2], inits) or len(inits[inputs[2]].dims) > 1:
                return None
            roles["bias"] = inputs[2]
        return "linear", roles, not attrs.get("transB", 0)
    if node.op_type == "MatMul" and _float_initializer(inputs[1], inits) and len(inits[inputs[1]].dims) == 2:
        return "linear", {"weight": inputs[1]}, True
    if node.op_type == "BatchNormalization" and all(_float_initializer(n, inits) for n in inputs[1:5]):
        roles = dict(zip(("weight", "bias", "running_mean", "running_var"), inputs[1:5], strict=True))
        return "batchnorm", roles, False
    if node.op_type == "LayerNormalization":
        return _classify_layer_norm(inputs, attrs, len(node.output), inits)
    return None


def _classify_layer_norm(
    inputs: list[str], attrs: dict[str, Any], outputs: int, inits: dict[str, onnx.TensorProto]
) -> tuple[str, dict[str, str], bool] | None:
    """A last-axis LayerNormalization with a constant 1-D scale (and bias) is an nn.LayerNorm, so pruning
    sees the channels it normalizes; other forms (several axes, Mean/InvStdDev outputs) stay functional."""
    present = [name for name in inputs[1:3] if name]
    if attrs.get("axis", -1) != -1 or outputs != 1 or not present:
        return None
    if not all(_float_initializer(n, inits) and len(inits[n].dims) == 1 for n in present):
        return None
    return "layernorm", dict(zip(("weight", "bias"), present, strict=False)), False


def find_weight_layers(graph: onnx.GraphProto) -> list[WeightLayer]:
    """Every Conv / Gemm / MatMul / BatchNormalization / LayerNormalization node with constant weights,
    named after them.

    A weight shared by two nodes (tied weights) is taken by the first node only; the others stay
    functional ops reading the shared constant.
    """
    inits = {init.name: init for init in graph.initializer}
    layers: list[WeightLayer] = []
    taken_weights: set[str] = set()
    taken_names: set[str] = set()
    for index, node in enumerate(graph.node):
        found = _classify(node, inits)
        if found is None or found[1]["weight"] in taken_weights:
            continue
        kind, roles, transposed = found
        name = module_path_from_initializer(roles["weight"])
        if name in taken_names or any(n.startswith(name + ".") or name.startswith(n + ".") for n in taken_names):
            name = f"{name}_{index}".replace(".", "_")
        taken_weights.add(roles["weight"])
        taken_names.add(name)
        layers.append(WeightLayer(name, kind, index, node.name or f"node_{index}", roles, transposed))
    return layers


def untie_weight(graph: onnx.GraphProto, name: str) -> int:
    """Give every weight layer node after the first that reads initializer `name` as its weight a copy of its
    own (an exporter may merge equal weights of distinct modules into one); returns the copies made."""
    inits = {init.name: init for init in graph.initializer}
    users = [node for node in graph.node if (found := _classify(node, inits)) and found[1]["weight"] == name]
    for index, node in enumerate(users[1:], start=1):
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}.untied{index}"
        graph.initializer.append(copy)
        node.input[1] = copy.name
    return len(users) - 1


def initializer_array(graph: onnx.GraphProto, name: str) -> Any:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


def fold_initializer_identities(model: onnx.ModelProto) -> bool:
    """Replace `Identity(initializer)` nodes by a copy of the initializer under the output name.

    The TorchScript exporter de-duplicates equal tensors this way (e.g. two BatchNorm biases that
    happen to be equal); untying them lets each layer own, and change, its own weights.
    Returns whether the graph changed.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    outputs = {value.name for value in graph.output}
    keep, copies = [], []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            copies.append(copy)
        else:
            keep.append(node)
    if not copies:
        return False
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(copies)
    return True
