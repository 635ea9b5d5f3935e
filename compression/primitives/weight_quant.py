"""The model-level loop shared by the weight-only quantizers (quant_rtn, quant_gptq, quant_decoupleq).

A method supplies one matrix function `(W [out, d], H [d, d] | None) -> (codes, S, Z)`; this module
deep-copies the model, picks the layers (skip patterns, embeddings, output head, depthwise convs),
runs the block-by-block calibration, records stats and progress, and assembles the CompressionResult.
"""

from __future__ import annotations

import copy
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compression.configs import QuantizerFields
from compression.errors import CompressionError
from compression.primitives.hessian import layer_loss
from compression.primitives.layers import (
    QUANTIZABLE_KINDS,
    find_layers,
    find_output_head,
    get_weight_matrix,
    is_depthwise,
    layer_kind,
    matches_any,
    set_weight_matrix,
    tied_weight_owner,
)
from compression.primitives.quant import dequantize_layer, round_to_nearest
from compression.primitives.sequential import RefineBlockFn, quantize_sequentially
from compression.types import Batches, CompressionResult, ProgressFn, QuantizedLayer, no_progress

MatrixQuantizer = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(weight [out, d] float32, Hessian [d, d] float64 or None) -> (codes int8, S, Z [out, n_groups])."""


@dataclass
class LayerPlan:
    """Which layers the method quantizes, which get plain RTN at a fixed width, which stay float and why."""

    quantize: dict[str, nn.Module] = field(default_factory=dict)
    rtn_extra: dict[str, tuple[nn.Module, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def plan_layers(model: nn.Module, config: QuantizerFields) -> LayerPlan:
    plan = LayerPlan()
    head = find_output_head(model)
    for name, module in find_layers(model, (*QUANTIZABLE_KINDS, "embedding")).items():
        tied = tied_weight_owner(model, name) if name == head else None
        if matches_any(name, config.skip_layers):
            plan.skipped[name] = "matches config.skip_layers"
        elif tied is not None:
            plan.skipped[name] = f"weight tied to {tied}: follows that layer"
        elif layer_kind(module) == "embedding" or name == head:
            what, bits = ("embedding", config.quantize_embeddings) if name != head else ("head", config.quantize_head)
            if bits is None:
                plan.skipped[name] = f"{'embedding table' if what == 'embedding' else 'output head'} kept in float"
                plan.skipped[name] += f" (config.quantize_{'embeddings' if what == 'embedding' else 'head'} is null)"
            else:
                plan.rtn_extra[name] = (module, bits)
        elif is_depthwise(module):
            plan.skipped[name] = "depthwise conv: kh·kw weights per filter, few parameters and very sensitive"
        else:
            plan.quantize[name] = module
    return plan


def check_finite_weights(layers: dict[str, nn.Module]) -> None:
    for name, module in layers.items():
        if not torch.isfinite(module.weight).all():
            raise CompressionError("non_finite_weights", f"layer {name} has NaN or inf weights")


class _Progress:
    """Reports progress by parameter count, with an ETA from the time spent so far."""

    def __init__(self, method: str, layers: dict[str, nn.Module], report: ProgressFn) -> None:
        self.method, self.report, self.start = method, report, time.perf_counter()
        self.total = max(1, sum(module.weight.numel() for module in layers.values()))
        self.count, self.layers, self.done = len(layers), 0, 0

    def layer_done(self, name: str, module: nn.Module) -> None:
        self.layers += 1
        self.done += module.weight.numel()
        fraction = min(1.0, self.done / self.total)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else 0.0
        self.report(0.95 * fraction, f"{self.method}: {self.layers}/{self.count} layers, {name} done, ETA {eta:.0f} s")


def quantize_module(
    name: str, module: nn.Module, quantize_matrix: MatrixQuantizer, hessian: torch.Tensor | None, config: Any
) -> QuantizedLayer:
    """Quantize one module's weight with `quantize_matrix`, per conv group when the Hessian has several."""
    weight = get_weight_matrix(module).float()
    groups = 1 if hessian is None else hessian.shape[0]
    parts = [
        quantize_matrix(rows.clone(), None if hessian is None else hessian[index])
        for index, rows in enumerate(weight.chunk(groups, dim=0))
    ]
    codes, scales, zeros = (torch.cat([part[i] for part in parts], dim=0) for i in range(3))
    kind = layer_kind(module) or "linear"
    shape = tuple(weight.shape) if kind == "conv1d_hf" else tuple(module.weight.shape)
    return QuantizedLayer(name, kind, config.bits, config.group_size, codes.cpu(), scales.cpu(), zeros.cpu(), shape)


def layer_stats(module: nn.Module, layer: QuantizedLayer, hessian: torch.Tensor | None, seconds: float) -> dict:
    weight = get_weight_matrix(module).float()
    approx = dequantize_layer(layer, weight.device)
    stats: dict[str, Any] = {"kind": layer.kind, "shape": list(layer.orig_shape), "time_s": round(seconds, 4)}
    stats["weight_rel_error"] = ((approx - weight).norm() / weight.norm().clamp_min(1e-30)).item() ** 2
    if hessian is not None:
        stats["loss"], stats["rel_loss"] = layer_loss(weight, approx, hessian)
    return stats


def _quantize_extra(plan: LayerPlan, config: QuantizerFields) -> dict[str, QuantizedLayer]:
    """Plain RTN for the embeddings / head the config asks for, at the config's group size."""
    done = {}
    for name, (module, bits) in plan.rtn_extra.items():
        weight = get_weight_matrix(module).float()
        codes, scales, zeros = round_to_nearest(weight, bits, config.group_size, config.zero_point)
        kind = layer_kind(module) or "linear"
        shape = tuple(weight.shape) if kind == "conv1d_hf" else tuple(module.weight.shape)
        done[name] = QuantizedLayer(name, kind, bits, config.group_size, codes.cpu(), scales.cpu(), zeros.cpu(), shape)
        set_weight_matrix(module, dequantize_layer(done[name], weight.device))
    return done


def _check_finite_result(quantized: dict[str, QuantizedLayer]) -> None:
    for name, layer in quantized.items():
        if not (torch.isfinite(layer.scales).all() and torch.isfinite(layer.zeros).all()):
            raise CompressionError("non_finite_result", f"quantizing {name} produced NaN or inf scales")


def _resource_stats(start: float, device: torch.device) -> dict[str, float]:
    stats = {
        "wall_time_s": round(time.perf_counter() - start, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        stats["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return stats


def quantize_weights(
    model: nn.Module,
    calib: Batches | None,
    config: QuantizerFields,
    quantize_matrix: MatrixQuantizer,
    *,
    needs_calibration: bool,
    refine: RefineBlockFn | None = None,
    progress: ProgressFn | None = None,
) -> CompressionResult:
    """Deep-copy `model`, quantize its layers with `quantize_matrix`, return the result (input untouched)."""
    start, report = time.perf_counter(), progress or no_progress
    has_calib = calib is not None and len(calib) > 0
    if needs_calibration and not has_calib:
        raise CompressionError("calibration_required", f"{config.method} needs calibration data")
    torch.manual_seed(config.seed)
    work = copy.deepcopy(model)
    was_training = work.training
    work.eval()
    plan = plan_layers(work, config)
    check_finite_weights({**plan.quantize, **{n: m for n, (m, _) in plan.rtn_extra.items()}})
    tracker, layer_info = _Progress(config.method, plan.quantize, report), {}

    def quantize_layer(name: str, module: nn.Module, hessian: torch.Tensor | None) -> QuantizedLayer:
        began = time.perf_counter()
        layer = quantize_module(name, module, quantize_matrix, hessian, config)
        layer_info[name] = layer_stats(module, layer, hessian, time.perf_counter() - began)
        tracker.layer_done(name, module)
        return layer

    report(0.0, f"{config.method}: {len(plan.quantize)} layers to quantize")
    with torch.no_grad():
        if has_calib:
            quantized, how = quantize_sequentially(work, calib, plan.quantize, quantize_layer, refine)
        else:
            quantized, how = _quantize_without_data(plan, quantize_layer), "no calibration data"
        quantized.update(_quantize_extra(plan, config))
    for name in plan.quantize.keys() - quantized.keys():
        plan.skipped[name] = "never called on the calibration data; left in float"
    _check_finite_result(quantized)
    work.train(was_training)
    stats = _summary(layer_info, quantized, plan, how)
    stats.update(_resource_stats(start, next(work.parameters()).device))
    report(1.0, f"{config.method}: {len(quantized)} layers quantized in {stats['wall_time_s']:.1f} s")
    return CompressionResult(model=work, method=config.method, quantized=quantized, skipped=plan.skipped, stats=stats)


def _quantize_without_data(plan: LayerPlan, quantize_layer: Callable) -> dict[str, QuantizedLayer]:
    done = {}
    for name, module in plan.quantize.items():
        done[name] = quantize_layer(name, module, None)
        set_weight_matrix(module, dequantize_layer(done[name], module.weight.device))
    return done


def _summary(layer_info: dict, quantized: dict[str, QuantizedLayer], plan: LayerPlan, how: str) -> dict[str, Any]:
    rel_losses = [info["rel_loss"] for info in layer_info.values() if "rel_loss" in info]
    return {
        "layers": layer_info,
        "n_quantized": len(quantized),
        "n_skipped": len(plan.skipped),
        "quantized_params": sum(layer.codes.numel() for layer in quantized.values()),
        "mean_rel_loss": sum(rel_losses) / len(rel_losses) if rel_losses else None,
        "calibration": how,
    }
