"""Check a job's gate (`compression.configs.Gate`) against the measured report."""

from __future__ import annotations

import math
from typing import Any

from compression.configs import Gate


def _metric_drop(report: dict[str, Any], relative: bool, bound: str = "point") -> float | None:
    metric = report.get("fidelity", {}).get("metric", {})
    drop, original = metric.get("drop"), metric.get("original")
    if bound == "upper_ci":
        drop = (metric.get("drop_ci95") or [None, None])[1]
    if drop is None:
        return None
    if relative:
        return drop / abs(original) if original else None
    return drop


def _speedup_check(limit: float, report: dict[str, Any]) -> dict[str, Any]:
    """Judged on the lower bound of the speedup's 95% interval (a noisy point estimate passes at random)."""
    latency = report.get("latency", {})
    interval = latency.get("speedup_ci95")
    lower = interval[0] if interval else None
    check = _check("min_speedup", limit, lower, lower is not None and lower >= limit, "x (95% interval lower bound)")
    return {**check, "point": latency.get("speedup"), "ci95": interval}


def _size(report: dict[str, Any]) -> int | None:
    return report.get("compressed", {}).get("size_bytes")


def _fraction_at_target(report: dict[str, Any]) -> float | None:
    return report.get("compressed", {}).get("fraction_at_target_bits")


def recovery(metric: dict[str, Any]) -> float | None:
    """Compressed / original for a higher-is-better metric, original / compressed for a lower-is-better one."""
    original, compressed = metric.get("original"), metric.get("compressed")
    if original is None or compressed is None or math.isinf(original) or math.isinf(compressed):
        return None
    better, worse = (original, compressed) if metric.get("higher_is_better", True) else (compressed, original)
    return worse / better if better else None


def _recovery_check(gate: Gate, report: dict[str, Any]) -> dict[str, Any]:
    measured = recovery(report.get("fidelity", {}).get("metric", {}))
    assert gate.min_recovery is not None
    ok = measured is not None and measured >= gate.min_recovery
    return _check("min_recovery", gate.min_recovery, measured, ok, "compressed / original metric")


def _export_check(report: dict[str, Any]) -> dict[str, Any]:
    """Always on: the shipped ONNX matches the PyTorch model and every other artifact matches the ONNX."""
    export = report.get("export_check") or {}
    measured = export.get("worst_rel_error", export.get("max_rel_error"))
    limit = export.get("tolerance")
    ok = bool(export.get("passed")) and measured is not None
    return _check("export_check", limit, measured, ok, "max relative output error between the shipped artifacts")


def has_evaluation_data(report: dict[str, Any]) -> bool:
    """False when the metric could only be taken on synthetic inputs: nothing real was judged."""
    return report.get("data", {}).get("used_for", {}).get("fidelity") != "synthetic"


def _verdict(checks: list[dict[str, Any]], report: dict[str, Any]) -> str:
    if not has_evaluation_data(report):
        return "inconclusive"
    return "pass" if all(c["passed"] for c in checks) else "fail"


def _check(name: str, limit: float, measured: float | None, passed: bool, unit: str) -> dict[str, Any]:
    return {"name": name, "limit": limit, "measured": measured, "passed": passed, "unit": unit}


def check_gate(gate: Gate, report: dict[str, Any], *, exported: bool = True) -> dict[str, Any]:
    """{verdict: "pass" | "fail" | "inconclusive", checks: [{name, limit, measured, passed, unit}]}.

    A check whose value could not be measured fails (a gate the report cannot prove is not passed).
    The last check, `export_check`, is always there for an exported model (`exported=False`: a candidate
    judged before export, e.g. a point of a mixed-precision sweep): the shipped artifacts must match each
    other (report["export_check"]).
    Without evaluation data (fidelity on synthetic inputs) the verdict is `inconclusive`, whatever the
    checks say: there was nothing to judge the model on.
    Reads report["fidelity"]["metric"]["drop"/"original"/"compressed"/"drop_ci95"],
    report["data"]["used_for"]["fidelity"], report["latency"]["speedup_ci95"],
    report["compressed"]["size_bytes"], report["compressed"]["fraction_at_target_bits"] and
    report["export_check"]["passed"/"worst_rel_error"/"tolerance"].
    """
    checks = []
    if gate.max_metric_drop is not None:
        drop = _metric_drop(report, gate.drop_is_relative, gate.metric_drop_bound)
        unit = "fraction of the original metric" if gate.drop_is_relative else "metric units"
        unit += ", upper end of the 95% interval" if gate.metric_drop_bound == "upper_ci" else ""
        ok = drop is not None and drop <= gate.max_metric_drop
        checks.append(_check("max_metric_drop", gate.max_metric_drop, drop, ok, unit))
    if gate.min_recovery is not None:
        checks.append(_recovery_check(gate, report))
    if gate.min_speedup is not None:
        checks.append(_speedup_check(gate.min_speedup, report))
    if gate.max_size_bytes is not None:
        size = _size(report)
        checks.append(
            _check(
                "max_size_bytes",
                gate.max_size_bytes,
                size,
                size is not None and size <= gate.max_size_bytes,
                "bytes",
            )
        )
    if gate.min_fraction_at_target_bits is not None:
        fraction = _fraction_at_target(report)
        ok = fraction is not None and fraction >= gate.min_fraction_at_target_bits
        checks.append(_check("min_fraction_at_target_bits", gate.min_fraction_at_target_bits, fraction, ok, "fraction"))
    if exported:
        checks.append(_export_check(report))
    return {"verdict": _verdict(checks, report), "checks": checks}
