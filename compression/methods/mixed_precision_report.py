"""mixed_precision, reporting: each Pareto point measured on the calibration data, the point that ships
(the cheapest passing the job's gate on the evaluation data, else the best) with the frontier, and the
per-layer explanation of an allocation."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compression.methods.mixed_precision_analysis import _Analysis
from compression.methods.mixed_precision_costs import FLOAT_BITS, LayerCosts
from compression.primitives.sensitivity import Table, output_metrics, run_outputs, task_drop
from compression.types import Batches


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


def _cost(point: dict[str, Any]) -> tuple[float, float]:
    return point["avg_bits"], point["budget"]


def pick_cheapest_passing(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the fewest average bits whose gate check (`point["evaluation"]["passed"]`) passed."""
    passing = [p for p in points if p.get("evaluation", {}).get("passed")]
    return min(passing, key=_cost, default=None)


def best_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the smallest measured metric drop (the best metric), the cheaper one on a tie."""
    measured_points = [p for p in points if p.get("evaluation", {}).get("drop") is not None]
    return min(measured_points, key=lambda p: (p["evaluation"]["drop"], *_cost(p)), default=None)


def select_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What ships: the cheapest point that passes the gate, else the best one."""
    return pick_cheapest_passing(points) or best_point(points)


def frontier(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every evaluated point, cheapest first: its bits, estimated size, metric, gate result, shipped or not."""
    rows = []
    for point in sorted((p for p in points if "evaluation" in p), key=_cost):
        evaluation = point["evaluation"]
        rows.append(
            {
                "budget": point["budget"],
                "avg_bits": point["avg_bits"],
                "size_bytes": evaluation["size_bytes"],
                "metric": evaluation["metric"],
                "drop": evaluation["drop"],
                "passed": evaluation["passed"],
                "shipped": bool(point.get("chosen")),
            }
        )
    return rows


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


def _tie_partners(ties: list[list[str]], why: dict[str, str]) -> dict[str, str]:
    """layer -> "other, names (why)" for every tied layer."""
    return {
        name: f"{', '.join(n for n in group if n != name)} ({why.get(name, 'tie')})" for group in ties for name in group
    }


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
