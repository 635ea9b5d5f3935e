"""A PyTorch model exported to ONNX with the dynamo exporter, and its quantized layers found in the graph.

- Dynamic axes: the batch axis of every input and each axis the model declares dynamic (token inputs:
  the sequence). A model that cannot be exported with them is refused (`export_dynamic_shapes_failed`),
  never silently exported with static shapes.
- Matching: the exporter renames (and for 3-D inputs pre-transposes) Linear weights, so layers are found
  by the exact values of their fake-quantized weights. Equal weights of distinct modules, merged by the
  exporter into one initializer, are untied again and taken one node per module in graph order.
  A quantized layer whose output never reaches the model's outputs (a BERT pooler under mean pooling) is
  not in the graph and is reported `unused`; any other layer without a node fails the export
  (`export_layer_missing`), and more modules than nodes with the same values is `export_node_collision`:
  either would ship float weights the report counts as quantized.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from compression.io.errors import ExportError
from compression.io.loaded import InputSpec
from compression.io.onnx_graph import WeightLayer, find_weight_layers, untie_weight
from compression.primitives.layers import get_weight_matrix
from compression.types import primary_output

ValueKey = tuple[tuple[int, ...], str]


def _dynamic_shapes(example: dict[str, torch.Tensor], specs: list[InputSpec]) -> dict[str, dict[int, Any]]:
    """The batch axis of every input, and each other axis the model declares dynamic (token inputs: the
    sequence), as export Dims shared across inputs by axis (input_ids and attention_mask stay equal)."""
    declared = {spec.name: spec.shape for spec in specs}
    dims: dict[int, Any] = {}
    shapes = {}
    for name, tensor in example.items():
        shape = declared.get(name) or (None,)
        axes = [0, *(axis for axis in range(1, tensor.dim()) if axis < len(shape) and shape[axis] is None)]
        shapes[name] = {
            axis: dims.setdefault(axis, torch.export.Dim("batch" if axis == 0 else f"dim{axis}")) for axis in axes
        }
    return shapes


def torch_export_onnx(
    model: nn.Module, example: dict[str, torch.Tensor], specs: list[InputSpec], work: Path
) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) with dynamic batch (and sequence) axes. A graph that cannot be exported
    with them is refused (`export_dynamic_shapes_failed`), never silently exported with static shapes."""
    target = work / "exported.onnx"
    example = {name: _at_least_two(t) for name, t in example.items()}  # size-1 axes would be specialized
    dynamic = _dynamic_shapes(example, specs)
    try:
        torch.onnx.export(
            model, (), str(target), kwargs=example, input_names=list(example), dynamo=True, dynamic_shapes=dynamic
        )
    except Exception as error:
        raise ExportError(
            "export_dynamic_shapes_failed", _static_message(f"{type(error).__name__}: {error}")
        ) from error
    exported = onnx.load(str(target))
    fixed = [
        f"{value.name}[{axis}]"
        for value in exported.graph.input
        for axis in dynamic.get(value.name, {})
        if value.type.tensor_type.shape.dim[axis].HasField("dim_value")
    ]
    if fixed:  # the exporter specialized a dynamic axis to the example's size instead of failing
        raise ExportError("export_dynamic_shapes_failed", _static_message(f"fixed sizes for {fixed}"))
    return exported


def _static_message(detail: str) -> str:
    return f"the model does not export to ONNX with a dynamic batch (and sequence) size: {detail[:500]}"


def _at_least_two(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() and tensor.shape[0] < 2:
        return torch.cat([tensor] * 2, dim=0)
    return tensor


def _value_key(matrix: np.ndarray) -> ValueKey:
    data = np.ascontiguousarray(matrix, dtype=np.float32)
    return data.shape, hashlib.sha1(data.tobytes()).hexdigest()


def _graph_layers_by_value(graph: onnx.GraphProto) -> dict[ValueKey, list[WeightLayer]]:
    inits = {init.name: init for init in graph.initializer}
    by_value: dict[ValueKey, list[WeightLayer]] = {}
    for layer in find_weight_layers(graph):
        if layer.kind == "batchnorm":
            continue
        array = numpy_helper.to_array(inits[layer.initializers["weight"]])
        matrix = array.T if layer.transposed else array.reshape(array.shape[0], -1)
        by_value.setdefault(_value_key(matrix), []).append(layer)
    return by_value


def match_layers_by_value(
    graph: onnx.GraphProto, model: nn.Module, names: list[str]
) -> tuple[dict[str, WeightLayer], list[str]]:
    """Each named module's weight layer in a freshly exported graph, found by the weight's exact values,
    and the names with no node at all. Raises `export_node_collision` (see the module doc)."""
    keys = {name: _module_key(model, name) for name in names}
    by_value = _graph_layers_by_value(graph)
    wanted = Counter(keys.values())
    shared = [by_value[k][0] for k, count in wanted.items() if 0 < len(by_value.get(k, [])) < count]
    if sum(untie_weight(graph, layer.initializers["weight"]) for layer in shared):
        by_value = _graph_layers_by_value(graph)
    claimed: dict[ValueKey, list[str]] = {}
    found, missing = {}, []
    for name, key in keys.items():
        candidates, taken = by_value.get(key, []), claimed.setdefault(key, [])
        if not candidates:
            missing.append(name)
            continue
        if len(taken) >= len(candidates):
            raise ExportError(
                "export_node_collision",
                f"quantized layers {[*taken, name]} have equal weights but the exported graph has "
                f"{len(candidates)} node(s) with them: each layer needs its own node",
            )
        found[name] = replace(candidates[len(taken)], name=name)
        taken.append(name)
    return found, missing


def unused_layers(model: nn.Module, example: dict[str, torch.Tensor], names: list[str]) -> set[str]:
    """The named layers whose output does not reach the model's outputs (not called, or called and
    dropped, like a BERT pooler under mean pooling), by one forward pass with autograd."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            seen[name] = output.detach().requires_grad_(True)
            return seen[name]

        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        with torch.enable_grad():
            total = primary_output(model.eval()(**example)).float().sum()
    finally:
        for handle in handles:
            handle.remove()
    called = [name for name in names if name in seen]
    if not called or not total.requires_grad:
        return set(names)
    grads = torch.autograd.grad(total, [seen[name] for name in called], allow_unused=True)
    return set(names) - {name for name, grad in zip(called, grads, strict=True) if grad is not None}


def match_layers(
    graph: onnx.GraphProto, model: nn.Module, names: list[str], example: dict[str, torch.Tensor]
) -> tuple[dict[str, WeightLayer], set[str]]:
    """(layers found in the graph, quantized layers that do not take part in the forward pass). A layer
    that takes part but has no node fails the export (`export_layer_missing`)."""
    found, missing = match_layers_by_value(graph, model, names)
    unused = unused_layers(model, example, missing) if missing else set()
    lost = [name for name in missing if name not in unused]
    if lost:
        raise ExportError(
            "export_layer_missing", f"quantized layers with no node holding their weights in the ONNX graph: {lost[:5]}"
        )
    return found, unused


def _module_key(model: nn.Module, name: str) -> ValueKey:
    matrix = get_weight_matrix(model.get_submodule(name)).cpu().float().numpy()
    return _value_key(matrix.reshape(matrix.shape[0], -1))
