"""Load-time checks of an ONNX graph against what `compression.io.onnx_ops` can run.

A node whose operator, attribute value or tensor type the interpreter does not implement is refused
here, by name (`Pad: attribute mode=...`), rather than failing or silently differing at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
from onnx import TensorProto, numpy_helper

from compression.io.onnx_graph import node_attributes
from compression.io.onnx_ops import ONNX_TO_TORCH_DTYPE, SUPPORTED_OPS, cast_target

DEFAULT_DOMAINS = ("", "ai.onnx")
NodeCheck = Callable[[onnx.NodeProto, dict[str, Any], int, dict[str, TensorProto]], list[str]]


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset version for the default (ai.onnx) domain; 0 when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)


def unsupported_operators(model: onnx.ModelProto) -> list[str]:
    """Sorted `domain::op` (or `op`) names the converter cannot run; empty when all are supported."""
    missing = set()
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in SUPPORTED_OPS:
            missing.add(f"{node.domain}::{node.op_type}" if node.domain else node.op_type)
    return sorted(missing)


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def _present(names: Any, position: int) -> bool:
    return len(names) > position and bool(names[position])


def _cast(node: onnx.NodeProto, attrs: dict[str, Any], opset: int, inits: dict[str, TensorProto]) -> list[str]:
    target = cast_target(attrs)
    return [] if target in ONNX_TO_TORCH_DTYPE else [f"attribute to={_type_name(target)}"]


def _batch_norm(node: onnx.NodeProto, attrs: dict[str, Any], opset: int, inits: dict[str, TensorProto]) -> list[str]:
    problems = []
    if attrs.get("training_mode", 0):
        problems.append("attribute training_mode=1")
    if opset < 9 and attrs.get("spatial", 1) == 0:
        problems.append("attribute spatial=0")
    if any(_present(node.output, i) for i in range(1, 5)):
        problems.append("running mean / variance outputs")
    return problems


def _dropout(node: onnx.NodeProto, attrs: dict[str, Any], opset: int, inits: dict[str, TensorProto]) -> list[str]:
    if not _present(node.input, 2):
        return []
    flag = inits.get(node.input[2])
    if flag is not None and not numpy_helper.to_array(flag).any():
        return []
    return ["input training_mode (random training-time dropout)"]


def _pad(node: onnx.NodeProto, attrs: dict[str, Any], opset: int, inits: dict[str, TensorProto]) -> list[str]:
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    return [] if mode in ("constant", "reflect", "edge", "wrap") else [f"attribute mode={mode}"]


def _constant(node: onnx.NodeProto, attrs: dict[str, Any], opset: int, inits: dict[str, TensorProto]) -> list[str]:
    if "value" in attrs and attrs["value"].data_type not in ONNX_TO_TORCH_DTYPE:
        return [f"attribute value of type {_type_name(attrs['value'].data_type)}"]
    known = {"value", "value_float", "value_floats", "value_int", "value_ints"}
    return [f"attribute {name}" for name in sorted(set(attrs) - known)]


def _resize(node: onnx.NodeProto, attrs: dict[str, Any], opset: int, inits: dict[str, TensorProto]) -> list[str]:
    def text(name: str, default: str) -> str:
        value = attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    problems = [f"attribute antialias={attrs['antialias']}"] if attrs.get("antialias", 0) else []
    if text("coordinate_transformation_mode", "half_pixel") in ("tf_crop_and_resize", "tf_half_pixel_for_nn"):
        problems.append(f"attribute coordinate_transformation_mode={text('coordinate_transformation_mode', '')}")
    if text("keep_aspect_ratio_policy", "stretch") != "stretch":
        problems.append(f"attribute keep_aspect_ratio_policy={text('keep_aspect_ratio_policy', '')}")
    return problems


NODE_CHECKS: dict[str, NodeCheck] = {
    "Resize": _resize,
    "Cast": _cast,
    "BatchNormalization": _batch_norm,
    "Dropout": _dropout,
    "Pad": _pad,
    "Constant": _constant,
}


def _value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    types = {value.name: value.type for value in [*graph.input, *graph.output, *graph.value_info]}
    for init in graph.initializer:
        types[init.name] = onnx.helper.make_tensor_type_proto(init.data_type, None)
    return types


def _tensor_type_problem(name: str, value_type: onnx.TypeProto) -> str | None:
    if value_type.WhichOneof("value") != "tensor_type":
        return f"tensor '{name}' is a {value_type.WhichOneof('value')}, not a tensor"
    elem_type = value_type.tensor_type.elem_type
    if elem_type and elem_type not in ONNX_TO_TORCH_DTYPE:
        return f"tensor '{name}' has element type {_type_name(elem_type)}"
    return None


def unsupported_variants(model: onnx.ModelProto) -> list[str]:
    """`Op: reason` for every node of a supported operator that uses a variant the interpreter lacks."""
    graph, opset = model.graph, default_opset(model)
    inits = {init.name: init for init in graph.initializer}
    types = _value_types(graph)
    problems: list[str] = []
    for node in graph.node:
        reasons = [_tensor_type_problem(n, types[n]) for n in [*node.input, *node.output] if n in types]
        check = NODE_CHECKS.get(node.op_type)
        if check is not None:
            reasons += check(node, node_attributes(node), opset, inits)
        problems += [f"{node.op_type}: {reason}" for reason in reasons if reason]
    return list(dict.fromkeys(problems))
