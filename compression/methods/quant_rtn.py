"""quant_rtn: round-to-nearest weight-only quantization, the baseline every report compares against.

Per output row and group: S, Z span the group's [min, max] (Z = 0 and a ±max|w| grid when symmetric),
codes are the nearest grid points. Needs no data; with calibration data the per-layer Hessian loss is
also measured (block by block, as the other quantizers do) so the reports compare like with like.
"""

from __future__ import annotations

import torch
from torch import nn

from compression.configs import RTNConfig
from compression.primitives.quant import ZeroPoint, round_to_nearest
from compression.primitives.weight_quant import quantize_weights
from compression.types import Batches, CompressionResult, ProgressFn


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int | None, zero_point: ZeroPoint | bool = "float"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, S, Z) of one `[out, d]` matrix."""
    return round_to_nearest(weight, bits, group_size, zero_point)


def compress(
    model: nn.Module, calib: Batches | None, config: RTNConfig, *, progress: ProgressFn | None = None
) -> CompressionResult:
    """RTN every quantizable layer; the input model is untouched."""

    def quantize_matrix(weight: torch.Tensor, hessian: torch.Tensor | None) -> tuple:
        return rtn_quantize(weight, config.bits, config.group_size, config.zero_point)

    result = quantize_weights(model, calib, config, quantize_matrix, needs_calibration=False, progress=progress)
    result.notes.append(f"round to nearest, min/max range per group, zero point: {config.zero_point}")
    return result
