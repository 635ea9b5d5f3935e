"""Regenerate the README's benchmark tables from benchmarks/results/*.json.

    .venv/bin/python benchmarks/render_readme.py

Each table sits between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` in README.md. A
results file renders through its own function below, or generically from a `table` entry
(`{"columns": [...], "rows": [[...], ...]}`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_service(data: dict[str, Any]) -> str:
    rows = []
    for result in data["results"]:
        for poll in result["polling"]:
            rows.append(
                [
                    result["deployment"],
                    f"GET /v1/jobs/{{id}} x{poll['clients']} clients",
                    poll["throughput_rps"],
                    poll["p50_ms"],
                    poll["p99_ms"],
                    poll["errors"],
                ]
            )
    table = markdown_table(["deployment", "load", "req/s", "p50 ms", "p99 ms", "errors"], rows)
    extra = [
        [
            r["deployment"],
            r["enqueue_to_start"]["median_s"],
            r["enqueue_to_start"]["max_s"],
            r["upload"]["upload_mb"],
            r["upload"]["mb_per_s"],
            r["upload"]["rss_before_mb"],
            r["upload"]["peak_rss_mb"],
        ]
        for r in data["results"]
    ]
    table2 = markdown_table(
        ["deployment", "enqueue→start median s", "max s", "upload MB", "MB/s", "API RSS before MB", "API peak RSS MB"],
        extra,
    )
    return f"{table}\n\n{table2}\n\n_{data.get('machine', '')}; args {data.get('args')}_"


def render_generic(data: dict[str, Any]) -> str:
    table = data.get("table")
    if not table:
        return "_no table in results_"
    notes = data.get("notes")
    text = markdown_table(table["columns"], table["rows"])
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in (notes if isinstance(notes, list) else [notes]))
    return text


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {"service": render_service}


def render_all(readme: str) -> str:
    for path in sorted(RESULTS.glob("*.json")):
        name = path.stem
        data = json.loads(path.read_text())
        body = RENDERERS.get(name, render_generic)(data)
        pattern = re.compile(rf"(<!-- bench:{name}:start -->\n).*?(\n<!-- bench:{name}:end -->)", re.S)
        readme = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), readme)
    return readme


def main() -> None:
    README.write_text(render_all(README.read_text()))
    print(f"README tables regenerated from {len(list(RESULTS.glob('*.json')))} result files")


if __name__ == "__main__":
    main()
