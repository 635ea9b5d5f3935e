"""mixed_precision: per-layer weight bit widths from measured sensitivity and an integer program.

MixDQ (metric-decoupled sensitivity, integer programming) with HAWQ-V3's constraints:
1. Sensitivity: every (layer, candidate width) is quantized ONCE with the configured quantizer (RTN, or
   GPTQ / decoupleQ's layer-wise stage on float-model Hessians) and swapped in alone; output SQNR, KL and
   the task metric are measured separately on `sensitivity_samples` calibration samples, then each is made
   additive (noise power, KL, drop), normalized and weighted (`compression.primitives.sensitivity`).
   Tables are cached, so another budget on the same model and data costs only the solve.
2. Allocation: one width per layer minimizing the summed score under an average-bits, BitOps or latency
   budget (each given as "uniform-equivalent bits"), optionally a predicted task-drop cap, with tied layers
   sharing a width (`compression.primitives.allocation`, HiGHS).
3. Every budget of the sweep (`budgets` plus `budget_bits`) is quantized for real (RTN reuses the step-1
   codes; GPTQ / decoupleQ re-run block by block at the allocated widths) and measured on the calibration
   data; `result.model` is the `budget_bits` point. Width 16 means "left float".

The float model runs once over the calibration data (`mixed_precision_calibration`): MACs, ties, Hessians,
the sensitivity reference and replay, the points' reference and the block inputs all come from that pass.
This module sets up, runs the sweep and assembles the result; the parts live beside it:
`mixed_precision_candidates` (quantizing a layer at a width, a model at an allocation),
`mixed_precision_analysis` (ties and the sensitivity pass), `mixed_precision_costs` (per-width costs
and the integer program of one budget) and `mixed_precision_report` (measurements, gate pick, per-layer why).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from compression.configs import MixedPrecisionConfig, RTNConfig
from compression.errors import CompressionError
from compression.methods.mixed_precision_analysis import _Analysis, analyse
from compression.methods.mixed_precision_calibration import FloatPass, float_pass
from compression.methods.mixed_precision_candidates import CandidateWeights, quantize_at
from compression.methods.mixed_precision_costs import (
    FLOAT_BITS,
    LayerCosts,
    allocation_problem,
    average_bits,
    latency_matrix,
    predicted,
)
from compression.methods.mixed_precision_report import explain_layers, measured
from compression.primitives.allocation import Allocation, solve_allocation
from compression.primitives.layers import get_weight_matrix
from compression.primitives.sensitivity import DEFAULT_CACHE, SensitivityCache, digest_batches
from compression.primitives.weight_quant import check_finite_weights, plan_layers
from compression.types import Batches, CompressionResult, ProgressFn, QuantizedLayer, no_progress

__all__ = ["apply_allocation", "compress"]


@dataclass
class _Setup:
    """The float model and everything measured on it once, shared by every budget of the sweep."""

    work: nn.Module
    calib: Batches  # the calibration batches on the model's device, as the calibration pass ran them
    layers: dict[str, nn.Module]
    skipped: dict[str, str]
    costs: LayerCosts
    weights: CandidateWeights
    task_metric: str
    measure: Batches  # the samples the sensitivity pass runs on
    holdout: bool  # candidates fitted on calibration samples outside `measure`
    float_pass: FloatPass  # what the one calibration pass of the float model recorded
    data_digest: str  # of the calibration data as given (the sensitivity cache key)


def resolve_task_metric(config: MixedPrecisionConfig, calib: Batches) -> str:
    if config.task_metric == "auto":
        return "accuracy" if calib.labels is not None else "top1_agreement"
    if config.task_metric == "accuracy" and calib.labels is None:
        raise CompressionError("labels_required", "task_metric 'accuracy' needs labels in the calibration data")
    return config.task_metric


def setup(model: nn.Module, calib: Batches, config: MixedPrecisionConfig) -> _Setup:
    """Deep-copy, pick the layers (the uniform quantizers' plan), run the one calibration pass, count MACs,
    drop layers never called."""
    work = copy.deepcopy(model).eval()
    plan = plan_layers(work, RTNConfig(skip_layers=config.skip_layers, group_size=None))
    check_finite_weights(plan.quantize)
    task_metric = resolve_task_metric(config, calib)
    recorded = float_pass(work, calib, plan.quantize, config)
    for name in [n for n, value in recorded.macs.items() if value == 0]:
        plan.skipped[name] = "never called on the calibration data; left in float"
        del plan.quantize[name]
    if not plan.quantize:
        raise CompressionError("nothing_to_quantize", "no quantizable layer runs on the calibration data")
    names, candidates = list(plan.quantize), sorted(set(config.candidates))
    params = np.array([get_weight_matrix(plan.quantize[n]).numel() for n in names], dtype=float)
    latency = latency_matrix(names, candidates, config.latency_table) if config.budget_kind == "latency" else None
    macs = np.array([recorded.macs[n] for n in names])
    costs = LayerCosts(names, candidates, params, macs, config.activation_bits, latency)
    weights = CandidateWeights(plan.quantize, recorded.hessians, config)
    return _Setup(
        work, recorded.batches, plan.quantize, plan.skipped, costs, weights, task_metric,
        recorded.measured_batches(), recorded.holdout, recorded, digest_batches(calib),
    )  # fmt: skip


def solve_point(
    state: _Setup, analysis: _Analysis, config: MixedPrecisionConfig, budget: float
) -> tuple[Allocation, dict[str, Any]]:
    """Solve one budget; the point's description without measurements yet."""
    allocation = solve_allocation(allocation_problem(state.costs, analysis.scores, analysis.ties, config, budget))
    forecast = predicted(analysis.scores, analysis.table, state.costs.names, allocation.choice)
    point = {
        "budget": budget,
        "budget_kind": config.budget_kind,
        "avg_bits": average_bits(state.costs, allocation.bits),
        "bitops": float(state.costs.bitops()[np.arange(len(allocation.choice)), allocation.choice].sum()),
        "predicted_drop": forecast["task_drop"],
        "predicted": forecast,
        "objective": allocation.objective,
        "solve_time_s": round(allocation.solve_time_s, 4),
        "solver_status": allocation.status,
        "allocation": dict(allocation.bits),
    }
    return allocation, point


def compress(
    model: nn.Module,
    calib: Batches | None,
    config: MixedPrecisionConfig,
    *,
    progress: ProgressFn | None = None,
    cache: SensitivityCache | None = None,
) -> CompressionResult:
    """Measure sensitivities, solve the allocation for every budget, quantize and measure each point;
    `result.model` is the `budget_bits` point. The input model is untouched."""
    start, report = time.perf_counter(), progress or no_progress
    if calib is None or len(calib) == 0:
        raise CompressionError("calibration_required", "mixed_precision needs calibration data")
    torch.manual_seed(config.seed)
    state = setup(model, calib, config)
    report(0.0, f"mixed_precision: {len(state.layers)} layers x {len(state.costs.candidates)} widths")
    analysis = analyse(state, config, cache or DEFAULT_CACHE, lambda f, m: report(0.6 * f, m))
    reference = state.float_pass.reference
    sweep = sorted({*(config.budgets or []), config.budget_bits})
    points, selected = [], None
    for index, budget in enumerate(sweep):
        allocation, point = solve_point(state, analysis, config, budget)
        quantized_model, quantized = quantize_at(
            state.work, allocation.bits, state.weights, state.calib, config, state.float_pass.blocks
        )
        point["measured"] = measured(reference, quantized_model, state.calib, state.task_metric)
        points.append(point)
        if budget == config.budget_bits:
            selected = (allocation, quantized_model, quantized)
        report(0.6 + 0.38 * (index + 1) / len(sweep), f"mixed_precision: budget {budget} solved and measured")
    assert selected is not None
    return _result(state, analysis, config, points, selected, start)


def _result(
    state: _Setup,
    analysis: _Analysis,
    config: MixedPrecisionConfig,
    points: list[dict[str, Any]],
    selected: tuple[Allocation, nn.Module, dict[str, QuantizedLayer]],
    start: float,
) -> CompressionResult:
    allocation, quantized_model, quantized = selected
    skipped = dict(state.skipped)
    for name, bits in allocation.bits.items():
        if bits >= FLOAT_BITS:
            skipped[name] = "allocated float (16 bits) by the bit allocation"
    stats = {
        "budget_bits": config.budget_bits,
        "budget_kind": config.budget_kind,
        "candidates": state.costs.candidates,
        "quantizer": config.quantizer,
        "task_metric": state.task_metric,
        "avg_bits": average_bits(state.costs, allocation.bits),
        "allocation": dict(allocation.bits),
        "sensitivity": analysis.sensitivity,
        "solve_time_s": round(sum(p["solve_time_s"] for p in points), 4),
        "ties": analysis.ties,
        "pareto": points,
        "layers": explain_layers(state.costs, analysis, allocation.bits),
        "n_quantized": len(quantized),
        "n_skipped": len(skipped),
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    return CompressionResult(quantized_model, "mixed_precision", quantized, skipped, stats, _notes(analysis, config))


def _notes(analysis: _Analysis, config: MixedPrecisionConfig) -> list[str]:
    sens = analysis.sensitivity
    held_out = "held-out " if sens["held_out"] else ""
    notes = [
        f"sensitivity: {sens['entries_measured']} (unit, width) entries measured one unit (a layer or a tie group) "
        f"at a time on {sens['samples']} {held_out}calibration samples in {sens['time_s']:.1f} s, "
        f"{sens['entries_cached']} from cache",
        f"allocation: integer program (HiGHS) under a {config.budget_kind} budget of {config.budget_bits} "
        "uniform-equivalent bits; Pareto points measured on the calibration data",
        *analysis.notes,
    ]
    if config.quantizer != "rtn":
        notes.append(
            f"{config.quantizer}: sensitivities use float-model Hessians; each point is re-quantized block by "
            "block at its widths" + ("" if config.quantizer == "gptq" else " (decoupleQ layer-wise stage only)")
        )
    return notes


def apply_allocation(
    model: nn.Module, calib: Batches, config: MixedPrecisionConfig, bits: dict[str, int]
) -> CompressionResult:
    """Materialize one allocation (e.g. the Pareto point a gate picked from `stats["pareto"]`) with the
    configured quantizer; layers missing from `bits` stay float. The input model is untouched."""
    state = setup(model, calib, config)
    chosen = {name: bits.get(name, FLOAT_BITS) for name in state.costs.names}
    quantized_model, quantized = quantize_at(
        state.work, chosen, state.weights, state.calib, config, state.float_pass.blocks
    )
    skipped = dict(state.skipped)
    skipped.update({n: "allocated float (16 bits) by the bit allocation" for n, b in chosen.items() if b >= FLOAT_BITS})
    stats = {"allocation": chosen, "avg_bits": average_bits(state.costs, chosen), "quantizer": config.quantizer}
    return CompressionResult(quantized_model, "mixed_precision", quantized, skipped, stats)
