"""Torch implementations of the ONNX operators the converter interprets (weight layers aside).

Each function takes (inputs, attrs) where inputs are tensors (None for an omitted optional input)
and returns a list of output tensors. Shape-like inputs are read with `.tolist()`: the converted
module runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

OpFn = Callable[[list[torch.Tensor | None], dict[str, Any]], list[torch.Tensor]]

ONNX_TO_TORCH_DTYPE: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}


def tensor_from_proto(proto: TensorProto) -> torch.Tensor:
    return torch.from_numpy(numpy_helper.to_array(proto).copy())


def _ints(tensor: torch.Tensor | None) -> list[int]:
    return [] if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda inputs, attrs: [fn(inputs[0])]


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda inputs, attrs: [fn(inputs[0], inputs[1])]


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    def run(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
        result = inputs[0]
        for other in inputs[1:]:
            result = fn(result, other)
        return [result]

    return run


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _constant(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    if "value" in attrs:
        return [tensor_from_proto(attrs["value"])]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in attrs:
            return [torch.tensor(attrs[key], dtype=dtype)]
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return [torch.tensor(list(attrs[key]), dtype=dtype)]
    raise ValueError(f"unsupported Constant attributes {sorted(attrs)}")


def _constant_of_shape(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    value = tensor_from_proto(attrs["value"]) if "value" in attrs else torch.zeros(1)
    return [torch.full(_ints(inputs[0]), value.reshape(-1)[0].item(), dtype=value.dtype)]


def _reshape(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    data, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [data.shape[i] if dim == 0 else dim for i, dim in enumerate(shape)]
    return [data.reshape(shape)]


def _flatten(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    data, axis = inputs[0], attrs.get("axis", 1)
    axis = axis % data.dim() if data.dim() else 0
    lead = int(torch.tensor(data.shape[:axis]).prod().item()) if axis else 1
    return [data.reshape(lead, -1)]


def _axes(inputs: list[torch.Tensor | None], attrs: dict[str, Any], position: int) -> list[int] | None:
    if len(inputs) > position and inputs[position] is not None:
        return _ints(inputs[position])
    return list(attrs["axes"]) if "axes" in attrs else None


def _squeeze(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    axes = _axes(inputs, attrs, 1)
    data = inputs[0]
    if axes is None:
        return [data.squeeze()]
    return [data.squeeze(tuple(a % data.dim() for a in axes))]


def _unsqueeze(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    data, axes = inputs[0], _axes(inputs, attrs, 1) or []
    rank = data.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        data = data.unsqueeze(axis)
    return [data]


def _reduce(fn: str) -> OpFn:
    def run(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
        data, axes = inputs[0], _axes(inputs, attrs, 1)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [data]
            axes = list(range(data.dim()))
        dims = tuple(a % data.dim() for a in axes)
        return [getattr(torch, fn)(data, dim=dims, keepdim=keep)]

    return run


def _slice(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    data = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        size = data.shape[axis]
        if step < 0:
            data = data.flip(axis)
            start, end = size - 1 - max(min(start, size - 1), -size - 1), size - 1 - max(end, -size - 1)
            step = -step
        index[axis % data.dim()] = slice(max(min(start, size), -size), max(min(end, size), -size), step)
    return [data[tuple(index)]]


def _gather(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    data, indices, axis = inputs[0], inputs[1].long(), attrs.get("axis", 0) % inputs[0].dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    flat = torch.index_select(data, axis, indices.reshape(-1))
    shape = list(data.shape[:axis]) + list(indices.shape) + list(data.shape[axis + 1 :])
    return [flat.reshape(shape)]


def _shape(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    shape = torch.tensor(list(inputs[0].shape), dtype=torch.int64)
    start, end = attrs.get("start", 0), attrs.get("end")
    return [shape[start:end]]


def _expand(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    data, shape = inputs[0], _ints(inputs[1])
    target = torch.broadcast_shapes(tuple(data.shape), tuple(shape))
    return [data.expand(target)]


def _cast(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    return [inputs[0].to(ONNX_TO_TORCH_DTYPE[attrs["to"]])]


def _split(inputs: list[torch.Tensor | None], attrs: dict[str, Any], outputs: int) -> list[torch.Tensor]:
    data, axis = inputs[0], attrs.get("axis", 0)
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else list(attrs.get("split", []))
    if not sizes:
        chunk = -(-data.shape[axis] // outputs)
        sizes = [min(chunk, data.shape[axis] - i * chunk) for i in range(outputs)]
    return list(torch.split(data, sizes, dim=axis))


def _pad(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    data, pads = inputs[0], _ints(inputs[1]) if len(inputs) > 1 else list(attrs.get("pads", []))
    value = float(inputs[2].item()) if len(inputs) > 2 and inputs[2] is not None else 0.0
    rank = data.dim()
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(rank))
    torch_pads: list[int] = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        axis %= rank
        torch_pads[2 * (rank - 1 - axis)] = pads[i]
        torch_pads[2 * (rank - 1 - axis) + 1] = pads[i + len(axes)]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[attrs.get("mode", b"constant").decode()]
    return [F.pad(data, torch_pads, mode=mode, value=value) if mode == "constant" else F.pad(data, torch_pads, mode)]


def _pool_padding(attrs: dict[str, Any], spatial: int) -> tuple[list[int], list[int]]:
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    return pads[:spatial], pads[spatial:]


def _pool(kind: str) -> OpFn:
    def run(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
        data = inputs[0]
        spatial = data.dim() - 2
        kernel = list(attrs["kernel_shape"])
        strides = list(attrs.get("strides", [1] * spatial))
        begin, end = _pool_padding(attrs, spatial)
        ceil = bool(attrs.get("ceil_mode", 0))
        if begin != end:
            flat = [p for pair in zip(reversed(begin), reversed(end), strict=True) for p in pair]
            fill = float("-inf") if kind == "max" else 0.0
            data, begin = F.pad(data, flat, value=fill), [0] * spatial
        if kind == "max":
            dilations = list(attrs.get("dilations", [1] * spatial))
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return [fn(data, kernel, strides, begin, dilations, ceil_mode=ceil)]
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        include = bool(attrs.get("count_include_pad", 0))
        return [fn(data, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include)]

    return run


def _softmax(fn: Callable[..., torch.Tensor]) -> OpFn:
    return lambda inputs, attrs: [fn(inputs[0], dim=attrs.get("axis", -1))]


def _gelu(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    approximate = attrs.get("approximate", b"none")
    return [F.gelu(inputs[0], approximate=approximate.decode() if isinstance(approximate, bytes) else approximate)]


def _clip(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    return [torch.clamp(inputs[0], min=low, max=high)]


def _layer_norm(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    data, axis = inputs[0], attrs.get("axis", -1) % inputs[0].dim()
    shape = tuple(data.shape[axis:])
    return [F.layer_norm(data, shape, inputs[1], inputs[2] if len(inputs) > 2 else None, attrs.get("epsilon", 1e-5))]


def _gemm(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    a, b = inputs[0], inputs[1]
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        out = out + attrs.get("beta", 1.0) * inputs[2]
    return [out]


def _where(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


def _range(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


def _tile(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    return [inputs[0].repeat(_ints(inputs[1]))]


def _trilu(inputs: list[torch.Tensor | None], attrs: dict[str, Any]) -> list[torch.Tensor]:
    k = int(inputs[1].item()) if len(inputs) > 1 and inputs[1] is not None else 0
    return [torch.triu(inputs[0], k) if attrs.get("upper", 1) else torch.tril(inputs[0], k)]


OPS: dict[str, OpFn] = {
    "Identity": _unary(lambda x: x),
    "Dropout": lambda inputs, attrs: [inputs[0]],
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Not": _unary(torch.logical_not),
    "Softplus": _unary(F.softplus),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": lambda i, a: [torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1)],
    "LeakyRelu": lambda i, a: [F.leaky_relu(i[0], a.get("alpha", 0.01))],
    "Elu": lambda i, a: [F.elu(i[0], a.get("alpha", 1.0))],
    "Gelu": _gelu,
    "Clip": _clip,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(torch.pow),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Where": _where,
    "MatMul": _binary(torch.matmul),
    "Gemm": _gemm,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": lambda i, a: [
        i[0].permute(*a["perm"]) if "perm" in a else i[0].permute(*range(i[0].dim() - 1, -1, -1))
    ],
    "Concat": lambda i, a: [torch.cat([t for t in i if t is not None], dim=a["axis"])],
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": _shape,
    "Size": lambda i, a: [torch.tensor(i[0].numel(), dtype=torch.int64)],
    "Gather": _gather,
    "Slice": _slice,
    "Expand": _expand,
    "Cast": _cast,
    "CastLike": lambda i, a: [i[0].to(i[1].dtype)],
    "Range": _range,
    "Tile": _tile,
    "Trilu": _trilu,
    "Pad": _pad,
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("amax"),
    "ReduceMin": _reduce("amin"),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda i, a: [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda i, a: [i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "LayerNormalization": _layer_norm,
}
MULTI_OUTPUT_OPS = {"Split"}
SUPPORTED_OPS = frozenset(OPS) | MULTI_OUTPUT_OPS | {"Conv", "BatchNormalization"}


def run_split(inputs: list[torch.Tensor | None], attrs: dict[str, Any], outputs: int) -> list[torch.Tensor]:
    return _split(inputs, attrs, outputs)
