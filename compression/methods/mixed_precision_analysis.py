"""mixed_precision, analysis: everything the integer program needs besides the budget. Layer ties
(shared inputs, residual adds, `tie_groups`) and the cached sensitivity pass over measurement units
(single layers and tie groups), combined into per-(layer, width) scores."""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compression.configs import MixedPrecisionConfig
from compression.methods.mixed_precision_costs import FLOAT_BITS
from compression.primitives.layers import matches_any
from compression.primitives.sensitivity import (
    SensitivityCache,
    SensitivityScores,
    Table,
    combine_sensitivity,
    count_samples,
    digest_model,
    measure_sensitivity,
    unit_key,
)
from compression.types import ProgressFn

if TYPE_CHECKING:
    from compression.methods.mixed_precision import _Setup


_PASS_THROUGH = (nn.modules.batchnorm._BatchNorm, nn.Identity, nn.Dropout)


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
    model: nn.Module, layers: dict[str, nn.Module], stages: list[list[str]], config: MixedPrecisionConfig
) -> tuple[list[list[str]], dict[str, str], list[str]]:
    """(merged tie groups, layer -> why it is tied, notes). `stages`: layers reading the same input tensor
    (q/k/v, gate/up, a conv and its 1x1 shortcut), as the calibration pass's `capture.Stages` found them."""
    groups: list[list[str]] = []
    why: dict[str, str] = {}
    notes: list[str] = []
    found: dict[str, list[list[str]] | None] = {}
    if "shared_input" in config.auto_ties:
        found["shared input"] = [[n for n in stage if n in layers] for stage in stages]
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


def sensitivity_pass(
    state: _Setup, config: MixedPrecisionConfig, units: list[list[str]], cache: SensitivityCache, report: ProgressFn
) -> tuple[Table, dict[str, Any]]:
    """The (cached) sensitivity table of every unit (layer or tie group) at every candidate width below 16."""
    began = time.perf_counter()
    key = cache.key(
        version=1,
        model=digest_model(state.work),
        data=state.data_digest,
        samples=config.sensitivity_samples,
        holdout=state.holdout,
        quantizer=config.quantizer,
        group_size=config.group_size,
        zero_point=config.zero_point,
    )
    known = cache.load(key)
    what = (state.work, state.layers, state.measure, state.costs.candidates, state.weights.matrix)
    table, count = measure_sensitivity(*what, known, report, units, state.float_pass.record)
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
    ties, reasons, notes = find_ties(state.work, state.layers, state.float_pass.stages, config)
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
