"""Torch implementations of the ONNX operators the converter interprets (weight layers aside).

Each function takes (inputs, attrs, ctx): inputs are tensors (None for an omitted optional input),
attrs the node's attributes, ctx the model's default-domain opset and the node's output count (an
operator's attributes and inputs changed across opsets: Softmax's axis at 13, Pad's pads at 11,
Slice's starts/ends at 10, ...). It returns the list of output tensors. Shape-like inputs are read
with `.tolist()`: the converted module runs eagerly. Node variants these functions cannot run are
refused at load time by `compression.io.onnx_checks`.
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


def _opt(inputs: Inputs, position: int) -> torch.Tensor | None:
    return inputs[position] if len(inputs) > position else None


def _ints(tensor: torch.Tensor | None) -> list[int]:
    return [] if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
    return [torch.full(_ints(inputs[0]), value.reshape(-1)[0].item(), dtype=value.dtype)]


def _reshape(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data = inputs[0]
    shape = list(attrs.get("shape", [])) if ctx.opset < 5 else _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [data.shape[i] if dim == 0 else dim for i, dim in enumerate(shape)]
    return [data.reshape(shape)]


def _flatten(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data, axis = inputs[0], attrs.get("axis", 1)
    axis = axis % data.dim() if data.dim() and axis < 0 else axis
    return [data.reshape(math.prod(data.shape[:axis]), math.prod(data.shape[axis:]))]


def _axes(inputs: Inputs, attrs: dict[str, Any], position: int) -> list[int] | None:
    if _opt(inputs, position) is not None:
        return _ints(inputs[position])
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
        starts, ends, axes, steps = _ints(inputs[1]), _ints(inputs[2]), _ints(_opt(inputs, 3)), _ints(_opt(inputs, 4))
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
    data, shape = inputs[0], _ints(inputs[1])
    target = torch.broadcast_shapes(tuple(data.shape), tuple(shape))
    return [data.expand(target)]


def cast_target(attrs: dict[str, Any]) -> int:
    """Cast's `to` as a TensorProto data type (before opset 6 it was the type's name)."""
    to = attrs["to"]
    return TensorProto.DataType.Value(_text(to)) if isinstance(to, (bytes, str)) else int(to)


def _cast(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    return [inputs[0].to(ONNX_TO_TORCH_DTYPE[cast_target(attrs)])]


def _split(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data, axis = inputs[0], attrs.get("axis", 0)
    sizes = _ints(_opt(inputs, 1)) or list(attrs.get("split", []))
    if not sizes:
        chunk = -(-data.shape[axis] // ctx.outputs)
        sizes = [min(chunk, data.shape[axis] - i * chunk) for i in range(ctx.outputs)]
    return list(torch.split(data, sizes, dim=axis))


def _pad_index(size: int, begin: int, end: int, mode: str) -> torch.Tensor:
    """Source index of every output position along one axis for the edge / reflect / wrap modes."""
    index = torch.arange(-begin, size + end, dtype=torch.int64)
    if mode == "edge":
        return index.clamp(0, size - 1)
    if mode == "wrap":
        return index % size
    period = max(2 * (size - 1), 1)
    folded = index % period
    return torch.where(folded > size - 1, period - folded, folded)


def _pad_arguments(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> tuple[list[int], Any, list[int]]:
    """(pads, constant value, axes): attributes before opset 11, inputs from then on (axes from 18)."""
    rank = inputs[0].dim()
    if ctx.opset < 11:
        pads, value, axes = list(attrs.get("pads", [])), attrs.get("value", 0.0), []
    else:
        pads, fill, axes = _ints(_opt(inputs, 1)), _opt(inputs, 2), _ints(_opt(inputs, 3))
        value = fill.reshape(-1)[0].item() if fill is not None and fill.numel() else 0
    axes = [a % rank for a in axes] if axes else list(range(rank))
    if len(pads) != 2 * len(axes):
        raise ValueError(f"Pad: {len(pads)} pads for {len(axes)} axes (expected {2 * len(axes)})")
    return pads, value, axes


def _pad(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data = inputs[0]
    pads, value, axes = _pad_arguments(inputs, attrs, ctx)
    begin, end = dict(zip(axes, pads[: len(axes)], strict=True)), dict(zip(axes, pads[len(axes) :], strict=True))
    mode = _text(attrs.get("mode", "constant"))
    if mode == "constant":
        flat = [p for axis in reversed(range(data.dim())) for p in (begin.get(axis, 0), end.get(axis, 0))]
        return [F.pad(data, flat, value=value)]
    for axis in axes:
        data = data.index_select(axis, _pad_index(data.shape[axis], begin[axis], end[axis], mode))
    return [data]


def spatial_pads(
    attrs: dict[str, Any], in_shape: tuple[int, ...] | list[int], kernel: list[int], strides: list[int]
) -> tuple[list[int], list[int]]:
    """(begin, end) padding per spatial axis for Conv / pooling: explicit `pads`, or auto_pad SAME_*."""
    spatial = len(kernel)
    auto_pad = _text(attrs.get("auto_pad", "NOTSET"))
    if auto_pad == "VALID":
        return [0] * spatial, [0] * spatial
    if auto_pad == "NOTSET":
        pads = list(attrs.get("pads", [0] * (2 * spatial)))
        return pads[:spatial], pads[spatial:]
    dilations = list(attrs.get("dilations", [1] * spatial))
    begin, end = [], []
    for size, k, s, d in zip(in_shape, kernel, strides, dilations, strict=True):
        total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin, end


def torch_pad_list(begin: list[int], end: list[int]) -> list[int]:
    """Per-axis (begin, end) -> F.pad's flat list, last axis first."""
    return [p for pair in zip(reversed(begin), reversed(end), strict=True) for p in pair]


def _native_padding(begin: list[int], end: list[int], kernel: list[int], dilations: list[int]) -> bool:
    """Whether torch's symmetric pool padding can express (begin, end): equal and at most half a kernel."""
    return begin == end and all(2 * p <= (k - 1) * d + 1 for p, k, d in zip(begin, kernel, dilations, strict=True))


def _pool(kind: str) -> OpFn:
    def run(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
        data = inputs[0]
        spatial = data.dim() - 2
        kernel = list(attrs["kernel_shape"])
        strides = list(attrs.get("strides", [1] * spatial))
        dilations = list(attrs.get("dilations", [1] * spatial))
        begin, end = spatial_pads(attrs, data.shape[2:], kernel, strides)
        ceil = bool(attrs.get("ceil_mode", 0))
        native = _native_padding(begin, end, kernel, dilations)
        if kind == "max":
            padded = data if native else F.pad(data, torch_pad_list(begin, end), value=-math.inf)
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            pooled, index = fn(padded, kernel, strides, begin if native else 0, dilations, ceil, return_indices=True)
            if ctx.outputs == 1:
                return [pooled]
            offsets = [0] * spatial if native else begin
            column_major = bool(attrs.get("storage_order", 0))
            return [pooled, _onnx_pool_indices(index, data.shape, padded.shape, offsets, column_major)]
        include = bool(attrs.get("count_include_pad", 0))
        if any(d != 1 for d in dilations):
            return [_dilated_average_pool(data, kernel, strides, dilations, (begin, end), ceil, include)]
        return [_average_pool(data, kernel, strides, (begin, end), ceil, include)]

    return run


def _average_pool(
    data: torch.Tensor, kernel: list[int], strides: list[int], pads: tuple[list[int], list[int]], ceil: bool,
    include_pad: bool,
) -> torch.Tensor:  # fmt: skip
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[data.dim() - 2]
    begin, end = pads
    if _native_padding(begin, end, kernel, [1] * len(kernel)):
        return fn(data, kernel, strides, begin, ceil_mode=ceil, count_include_pad=include_pad)
    # Uneven or wide padding: pad explicitly and divide by the pooled count of the cells that count
    flat = torch_pad_list(begin, end)
    padded = F.pad(data, flat)
    counted = F.pad(torch.ones_like(data[:1, :1]), flat, value=1.0 if include_pad else 0.0)
    return fn(padded, kernel, strides, ceil_mode=ceil) / fn(counted, kernel, strides, ceil_mode=ceil)


def _onnx_pool_indices(
    index: torch.Tensor, shape: torch.Size, padded_shape: torch.Size, begin: list[int], column_major: bool
) -> torch.Tensor:  # fmt: skip
    """torch's per-plane argmax positions (in the padded plane) -> ONNX's index into the whole input
    (row-major, or column-major within each plane for storage_order=1)."""
    plane, padded_plane = list(shape[2:]), list(padded_shape[2:])
    flat, remainder = torch.zeros_like(index), index
    for axis in reversed(range(len(plane))):  # unravel in the padded plane, ravel in the input's
        position = remainder % padded_plane[axis] - begin[axis]
        remainder = remainder // padded_plane[axis]
        stride = math.prod(plane[:axis]) if column_major else math.prod(plane[axis + 1 :])
        flat = flat + position * stride
    planes = torch.arange(shape[0] * shape[1], dtype=torch.int64).reshape(shape[0], shape[1], *[1] * len(plane))
    return flat + planes * math.prod(plane)


def _ceil_extra(size: int, window: int, stride: int, begin: int, end: int) -> int:
    """Cells past the end padding that ceil_mode's last window reads (it must start inside input or begin pad)."""
    total = size + begin + end
    count = -(-(total - window) // stride) + 1
    if (count - 1) * stride >= size + begin:
        count -= 1
    return max(0, (count - 1) * stride + window - total)


def _dilated_average_pool(
    data: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int],
    pads: tuple[list[int], list[int]], ceil: bool, include_pad: bool,
) -> torch.Tensor:  # fmt: skip
    """torch's avg_pool has no dilation: sum with a dilated all-ones kernel, divide by the counted cells."""
    spatial, (begin, end) = len(kernel), pads
    windows = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    extra = [
        _ceil_extra(*args) if ceil else 0 for args in zip(data.shape[2:], windows, strides, begin, end, strict=True)
    ]
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    ones = torch.ones(1, 1, *kernel, dtype=data.dtype)
    flat = data.reshape(-1, 1, *data.shape[2:])
    padded = F.pad(F.pad(flat, torch_pad_list(begin, end)), torch_pad_list([0] * spatial, extra))
    counted = F.pad(torch.ones_like(flat[:1]), torch_pad_list(begin, end), value=1.0 if include_pad else 0.0)
    counted = F.pad(counted, torch_pad_list([0] * spatial, extra))
    sums = fn(padded, ones, None, strides, 0, dilations)
    out = sums / fn(counted, ones, None, strides, 0, dilations)
    return out.reshape(*data.shape[:2], *out.shape[2:])


def conv(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    x, weight, bias = inputs[0], inputs[1], _opt(inputs, 2)
    spatial = weight.dim() - 2
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    begin, end = spatial_pads(attrs, x.shape[2:], list(weight.shape[2:]), strides)
    if begin != end:
        x, begin = F.pad(x, torch_pad_list(begin, end)), [0] * spatial
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return [fn(x, weight, bias, strides, begin, dilations, attrs.get("group", 1))]


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
    scales = inputs[1] if _opt(inputs, 1) is not None else torch.tensor(list(attrs["scales"]))
    mode = "linear" if _text(attrs.get("mode", "nearest")) in ("linear", "bilinear") else "nearest"
    return resize([inputs[0], scales], {"mode": mode}, OpContext(opset=10))


def _gelu(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    return [F.gelu(inputs[0], approximate=_text(attrs.get("approximate", "none")))]


def _clip(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    if ctx.opset < 11:  # min / max were attributes
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low, high = _opt(inputs, 1), _opt(inputs, 2)
    if low is None and high is None:
        return [inputs[0]]
    return [torch.clamp(inputs[0], min=low, max=high)]


def _dropout(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    mask = [torch.ones_like(inputs[0], dtype=torch.bool)] if ctx.outputs > 1 else []
    return [inputs[0], *mask]


def _layer_norm(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data, axis, eps = inputs[0], attrs.get("axis", -1) % inputs[0].dim(), attrs.get("epsilon", 1e-5)
    out = F.layer_norm(data, tuple(data.shape[axis:]), inputs[1], _opt(inputs, 2), eps)
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
    if _opt(inputs, 2) is not None:
        out = out + attrs.get("beta", 1.0) * inputs[2]
    return [out]


def _where(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


def _range(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


def _tile(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    return [inputs[0].repeat(_ints(inputs[1]))]


def _trilu(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    k = int(inputs[1].item()) if _opt(inputs, 1) is not None else 0
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
    "Pad": _pad,
    "Resize": resize,
    "Upsample": _upsample,
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("amax"),
    "ReduceMin": _reduce("amin"),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda i, a, c: [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda i, a, c: [i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "LayerNormalization": _layer_norm,
}
SUPPORTED_OPS = frozenset(OPS)
