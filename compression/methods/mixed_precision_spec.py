"""The job pipeline's view of `mixed_precision`: encoders are scored by embedding cosine, and a `budgets`
sweep with a metric gate ships the cheapest measured Pareto point that passes the gate."""

from __future__ import annotations

from compression.configs import Gate, MixedPrecisionConfig
from compression.io import LoadedModel
from compression.methods.mixed_precision import apply_allocation, compress, pick_cheapest_passing
from compression.methods.spec import MethodRun, MethodSpec
from compression.types import CompressionResult


def adapt_to_model(config: MixedPrecisionConfig, loaded: LoadedModel) -> MixedPrecisionConfig:
    """`task_metric: auto` on an encoder means embedding cosine."""
    if config.task_metric == "auto" and loaded.task == "encoder":
        return config.model_copy(update={"task_metric": "cosine"})
    return config


def pick_sweep_point(result: CompressionResult, run: MethodRun) -> CompressionResult:
    """For a sweep with a metric gate: rebuild and ship the cheapest measured point that passes."""
    points = result.stats.get("pareto") or []
    gate = Gate(**run.job.gate) if run.job.gate else None
    if len(points) < 2 or gate is None or gate.max_metric_drop is None or run.calib is None:
        return result
    chosen = pick_cheapest_passing(points, gate.max_metric_drop, gate.drop_is_relative)
    if chosen is None:
        result.notes.append("no Pareto point passed the metric gate on calibration data: shipped budget_bits")
        return result
    for point in points:
        point["chosen"] = point is chosen
    if chosen["budget"] == run.config.budget_bits:
        return result
    picked = apply_allocation(run.loaded.module, run.calib, run.config, chosen["allocation"])
    picked.stats = {**result.stats, **picked.stats, "chosen_budget": chosen["budget"]}
    picked.notes = [
        *result.notes,
        f"the gate picked budget {chosen['budget']} ({chosen['avg_bits']:.2f} average "
        "bits): the cheapest sweep point whose measured metric drop passed",
    ]
    return picked


SPEC = MethodSpec(
    config_class=MixedPrecisionConfig,
    compress=compress,
    cost=12.0,
    adapt_config=adapt_to_model,
    pick=pick_sweep_point,
)
