"""The job pipeline's view of `mixed_precision`: encoders are scored by embedding cosine, and a `budgets`
sweep with a gate measures every point on the evaluation data and ships the cheapest point that passes
the job's own gate, else the best point (the gate's verdict is then `fail`), with the frontier in the
report's stats."""

from __future__ import annotations

from typing import Any

from compression.configs import Gate, MixedPrecisionConfig
from compression.evaluate import check_gate
from compression.io import LoadedModel
from compression.methods.mixed_precision import apply_allocation, compress
from compression.methods.mixed_precision_report import frontier, select_point
from compression.methods.spec import MethodRun, MethodSpec
from compression.types import CompressionResult

# judged once the picked point is exported and timed; a point of the sweep has no latency of its own
AFTER_EXPORT = {"min_speedup": None}


def adapt_to_model(config: MixedPrecisionConfig, loaded: LoadedModel) -> MixedPrecisionConfig:
    """`task_metric: auto` on an encoder means embedding cosine."""
    if config.task_metric == "auto" and loaded.task == "encoder":
        return config.model_copy(update={"task_metric": "cosine"})
    return config


def _materialize(point: dict[str, Any], result: CompressionResult, run: MethodRun) -> CompressionResult:
    if point["budget"] == run.config.budget_bits:
        return result
    assert run.calib is not None
    return apply_allocation(run.loaded.module, run.calib, run.config, point["allocation"])


def _evaluate(candidate: CompressionResult, run: MethodRun, gate: Gate) -> dict[str, Any]:
    assert run.measure is not None
    sections = run.measure(candidate)
    checks = check_gate(gate, sections, exported=False)
    metric = sections["fidelity"]["metric"]
    return {
        "metric": metric.get("compressed"),
        "metric_name": metric.get("name"),
        "drop": metric.get("drop"),
        "size_bytes": sections["compressed"]["size_bytes"],
        "passed": checks["verdict"] == "pass",
        "checks": checks["checks"],
    }


def _sweep(result: CompressionResult, run: MethodRun, gate: Gate) -> tuple[dict[str, Any], CompressionResult]:
    """Evaluate every point, cheapest first, keeping only the model of the point selected so far."""
    points = sorted(result.stats["pareto"], key=lambda p: (p["avg_bits"], p["budget"]))
    kept: tuple[dict[str, Any], CompressionResult] | None = None
    for index, point in enumerate(points):
        candidate = _materialize(point, result, run)
        point["evaluation"] = _evaluate(candidate, run, gate)
        if select_point(points[: index + 1]) is point:
            kept = (point, candidate)
        run.progress(1.0, f"mixed_precision: budget {point['budget']} measured on the {run.evaluation_source} data")
    assert kept is not None
    return kept


def _notes(chosen: dict[str, Any], run: MethodRun) -> list[str]:
    source = run.evaluation_source
    passed = chosen["evaluation"]["passed"]
    how = "the cheapest whose gate checks passed" if passed else "none passed the gate: the best metric shipped"
    notes = [
        f"sweep point picked on the {source} data: budget {chosen['budget']} ({chosen['avg_bits']:.2f} average "
        f"bits), {how}; every point is in stats.frontier (latency is gated after export)"
    ]
    if source != "evaluation":
        notes.append(f"no separate evaluation data: the sweep point was picked on the {source} data")
    return notes


def pick_sweep_point(result: CompressionResult, run: MethodRun) -> CompressionResult:
    """For a sweep with a gate: ship the cheapest point that passes the job's gate on the evaluation
    data, else the best one; every point goes to `stats["frontier"]`."""
    points = result.stats.get("pareto") or []
    if len(points) < 2 or not run.job.gate or run.measure is None or run.calib is None:
        return result
    gate = Gate(**run.job.gate).model_copy(update=AFTER_EXPORT)
    if not check_gate(gate, {}, exported=False)["checks"]:  # only after-export checks: nothing to choose a point by
        return result
    chosen, picked = _sweep(result, run, gate)
    for point in points:
        point["chosen"] = point is chosen
    stats = {**result.stats, **picked.stats} if picked is not result else dict(result.stats)
    picked.stats = {
        **stats,
        "chosen_budget": chosen["budget"],
        "selected_on": run.evaluation_source,
        "frontier": frontier(points),
    }
    picked.notes = [*result.notes, *_notes(chosen, run)]
    return picked


SPEC = MethodSpec(
    config_class=MixedPrecisionConfig,
    compress=compress,
    cost=12.0,
    adapt_config=adapt_to_model,
    pick=pick_sweep_point,
)
