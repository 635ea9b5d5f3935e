"""ONNX -> torch: an nn.Module that interprets the graph in order with torch ops.

Conv nodes with constant weights become nn.Conv1d/nn.Conv2d submodules, Gemm/MatMul with a
constant weight become nn.Linear, BatchNormalization becomes nn.BatchNorm2d and a last-axis
LayerNormalization nn.LayerNorm, so compression methods see (and may replace or reshape) real
layers. Submodules are named after their weight
initializer (`layer1.conv1.weight` -> `layer1.conv1`), so a model exported from torch keeps its
layer names. `layer_initializers` maps each such module back to the initializers it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from compression.io.errors import ModelLoadError
from compression.io.onnx_checks import default_opset, unsupported_operators, unsupported_variants
from compression.io.onnx_graph import WeightLayer, find_weight_layers, node_attributes
from compression.io.onnx_ops import OPS, OpContext, tensor_from_proto
from compression.io.onnx_spatial import spatial_pads, torch_pad_list


@dataclass
class _Step:
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    context: OpContext
    module: str | None = None  # dotted submodule name for weight layers


def _attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    *parents, leaf = dotted.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    owner.add_module(leaf, module)


def _static_conv_padding(attrs: dict[str, Any], spatial: int) -> list[int] | None:
    """The symmetric padding an nn.Conv can hold, or None when it depends on the input (auto_pad
    SAME_*) or differs between begin and end: the converted layer then pads explicitly first."""
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return [0] * spatial
    if auto_pad != "NOTSET":
        return None
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    return pads[:spatial] if pads[:spatial] == pads[spatial:] else None


def _build_conv(weight: torch.Tensor, bias: torch.Tensor | None, attrs: dict[str, Any]) -> nn.Module:
    spatial = weight.dim() - 2
    padding = _static_conv_padding(attrs, spatial) or [0] * spatial
    groups = attrs.get("group", 1)
    cls = nn.Conv1d if spatial == 1 else nn.Conv2d
    conv = cls(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=tuple(attrs.get("strides", [1] * spatial)),
        padding=tuple(padding),
        dilation=tuple(attrs.get("dilations", [1] * spatial)),
        groups=groups,
        bias=bias is not None,
    )
    conv.weight.data.copy_(weight)
    if bias is not None:
        conv.bias.data.copy_(bias)
    return conv


def _build_layer_norm(roles: dict[str, torch.Tensor], attrs: dict[str, Any]) -> nn.LayerNorm:
    norm = nn.LayerNorm(roles["weight"].numel(), eps=attrs.get("epsilon", 1e-5), bias="bias" in roles)
    for role, tensor in roles.items():
        getattr(norm, role).data.copy_(tensor)
    return norm


def _build_module(layer: WeightLayer, consts: dict[str, torch.Tensor], attrs: dict[str, Any]) -> nn.Module:
    roles = {role: consts[name].float() for role, name in layer.initializers.items()}
    if layer.kind == "conv":
        return _build_conv(roles["weight"], roles.get("bias"), attrs)
    if layer.kind == "linear":
        weight = roles["weight"].t() if layer.transposed else roles["weight"]
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in roles)
        linear.weight.data.copy_(weight)
        if "bias" in roles:
            linear.bias.data.copy_(roles["bias"].reshape(-1).expand(weight.shape[0]))
        return linear
    if layer.kind == "layernorm":
        return _build_layer_norm(roles, attrs)
    bn = nn.BatchNorm2d(roles["weight"].numel(), eps=attrs.get("epsilon", 1e-5))
    for role in ("weight", "bias"):
        getattr(bn, role).data.copy_(roles[role])
    bn.running_mean.copy_(roles["running_mean"])
    bn.running_var.copy_(roles["running_var"])
    return bn.eval()


def _refuse_unsupported(model: onnx.ModelProto) -> None:
    missing = unsupported_operators(model)
    if missing:
        raise ModelLoadError("unsupported_operator", f"unsupported ONNX operators: {', '.join(missing)}")
    variants = unsupported_variants(model)
    if variants:
        raise ModelLoadError("unsupported_operator", f"unsupported ONNX operator variants: {'; '.join(variants)}")


class OnnxModule(nn.Module):
    """Runs an ONNX graph with torch. `forward(**inputs)` returns the graph's output, or a tuple of
    all its outputs (in graph order) when it has more than one."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        _refuse_unsupported(model)
        graph = model.graph
        self.opset = default_opset(model)
        init_names = {init.name for init in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]
        consts = {init.name: tensor_from_proto(init) for init in graph.initializer}
        layers = find_weight_layers(graph)
        self.layer_initializers: dict[str, WeightLayer] = {layer.name: layer for layer in layers}
        by_node = {layer.node_index: layer for layer in layers}
        self._steps: list[_Step] = []
        for index, node in enumerate(graph.node):
            attrs = node_attributes(node)
            layer = by_node.get(index)
            if layer is not None:
                _attach(self, layer.name, _build_module(layer, consts, attrs))
            context = OpContext(self.opset, len(node.output))
            step = _Step(node.op_type, list(node.input), list(node.output), attrs, context, layer and layer.name)
            self._steps.append(step)
        owned = {name for layer in layers for name in layer.initializers.values()}
        self.constants = nn.Module()
        self._constant_keys: dict[str, str] = {}
        for position, (name, value) in enumerate(consts.items()):
            if name not in owned or self._read_by_other_nodes(name, by_node, graph):
                key = f"c{position}"
                self.constants.register_buffer(key, value)
                self._constant_keys[name] = key

    @staticmethod
    def _read_by_other_nodes(name: str, by_node: dict[int, WeightLayer], graph: onnx.GraphProto) -> bool:
        return any(name in node.input and index not in by_node for index, node in enumerate(graph.node))

    def constant(self, name: str) -> torch.Tensor:
        return getattr(self.constants, self._constant_keys[name])

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, args, strict=False))
        env.update(kwargs)
        unknown = set(kwargs) - set(self.input_names)
        if unknown:
            raise TypeError(f"unexpected inputs {sorted(unknown)}; the model takes {self.input_names}")
        for step in self._steps:
            names = step.inputs[:1] if step.module is not None else step.inputs
            inputs = [self._value(name, env) for name in names]
            outputs = self._run_step(step, inputs)
            env.update(zip(step.outputs, outputs, strict=False))
        results = tuple(self._value(name, env) for name in self.output_names)
        return results[0] if len(results) == 1 else results

    def _value(self, name: str, env: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not name:
            return None
        if name in env:
            return env[name]
        return self.constant(name)

    def _run_step(self, step: _Step, inputs: list[torch.Tensor | None]) -> list[torch.Tensor]:
        if step.module is not None:
            return [self._run_layer(step, inputs[0])]
        return OPS[step.op_type](inputs, step.attrs, step.context)

    def _run_layer(self, step: _Step, x: torch.Tensor) -> torch.Tensor:
        module = self.get_submodule(step.module)
        if step.op_type == "Conv" and _static_conv_padding(step.attrs, x.dim() - 2) is None:
            strides = list(step.attrs.get("strides", [1] * (x.dim() - 2)))
            begin, end = spatial_pads(step.attrs, x.shape[2:], list(module.kernel_size), strides)
            return module(F.pad(x, torch_pad_list(begin, end)))
        if isinstance(module, nn.BatchNorm2d) and x.dim() != 4:
            return F.batch_norm(
                x, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
            )
        return module(x)
