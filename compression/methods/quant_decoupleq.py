"""quant_decoupleq: decoupleQ (ByteDance, arXiv 2404.12759), W ≈ W_int·S + Z with free float S and Z.

Layer-wise stage, per output row, minimizing (Ŵ−W) H (Ŵ−W)ᵀ (H damped by damp·mean diag):
1. min/max init, then a GPTQ pass with that grid fixed (the GPTQ baseline as a starting point);
2. alternate `iterations` times, keeping per row only what lowers the error:
   - first alternation only: an H-weighted range-shrink grid search for (S, Z), refit in closed form;
   - integer step with (S, Z) fixed: GPTQ rounding (default) or projected gradient (FISTA on the box
     relaxation [lo·s+z, hi·s+z]) followed by GPTQ rounding of the relaxed solution;
   - float step with the integers fixed: the exact least-squares (S, Z), a 2·n_groups linear system
     per row (the normal equations of a quadratic in (S, Z)).
Block-wise stage (optional): integers frozen, S, Z and the block's norm parameters trained with Adam to
match the float block's outputs. The block's calibration batches are split (`holdout_split`: every 4th
held out, at least one): training sees only the fitting part, and the refinement is kept only when the
block's MSE went down on the fitting AND on the held-out batches (else the layer-wise solution stays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from compression.configs import DecoupleQConfig
from compression.methods.quant_gptq import act_order_permutation, gptq_round
from compression.primitives.hessian import damp, fix_dead_inputs, inverse_cholesky
from compression.primitives.layers import matrix_to_weight
from compression.primitives.quant import (
    ZeroPoint,
    code_range,
    dequantize,
    expand_groups,
    group_view,
    integer_zeros,
    minmax_params,
    num_groups,
    quantize,
    row_errors,
    shrink_search,
    zero_point_mode,
)
from compression.primitives.sequential import BlockContext, block_output
from compression.primitives.weight_quant import quantize_weights
from compression.types import Batches, CompressionResult, ProgressFn, QuantizedLayer

_SOLVE_ELEMENTS = 1 << 24  # rows per chunk so the [rows, groups, d] intermediate stays ~128 MB


def solve_scale_zero(
    weight: torch.Tensor,
    codes: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int | None,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact least-squares (S, Z) `[out, n_groups]` for fixed codes: per row, the minimizer of
    (Ŵ−W) H (Ŵ−W)ᵀ with Ŵ = codes·S + Z, from its normal equations (float64). Rows whose system stays
    singular after damping get NaN (callers keep their previous values)."""
    rows, cols = weight.shape
    group = group_size or cols
    groups = num_groups(cols, group_size)
    padded = groups * group
    hess = torch.zeros(padded, padded, dtype=torch.float64, device=weight.device)
    hess[:cols, :cols] = hessian.to(weight.device, torch.float64)
    codes_g = group_view(codes.double(), group)  # [rows, ng, G]
    wh = torch.nn.functional.pad(weight.double(), (0, padded - cols)) @ hess
    wh_g = wh.view(rows, groups, group)
    hess_rows = hess.view(groups, group, padded)
    p22 = hess.view(groups, group, groups, group).sum(dim=(1, 3))
    chunk = max(1, _SOLVE_ELEMENTS // (groups * padded))
    scales, zeros = [], []
    for start in range(0, rows, chunk):
        a = codes_g[start : start + chunk]
        m = torch.einsum("cgi,gij->cgj", a, hess_rows).view(a.shape[0], groups, groups, group)
        p11 = torch.einsum("cghj,chj->cgh", m, a)
        rhs_s = (wh_g[start : start + chunk] * a).sum(-1)
        if symmetric:
            scales.append(_solve_rows(p11, rhs_s))
            continue
        p12 = m.sum(-1)
        top = torch.cat([p11, p12], dim=2)
        bottom = torch.cat([p12.transpose(1, 2), p22.expand_as(p11)], dim=2)
        solution = _solve_rows(
            torch.cat([top, bottom], dim=1), torch.cat([rhs_s, wh_g[start : start + chunk].sum(-1)], 1)
        )
        scales.append(solution[:, :groups])
        zeros.append(solution[:, groups:])
    scale = torch.cat(scales)
    return scale, torch.zeros_like(scale) if symmetric else torch.cat(zeros)


def integer_scale_zero(
    weight: torch.Tensor, codes: torch.Tensor, hessian: torch.Tensor, group_size: int | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float step with integer zero points: per group the integer zp (`best_integer_zero_points`), then
    the exact least-squares S of every group for those zp (codes − zp in place of the codes, no offset).
    Returns float32 (S, Z = −zp·S); rows whose solve failed get NaN S."""
    scales, zeros = solve_scale_zero(weight, codes, hessian, group_size)
    zero_points = best_integer_zero_points(codes, hessian, group_size, bits, scales, zeros)
    shifted = codes.double() - expand_groups(zero_points, codes.shape[1], group_size)
    scale = solve_scale_zero(weight, shifted, hessian, group_size, symmetric=True)[0].float()
    return scale, integer_zeros(scale, zero_points)


def best_integer_zero_points(
    codes: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int | None,
    bits: int,
    scales: torch.Tensor,
    zeros: torch.Tensor,
) -> torch.Tensor:
    """Per (row, group), floor or ceil of −Z*/S* (in the code range), whichever loses less with its closed-form
    scale. (S*, Z*) is the exact least-squares optimum, where the gradient in each group's (S, Z) is zero, so
    replacing group g's weights b = c·S* + Z* by s·(c − zp) raises the error by (u H_gg uᵀ), u = s·(c − zp) − b,
    minimized by s = a H_gg bᵀ / a H_gg aᵀ (a = c − zp) to b H_gg bᵀ − (a H_gg bᵀ)² / a H_gg aᵀ. float64 [out, ng]."""
    lo, hi = code_range(bits)
    cols = codes.shape[1]
    group, groups = group_size or cols, num_groups(cols, group_size)
    hess = torch.zeros(groups * group, groups * group, dtype=torch.float64, device=codes.device)
    hess[:cols, :cols] = hessian.to(codes.device, torch.float64)
    index = torch.arange(groups, device=codes.device)
    blocks = hess.view(groups, group, groups, group)[index, :, index, :]  # [ng, G, G]: H_gg
    codes_g = group_view(codes.double(), group)
    target = codes_g * scales.double()[..., None] + zeros.double()[..., None]
    target_h = torch.einsum("rgi,gij->rgj", target, blocks)
    start = (-zeros.double() / scales.double()).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    best_zp, best_loss = torch.zeros_like(start), torch.full_like(start, float("inf"))
    for candidate in (start.floor(), start.ceil()):
        candidate = candidate.clamp(lo, hi)
        shifted = codes_g - candidate[..., None]
        shifted_h = torch.einsum("rgi,gij->rgj", shifted, blocks)
        aha, ahb = (shifted_h * shifted).sum(-1), (shifted_h * target).sum(-1)
        loss = (target_h * target).sum(-1) - torch.where(aha > 0, ahb**2 / aha.clamp_min(1e-300), 0.0)
        better = loss < best_loss
        best_zp, best_loss = torch.where(better, candidate, best_zp), torch.where(better, loss, best_loss)
    return best_zp


def _solve_rows(system: torch.Tensor, rhs: torch.Tensor, tries: int = 3) -> torch.Tensor:
    """Batched solve; singular rows are retried with 1 % (then 10 %, ...) of their mean diagonal added."""
    solution, info = torch.linalg.solve_ex(system, rhs.unsqueeze(-1))
    solution = solution.squeeze(-1)
    eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
    for attempt in range(tries):
        failed = (info != 0) | ~torch.isfinite(solution).all(dim=1)
        if not failed.any():
            break
        sub = system[failed]
        level = 0.01 * 10**attempt * torch.diagonal(sub, dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        retry, retry_info = torch.linalg.solve_ex(sub + level[:, None, None] * eye, rhs[failed].unsqueeze(-1))
        solution[failed], info = retry.squeeze(-1), info.clone()
        info[failed] = retry_info
    failed = (info != 0) | ~torch.isfinite(solution).all(dim=1)
    solution[failed] = float("nan")
    return solution


@dataclass
class _Solution:
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    errors: torch.Tensor  # per row, under the damped Hessian


class _LayerProblem:
    """One layer's decoupleQ problem: the weights, the damped Hessian and the fixed GPTQ machinery."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, config: dict[str, Any]) -> None:
        self.weight = weight.float().clone()
        hess = hessian.to(weight.device, torch.float64)
        # The objective is the damped calibration loss; dead inputs (H_ii = 0) only get the damping, so
        # the (S, Z) fit does not spend effort on columns that never see a signal.
        self.hessian = damp(hess, config.get("objective_damp", config["damp_percent"]))
        # The integer step is GPTQ exactly as quant_gptq runs it (dead inputs fixed, same damping).
        gptq_hess, self.gptq_target = hess.clone(), self.weight.clone()
        fix_dead_inputs(gptq_hess, self.gptq_target)
        self.perm = act_order_permutation(gptq_hess, config["act_order"])
        self.inv_chol = inverse_cholesky(gptq_hess[self.perm][:, self.perm], config["damp_percent"]).float()
        self.bits, self.group_size, self.zero_point = config["bits"], config["group_size"], config["zero_point"]
        self.integer_step_kind, self.pgd_steps = config["integer_step"], config["pgd_steps"]
        self.block_size = config["block_size"]

    def solution(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> _Solution:
        approx = dequantize(codes, scales, zeros, self.group_size)
        errors = row_errors(approx - self.weight, self.hessian)
        return _Solution(codes, scales.float(), zeros.float(), errors.nan_to_num(float("inf")))

    def column_params(self, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cols = self.weight.shape[1]
        scales = torch.where(scales.abs() < 1e-12, torch.full_like(scales, 1e-12), scales)
        scale_cols = expand_groups(scales, cols, self.group_size)
        return scale_cols, expand_groups(zeros, cols, self.group_size)

    def integer_step(self, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """Codes for fixed (S, Z): GPTQ rounding of W (or of its box-constrained relaxation)."""
        scale_cols, zero_cols = self.column_params(scales, zeros)
        target = self.gptq_target if self.integer_step_kind == "gptq" else self.relaxed(scale_cols, zero_cols)
        perm = self.perm
        codes = gptq_round(
            target[:, perm],
            self.inv_chol,
            scale_cols[:, perm].contiguous(),
            zero_cols[:, perm].contiguous(),
            self.bits,
            self.block_size,
        )
        return codes[:, torch.argsort(perm)]

    def relaxed(self, scale_cols: torch.Tensor, zero_cols: torch.Tensor) -> torch.Tensor:
        """FISTA on min (w−W) H (w−W)ᵀ over the box spanned by the grid, step 1/λmax(H)."""
        lo, hi = code_range(self.bits)
        ends = torch.stack([lo * scale_cols + zero_cols, hi * scale_cols + zero_cols])
        lower, upper = ends.amin(0), ends.amax(0)
        hessian = self.hessian.float()
        step = 1.0 / torch.linalg.eigvalsh(self.hessian).max().item()
        current = torch.minimum(torch.maximum(self.weight, lower), upper)
        momentum, t = current, 1.0
        for _ in range(self.pgd_steps):
            gradient = (momentum - self.weight) @ hessian
            following = torch.minimum(torch.maximum(momentum - step * gradient, lower), upper)
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            momentum = following + (t - 1) / t_next * (following - current)
            current, t = following, t_next
        return current

    def float_step(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.zero_point == "integer":
            return integer_scale_zero(self.weight, codes, self.hessian, self.group_size, self.bits)
        symmetric = self.zero_point == "none"
        scales, zeros = solve_scale_zero(self.weight, codes, self.hessian, self.group_size, symmetric)
        return scales.float(), zeros.float()

    def shrink_start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, Z) from the H-weighted range-shrink grid search, refit in closed form on its rounding."""
        scales, zeros = shrink_search(self.weight, self.bits, self.group_size, self.zero_point, self.hessian)
        codes = quantize(self.weight, scales, zeros, self.bits, self.group_size)
        refit_s, refit_z = self.float_step(codes)
        ok = torch.isfinite(refit_s).all(1) & torch.isfinite(refit_z).all(1)
        return torch.where(ok[:, None], refit_s, scales), torch.where(ok[:, None], refit_z, zeros)


def keep_better(best: _Solution, candidate: _Solution) -> tuple[_Solution, int]:
    """Per row, the candidate where its error is lower; also returns how many rows improved."""
    better = candidate.errors < best.errors
    pick = better[:, None]
    merged = _Solution(
        torch.where(pick, candidate.codes, best.codes),
        torch.where(pick, candidate.scales, best.scales),
        torch.where(pick, candidate.zeros, best.zeros),
        torch.where(better, candidate.errors, best.errors),
    )
    return merged, int(better.sum())


def decoupleq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    zero_point: ZeroPoint | bool = "float",
    iterations: int = 3,
    damp_percent: float = 0.01,
    act_order: bool = True,
    integer_step: str = "gptq",
    pgd_steps: int = 50,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """decoupleQ's layer-wise stage on one `[out, d]` matrix; returns (codes, S, Z). With zero_point 'integer'
    every candidate (the min/max start, the shrink search, each float step) has Z = −zp·S, zp an integer."""
    zero_point = zero_point_mode(zero_point)
    settings = dict(bits=bits, group_size=group_size, zero_point=zero_point, damp_percent=damp_percent)
    settings |= dict(act_order=act_order, integer_step=integer_step, pgd_steps=pgd_steps, block_size=block_size)
    problem = _LayerProblem(weight, hessian, settings)
    scales, zeros = minmax_params(problem.weight, bits, group_size, zero_point)
    best = problem.solution(quantize(problem.weight, scales, zeros, bits, group_size), scales, zeros)
    best, _ = keep_better(best, problem.solution(problem.integer_step(scales, zeros), scales, zeros))
    rows = weight.shape[0]
    for iteration in range(iterations):
        if iteration == 0:
            scales, zeros = problem.shrink_start()
        else:
            scales, zeros = best.scales, best.zeros
        best, improved_int = keep_better(best, problem.solution(problem.integer_step(scales, zeros), scales, zeros))
        new_scales, new_zeros = problem.float_step(best.codes)
        best, improved_float = keep_better(best, problem.solution(best.codes, new_scales, new_zeros))
        if iteration > 0 and max(improved_int, improved_float) < 1e-4 * rows:
            break
    return best.codes, best.scales, best.zeros


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    return isinstance(module, norm_types) or "Norm" in type(module).__name__


def _masked_mse(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and tuple(mask.shape) == tuple(output.shape[:2]) and output.dim() == 3:
        keep = mask.to(torch.bool)
        return torch.nn.functional.mse_loss(output[keep], target[keep])
    return torch.nn.functional.mse_loss(output, target)


def _trainable(values: torch.Tensor, device: torch.device, train: bool) -> torch.Tensor:
    return values.detach().to(device, torch.float32).clone().requires_grad_(train)


class _BlockRefiner:
    """Trains S, Z of a block's quantized layers and its norm parameters against the float outputs."""

    def __init__(self, context: BlockContext, zero_point: ZeroPoint) -> None:
        self.context = context
        layers = context.layers.items()
        free = zero_point == "float"
        self.codes = {n: q.codes.to(m.weight.device) for n, (m, q) in layers}
        self.scales = {n: _trainable(q.scales, m.weight.device, True) for n, (m, q) in layers}
        self.zeros = {n: _trainable(q.zeros, m.weight.device, free) for n, (m, q) in layers}
        # integer zero points stay fixed: Z = −zp·S follows the trained S
        self.zero_points = {} if zero_point != "integer" else {n: _zero_points(q, m) for n, (m, q) in layers}
        norm_params = [
            param
            for name, module in context.block.named_modules()
            if _is_norm(module) and not name.startswith(context.done_prefixes)
            for param in module.parameters(recurse=False)
        ]
        self.norms = list({id(p): p for p in norm_params}.values())
        self.trainable = [*self.scales.values(), *(self.zeros.values() if free else []), *self.norms]

    def offsets(self, name: str) -> torch.Tensor:
        zero_points = self.zero_points.get(name)
        return self.zeros[name] if zero_points is None else integer_zeros(self.scales[name], zero_points)

    def loss(self, index: int) -> torch.Tensor:
        ctx = self.context
        overrides = {}
        for name, (module, layer) in ctx.layers.items():
            matrix = dequantize(self.codes[name], self.scales[name], self.offsets(name), layer.group_size)
            overrides[f"{ctx.local_name(name)}.weight"] = matrix_to_weight(module, matrix).to(module.weight.dtype)
        args, kwargs = ctx.inputs.args[index], ctx.inputs.kwargs[index]
        output = block_output(functional_call(ctx.block, overrides, args, kwargs))
        return _masked_mse(output, ctx.float_outputs[index], ctx.inputs.masks[index])

    def total_loss(self, indices: list[int]) -> float:
        with torch.no_grad():
            return sum(self.loss(i).item() for i in indices)

    def train(self, lr: float, epochs: int, indices: list[int]) -> None:
        optimizer = torch.optim.Adam(self.trainable, lr=lr, betas=(0.9, 0.99), eps=2e-5)
        with torch.enable_grad():
            for _ in range(epochs):
                for index in indices:
                    optimizer.zero_grad(set_to_none=True)
                    self.loss(index).backward()
                    optimizer.step()


def _zero_points(layer: QuantizedLayer, module: nn.Module) -> torch.Tensor:
    zero_points = layer.integer_zero_points()
    assert zero_points is not None, f"{layer.name}: the layer-wise stage left a non-integer zero point"
    return zero_points.to(module.weight.device, torch.float32)


HOLDOUT_EVERY = 4  # every 4th calibration batch of a block is held out from its refinement


def holdout_split(count: int) -> tuple[list[int], list[int]]:
    """(fitting, held-out) batch indices: every HOLDOUT_EVERY-th batch held out, at least one when there
    are two or more (then the last); a single batch cannot be split and is returned as held out only."""
    held = [i for i in range(count) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    if not held and count > 0:
        held = [count - 1]
    return [i for i in range(count) if i not in held], held


def _train_and_measure(refiner: _BlockRefiner, lr: float, epochs: int, fit: list[int], held: list[int]) -> dict:
    """Train on `fit`; the block MSE on both parts before and after (held-out: not seen in training)."""
    block_params = list(refiner.context.block.parameters())
    flags = [p.requires_grad for p in block_params]
    try:
        for param in block_params:
            param.requires_grad_(False)
        for param in refiner.norms:
            param.requires_grad_(True)
        before, held_before = refiner.total_loss(fit), refiner.total_loss(held)
        if before > 0:  # a zero error (e.g. a layer whose output is unused) leaves nothing to fit
            refiner.train(lr, epochs, fit)
        after, held_after = refiner.total_loss(fit), refiner.total_loss(held)
    finally:
        for param, flag in zip(block_params, flags, strict=True):
            param.requires_grad_(flag)
    return {"mse_before": before, "mse_after": after, "heldout_before": held_before, "heldout_after": held_after}


def _verdict(refiner: _BlockRefiner, mse: dict[str, float]) -> tuple[bool, str]:
    trained = [*refiner.scales.values(), *refiner.zeros.values(), *refiner.norms]
    if not (all(bool(torch.isfinite(t).all()) for t in trained) and math.isfinite(mse["mse_after"])):
        return False, "non-finite after training"
    if not mse["mse_after"] < mse["mse_before"]:
        return False, "no gain on the fitting batches"
    if not mse["heldout_after"] < mse["heldout_before"]:
        return False, "held-out error did not drop (overfit)"
    return True, "fitting and held-out error dropped"


def refine_block(
    context: BlockContext, lr: float, epochs: int, zero_point: ZeroPoint, log: dict[str, Any]
) -> dict[str, QuantizedLayer]:
    """decoupleQ's block-wise stage; returns the layers with new (S, Z) (none when it was rejected)."""
    fit, held = holdout_split(len(context.inputs.args))
    entry: dict[str, Any] = {"fit_batches": len(fit), "heldout_batches": len(held)}
    log[context.prefix or "<model>"] = entry
    if not fit:
        entry.update(kept=False, reason="one calibration batch: nothing left to fit after holding one out")
        return {}
    refiner = _BlockRefiner(context, zero_point)
    saved_norms = [p.detach().clone() for p in refiner.norms]
    mse = _train_and_measure(refiner, lr, epochs, fit, held)
    kept, reason = _verdict(refiner, mse)
    entry.update(mse, kept=kept, reason=reason)
    if not kept:
        with torch.no_grad():
            for param, saved in zip(refiner.norms, saved_norms, strict=True):
                param.copy_(saved)
        return {}
    with torch.no_grad():
        return {
            name: replace(layer, scales=refiner.scales[name].detach().cpu(), zeros=refiner.offsets(name).detach().cpu())
            for name, (_, layer) in context.layers.items()
        }


def compress(
    model: nn.Module, calib: Batches | None, config: DecoupleQConfig, *, progress: ProgressFn | None = None
) -> CompressionResult:
    """decoupleQ every quantizable layer block by block, then (optionally) refine each block's float part."""
    quantize_matrix = partial(
        _quantize_matrix,
        bits=config.bits,
        group_size=config.group_size,
        zero_point=config.zero_point,
        iterations=config.iterations,
        damp_percent=config.damp_percent,
        act_order=config.act_order,
        integer_step=config.integer_step,
        pgd_steps=config.pgd_steps,
    )
    log: dict[str, Any] = {}
    refine = None
    if config.blockwise and config.blockwise_epochs > 0:
        refine = partial(
            refine_block,
            lr=config.blockwise_lr,
            epochs=config.blockwise_epochs,
            zero_point=config.zero_point,
            log=log,
        )
    result = quantize_weights(
        model, calib, config, quantize_matrix, needs_calibration=True, refine=refine, progress=progress
    )
    accepted = sum(entry["kept"] for entry in log.values())
    result.stats["blockwise"] = log
    result.stats["blockwise_refinements"] = {"accepted": accepted, "rejected": len(log) - accepted}
    result.notes.append(
        f"decoupleQ: integer step '{config.integer_step}', {config.iterations} alternations, "
        f"zero point: {config.zero_point}, "
        f"block-wise stage {'on' if refine else 'off'} ({accepted} of {len(log)} block refinements accepted: "
        f"every {HOLDOUT_EVERY}th calibration batch (at least one) held out, a refinement kept only when its "
        "held-out error dropped too)"
    )
    return result


def _quantize_matrix(weight: torch.Tensor, hessian: torch.Tensor | None, **kwargs: Any) -> tuple:
    assert hessian is not None, "decoupleQ needs a Hessian"
    return decoupleq_quantize(weight, hessian, **kwargs)
