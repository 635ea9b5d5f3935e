"""What people read out of a job report, in one place for the CLI summary and report.html.

Pure dict reading (no torch, no database): the command-line client imports it too.
"""

from __future__ import annotations

import math
from typing import Any

NOTE_SECTIONS = ("data", "fidelity", "latency", "export_check", "stats", "resources")


def report_notes(report: dict[str, Any]) -> list[str]:
    """Every warning or note the report carries, in report order, each once: what the method ran
    (`variant_notes`), then each section's `notes` (data split, busy machine, export, ...)."""
    notes: list[str] = list(report.get("variant_notes") or [])
    for key in NOTE_SECTIONS:
        section = report.get(key)
        if isinstance(section, dict):
            notes += [str(note) for note in section.get("notes") or []]
    return list(dict.fromkeys(notes))


def metric_view(report: dict[str, Any]) -> dict[str, Any] | None:
    """The task metric by name with its signed change (compressed - original) and whether that is worse."""
    metric = (report.get("fidelity") or {}).get("metric") or {}
    original, compressed = metric.get("original"), metric.get("compressed")
    if not _finite(original) or not _finite(compressed):
        return None
    higher_is_better = metric.get("higher_is_better", True)
    delta = compressed - original
    return {
        "name": metric.get("name") or "task metric",
        "original": original,
        "compressed": compressed,
        "delta": delta,
        "worse": delta < 0 if higher_is_better else delta > 0,
        "higher_is_better": higher_is_better,
        "drop": metric.get("drop"),
        "drop_ci95": metric.get("drop_ci95"),
        "synthetic": on_synthetic_inputs(report),
    }


def on_synthetic_inputs(report: dict[str, Any]) -> bool:
    """No evaluation data: the metric was taken on generated inputs and judges nothing."""
    return ((report.get("data") or {}).get("used_for") or {}).get("fidelity") == "synthetic"


def latency_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per batch size: median and p95 of both models (ms), the speedup and its 95% interval."""
    latency = report.get("latency") or {}
    original = (latency.get("original") or {}).get("batches") or {}
    compressed = (latency.get("compressed") or {}).get("batches") or {}
    intervals = latency.get("by_batch") or {}
    rows = []
    for batch in sorted(set(original) & set(compressed), key=int):
        interval = intervals.get(batch) or {}
        rows.append(
            {
                "batch": int(batch),
                "original_ms": original[batch].get("median_ms"),
                "compressed_ms": compressed[batch].get("median_ms"),
                "original_p95_ms": original[batch].get("p95_ms"),
                "compressed_p95_ms": compressed[batch].get("p95_ms"),
                "speedup": interval.get("speedup", (latency.get("speedup_by_batch") or {}).get(batch)),
                "speedup_ci95": interval.get("speedup_ci95"),
                "significant": interval.get("significant"),
            }
        )
    return rows


def effective_bits(report: dict[str, Any]) -> float | None:
    """Stored bits per quantizable weight, scales and zeros included (not the nominal width)."""
    bits = (report.get("compressed") or {}).get("bits")
    return bits.get("actual_bits") if isinstance(bits, dict) else None


def size_ratio(report: dict[str, Any]) -> float | None:
    original = (report.get("original") or {}).get("size_bytes")
    compressed = (report.get("compressed") or {}).get("size_bytes")
    return compressed / original if _finite(original) and _finite(compressed) and original else None


def megabytes(size: Any) -> str:
    return f"{size / 1e6:.3g} MB" if _finite(size) else "n/a"


def signed(value: Any, digits: int = 4) -> str:
    return f"{value:+.{digits}g}" if _finite(value) else "n/a"


def speedup_text(row: dict[str, Any]) -> str:
    """'1.29x (95% interval 0.97x to 1.38x, not significant)'."""
    speedup, interval = row.get("speedup"), row.get("speedup_ci95")
    if not _finite(speedup):
        return "speedup n/a"
    text = f"{speedup:.3g}x"
    if interval:
        verdict = "significant" if row.get("significant") else "not significant"
        text += f" (95% interval {interval[0]:.3g}x to {interval[1]:.3g}x, {verdict})"
    return text


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def job_summary(report: dict[str, Any]) -> dict[str, Any]:
    """A job's `summary` (GET /v1/jobs): both sides, fidelity, and the headline numbers lists show."""
    summary = {key: report[key] for key in ("original", "compressed", "fidelity") if key in report}
    latency = report.get("latency") or {}
    metric = metric_view(report)
    summary.update(
        speedup=latency.get("speedup"),
        speedup_ci95=latency.get("speedup_ci95"),
        size_ratio=size_ratio(report),
        metric={key: metric[key] for key in ("name", "delta", "worse", "synthetic")} if metric else None,
    )
    return summary
