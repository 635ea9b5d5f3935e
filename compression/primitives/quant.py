"""Uniform weight quantization on 2-D matrices: W ≈ codes·S + Z per output row and group of input columns.

Conventions shared by every quantizer in the library (and `compression.types.QuantizedLayer`):
- W is `[out, cols]`; a group is `group_size` consecutive input columns (the last one may be shorter);
  `group_size=None` means one group per row (per-channel).
- codes are signed integers in `[-2^(b-1), 2^(b-1)-1]` (int8); S and Z are float `[out, n_groups]`.
- Z is an offset in weight units. `ZeroPoint` says what it may be: "float" a free float offset, "integer"
  Z = -zp·S with an integer zero point zp in the code range (so W = (codes - zp)·S, the form ONNX Runtime's
  prepacked MatMulNBits, GPTQ checkpoints and compressed-tensors store; Z is computed in float32 as
  -(zp·S), so `integer_zero_points` recovers zp exactly), "none" Z = 0 (symmetric).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from compression.types import QuantizedLayer

ZeroPoint = Literal["float", "integer", "none"]


def zero_point_mode(zero_point: ZeroPoint | bool) -> ZeroPoint:
    """The mode of a `zero_point` argument; a bool is the older `symmetric` flag (True: "none", False: "float")."""
    if isinstance(zero_point, bool):
        return "none" if zero_point else "float"
    if zero_point not in ("float", "integer", "none"):
        raise ValueError(f"zero_point must be 'float', 'integer' or 'none', got {zero_point!r}")
    return zero_point


def code_range(bits: int) -> tuple[int, int]:
    """Smallest and largest signed code at `bits` bits."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def num_groups(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(cols / group_size)


def expand_groups(per_group: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """Repeat `[out, n_groups]` values along the columns -> `[out, cols]`."""
    if group_size is None:
        return per_group[:, :1].expand(-1, cols)
    return per_group.repeat_interleave(group_size, dim=1)[:, :cols]


def group_view(matrix: torch.Tensor, group_size: int | None, fill: float = 0.0) -> torch.Tensor:
    """`[out, cols]` -> `[out, n_groups, group]`, padding the last group with `fill`."""
    rows, cols = matrix.shape
    group = group_size or cols
    padded_cols = num_groups(cols, group_size) * group
    if padded_cols != cols:
        pad = matrix.new_full((rows, padded_cols - cols), fill)
        matrix = torch.cat([matrix, pad], dim=1)
    return matrix.reshape(rows, -1, group)


def minmax_params(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    zero_point: ZeroPoint | bool,
    shrink: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, Z) `[out, n_groups]` spanning each group's range, optionally shrunk by `shrink` (broadcastable).

    Asymmetric ("float"): the lowest code maps to min(w) and the highest to max(w).
    "integer": the range is widened to include 0 (as GPTQ's grid does), then Z snapped to -zp·S.
    Symmetric ("none"): Z = 0 and S = 2·max|w| / (2^b - 1), as GPTQ's symmetric grid does.
    """
    mode = zero_point_mode(zero_point)
    lo, hi = code_range(bits)
    grouped = group_view(weight.float(), group_size, fill=float("nan"))
    if mode == "none":
        amax = grouped.abs().nan_to_num(0.0).amax(dim=-1) * shrink
        scale = (2 * amax / (hi - lo)).clamp_min(1e-12)
        return scale, torch.zeros_like(scale)
    wmin = grouped.nan_to_num(float("inf")).amin(dim=-1)
    wmax = grouped.nan_to_num(float("-inf")).amax(dim=-1)
    if mode == "integer":
        wmin, wmax = wmin.clamp_max(0.0), wmax.clamp_min(0.0)
    center, half = (wmax + wmin) / 2, (wmax - wmin) / 2 * shrink
    scale = (2 * half / (hi - lo)).clamp_min(1e-12)
    zeros = center - half - lo * scale
    return snap_zero_points(scale, zeros, bits) if mode == "integer" else (scale, zeros)


def integer_zeros(scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    """Z = -(zp·S) in float32: the one place an integer zero point becomes an offset."""
    return -(zero_points.float() * scales.float())


def snap_zero_points(scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, Z) with Z moved to the nearest -zp·S, zp an integer in the code range (S unchanged, float32)."""
    lo, hi = code_range(bits)
    scales = scales.float()
    zero_points = torch.round(-zeros.double() / scales.double()).nan_to_num(0.0).clamp(lo, hi)
    return scales, integer_zeros(scales, zero_points)


def integer_zero_points(scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor | None:
    """Signed int8 zp `[out, n_groups]` with Z = -(zp·S) exactly (float32) and zp in the code range, else None.
    All-zero Z gives zp = 0 (symmetric layers are integer layers with zp = 0)."""
    lo, hi = code_range(bits)
    zero_points = torch.round(-zeros.double() / scales.double()).nan_to_num(0.0)
    if zero_points.numel() and (zero_points.min() < lo or zero_points.max() > hi):
        return None
    if not torch.equal(integer_zeros(scales, zero_points), zeros.float()):
        return None
    return zero_points.to(torch.int8)


def quantize(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int | None
) -> torch.Tensor:
    """Nearest codes (ties round up) clamped to the signed range; int8 `[out, cols]`."""
    lo, hi = code_range(bits)
    cols = weight.shape[1]
    scale_cols = expand_groups(scales, cols, group_size)
    zero_cols = expand_groups(zeros, cols, group_size)
    codes = torch.floor((weight.float() - zero_cols) / scale_cols + 0.5).clamp_(lo, hi)
    return codes.to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """codes·S + Z as float32 `[out, cols]`: the one dequantization (`QuantizedLayer.dequantize` calls it)."""
    cols = codes.shape[1]
    return codes.float() * expand_groups(scales.float(), cols, group_size) + expand_groups(
        zeros.float(), cols, group_size
    )


def dequantize_layer(layer: QuantizedLayer, device: torch.device | str | None = None) -> torch.Tensor:
    """`layer.dequantize()` as an `[out, in_flat]` matrix computed on `device` (same arithmetic, so the
    same float values; QuantizedLayer keeps its tensors on the CPU)."""
    device = device or layer.codes.device
    codes, scales, zeros = (t.to(device) for t in (layer.codes, layer.scales, layer.zeros))
    return dequantize(codes, scales, zeros, layer.group_size)


def round_to_nearest(
    weight: torch.Tensor, bits: int, group_size: int | None, zero_point: ZeroPoint | bool, shrink: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN: min/max (S, Z) per group, then nearest codes. Returns (codes, S, Z)."""
    scales, zeros = minmax_params(weight, bits, group_size, zero_point, shrink)
    return quantize(weight, scales, zeros, bits, group_size), scales, zeros


def row_errors(delta: torch.Tensor, hessian: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row quadratic error δ H δᵀ (plain squared error when `hessian` is None)."""
    if hessian is None:
        return (delta.double() ** 2).sum(dim=1)
    delta = delta.to(hessian.dtype)
    return ((delta @ hessian) * delta).sum(dim=1)


def shrink_search(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    zero_point: ZeroPoint | bool,
    hessian: torch.Tensor | None = None,
    grid: int = 200,
    max_shrink: float = 0.8,
    coarse_step: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Range clamp: shrink each row's ranges by p = 1 - k/grid (0 <= k < max_shrink·grid) and keep the
    best p per row under the H-weighted error (all groups of a row share p, as decoupleQ does).

    Coarse to fine: every `coarse_step`-th k first, then every k within ±coarse_step of each row's best
    (about grid·max_shrink/coarse_step + 2·coarse_step evaluations instead of grid·max_shrink).
    Candidates are ranked in float32 (only their order matters).
    """
    hessian = None if hessian is None else hessian.float()
    rows, limit = weight.shape[0], int(max_shrink * grid) - 1
    best_k = torch.zeros(rows, 1, device=weight.device)
    best_err = torch.full((rows,), float("inf"), dtype=torch.float64, device=weight.device)
    coarse = [torch.full((rows, 1), float(k), device=weight.device) for k in range(0, limit + 1, coarse_step)]
    for candidates in (coarse, None):
        if candidates is None:
            offsets = [o for o in range(-coarse_step + 1, coarse_step) if o != 0]
            candidates = [(best_k + o).clamp(0, limit) for o in offsets]
        for k in candidates:
            scales, zeros = minmax_params(weight, bits, group_size, zero_point, 1 - k / grid)
            approx = dequantize(quantize(weight, scales, zeros, bits, group_size), scales, zeros, group_size)
            err = row_errors(approx - weight.float(), hessian).to(best_err.dtype)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_k = torch.where(better[:, None], k, best_k)
    return minmax_params(weight, bits, group_size, zero_point, 1 - best_k / grid)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖ref‖² / ‖ref − approx‖²)."""
    noise = (reference.double() - approx.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise)
