"""ONNX Resize (opset 10 onwards) in torch, one axis at a time: every coordinate transformation mode
but tf_crop_and_resize, nearest (all four rounding modes), linear and cubic (cubic_coeff_a,
exclude_outside). Antialiasing, tf_crop_and_resize and keep_aspect_ratio_policy other than stretch
are refused at load by `compression.io.onnx_checks`.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _source_coordinates(out_size: int, in_size: int, scale: float, mode: str) -> torch.Tensor:
    """Coordinate in the input of every output position along one axis (ONNX's transformation modes)."""
    x = torch.arange(out_size, dtype=torch.float64)
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":  # the resized length is in_size * scale before flooring, as ONNX defines it
        return torch.zeros_like(x) if out_size == 1 else x * (in_size - 1) / (in_size * scale - 1)
    if mode == "pytorch_half_pixel" and out_size == 1:
        return torch.zeros_like(x)
    if mode == "half_pixel_symmetric":
        adjustment = out_size / (scale * in_size)
        offset = in_size / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    return (x + 0.5) / scale - 0.5  # half_pixel, pytorch_half_pixel


def _nearest_index(coordinates: torch.Tensor, rounding: str, in_size: int) -> torch.Tensor:
    rounded = {
        "round_prefer_floor": torch.ceil(coordinates - 0.5),
        "round_prefer_ceil": torch.floor(coordinates + 0.5),
        "floor": torch.floor(coordinates),
        "ceil": torch.ceil(coordinates),
    }[rounding]
    return rounded.clamp(0, in_size - 1).long()


def _cubic_weights(t: torch.Tensor, a: float) -> torch.Tensor:
    """[positions, 4] weights of the taps at floor(x) - 1 .. floor(x) + 2 (Keys' cubic with parameter a)."""
    distances = torch.stack([t + 1, t, 1 - t, 2 - t], dim=1)
    near = ((a + 2) * distances - (a + 3)) * distances * distances + 1
    far = ((a * distances - 5 * a) * distances + 8 * a) * distances - 4 * a
    return torch.where(distances <= 1, near, far)


def _taps(
    coordinates: torch.Tensor, mode: str, attrs: dict[str, Any], in_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([positions, taps] source indices clamped to the edge, [positions, taps] weights)."""
    base = torch.floor(coordinates)
    t = coordinates - base
    if mode == "linear":
        offsets, weights = torch.tensor([0, 1]), torch.stack([1 - t, t], dim=1)
    else:
        offsets, weights = torch.tensor([-1, 0, 1, 2]), _cubic_weights(t, attrs.get("cubic_coeff_a", -0.75))
    raw = base.long().unsqueeze(1) + offsets
    if mode == "cubic" and attrs.get("exclude_outside", 0):
        weights = torch.where((raw < 0) | (raw >= in_size), torch.zeros_like(weights), weights)
        weights = weights / weights.sum(dim=1, keepdim=True)
    return raw.clamp(0, in_size - 1), weights


def _resize_axis(data: torch.Tensor, axis: int, out_size: int, scale: float, attrs: dict[str, Any]) -> torch.Tensor:
    in_size = data.shape[axis]
    mode = _text(attrs.get("mode", "nearest"))
    coordinates = _source_coordinates(
        out_size, in_size, scale, _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    )
    if mode == "nearest":
        index = _nearest_index(coordinates, _text(attrs.get("nearest_mode", "round_prefer_floor")), in_size)
        return data.index_select(axis, index)
    index, weights = _taps(coordinates, mode, attrs, in_size)
    gathered = data.index_select(axis, index.reshape(-1))
    shape = [*data.shape[:axis], out_size, index.shape[1], *data.shape[axis + 1 :]]
    weight_shape = [1] * axis + [out_size, index.shape[1]] + [1] * (data.dim() - axis - 1)
    combined = (gathered.reshape(shape).double() * weights.reshape(weight_shape)).sum(dim=axis + 1)
    return combined.to(data.dtype)


def _targets(data: torch.Tensor, inputs: list[Any], attrs: dict[str, Any], opset: int) -> list[tuple[int, int, float]]:
    """(axis, output size, scale) for every resized axis, from `scales` or `sizes`."""
    scales = inputs[1] if opset < 11 else (inputs[2] if len(inputs) > 2 else None)
    sizes = inputs[3] if opset >= 11 and len(inputs) > 3 else None
    axes = [a % data.dim() for a in attrs.get("axes", range(data.dim()))]
    if sizes is not None and sizes.numel():
        wanted = [int(v) for v in sizes.reshape(-1).tolist()]
        return [(a, n, n / data.shape[a]) for a, n in zip(axes, wanted, strict=True)]
    factors = [float(v) for v in scales.reshape(-1).tolist()]
    return [(a, math.floor(data.shape[a] * s), s) for a, s in zip(axes, factors, strict=True)]


def resize(inputs: list[Any], attrs: dict[str, Any], ctx: Any) -> list[torch.Tensor]:
    data = inputs[0]
    if ctx.opset < 11:  # Resize-10 had no such attributes: asymmetric coordinates, nearest rounds down
        attrs = {**attrs, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    for axis, out_size, scale in _targets(data, inputs, attrs, ctx.opset):
        if out_size != data.shape[axis] or scale != 1.0:
            data = _resize_axis(data, axis, out_size, scale, attrs)
    return [data]
