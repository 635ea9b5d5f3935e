"""report.html: the JSON report for people, with inline SVG charts (no JS, no external assets)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from app.core.report_view import (
    effective_bits,
    latency_rows,
    megabytes,
    metric_view,
    report_notes,
    signed,
    size_ratio,
)
from app.db.models import Job

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def num(value: Any) -> Any:
    """Floats to 4 significant digits for people; everything else unchanged."""
    return f"{value:.4g}" if isinstance(value, float) else value


@lru_cache
def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters["num"] = num
    env.filters["mb"] = megabytes
    env.filters["signed"] = signed
    return env


# Colours say how bad a number is on its own (not how it compares with the other bars): thresholds below.
COLOURS = {"good": "#2da44e", "warn": "#d4a72c", "bad": "#cf222e", "neutral": "#8c959f"}
SQNR_DB_GOOD, SQNR_DB_BAD = 20.0, 10.0  # per-layer output SQNR: >= 20 dB fine, < 10 dB damaged
DROP_GOOD, DROP_BAD = 0.01, 0.05  # task metric lost, relative to the original: <= 1% fine, > 5% bad


def metric_badness(report: dict[str, Any]) -> str:
    metric = metric_view(report)
    if metric is None or metric["synthetic"] or not metric["original"]:
        return "neutral"
    lost = -metric["delta"] if metric["higher_is_better"] else metric["delta"]
    relative = lost / abs(metric["original"])
    return "good" if relative <= DROP_GOOD else "warn" if relative <= DROP_BAD else "bad"


def size_badness(report: dict[str, Any]) -> str:
    ratio = size_ratio(report)
    if ratio is None:
        return "neutral"
    return "good" if ratio <= 0.5 else "warn" if ratio <= 1.0 else "bad"


def speedup_badness(interval: list[float] | None) -> str:
    """Faster beyond doubt: good; slower beyond doubt: bad; the interval holds 1: no measurable change."""
    if not interval:
        return "neutral"
    return "good" if interval[0] > 1.0 else "bad" if interval[1] < 1.0 else "warn"


def sqnr_badness(sqnr_db: float) -> str:
    return "good" if sqnr_db >= SQNR_DB_GOOD else "bad" if sqnr_db < SQNR_DB_BAD else "warn"


def bar_pairs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Original vs compressed pairs for size, latency and the task metric, scaled for a bar chart; the
    compressed bar coloured by how bad its number is."""
    original, compressed = report.get("original", {}), report.get("compressed", {})
    latency = report.get("latency") or {}
    metric_name = (metric_view(report) or {}).get("name", "task metric")
    pairs = []
    for key, label, badness in (
        ("size_bytes", "Size (bytes)", size_badness(report)),
        ("latency_ms", "Latency p50, smallest batch (ms)", speedup_badness(latency.get("speedup_ci95"))),
        ("metric", f"{metric_name}", metric_badness(report)),
    ):
        a, b = original.get(key), compressed.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float):
            top = max(abs(a), abs(b)) or 1.0
            pairs.append(
                {
                    "label": label,
                    "original": a,
                    "compressed": b,
                    "wa": 300 * abs(a) / top,
                    "wb": 300 * abs(b) / top,
                    "badness": badness,
                    "colour": COLOURS[badness],
                }
            )
    return pairs


def layer_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    layers = report.get("diagnosis", {}).get("layers", [])
    finite = [r for r in layers if isinstance(r.get("sqnr_db"), int | float)]
    top = max((r["sqnr_db"] for r in finite), default=1.0) or 1.0
    rows = []
    for row in finite:
        badness = sqnr_badness(row["sqnr_db"])
        rows.append({**row, "w": max(2.0, 300 * max(row["sqnr_db"], 0) / top), "badness": badness})
    return [{**r, "colour": COLOURS[r["badness"]]} for r in rows]


def pareto_plot(report: dict[str, Any]) -> dict[str, Any] | None:
    """Mixed-precision sweep points (average bits vs measured metric) scaled into a 600x240 plot."""
    points = [p for p in (report.get("stats") or {}).get("pareto") or [] if isinstance(p, dict)]
    measured = [(p.get("avg_bits"), _pareto_metric(p), p) for p in points]
    measured = [(x, y, p) for x, y, p in measured if isinstance(x, int | float) and isinstance(y, int | float)]
    if len(measured) < 2:
        return None
    xs, ys = [m[0] for m in measured], [m[1] for m in measured]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)

    def scale(value: float, low: float, high: float, size: float) -> float:
        return 40 + size * (value - low) / ((high - low) or 1.0)

    dots = [
        {
            "x": scale(x, x0, x1, 520),
            "y": 220 - scale(y, y0, y1, 180) + 40,
            "bits": x,
            "metric": y,
            "budget": p.get("budget"),
            "chosen": bool(p.get("chosen")),
        }
        for x, y, p in sorted(measured)
    ]
    return {
        "dots": dots,
        "label": "task metric" if measured[0][2]["measured"].get("task_metric") is not None else "output SQNR (dB)",
    }


def _pareto_metric(point: dict[str, Any]) -> Any:
    measured = point.get("measured") or {}
    return measured.get("task_metric", measured.get("sqnr_db"))


def render_report_html(*, job: Job, report: dict[str, Any], model_filename: str | None = None) -> str:
    template = _env().get_template("report.html.j2")
    view = {
        "model_filename": model_filename or job.model_id,
        "metric": metric_view(report),
        "metric_badness": metric_badness(report),
        "latency": [{**row, "badness": speedup_badness(row["speedup_ci95"])} for row in latency_rows(report)],
        "effective_bits": effective_bits(report),
        "size_ratio": size_ratio(report),
        "notes": report_notes(report),
        "colours": COLOURS,
    }
    return template.render(
        job=job,
        report=report,
        view=view,
        bars=bar_pairs(report),
        layers=layer_rows(report),
        pareto=pareto_plot(report),
    )
