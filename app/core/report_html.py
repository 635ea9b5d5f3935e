"""report.html: the JSON report for people, with inline SVG charts (no JS, no external assets)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from app.db.models import Job

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def num(value: Any) -> Any:
    """Floats to 4 significant digits for people; everything else unchanged."""
    return f"{value:.4g}" if isinstance(value, float) else value


@lru_cache
def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    env.filters["num"] = num
    return env


def bar_pairs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Original vs compressed pairs for size, latency and the task metric, scaled for a bar chart."""
    original, compressed = report.get("original", {}), report.get("compressed", {})
    pairs = []
    for key, label in (
        ("size_bytes", "Size (bytes)"),
        ("latency_ms", "Latency p50 (ms)"),
        ("metric", "Task metric"),
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
                }
            )
    return pairs


def layer_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    layers = report.get("diagnosis", {}).get("layers", [])
    finite = [r for r in layers if isinstance(r.get("sqnr_db"), int | float)]
    top = max((r["sqnr_db"] for r in finite), default=1.0) or 1.0
    return [{**r, "w": max(2.0, 300 * max(r["sqnr_db"], 0) / top)} for r in finite]


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


def render_report_html(*, job: Job, report: dict[str, Any]) -> str:
    template = _env().get_template("report.html.j2")
    return template.render(
        job=job, report=report, bars=bar_pairs(report), layers=layer_rows(report), pareto=pareto_plot(report)
    )
