"""quant_gptq: GPTQ (Frantar et al. 2022), Hessian-aware rounding with error feedback.

Columns are rounded one at a time; each rounding error is spread over the not-yet-rounded columns
through the inverse Hessian's Cholesky factor, which minimizes (Ŵ−W) H (Ŵ−W)ᵀ greedily.
- act_order: columns in order of decreasing diag(H); groups then use static (S, Z) computed from the
  original weights up front, so groups stay contiguous in the original column order (no g_idx).
- without act_order, groups are dynamic: a group's (S, Z) come from the already-updated weights when
  the sweep reaches it (GPTQ's default).
- lazy batch updates: errors are applied to the columns right of a `block_size` batch in one matmul.
- damping: H + damp·mean(diag H)·I, escalated ×10 on Cholesky failure; dead inputs get H_ii = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from compression.configs import GPTQConfig
from compression.primitives.hessian import fix_dead_inputs, inverse_cholesky
from compression.primitives.quant import ZeroPoint, code_range, expand_groups, minmax_params, num_groups
from compression.primitives.weight_quant import quantize_weights
from compression.types import Batches, CompressionResult, ProgressFn

GroupRefresh = Callable[[int, torch.Tensor], None]
"""(first column of a group, current weights of that group) -> writes that group's column params."""


def act_order_permutation(hessian: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Column processing order: decreasing diag(H) (stable) or the identity."""
    if not act_order:
        return torch.arange(hessian.shape[-1], device=hessian.device)
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)


def lazy_block_size(block_size: int, group_size: int | None, dynamic_groups: bool) -> int:
    """A batch width whose boundaries fall on group starts, so dynamic groups see fully updated weights."""
    if not dynamic_groups or group_size is None:
        return block_size
    if group_size <= block_size:
        return group_size * (block_size // group_size)
    return 1 << (block_size.bit_length() - 1)  # a power of two <= block_size divides group_size


def gptq_round(
    weight: torch.Tensor,
    inv_chol: torch.Tensor,
    scale_cols: torch.Tensor,
    zero_cols: torch.Tensor,
    bits: int,
    block_size: int = 128,
    group_size: int | None = None,
    refresh: GroupRefresh | None = None,
) -> torch.Tensor:
    """GPTQ's sweep on columns already in processing order; returns int8 codes in that order.

    weight `[out, d]`, inv_chol the upper Cholesky factor of H⁻¹ in the same order, scale_cols /
    zero_cols `[out, d]` per-column grid params (filled by `refresh` at group starts when given).
    """
    work = weight.clone()
    codes = torch.zeros_like(work, dtype=torch.int8)
    lo, hi = code_range(bits)
    cols = work.shape[1]
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = work[:, start:stop].clone()
        errors = torch.zeros_like(block)
        factor = inv_chol[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if refresh is not None and col % group_size == 0:
                current = block[:, i : i + group_size] if group_size <= block_size else work[:, col : col + group_size]
                refresh(col, current)
            scale, zero = scale_cols[:, col], zero_cols[:, col]
            code = torch.floor((block[:, i] - zero) / scale + 0.5).clamp_(lo, hi)
            codes[:, col] = code.to(torch.int8)
            errors[:, i] = (block[:, i] - (code * scale + zero)) / factor[i, i]
            block[:, i:] -= errors[:, i : i + 1] * factor[i : i + 1, i:]
        work[:, stop:] -= errors @ inv_chol[start:stop, stop:]
    return codes


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    zero_point: ZeroPoint | bool = "float",
    damp_percent: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on one `[out, d]` matrix with its `[d, d]` Hessian; returns (codes, S, Z), columns in the
    original order. The input tensors are not modified."""
    work, hess = weight.float().clone(), hessian.to(weight.device, torch.float64).clone()
    fix_dead_inputs(hess, work)
    perm = act_order_permutation(hess, act_order)
    inv_chol = inverse_cholesky(hess[perm][:, perm], damp_percent).float()
    dynamic = group_size is not None and not act_order
    if dynamic:
        rows, groups = work.shape[0], num_groups(work.shape[1], group_size)
        scales = work.new_ones(rows, groups)
        zeros = work.new_zeros(rows, groups)
    else:
        scales, zeros = minmax_params(work, bits, group_size, zero_point)
    scale_cols = expand_groups(scales, work.shape[1], group_size)[:, perm].contiguous()
    zero_cols = expand_groups(zeros, work.shape[1], group_size)[:, perm].contiguous()
    refresh = None
    if dynamic:
        refresh = partial(_refresh_group, scales, zeros, scale_cols, zero_cols, bits, group_size, zero_point)
    codes = gptq_round(
        work[:, perm],
        inv_chol,
        scale_cols,
        zero_cols,
        bits,
        lazy_block_size(block_size, group_size, dynamic),
        group_size,
        refresh,
    )
    return codes[:, torch.argsort(perm)], scales, zeros


def _refresh_group(
    scales: torch.Tensor,
    zeros: torch.Tensor,
    scale_cols: torch.Tensor,
    zero_cols: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: ZeroPoint | bool,
    col: int,
    current: torch.Tensor,
) -> None:
    group_scale, group_zero = minmax_params(current, bits, None, zero_point)
    group = col // group_size
    scales[:, group], zeros[:, group] = group_scale[:, 0], group_zero[:, 0]
    scale_cols[:, col : col + current.shape[1]] = group_scale
    zero_cols[:, col : col + current.shape[1]] = group_zero


def compress(
    model: nn.Module, calib: Batches | None, config: GPTQConfig, *, progress: ProgressFn | None = None
) -> CompressionResult:
    """GPTQ every quantizable layer block by block on the calibration data; the input model is untouched."""
    quantize_matrix = partial(
        _quantize_matrix,
        bits=config.bits,
        group_size=config.group_size,
        zero_point=config.zero_point,
        damp_percent=config.damp_percent,
        act_order=config.act_order,
        block_size=config.block_size,
    )
    result = quantize_weights(model, calib, config, quantize_matrix, needs_calibration=True, progress=progress)
    variant = "act-order, static groups" if config.act_order else "dynamic groups"
    result.notes.append(
        f"GPTQ ({variant}), damping {config.damp_percent}, lazy batches of {config.block_size}, "
        f"zero point: {config.zero_point}"
    )
    return result


def _quantize_matrix(weight: torch.Tensor, hessian: torch.Tensor | None, **kwargs) -> tuple:
    assert hessian is not None, "GPTQ needs a Hessian"
    return gptq_quantize(weight, hessian, **kwargs)
