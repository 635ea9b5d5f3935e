"""Data types shared by every method: calibration batches, results, progress callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ProgressFn = Callable[[float, str], None]
"""progress(fraction 0..1 of this method's work, short human message)."""


def primary_output(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The tensor methods and metrics work on: a model's output, or the first output of a model with several
    (an imported ONNX graph returns a tuple of all its outputs)."""
    return output[0] if isinstance(output, tuple | list) else output


def no_progress(fraction: float, message: str) -> None:
    return None


def scaled_progress(progress: ProgressFn, start: float, end: float) -> ProgressFn:
    """`progress` for a part of the work that spans `start`..`end` of the whole."""
    return lambda fraction, message: progress(start + (end - start) * min(max(fraction, 0.0), 1.0), message)


@dataclass
class Batches:
    """Model inputs as keyword batches: `model(**batch)` returns one tensor (logits or hidden states), or a
    tuple whose `primary_output` is that tensor."""

    inputs: list[dict[str, torch.Tensor]]
    labels: list[torch.Tensor] | None = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class QuantizedLayer:
    """One layer's weights as W = codes·S + Z, per output row and group of input columns.

    codes: signed integers in [-2^(b-1), 2^(b-1)-1], shape [out, in_flat] (int8).
    scales, zeros: float [out, n_groups]; zeros are all 0 for symmetric quantizers, and -(zp·S) in float32 for
    integer zero points (`integer_zero_points` gives zp; `zero_point_kind` says which form the layer has).
    orig_shape: the float weight's shape (Conv: out, in/groups, kh, kw).
    """

    name: str
    kind: str  # "linear" | "conv2d" | "conv1d_hf" | "embedding"
    bits: int
    group_size: int | None
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    orig_shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        """codes·S + Z in float32, in the float weight's shape (`compression.primitives.quant.dequantize`)."""
        from compression.primitives.quant import dequantize  # the arithmetic lives with the quantizers

        return dequantize(self.codes, self.scales, self.zeros, self.group_size).reshape(self.orig_shape)

    def integer_zero_points(self) -> torch.Tensor | None:
        """Signed int8 zp `[out, n_groups]` with W = (codes − zp)·S exactly, or None for a float offset Z.
        Unsigned (GPTQ / MatMulNBits) form: q = codes + 2^(b−1), zero point zp + 2^(b−1), both in [0, 2^b − 1]."""
        from compression.primitives.quant import integer_zero_points

        return integer_zero_points(self.scales, self.zeros, self.bits)

    def zero_point_kind(self) -> str:
        """ "none" (Z = 0, symmetric), "integer" (Z = −zp·S, zp an integer code) or "float" (a free offset)."""
        if bool((self.zeros == 0).all()):
            return "none"
        return "integer" if self.integer_zero_points() is not None else "float"


@dataclass
class CompressionResult:
    """What every method returns. `model` is a runnable float module (fake-quantized weights)."""

    model: nn.Module
    method: str
    quantized: dict[str, QuantizedLayer] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> why it stayed float
    stats: dict[str, Any] = field(default_factory=dict)  # method-specific numbers for the report
    notes: list[str] = field(default_factory=list)  # human statements for the report ("variant ran: ...")
