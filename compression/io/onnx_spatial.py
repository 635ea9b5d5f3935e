"""ONNX's spatial operators in torch: Pad (constant, edge, reflect, wrap; attributes before opset 11,
inputs from then on), MaxPool / AveragePool (explicit or SAME_* auto padding, ceil_mode, dilations,
count_include_pad, MaxPool's indices in either storage order) and Conv; with the small attribute and
input readers the other op modules share. Same (inputs, attrs, ctx) convention as `onnx_ops`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from compression.io.onnx_ops import Inputs, OpContext, OpFn


def optional_input(inputs: Inputs, position: int) -> torch.Tensor | None:
    return inputs[position] if len(inputs) > position else None


def int_list(tensor: torch.Tensor | None) -> list[int]:
    return [] if tensor is None else [int(v) for v in tensor.reshape(-1).tolist()]


def attr_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
        pads, fill, axes = (
            int_list(optional_input(inputs, 1)),
            optional_input(inputs, 2),
            int_list(optional_input(inputs, 3)),
        )
        value = fill.reshape(-1)[0].item() if fill is not None and fill.numel() else 0
    axes = [a % rank for a in axes] if axes else list(range(rank))
    if len(pads) != 2 * len(axes):
        raise ValueError(f"Pad: {len(pads)} pads for {len(axes)} axes (expected {2 * len(axes)})")
    return pads, value, axes


def pad(inputs: Inputs, attrs: dict[str, Any], ctx: OpContext) -> list[torch.Tensor]:
    data = inputs[0]
    pads, value, axes = _pad_arguments(inputs, attrs, ctx)
    begin, end = dict(zip(axes, pads[: len(axes)], strict=True)), dict(zip(axes, pads[len(axes) :], strict=True))
    mode = attr_text(attrs.get("mode", "constant"))
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
    auto_pad = attr_text(attrs.get("auto_pad", "NOTSET"))
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


def pool(kind: str) -> OpFn:
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
    x, weight, bias = inputs[0], inputs[1], optional_input(inputs, 2)
    spatial = weight.dim() - 2
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    begin, end = spatial_pads(attrs, x.shape[2:], list(weight.shape[2:]), strides)
    if begin != end:
        x, begin = F.pad(x, torch_pad_list(begin, end)), [0] * spatial
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return [fn(x, weight, bias, strides, begin, dilations, attrs.get("group", 1))]
