"""BatchNorm folding and the data-free statistics a BatchNorm layer carries.

An eval-mode BatchNorm is a per-channel affine map `bn(z) = gain * z + shift` with
`gain = γ / sqrt(var + eps)` and `shift = β − gain * μ`. Folding it into the layer before it gives
the "BN-folded" filters `gain_i * W_i` and biases `gain_i * b_i + shift_i` that the data-free
methods (DFQ, UDFC) work with. On in-distribution data the BN output of channel i has mean β_i and
standard deviation |γ_i|, which is the only input model a data-free method has.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def bn_gain_shift(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain, shift) in float64 such that `bn(z) == gain * z + shift` per channel (eval mode)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    sigma = torch.sqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(sigma)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(sigma)
    gain = gamma / sigma
    return gain, beta - gain * bn.running_mean.detach().double()


def identity_gain_shift(out_channels: int, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain, shift) of "no BatchNorm": gain 1 and the layer's own bias (or 0)."""
    gain = torch.ones(out_channels, dtype=torch.float64)
    shift = bias.detach().double() if bias is not None else torch.zeros(out_channels, dtype=torch.float64)
    return gain, shift


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm1d | nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """BN-folded (weight, bias) in float64: `bn(layer(x)) == folded_layer(x)`."""
    gain, shift = bn_gain_shift(bn)
    view = (-1,) + (1,) * (weight.dim() - 1)
    folded_bias = shift if bias is None else gain * bias.detach().double() + shift
    return weight.detach().double() * gain.view(view), folded_bias


def bn_output_moments(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the BN output on in-distribution data: (β, |γ|), in float64."""
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(bn.num_features).double()
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(bn.num_features).double()
    return beta, gamma.abs()


def folded_preactivation_prior(folded_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free (mean, std) per output channel of a layer whose BatchNorm was folded into it.

    The folded layer no longer says what its BN held (β_i, |γ_i|). The prior keeps BN's centring (β = 0,
    its initialization) and takes the spread from the folded filter's gain on a unit-variance input,
    ‖ŵ_i‖, scaled down where needed so that the layer's mean spread stays at most BN's γ = 1: of two
    guesses the smaller, because an over-estimated ReLU mean over-corrects the consumer bias, which
    costs far more than leaving part of the residual (benchmarks/data_free.py, BN-folded rows). The
    folded bias is not used as the mean: it omits ŵ_i·E[x], far from 0 behind a ReLU. Float64.
    """
    norms = folded_weight.detach().double().flatten(1).norm(dim=1)
    mean_norm = float(norms.mean())
    std = norms / mean_norm if mean_norm > 1.0 else norms
    return torch.zeros_like(std), std


def gaussian_relu_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[ReLU(h)] for h ~ N(mean, std²), elementwise; std 0 gives ReLU(mean)."""
    safe_std = std.clamp_min(1e-12)
    z = mean / safe_std
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return torch.where(std > 0, mean * cdf + safe_std * pdf, mean.clamp_min(0.0))
