"""Torch implementations of the ONNX operators the converter interprets (weight layers aside).

Each function takes (inputs, attrs, ctx): inputs are tensors (None for an omitted optional input),
attrs the node's attributes, ctx the model's default-domain opset and the node's output count (an
operator's attributes and inputs changed across opsets: Softmax's axis at 13, Pad's pads at 11,
Slice's starts/ends at 10, ...). It returns the list of output tensors. Shape-like inputs are read
with `.tolist()`: the converted module runs eagerly. Node variants these functions cannot run are
refused at load time by `compression.io.onnx_checks`. Pad, pooling and Conv live in
`compression.io.onnx_spatial`, Resize in `compression.io.onnx_resize`; `OPS` maps every op type.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

from compression.io.onnx_resize import resize
from compression.io.onnx_spatial import attr_text, conv, int_list, optional_input, pad, pool


@dataclass(frozen=True)
class OpContext:
    """What an op needs beyond its inputs and attributes: the opset and how many outputs the node has."""

    opset: int
    outputs: int = 1


Inputs = list[torch.Tensor | None]
OpFn = Callable[[Inputs, dict[str, Any], OpContext], list[torch.Tensor]]

ONNX_TO_TORCH_DTYPE: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.UINT8: torch.uint8,
    TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}
# torch has these dtypes but few kernels for them: arithmetic and comparisons run in int64
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def tensor_from_array(array: np.ndarray) -> torch.Tensor:
    """numpy (ml_dtypes bfloat16 included, which torch.from_numpy refuses) -> torch."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def tensor_from_proto(proto: TensorProto) -> torch.Tensor:
    return tensor_from_array(numpy_helper.to_array(proto))


def _to_int64(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == torch.uint64 and bool((tensor.view(torch.int64) < 0).any()):
        raise ValueError("uint64 values of 2**63 and above are not supported")
    return tensor.to(torch.int64)


def _int64_for_unsigned(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*tensors: torch.Tensor) -> torch.Tensor:
        if tensors[0].dtype not in _WIDE_UNSIGNED:
            return fn(*tensors)
        out = fn(*(_to_int64(t) for t in tensors))
        return out if out.dtype == torch.bool else out.to(tensors[0].dtype)

    return run


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda inputs, attrs, ctx: [fn(inputs[0])]


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    wide = _int64_for_unsigned(fn)
    return lambda inputs, attrs, ctx: [wide(inputs[0], inputs[1])]


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    wide = _int64_for_unsigned(fn)

    def run(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
        result = inputs[0]
        for other in inputs[1:]:
            result = wide(result, other)
        return [result]

    return run


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.pow(a, b).to(a.dtype)  # ONNX: the result has the base's type


def _constant(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    if "value" in attrs:
        return [tensor_from_proto(attrs["value"])]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in attrs:
            return [torch.tensor(attrs[key], dtype=dtype)]
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return [torch.tensor(list(attrs[key]), dtype=dtype)]
    raise ValueError(f"unsupported Constant attributes {sorted(attrs)}")


def _constant_of_shape(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    value = tensor_from_proto(attrs["value"]) if "value" in attrs else torch.zeros(1)
    return [torch.full(int_list(inputs[0]), value.reshape(-1)[0].item(), dtype=value.dtype)]


def _reshape(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data = inputs[0]
    shape = list(attrs.get("shape", [])) if ctx.opset < 5 else int_list(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [data.shape[i] if dim == 0 else dim for i, dim in enumerate(shape)]
    return [data.reshape(shape)]


def _flatten(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data, axis = inputs[0], attrs.get("axis", 1)
    axis = axis % data.dim() if data.dim() and axis < 0 else axis
    return [data.reshape(math.prod(data.shape[:axis]), math.prod(data.shape[axis:]))]


def _axes(inputs: Inputs, attrs: dict[str, Any], position: int) -> list[int] | None:
    if optional_input(inputs, position) is not None:
        return int_list(inputs[position])
    return list(attrs["axes"]) if "axes" in attrs else None


def _squeeze(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    axes = _axes(inputs, attrs, 1)
    data = inputs[0]
    if axes is None:
        return [data.squeeze()]
    return [data.squeeze(tuple(a % data.dim() for a in axes))]


def _unsqueeze(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data, axes = inputs[0], _axes(inputs, attrs, 1) or []
    rank = data.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        data = data.unsqueeze(axis)
    return [data]


_EMPTY_REDUCTION = {"amax": "min", "amin": "max"}  # the identity element of an empty max / min


def _empty_reduction(data: torch.Tensor, fn: str, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    shape = [1 if i in dims else n for i, n in enumerate(data.shape)] if keep else [
        n for i, n in enumerate(data.shape) if i not in dims
    ]  # fmt: skip
    if data.dtype == torch.bool:
        return torch.full(shape, fn == "amin", dtype=torch.bool)
    info = torch.finfo(data.dtype) if data.is_floating_point() else torch.iinfo(data.dtype)
    extreme = getattr(info, _EMPTY_REDUCTION[fn])
    value = (-math.inf if fn == "amax" else math.inf) if data.is_floating_point() else extreme
    return torch.full(shape, value, dtype=data.dtype)


def _reduce(fn: str) -> OpFn:
    def run(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
        data, axes = inputs[0], _axes(inputs, attrs, 1)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [data]
            axes = list(range(data.dim()))
        dims = tuple(sorted(a % data.dim() for a in axes))
        if fn in _EMPTY_REDUCTION and any(data.shape[d] == 0 for d in dims):
            return [_empty_reduction(data, fn, dims, keep)]
        return [getattr(torch, fn)(data, dim=dims, keepdim=keep)]

    return run


def _slice_axis(data: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    size = data.shape[axis]
    start, end = start + size if start < 0 else start, end + size if end < 0 else end
    if step > 0:
        index: list[slice] = [slice(None)] * data.dim()
        index[axis] = slice(min(max(start, 0), size), min(max(end, 0), size), step)
        return data[tuple(index)]
    start, end = min(max(start, -1), size - 1), min(max(end, -1), size - 1)
    return data.index_select(axis, torch.arange(start, end, step, dtype=torch.int64))


def _slice(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data = inputs[0]
    if ctx.opset < 10:  # starts / ends / axes were attributes, steps did not exist
        starts, ends, axes = list(attrs["starts"]), list(attrs["ends"]), list(attrs.get("axes", []))
        steps = []
    else:
        starts, ends = int_list(inputs[1]), int_list(inputs[2])
        axes, steps = int_list(optional_input(inputs, 3)), int_list(optional_input(inputs, 4))
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        data = _slice_axis(data, axis % data.dim(), start, end, step)
    return [data]


def _gather(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data, indices, axis = inputs[0], inputs[1].long(), attrs.get("axis", 0) % inputs[0].dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    flat = torch.index_select(data, axis, indices.reshape(-1))
    shape = list(data.shape[:axis]) + list(indices.shape) + list(data.shape[axis + 1 :])
    return [flat.reshape(shape)]


def _shape(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    shape = torch.tensor(list(inputs[0].shape), dtype=torch.int64)
    start, end = attrs.get("start", 0), attrs.get("end")
    return [shape[start:end]]


def _expand(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data, shape = inputs[0], int_list(inputs[1])
    target = torch.broadcast_shapes(tuple(data.shape), tuple(shape))
    return [data.expand(target)]


def cast_target(attrs: dict[str, Any]) -> int:
    """Cast's `to` as a TensorProto data type (before opset 6 it was the type's name)."""
    to = attrs["to"]
    return TensorProto.DataType.Value(attr_text(to)) if isinstance(to, (bytes, str)) else int(to)


def _cast(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    return [inputs[0].to(ONNX_TO_TORCH_DTYPE[cast_target(attrs)])]


def _split(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data, axis = inputs[0], attrs.get("axis", 0)
    sizes = int_list(optional_input(inputs, 1)) or list(attrs.get("split", []))
    if not sizes:
        chunk = -(-data.shape[axis] // ctx.outputs)
        sizes = [min(chunk, data.shape[axis] - i * chunk) for i in range(ctx.outputs)]
    return list(torch.split(data, sizes, dim=axis))


def _batch_norm(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    x, scale, bias, mean, var = inputs[:5]
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))]


def _softmax(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
        data = inputs[0]
        if ctx.opset >= 13:
            return [fn(data, dim=attrs.get("axis", -1))]
        # Before opset 13: the input is coerced to 2-D at `axis` (default 1) and normalized per row
        axis = attrs.get("axis", 1) % max(data.dim(), 1)
        rows = data.reshape(math.prod(data.shape[:axis]), -1)
        return [fn(rows, dim=1).reshape(data.shape)]

    return run


def _upsample(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    """Upsample (opsets 7-9, Resize's predecessor): scales an attribute, then an input; asymmetric coordinates."""
    scales = inputs[1] if optional_input(inputs, 1) is not None else torch.tensor(list(attrs["scales"]))
    mode = "linear" if attr_text(attrs.get("mode", "nearest")) in ("linear", "bilinear") else "nearest"
    return resize([inputs[0], scales], {"mode": mode}, OpContext(opset=10))


def _gelu(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    return [F.gelu(inputs[0], approximate=attr_text(attrs.get("approximate", "none")))]


def _clip(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    if ctx.opset < 11:  # min / max were attributes
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low, high = optional_input(inputs, 1), optional_input(inputs, 2)
    if low is None and high is None:
        return [inputs[0]]
    return [torch.clamp(inputs[0], min=low, max=high)]


def _dropout(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    mask = [torch.ones_like(inputs[0], dtype=torch.bool)] if ctx.outputs > 1 else []
    return [inputs[0], *mask]


def _layer_norm(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data, axis, eps = inputs[0], attrs.get("axis", -1) % inputs[0].dim(), attrs.get("epsilon", 1e-5)
    out = F.layer_norm(data, tuple(data.shape[axis:]), inputs[1], optional_input(inputs, 2), eps)
    if ctx.outputs == 1:
        return [out]
    # The optional Mean / InvStdDev outputs, in stash_type (float32 unless it says otherwise)
    stash = ONNX_TO_TORCH_DTYPE[attrs.get("stash_type", TensorProto.FLOAT)]
    values, dims = data.to(stash), tuple(range(axis, data.dim()))
    mean = values.mean(dim=dims, keepdim=True)
    variance = (values - mean).pow(2).mean(dim=dims, keepdim=True)
    return [out, mean, torch.rsqrt(variance + eps)][: ctx.outputs]


def _gemm(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    a, b = inputs[0], inputs[1]
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    if optional_input(inputs, 2) is not None:
        out = out + attrs.get("beta", 1.0) * inputs[2]
    return [out]


def _where(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


def _range(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


def _tile(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    return [inputs[0].repeat(int_list(inputs[1]))]


def _trilu(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    k = int(inputs[1].item()) if optional_input(inputs, 1) is not None else 0
    return [torch.triu(inputs[0], k) if attrs.get("upper", 1) else torch.tril(inputs[0], k)]


def _transpose(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    perm = list(attrs["perm"]) if "perm" in attrs else list(range(inputs[0].dim() - 1, -1, -1))
    return [inputs[0].permute(*perm)]


OPS: dict[str, OpFn] = {
    "Identity": _unary(lambda x: x),
    "Dropout": _dropout,
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
    "HardSigmoid": lambda i, a, c: [torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1)],
    "LeakyRelu": lambda i, a, c: [F.leaky_relu(i[0], a.get("alpha", 0.01))],
    "Elu": lambda i, a, c: [F.elu(i[0], a.get("alpha", 1.0))],
    "Gelu": _gelu,
    "Clip": _clip,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(_pow),
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
    "Conv": conv,
    "BatchNormalization": _batch_norm,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Concat": lambda i, a, c: [torch.cat([t for t in i if t is not None], dim=a["axis"])],
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": _shape,
    "Size": lambda i, a, c: [torch.tensor(i[0].numel(), dtype=torch.int64)],
    "Gather": _gather,
    "Slice": _slice,
    "Split": _split,
    "Expand": _expand,
    "Cast": _cast,
    "CastLike": lambda i, a, c: [i[0].to(i[1].dtype)],
    "Range": _range,
    "Tile": _tile,
    "Trilu": _trilu,
    "Pad": pad,
    "Resize": resize,
    "Upsample": _upsample,
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("amax"),
    "ReduceMin": _reduce("amin"),
    "MaxPool": pool("max"),
    "AveragePool": pool("avg"),
    "GlobalAveragePool": lambda i, a, c: [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda i, a, c: [i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "LayerNormalization": _layer_norm,
}
SUPPORTED_OPS = frozenset(OPS)
