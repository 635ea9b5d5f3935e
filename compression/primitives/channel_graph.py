"""Producer -> consumer channel pairs of a torch model, and physical removal of channels.

A *pair* is a weight layer (the producer: Conv2d/Linear) whose output channels reach one or more
weight layers (the consumers) only through ops that act on each channel separately:
`producer -> [BatchNorm] -> [one activation] -> [dropout / pooling / flatten] -> consumer(s)`.
Only then can a channel be removed from the producer, its BatchNorm and every consumer's input, and
its contribution be folded into the consumers' input kernels. Anything else (a residual add, a
concatenation, the model output, an op we do not know) couples the channels with other tensors, so
the producer is reported in `ChannelGraph.unpaired` with the reason.

The dataflow comes from `torch.fx.symbolic_trace`, or, for the library's ONNX interpreter module
(`compression.io.onnx_torch.OnnxModule`, not fx-traceable), from its ordered step list. Both are first
normalized to a small op list (`_Op`), so one walker finds the pairs. A module that gives neither is
searched child by child; channels that leave a traced child are unpaired ("leaves its traced scope").
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import fx, nn

WeightLayer = nn.Conv2d | nn.Linear
WEIGHT_LAYER_TYPES = (nn.Conv2d, nn.Linear)
POSITIVELY_HOMOGENEOUS = frozenset({"identity", "relu", "leaky_relu"})

_ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.ReLU6: "relu6",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.ELU: "elu",
    nn.Mish: "mish",
}
_ACTIVATION_FUNCTIONS = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.leaky_relu: "leaky_relu",
    F.gelu: "gelu",
    F.silu: "silu",
    torch.tanh: "tanh",
    torch.sigmoid: "sigmoid",
}
_ONNX_ACTIVATIONS = {
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "Gelu": "gelu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "HardSwish": "hardswish",
    "Elu": "elu",
    "Mish": "mish",
}
_MEAN_PRESERVING_MODULES = (
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)
_MAX_POOL_MODULES = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_MEAN_PRESERVING_FUNCTIONS = (F.dropout, F.avg_pool2d, F.adaptive_avg_pool2d)
_MAX_POOL_FUNCTIONS = (F.max_pool2d, F.adaptive_max_pool2d)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_PASSTHROUGH_METHODS = frozenset({"contiguous", "clone"})
_METHOD_FUNCTIONS = {"relu": F.relu, "relu_": F.relu, "flatten": torch.flatten}
_ONNX_MEAN_PRESERVING = frozenset({"AveragePool", "GlobalAveragePool", "Dropout", "Identity"})
_ONNX_MAX_POOL = frozenset({"MaxPool", "GlobalMaxPool"})


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the producer's channels as its input channels."""

    name: str
    block: int  # input columns per producer channel: 1, or H*W when a Linear reads a flattened feature map
    mean_preserving: bool  # False when a max-pool sits on the path (the BN mean model no longer holds)


@dataclass(frozen=True)
class ChannelPair:
    producer: str
    bn: str | None
    activation: str  # "identity", "relu", "leaky_relu", "gelu", ...
    consumers: tuple[Consumer, ...]

    @property
    def positively_homogeneous(self) -> bool:
        """act(s·h) == s·act(h) for s > 0: channel scales and combinations pass through the activation."""
        return self.activation in POSITIVELY_HOMOGENEOUS


@dataclass
class ChannelGraph:
    layers: list[str] = field(default_factory=list)  # weight layers, execution order within a traced scope
    pairs: dict[str, ChannelPair] = field(default_factory=dict)  # keyed by producer name
    unpaired: dict[str, str] = field(default_factory=dict)  # producer name -> why it has no clean consumer


@dataclass
class _Op:
    """One dataflow node, already classified.

    kind: layer | bn | act | mean | max | flatten | add | cat | output | other; `name` is the module name
    for layer/bn, the activation for act, a description for other.
    """

    kind: str
    name: str = ""
    users: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _PathState:
    activation: str = "identity"
    mean_preserving: bool = True
    flattened: bool = False


def find_channel_graph(model: nn.Module) -> ChannelGraph:
    """Every Conv2d/Linear of `model`, with its producer -> consumer pair or the reason it has none."""
    graph = ChannelGraph()
    _collect(model, "", model, graph)
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_LAYER_TYPES) and name not in graph.layers:
            graph.layers.append(name)
            graph.unpaired.setdefault(name, "not reached by tracing")
    return graph


def _collect(module: nn.Module, prefix: str, root: nn.Module, graph: ChannelGraph) -> None:
    if isinstance(module, WEIGHT_LAYER_TYPES):
        graph.layers.append(prefix.rstrip("."))
        graph.unpaired[prefix.rstrip(".")] = "its output leaves an untraceable parent module"
        return
    ops = _ops_from_onnx_steps(module, prefix) if hasattr(module, "_steps") else _ops_from_fx(module, prefix)
    if ops is None:
        for child_name, child in module.named_children():
            _collect(child, f"{prefix}{child_name}.", root, graph)
        return
    _pairs_from_ops(ops, root, graph)


# ---- normalizing dataflow to _Op lists -----------------------------------------------------------------


def _ops_from_fx(module: nn.Module, prefix: str) -> list[_Op] | None:
    try:
        traced = fx.symbolic_trace(module)
    except Exception:  # any tracing failure means "search the children instead"
        return None
    modules = dict(traced.named_modules())
    nodes = list(traced.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    ops = [_classify_fx(node, modules, prefix) for node in nodes]
    for node, op in zip(nodes, ops, strict=True):
        op.users = [index[user] for user in node.users]
    return ops


def _classify_fx(node: fx.Node, modules: dict[str, nn.Module], prefix: str) -> _Op:
    if node.op == "output":
        return _Op("output")
    if node.op == "call_module":
        return _classify_module(modules[node.target], prefix + node.target)
    if node.op not in ("call_function", "call_method"):
        return _Op("other", node.op)
    target = node.target
    if node.op == "call_method":
        if target in _PASSTHROUGH_METHODS:
            return _Op("mean")
        target = _METHOD_FUNCTIONS.get(target, target)
    return _classify_function(target, node)


def _classify_module(module: nn.Module, name: str) -> _Op:
    if isinstance(module, WEIGHT_LAYER_TYPES):
        return _Op("layer", name)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _Op("bn", name)
    if type(module) in _ACTIVATION_MODULES:
        return _Op("act", _ACTIVATION_MODULES[type(module)])
    if isinstance(module, _MEAN_PRESERVING_MODULES):
        return _Op("mean")
    if isinstance(module, _MAX_POOL_MODULES):
        return _Op("max")
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return _Op("flatten")
    return _Op("other", f"module {type(module).__name__}")


def _classify_function(target: Any, node: fx.Node) -> _Op:
    if target in _ACTIVATION_FUNCTIONS:
        return _Op("act", _ACTIVATION_FUNCTIONS[target])
    if target in _MEAN_PRESERVING_FUNCTIONS:
        return _Op("mean")
    if target in _MAX_POOL_FUNCTIONS:
        return _Op("max")
    if target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return _Op("flatten") if (start, end) == (1, -1) else _Op("other", "flatten mixing channels")
    if target in _ADD_FUNCTIONS:
        return _Op("add")
    if target is torch.cat:
        return _Op("cat")
    return _Op("other", str(getattr(target, "__name__", target)))


def _ops_from_onnx_steps(module: nn.Module, prefix: str) -> list[_Op] | None:
    """The op list of an `OnnxModule` (its private `_steps`: op_type, inputs, outputs, module, attrs)."""
    steps = getattr(module, "_steps", None)
    outputs = getattr(module, "output_names", None)
    if not isinstance(steps, list) or outputs is None:
        return None
    made_by: dict[str, int] = {}
    ops: list[_Op] = []
    constant_nodes: dict[str, Any] = {}  # output name -> Constant step, for Clip's bounds
    for i, step in enumerate(steps):
        ops.append(_classify_onnx_step(step, module, prefix, constant_nodes))
        if step.op_type == "Constant":
            constant_nodes.update({name: step for name in step.outputs})
        for name in step.inputs:
            if name in made_by:
                ops[made_by[name]].users.append(i)
        made_by.update({name: i for name in step.outputs})
    ops.append(_Op("output"))
    for name in outputs:
        if name in made_by:
            ops[made_by[name]].users.append(len(ops) - 1)
    return ops


def _onnx_scalar(name: str, module: nn.Module, constant_nodes: dict[str, Any]) -> float | None:
    """The value of a scalar graph constant (an initializer or a Constant node's output), else None."""
    if name in getattr(module, "_constant_keys", {}):
        value = module.constant(name)
        return float(value.reshape(-1)[0]) if value.numel() == 1 else None
    producer = constant_nodes.get(name)
    if producer is None or "value" not in producer.attrs:
        return None
    array = numpy_helper.to_array(producer.attrs["value"])
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _clip_activation(step: Any, module: nn.Module, constant_nodes: dict[str, Any]) -> str | None:
    """Clip(0, 6) is ReLU6 and Clip(0, none) is ReLU (torch exports both that way); other bounds: None."""
    if step.context.opset < 11:
        low, high = step.attrs.get("min"), step.attrs.get("max")
    else:
        names = [*step.inputs[1:3], "", ""][:2]
        low, high = (_onnx_scalar(n, module, constant_nodes) if n else None for n in names)
        if any(n and v is None for n, v in zip(names, (low, high), strict=True)):
            return None  # a bound that is not a constant
    if low == 0 and high is None:
        return "relu"
    return "relu6" if (low, high) == (0, 6) else None


def _classify_onnx_step(step: Any, module: nn.Module, prefix: str, constant_nodes: dict[str, Any]) -> _Op:
    if step.module is not None:
        return _classify_module(module.get_submodule(step.module), prefix + step.module)
    op_type = step.op_type
    if op_type == "Clip" and _clip_activation(step, module, constant_nodes):
        return _Op("act", _clip_activation(step, module, constant_nodes))
    if op_type in _ONNX_ACTIVATIONS:
        return _Op("act", _ONNX_ACTIVATIONS[op_type])
    if op_type in _ONNX_MEAN_PRESERVING:
        return _Op("mean")
    if op_type in _ONNX_MAX_POOL:
        return _Op("max")
    if op_type == "Flatten":
        return _Op("flatten") if step.attrs.get("axis", 1) == 1 else _Op("other", "Flatten mixing channels")
    if op_type in ("Add", "Sum"):
        return _Op("add")
    if op_type == "Concat":
        return _Op("cat")
    return _Op("other", op_type)


# ---- pairs from an op list -----------------------------------------------------------------------------


def _pairs_from_ops(ops: list[_Op], root: nn.Module, graph: ChannelGraph) -> None:
    calls: dict[str, int] = {}
    for op in ops:
        if op.kind == "layer":
            calls[op.name] = calls.get(op.name, 0) + 1
    for op in ops:
        if op.kind != "layer" or op.name in graph.layers:
            continue
        graph.layers.append(op.name)
        if calls[op.name] > 1:
            graph.unpaired[op.name] = "called more than once (shared weights)"
            continue
        found = _pair_of(op, ops, root)
        if isinstance(found, str):
            graph.unpaired[op.name] = found
        else:
            graph.pairs[op.name] = found


def _pair_of(op: _Op, ops: list[_Op], root: nn.Module) -> ChannelPair | str:
    producer = root.get_submodule(op.name)
    if isinstance(producer, nn.Conv2d) and producer.groups != 1:
        return "grouped/depthwise conv: its output channels are tied to its input channels"
    bn_name, start = None, op
    if len(op.users) == 1 and ops[op.users[0]].kind == "bn":
        start = ops[op.users[0]]
        if root.get_submodule(start.name).running_mean is None:
            return "its BatchNorm has no running statistics"
        bn_name = start.name
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    found = _walk(start, _PathState(), ops, root, (channels, isinstance(producer, nn.Linear)))
    if isinstance(found, str):
        return found
    if not found:
        return "no consumer layer"
    if len({activation for activation, _ in found}) > 1:
        return "different activations on different paths"
    consumers = tuple(consumer for _, consumer in found)
    if len({c.name for c in consumers}) != len(consumers):
        return "a consumer reads the channels twice"
    return ChannelPair(op.name, bn_name, found[0][0], consumers)


def _walk(
    op: _Op, state: _PathState, ops: list[_Op], root: nn.Module, producer: tuple[int, bool]
) -> list[tuple[str, Consumer]] | str:
    found: list[tuple[str, Consumer]] = []
    for user in op.users:
        step = _step(ops[user], state, root, producer)
        if isinstance(step, str):
            return step
        if isinstance(step, Consumer):
            found.append((state.activation, step))
            continue
        deeper = _walk(ops[user], step, ops, root, producer)
        if isinstance(deeper, str):
            return deeper
        found.extend(deeper)
    return found


def _step(user: _Op, state: _PathState, root: nn.Module, producer: tuple[int, bool]) -> Consumer | _PathState | str:
    """What one user does to the channels: ends the path at a consumer, passes them on, or breaks them."""
    if user.kind == "layer":
        return _consumer(user.name, root.get_submodule(user.name), state, *producer)
    if user.kind == "act":
        if state.activation != "identity":
            return "two activations on the path"
        return _PathState(user.name, state.mean_preserving, state.flattened)
    if user.kind == "mean":
        return state
    if user.kind == "max":
        return _PathState(state.activation, False, state.flattened)
    if user.kind == "flatten" and not producer[1]:
        return _PathState(state.activation, state.mean_preserving, True)
    return {
        "output": "its output leaves the traced scope (model output or untraceable parent)",
        "add": "feeds a residual add (channels coupled with the skip path)",
        "cat": "feeds a concatenation (channel indices shared with other tensors)",
        "bn": "feeds a BatchNorm that is not directly after it",
        "flatten": "feeds a flatten of a Linear output",
    }.get(user.kind, f"feeds an unsupported op ({user.name})")


def _consumer(name: str, module: nn.Module, state: _PathState, channels: int, linear_producer: bool) -> Consumer | str:
    if isinstance(module, nn.Linear):
        if not (state.flattened or linear_producer):
            return f"a Linear ({name}) reads a feature map without a flatten"
        if module.in_features % channels:
            return f"{name} has {module.in_features} inputs, not a multiple of {channels} channels"
        return Consumer(name, module.in_features // channels, state.mean_preserving)
    if linear_producer or state.flattened:
        return f"a conv ({name}) reads a flattened or Linear output"
    if module.groups != 1:
        return f"feeds a grouped/depthwise conv ({name})"
    if module.in_channels != channels:
        return f"{name} expects {module.in_channels} input channels, the producer gives {channels}"
    return Consumer(name, 1, state.mean_preserving)


# ---- physical channel removal ----------------------------------------------------------------------


def keep_output_channels(layer: WeightLayer, keep: torch.Tensor) -> None:
    """Shrink `layer` in place to the output channels `keep` (sorted indices)."""
    layer.weight = nn.Parameter(layer.weight.detach()[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[keep].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)


def keep_input_channels(layer: WeightLayer, keep: torch.Tensor, block: int = 1) -> None:
    """Shrink `layer` in place to the input channels `keep`; a Linear reads `block` columns per channel."""
    if isinstance(layer, nn.Linear):
        columns = (keep[:, None] * block + torch.arange(block)).reshape(-1)
        layer.weight = nn.Parameter(layer.weight.detach()[:, columns].clone())
        layer.in_features = len(columns)
        return
    layer.weight = nn.Parameter(layer.weight.detach()[:, keep].clone())
    layer.in_channels = len(keep)


def keep_bn_channels(bn: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> None:
    """Shrink a BatchNorm in place to the channels `keep`."""
    if bn.weight is not None:
        bn.weight = nn.Parameter(bn.weight.detach()[keep].clone())
        bn.bias = nn.Parameter(bn.bias.detach()[keep].clone())
    bn.running_mean = bn.running_mean[keep].clone()
    bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)


def input_slices(weight: torch.Tensor, block: int = 1) -> torch.Tensor:
    """A consumer weight viewed as [out, in_channels, rest]: slice [:, i] is what input channel i meets."""
    if weight.dim() == 2:
        return weight.reshape(weight.shape[0], -1, block)
    return weight.reshape(weight.shape[0], weight.shape[1], -1)
