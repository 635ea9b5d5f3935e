"""Layer Hessians H = mean over samples of x xᵀ, where x is what one output row of the weight sees.

- Linear / HF Conv1D: one sample per token (padding tokens dropped when a token mask is given).
- Conv2d: one sample per output position, the unfolded `C/groups·kh·kw` patch (`F.unfold`), in the same
  column order as `weight.flatten(1)`. A grouped conv gets one Hessian per group, since the rows of
  group g only see input channels of group g; Hessians are therefore always `[groups, d, d]`.
Accumulated in float64 on the activations' device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compression.errors import CompressionError
from compression.primitives.layers import layer_kind


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of a Conv2d, resolving the 'same' / 'valid' strings."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        (top, bottom), (left, right) = ((t // 2, t - t // 2) for t in totals)
        return (left, right, top, bottom)
    pad_h, pad_w = conv.padding
    return (pad_w, pad_w, pad_h, pad_h)


def unfold_conv_input(conv: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """Conv2d input `[B, C, H, W]` -> patches `[groups, B·L, C/groups·kh·kw]`."""
    if inputs.dim() == 3:
        inputs = inputs.unsqueeze(0)
    pads = _conv_padding(conv)
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        inputs = F.pad(inputs, pads, mode=mode)
    patches = F.unfold(inputs, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return patches.reshape(patches.shape[0], conv.groups, -1).transpose(0, 1)


def layer_input_samples(
    module: nn.Module, inputs: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The samples one output row sees, `[groups, n, d]` (groups = 1 except grouped convs)."""
    if layer_kind(module) == "conv2d":
        return unfold_conv_input(module, inputs)
    samples = inputs.reshape(-1, inputs.shape[-1])
    if token_mask is not None and tuple(token_mask.shape) == tuple(inputs.shape[:-1]):
        samples = samples[token_mask.reshape(-1).to(torch.bool)]
    return samples.unsqueeze(0)


class HessianAccumulator:
    """Running mean of x xᵀ for one layer; feed it the layer's inputs with `add`, read `hessian()`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, module: nn.Module, inputs: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        samples = layer_input_samples(module, inputs.detach(), token_mask)
        if not torch.isfinite(samples).all():
            raise CompressionError(
                "non_finite_activations", f"NaN or inf in the calibration inputs of layer {self.name}"
            )
        samples = samples.to(torch.float64)
        update = samples.transpose(1, 2) @ samples
        self.total = update if self.total is None else self.total + update
        self.count += samples.shape[1]

    def hessian(self) -> torch.Tensor:
        """The mean x xᵀ, `[groups, d, d]` float64; raises if the layer never saw a sample."""
        if self.total is None or self.count == 0:
            raise CompressionError("no_calibration_samples", f"layer {self.name} received no inputs")
        return self.total / self.count


def fix_dead_inputs(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Columns whose input is always zero (H_ii = 0): set H_ii = 1 and W[:, i] = 0, in place (GPTQ's rule).

    `hessian` is `[d, d]`, `weight` `[out, d]`; returns the dead-column mask.
    """
    dead = torch.diagonal(hessian) == 0
    if dead.any():
        hessian[dead, dead] = 1.0
        weight[:, dead] = 0.0
    return dead


def damp(hessian: torch.Tensor, percent: float) -> torch.Tensor:
    """H + percent·mean(diag H)·I (a new tensor)."""
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
    return hessian + percent * torch.diagonal(hessian).mean() * eye


def inverse_cholesky(hessian: torch.Tensor, damp_percent: float, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = (H + λI)⁻¹), λ = damp·mean(diag H).

    On failure the damping grows ×10 per try (up to `max_tries`), then a CompressionError is raised.
    """
    for attempt in range(max_tries):
        lower, info = torch.linalg.cholesky_ex(damp(hessian, damp_percent * 10**attempt))
        if info.item() != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if info.item() == 0 and torch.isfinite(upper).all():
            return upper
    raise CompressionError(
        "cholesky_failed",
        f"the layer Hessian stayed singular with damping up to {damp_percent * 10 ** (max_tries - 1):g}"
        "·mean(diag H); the calibration data may be too small or degenerate",
    )


def layer_loss(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> tuple[float, float]:
    """(Σ_groups tr((Ŵ−W) H (Ŵ−W)ᵀ), the same relative to tr(W H Wᵀ)) for `[groups, d, d]` Hessians."""
    groups = hessian.shape[0]
    delta = (approx.double() - weight.double()).reshape(groups, -1, hessian.shape[-1])
    ref = weight.double().reshape(groups, -1, hessian.shape[-1])
    hessian = hessian.to(delta.device, torch.float64)
    loss = ((delta @ hessian) * delta).sum().item()
    norm = ((ref @ hessian) * ref).sum().item()
    return loss, loss / norm if norm > 0 else 0.0
