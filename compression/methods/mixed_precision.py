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
"""

from __future__ import annotations

import copy
import math
import operator
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from compression.configs import MixedPrecisionConfig, RTNConfig
from compression.errors import CompressionError
from compression.methods.quant_decoupleq import decoupleq_quantize
from compression.methods.quant_gptq import gptq_quantize
from compression.methods.quant_rtn import rtn_quantize
from compression.primitives.allocation import (
    Allocation,
    AllocationProblem,
    BudgetRow,
    solve_allocation,
    uniform_equivalent_limit,
)
from compression.primitives.hessian import HessianAccumulator
from compression.primitives.layers import get_weight_matrix, matches_any, set_weight_matrix
from compression.primitives.sensitivity import (
    DEFAULT_CACHE,
    SensitivityCache,
    SensitivityScores,
    Table,
    combine_sensitivity,
    count_samples,
    digest_batches,
    digest_model,
    measure_sensitivity,
    output_metrics,
    run_outputs,
    split_samples,
    task_drop,
    unit_key,
)
from compression.primitives.sequential import (
    batches_on,
    discover_stages,
    quantize_sequentially,
    whole_model_inputs,
)
from compression.primitives.weight_quant import (
    MatrixQuantizer,
    check_finite_weights,
    plan_layers,
    quantize_module,
)
from compression.types import Batches, CompressionResult, ProgressFn, QuantizedLayer, no_progress

FLOAT_BITS = 16
_PASS_THROUGH = (nn.modules.batchnorm._BatchNorm, nn.Identity, nn.Dropout)


@dataclass
class _Setup:
    """The float model and everything measured on it once, shared by every budget of the sweep."""

    work: nn.Module
    calib: Batches
    layers: dict[str, nn.Module]
    skipped: dict[str, str]
    costs: LayerCosts
    weights: CandidateWeights
    task_metric: str
    measure: Batches  # the samples the sensitivity pass runs on
    holdout: bool  # candidates fitted on calibration samples outside `measure`


@dataclass
class _Analysis:
    """Sensitivities and ties: everything the integer program needs besides the budget."""

    table: Table
    scores: SensitivityScores
    sensitivity: dict[str, Any]  # pass statistics
    ties: list[list[str]]
    tie_reasons: dict[str, str]
    notes: list[str]
    unit_of: dict[str, str]  # layer -> the table key it was measured under (itself or its tie group)


def matrix_quantizer(config: MixedPrecisionConfig, bits: int) -> MatrixQuantizer:
    """(W, H) -> (codes, S, Z) at `bits` with the configured quantizer (library defaults otherwise)."""
    group, sym = config.group_size, config.symmetric

    def quantize(weight: torch.Tensor, hessian: torch.Tensor | None) -> tuple:
        if config.quantizer == "rtn":
            return rtn_quantize(weight, bits, group, sym)
        assert hessian is not None, f"{config.quantizer} needs a Hessian"
        if config.quantizer == "gptq":
            return gptq_quantize(weight, hessian, bits, group, sym)
        return decoupleq_quantize(weight, hessian, bits, group, sym)

    return quantize


@torch.no_grad()
def float_hessians(model: nn.Module, layers: dict[str, nn.Module], calib: Batches) -> dict[str, torch.Tensor]:
    """Every layer's Hessian `[groups, d, d]` from forwards of the float model (not sequential)."""
    accumulators = {name: HessianAccumulator(name) for name in layers}
    state: dict[str, Any] = {"mask": None}
    handles = [
        module.register_forward_pre_hook(lambda m, args, n=name: accumulators[n].add(m, args[0], state["mask"]))
        for name, module in layers.items()
    ]
    inputs = whole_model_inputs(batches_on(calib, next(model.parameters()).device))
    try:
        for kwargs, mask in zip(inputs.kwargs, inputs.masks, strict=True):
            state["mask"] = mask
            model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.hessian() for name, acc in accumulators.items()}


class CandidateWeights:
    """Each (layer, bits) quantized at most once with the configured quantizer, then reused. Hessians (GPTQ,
    decoupleQ) come from one float forward over `calib`, computed on first need."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], calib: Batches, config: MixedPrecisionConfig):
        self.model, self.layers, self.calib, self.config = model, layers, calib, config
        self.hessians: dict[str, torch.Tensor] | None = None
        self.done: dict[tuple[str, int], QuantizedLayer] = {}

    def _hessian(self, name: str) -> torch.Tensor | None:
        if self.config.quantizer == "rtn":
            return None
        if self.hessians is None:
            self.hessians = float_hessians(self.model, self.layers, self.calib)
        return self.hessians[name]

    def layer(self, name: str, bits: int) -> QuantizedLayer:
        if (name, bits) not in self.done:
            settings = SimpleNamespace(bits=bits, group_size=self.config.group_size)
            quantizer = matrix_quantizer(self.config, bits)
            self.done[name, bits] = quantize_module(name, self.layers[name], quantizer, self._hessian(name), settings)
        return self.done[name, bits]

    def matrix(self, name: str, bits: int) -> torch.Tensor:
        rows = get_weight_matrix(self.layers[name]).shape[0]
        return self.layer(name, bits).dequantize().reshape(rows, -1)


@torch.no_grad()
def layer_macs(model: nn.Module, layers: dict[str, nn.Module], batch: dict[str, Any]) -> dict[str, float]:
    """Multiply-accumulates per sample of each layer in one forward of `batch` (0: never called)."""
    macs = dict.fromkeys(layers, 0.0)

    def hook(name: str, module: nn.Module, output: torch.Tensor) -> None:
        macs[name] += float(output.numel() * get_weight_matrix(module).shape[1])

    handles = [m.register_forward_hook(lambda m, a, out, n=n: hook(n, m, out)) for n, m in layers.items()]
    try:
        model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    rows = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    return {name: value / rows for name, value in macs.items()}


def shared_input_ties(model: nn.Module, layers: dict[str, nn.Module], batch: dict[str, Any]) -> list[list[str]]:
    """Groups of layers that read the same input tensor (q/k/v, gate/up, a conv and its 1x1 shortcut)."""
    stages, _ = discover_stages(model, whole_model_inputs([batch]), layers)
    return [stage for stage in stages if len(stage) > 1]


def _producer(node: torch.fx.Node, modules: dict[str, nn.Module], layers: dict[str, nn.Module]) -> str | None:
    """The quantizable layer whose output reaches `node` through BN / Identity / Dropout only."""
    while node.op == "call_module":
        if node.target in layers:
            return str(node.target)
        if not isinstance(modules[str(node.target)], _PASS_THROUGH) or not node.args:
            return None
        node = node.args[0]  # type: ignore[assignment]
    return None


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target in ("add", "add_")


def residual_add_ties(model: nn.Module, layers: dict[str, nn.Module]) -> list[list[str]] | None:
    """Groups of layers whose outputs meet in one add (HAWQ-V3 ties the residual branches); None when the
    model cannot be traced by torch.fx."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:
        return None
    modules = dict(model.named_modules())
    groups = []
    for node in graph.nodes:
        if _is_add(node):
            found = {_producer(arg, modules, layers) for arg in node.args if isinstance(arg, torch.fx.Node)}
            found.discard(None)
            if len(found) > 1:
                groups.append(sorted(found))  # type: ignore[arg-type]
    return groups


def merge_groups(groups: list[list[str]]) -> list[list[str]]:
    """Union of overlapping groups, each sorted, in order of first appearance."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for group in groups:
        for other in group[1:]:
            parent[root(other)] = root(group[0])
    merged: dict[str, list[str]] = {}
    for name in parent:
        merged.setdefault(root(name), []).append(name)
    return [sorted(members) for members in merged.values() if len(members) > 1]


def find_ties(
    model: nn.Module, layers: dict[str, nn.Module], batch: dict[str, Any], config: MixedPrecisionConfig
) -> tuple[list[list[str]], dict[str, str], list[str]]:
    """(merged tie groups, layer -> why it is tied, notes)."""
    groups: list[list[str]] = []
    why: dict[str, str] = {}
    notes: list[str] = []
    found: dict[str, list[list[str]] | None] = {}
    if "shared_input" in config.auto_ties:
        found["shared input"] = shared_input_ties(model, layers, batch)
    if "residual_add" in config.auto_ties:
        found["residual add"] = residual_add_ties(model, layers)
        if found["residual add"] is None:
            notes.append("residual_add ties skipped: the model is not traceable by torch.fx")
    found["config.tie_groups"] = [[n for n in layers if matches_any(n, group)] for group in config.tie_groups]
    for reason, tied in found.items():
        for group in tied or []:
            groups.append(group)
            for name in group:
                why.setdefault(name, reason)
    return merge_groups([g for g in groups if len(g) > 1]), why, notes


@dataclass
class LayerCosts:
    """What each layer costs at each candidate width: weight bits, BitOps, latency (when a table is given)."""

    names: list[str]
    candidates: list[int]
    params: np.ndarray  # [layers]
    macs: np.ndarray  # [layers], per sample
    activation_bits: int
    latency: np.ndarray | None = None  # [layers, candidates]

    def weight_bits(self) -> np.ndarray:
        return self.params[:, None] * np.asarray(self.candidates, dtype=float)[None, :]

    def bitops(self) -> np.ndarray:
        widths = np.asarray(self.candidates, dtype=float)
        acts = np.where(widths >= FLOAT_BITS, float(FLOAT_BITS), float(self.activation_bits))
        return self.macs[:, None] * (widths * acts)[None, :]


def latency_matrix(names: list[str], candidates: list[int], table: dict[str, dict[int, float]]) -> np.ndarray:
    missing = [(n, b) for n in names for b in candidates if b not in table.get(n, {})]
    if missing:
        raise CompressionError("latency_table_incomplete", f"latency_table lacks (layer, bits) {missing[:5]}")
    return np.array([[table[n][b] for b in candidates] for n in names], dtype=float)


def budget_rows(costs: LayerCosts, scores: SensitivityScores, config: MixedPrecisionConfig, budget: float) -> list:
    """The budget row for `budget` (uniform-equivalent bits) plus the optional predicted-drop cap."""
    coeffs = {"bits": costs.weight_bits, "bitops": costs.bitops, "latency": lambda: costs.latency}[config.budget_kind]()
    assert coeffs is not None
    rows = [BudgetRow(config.budget_kind, coeffs, uniform_equivalent_limit(coeffs, costs.candidates, budget))]
    if config.max_predicted_drop is not None:
        rows.append(BudgetRow("predicted_drop", np.clip(scores.task_drop, 0, None), config.max_predicted_drop))
    return rows


def allocation_problem(
    costs: LayerCosts, scores: SensitivityScores, ties: list[list[str]], config: MixedPrecisionConfig, budget: float
) -> AllocationProblem:
    index = {name: i for i, name in enumerate(costs.names)}
    return AllocationProblem(
        names=costs.names,
        candidates=costs.candidates,
        cost=scores.combined,
        budgets=budget_rows(costs, scores, config, budget),
        ties=[[index[name] for name in group] for group in ties],
    )


def quantize_at(
    model: nn.Module,
    bits: dict[str, int],
    weights: CandidateWeights,
    calib: Batches,
    config: MixedPrecisionConfig,
) -> tuple[nn.Module, dict[str, QuantizedLayer]]:
    """A copy of the float `model` with each layer at its allocated width (16 = left float)."""
    work = copy.deepcopy(model)
    modules = dict(work.named_modules())
    chosen = {name: modules[name] for name, b in bits.items() if b < FLOAT_BITS}
    if config.quantizer == "rtn":
        done = {name: weights.layer(name, bits[name]) for name in chosen}
        for name, layer in done.items():
            set_weight_matrix(chosen[name], layer.dequantize().reshape(get_weight_matrix(chosen[name]).shape))
        return work, done

    def quantize_layer(name: str, module: nn.Module, hessian: torch.Tensor) -> QuantizedLayer:
        settings = SimpleNamespace(bits=bits[name], group_size=config.group_size)
        return quantize_module(name, module, matrix_quantizer(config, bits[name]), hessian, settings)

    with torch.no_grad():
        done, _ = quantize_sequentially(work, calib, chosen, quantize_layer)
    return work, done


def average_bits(costs: LayerCosts, bits: dict[str, int]) -> float:
    widths = np.array([bits[name] for name in costs.names], dtype=float)
    return float((costs.params * widths).sum() / costs.params.sum())


def predicted(scores: SensitivityScores, table: Table, names: list[str], choice: list[int]) -> dict[str, Any]:
    """Additive predictions from the one-layer measurements: noise powers, KLs and drops summed."""
    rows = np.arange(len(names))
    noise = float(scores.damage["sqnr"][rows, choice].sum())
    return {
        "sqnr_db": math.inf if noise == 0 else -10 * math.log10(noise),
        "kl": float(scores.damage["kl"][rows, choice].sum()),
        "task_drop": float(np.clip(scores.task_drop[rows, choice], 0, None).sum()),
    }


def measured(reference: list[torch.Tensor], model: nn.Module, calib: Batches, task_metric: str) -> dict[str, Any]:
    metrics = output_metrics(reference, run_outputs(model, calib), calib.labels)
    original = metrics["accuracy_ref"] if task_metric == "accuracy" else 1.0
    return {
        "sqnr_db": metrics["sqnr_db"],
        "kl": metrics["kl"],
        "task_metric": metrics.get(task_metric),
        "task_original": original,
        "task_drop": task_drop(metrics, task_metric),
        "top1_agreement": metrics["top1_agreement"],
        "cosine": metrics["cosine"],
    }


def pick_cheapest_passing(
    points: list[dict[str, Any]], max_metric_drop: float, drop_is_relative: bool = False
) -> dict[str, Any] | None:
    """The Pareto point with the fewest average bits whose MEASURED task-metric drop is within the limit."""

    def drop(point: dict[str, Any]) -> float | None:
        value, original = point["measured"].get("task_drop"), point["measured"].get("task_original")
        if value is None or (drop_is_relative and not original):
            return None
        return value / abs(original) if drop_is_relative else value

    passing = [p for p in points if (d := drop(p)) is not None and d <= max_metric_drop]
    return min(passing, key=lambda p: (p["avg_bits"], p["budget"]), default=None)


def _sqnr(table: Table, name: str, bits: int) -> float:
    return math.inf if bits >= FLOAT_BITS else float(table[name][str(bits)]["sqnr_db"] or math.inf)


def layer_reason(name: str, bits: int, candidates: list[int], table: Table, rank: int, count: int) -> str:
    """A one-line why, from the one-layer-alone output SQNR at the chosen and the next lower width."""
    j = candidates.index(bits)
    where = f"sensitivity rank {rank}/{count} at {candidates[0]} bits"  # name: a layer or a tie group
    here = _sqnr(table, name, bits)
    if j == 0:
        return f"{bits} bits (lowest candidate): alone it leaves output SQNR {here:.1f} dB; {where}"
    lower = candidates[j - 1]
    at_lower = _sqnr(table, name, lower)
    head = "allocated float" if bits >= FLOAT_BITS else f"{bits} bits"
    fall = "" if math.isinf(here) else f"{here - at_lower:.1f} dB "
    return f"{head}: at {lower} bits alone output SQNR would fall {fall}to {at_lower:.1f} dB; {where}"


def _unit_ranks(costs: LayerCosts, analysis: _Analysis) -> tuple[dict[str, int], dict[str, int]]:
    """(unit key -> its first layer's row, unit key -> sensitivity rank at the lowest width, 1 = most)."""
    leader: dict[str, int] = {}
    for i, name in enumerate(costs.names):
        leader.setdefault(analysis.unit_of[name], i)
    lowest = {key: analysis.scores.combined[i, 0] for key, i in leader.items()}
    return leader, {key: 1 + sum(v > value for v in lowest.values()) for key, value in lowest.items()}


def explain_layers(costs: LayerCosts, analysis: _Analysis, bits: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per layer name: chosen width, per-width sensitivity per metric (of its unit), cost, and why."""
    leader, rank = _unit_ranks(costs, analysis)
    tied, table, scores = _tie_partners(analysis.ties, analysis.tie_reasons), analysis.table, analysis.scores
    bitops, weight_bits, rows = costs.bitops(), costs.weight_bits(), {}
    for i, name in enumerate(costs.names):
        key, j = analysis.unit_of[name], costs.candidates.index(bits[name])
        sensitivity = {
            str(b): {
                "sqnr_db": _sqnr(table, key, b),
                "kl": None if b >= FLOAT_BITS else table[key][str(b)]["kl"],
                "task_drop": float(scores.task_drop[leader[key], k]),
                "combined": float(scores.combined[leader[key], k]),
            }
            for k, b in enumerate(costs.candidates)
        }
        reason = layer_reason(key, bits[name], costs.candidates, table, rank[key], len(rank))
        if name in tied:
            reason += f"; tied with {tied[name]}, measured together"
        cost = {"weights": int(costs.params[i]), "weight_bits": float(weight_bits[i, j]), "bitops": float(bitops[i, j])}
        rows[name] = {"name": name, "bits": bits[name], "sensitivity": sensitivity, "cost": cost, "reason": reason}
    return rows


def resolve_task_metric(config: MixedPrecisionConfig, calib: Batches) -> str:
    if config.task_metric == "auto":
        return "accuracy" if calib.labels is not None else "top1_agreement"
    if config.task_metric == "accuracy" and calib.labels is None:
        raise CompressionError("labels_required", "task_metric 'accuracy' needs labels in the calibration data")
    return config.task_metric


def _on_device(calib: Batches, device: torch.device) -> Batches:
    labels = None if calib.labels is None else [label.to(device) for label in calib.labels]
    return Batches(batches_on(calib, device), labels)


def setup(model: nn.Module, calib: Batches, config: MixedPrecisionConfig) -> _Setup:
    """Deep-copy, pick the layers (the uniform quantizers' plan), count MACs, drop layers never called."""
    work = copy.deepcopy(model).eval()
    calib = _on_device(calib, next(work.parameters()).device)
    plan = plan_layers(work, RTNConfig(skip_layers=config.skip_layers, group_size=None))
    check_finite_weights(plan.quantize)
    macs = layer_macs(work, plan.quantize, calib.inputs[0])
    for name in [n for n, value in macs.items() if value == 0]:
        plan.skipped[name] = "never called on the calibration data; left in float"
        del plan.quantize[name]
    if not plan.quantize:
        raise CompressionError("nothing_to_quantize", "no quantizable layer runs on the calibration data")
    names, candidates = list(plan.quantize), sorted(set(config.candidates))
    params = np.array([get_weight_matrix(plan.quantize[n]).numel() for n in names], dtype=float)
    latency = latency_matrix(names, candidates, config.latency_table) if config.budget_kind == "latency" else None
    costs = LayerCosts(names, candidates, params, np.array([macs[n] for n in names]), config.activation_bits, latency)
    fit, measure, holdout = sensitivity_split(calib, config)
    weights = CandidateWeights(work, plan.quantize, fit, config)
    task_metric = resolve_task_metric(config, calib)
    return _Setup(work, calib, plan.quantize, plan.skipped, costs, weights, task_metric, measure, holdout)


def sensitivity_split(calib: Batches, config: MixedPrecisionConfig) -> tuple[Batches, Batches, bool]:
    """(samples the candidates are fitted on, samples the sensitivity pass measures, held out?). The
    measured samples are the last `sensitivity_samples`; data-driven quantizers fit on the others when at
    least as many remain, else on everything (a sensitivity measured on the fitted data is optimistic)."""
    total = count_samples(calib)
    count = min(config.sensitivity_samples, total)
    _, measure = split_samples(calib, total - count)
    if config.quantizer != "rtn" and config.sensitivity_holdout and total - count >= count:
        return split_samples(calib, total - count)[0], measure, True
    return calib, measure, False


def sensitivity_pass(
    state: _Setup, config: MixedPrecisionConfig, units: list[list[str]], cache: SensitivityCache, report: ProgressFn
) -> tuple[Table, dict[str, Any]]:
    """The (cached) sensitivity table of every unit (layer or tie group) at every candidate width below 16."""
    began = time.perf_counter()
    key = cache.key(
        version=1,
        model=digest_model(state.work),
        data=digest_batches(state.calib),
        samples=config.sensitivity_samples,
        holdout=state.holdout,
        quantizer=config.quantizer,
        group_size=config.group_size,
        symmetric=config.symmetric,
    )
    known = cache.load(key)
    table, count = measure_sensitivity(
        state.work, state.layers, state.measure, state.costs.candidates, state.weights.matrix, known, report, units
    )
    if count:
        cache.save(key, table)
    total = len(units) * sum(1 for b in state.costs.candidates if b < FLOAT_BITS)
    stats = {
        "time_s": round(time.perf_counter() - began, 3),
        "entries_measured": count,
        "entries_cached": total - count,
        "cache": "hit" if count == 0 else ("miss" if count == total else "partial"),
        "samples": count_samples(state.measure),
        "held_out": state.holdout,
        "units": len(units),
        "cache_key": key,
    }
    return table, stats


def _tie_partners(ties: list[list[str]], why: dict[str, str]) -> dict[str, str]:
    """layer -> "other, names (why)" for every tied layer."""
    return {
        name: f"{', '.join(n for n in group if n != name)} ({why.get(name, 'tie')})" for group in ties for name in group
    }


def measurement_units(names: list[str], ties: list[list[str]]) -> list[list[str]]:
    """Tie groups (measured jointly) and single layers, in layer order of their first member."""
    group_of = {name: group for group in ties for name in group}
    units, seen = [], set()
    for name in names:
        unit = group_of.get(name, [name])
        if unit[0] not in seen:
            seen.add(unit[0])
            units.append(unit)
    return units


def analyse(state: _Setup, config: MixedPrecisionConfig, cache: SensitivityCache, report: ProgressFn) -> _Analysis:
    ties, reasons, notes = find_ties(state.work, state.layers, state.calib.inputs[0], config)
    units = measurement_units(state.costs.names, ties)
    table, stats = sensitivity_pass(state, config, units, cache, report)
    names, candidates = state.costs.names, state.costs.candidates
    weights = dict(config.metric_weights)
    if state.task_metric == "cosine" and weights.get("kl") and (weights.get("sqnr") or weights.get("task")):
        weights["kl"] = 0.0  # embeddings, not logits: a softmax over hidden units is no distribution
        notes.append("kl not used in the sensitivity: task_metric 'cosine' means the outputs are embeddings")
    scores = combine_sensitivity(table, names, candidates, weights, state.task_metric, units)
    stats.update({"weights_used": scores.weights, "normalizer": scores.normalizer})
    return _Analysis(table, scores, stats, ties, reasons, notes, {n: unit_key(u) for u in units for n in u})


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
    reference = run_outputs(state.work, state.calib)
    sweep = sorted({*(config.budgets or []), config.budget_bits})
    points, selected = [], None
    for index, budget in enumerate(sweep):
        allocation, point = solve_point(state, analysis, config, budget)
        quantized_model, quantized = quantize_at(state.work, allocation.bits, state.weights, state.calib, config)
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
    quantized_model, quantized = quantize_at(state.work, chosen, state.weights, state.calib, config)
    skipped = dict(state.skipped)
    skipped.update({n: "allocated float (16 bits) by the bit allocation" for n, b in chosen.items() if b >= FLOAT_BITS})
    stats = {"allocation": chosen, "avg_bits": average_bits(state.costs, chosen), "quantizer": config.quantizer}
    return CompressionResult(quantized_model, "mixed_precision", quantized, skipped, stats)
