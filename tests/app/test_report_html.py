"""report.html from real reports (the library's runner on the tiny ONNX classifier): model file and format,
config, data and its split, export check, effective bits, median/p95 latency per batch with the speedup
interval, timings, every note; bars coloured by how bad their own number is."""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.core.report_html import COLOURS, bar_pairs, layer_rows, render_report_html
from app.db.models import Job
from tests.helpers.reports import tiny_report


def _render(report: dict, verdict: str | None = None) -> str:
    job = Job(
        id="job1",
        method=report["method"],
        status="succeeded",
        verdict=verdict or report["gate"]["verdict"],
        model_id="m1",
        finished_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    return html.unescape(render_report_html(job=job, report=report, model_filename="tiny.onnx"))


def _row(page: str, css_class: str, extra: str = "") -> str:
    match = re.search(rf'<tr class="{css_class}"{extra}>(.*?)</tr>', page, re.S)
    assert match, f"no {css_class} row"
    return match.group(1)


def test_report_html_shows_what_ran_on_what_and_how_it_measured(tmp_path: Path) -> None:
    report = tiny_report(tmp_path, gate={"max_metric_drop": 0.5}, method="quant_gptq", split=True)
    page = _render(report)
    assert "tiny.onnx" in page and 'data-testid="model-format">onnx<' in page
    assert "2025-01-02T03:04:05+00:00" in page, "the finish time carries its time zone"
    split = report["data"]["split"]
    assert split["from"] == "d1"
    assert f"dataset d1: {split['calibration']} calibration / {split['evaluation']} held-out evaluation" in page
    assert 'id="export-check" class="pass">passed' in page and "max_rel_error" in page
    bits = report["compressed"]["bits"]["actual_bits"]
    assert f'data-testid="effective-bits">{bits:.3g}<' in page
    for batch, interval in report["latency"]["by_batch"].items():
        row = _row(page, "latency", f' data-batch="{batch}"')
        compressed = report["latency"]["compressed"]["batches"][batch]
        assert f"{compressed['median_ms']:.4g} / {compressed['p95_ms']:.4g}" in row, "median and p95"
        low, high = interval["speedup_ci95"]
        assert f"95% interval {low:.3g}x to {high:.3g}x" in row
    assert {'data-batch="1"', 'data-batch="32"'} <= set(re.findall(r'data-batch="\d+"', page))
    for stage, seconds in report["timings_s"].items():
        assert re.search(rf"<td>{stage}</td><td class=\"num\">{seconds:.4g} s</td>", page)
    metric = report["fidelity"]["metric"]
    assert f"{metric['compressed'] - metric['original']:+.4g}" in _row(page, "metric")
    for note in [*report["variant_notes"], *report["data"]["notes"], *report["latency"]["notes"]]:
        assert f"<li>{note}</li>" in page


def test_report_html_config_lists_every_key(tmp_path: Path) -> None:
    report = tiny_report(tmp_path, gate={"max_metric_drop": 0.5})
    page = _render(report)
    assert report["config"]["bits"] == 4
    for key, value in report["config"].items():
        assert f"<tr><td>{key}</td><td><code>{json.dumps(value)}</code></td></tr>" in page


def _with_metric(original: float, compressed: float, higher_is_better: bool = True) -> dict:
    drop = (original - compressed) if higher_is_better else (compressed - original)
    metric = {"name": "m", "original": original, "compressed": compressed, "drop": drop}
    return {
        "fidelity": {"metric": {**metric, "higher_is_better": higher_is_better}},
        "original": {"metric": original, "size_bytes": 1000, "latency_ms": 2.0},
        "compressed": {"metric": compressed, "size_bytes": 300, "latency_ms": 2.0},
        "latency": {"speedup_ci95": [0.9, 1.1]},
        "data": {"used_for": {"fidelity": "evaluation"}},
    }


@pytest.mark.parametrize(("original", "compressed", "higher_is_better", "badness"), [
    (0.90, 0.895, True, "good"),     # 0.6% of accuracy lost
    (0.90, 0.87, True, "warn"),      # 3.3%
    (0.90, 0.60, True, "bad"),       # 33%
    (21.2, 21.3, False, "good"),     # perplexity up 0.5%
    (21.2, 137.4, False, "bad"),     # perplexity 6x: bad although its bar is the longer one
])  # fmt: skip
def test_metric_bar_is_coloured_by_its_own_badness(original, compressed, higher_is_better, badness) -> None:  # type: ignore[no-untyped-def]
    bars = {bar["label"]: bar for bar in bar_pairs(_with_metric(original, compressed, higher_is_better))}
    assert bars["m"]["badness"] == badness and bars["m"]["colour"] == COLOURS[badness]
    assert bars["Size (bytes)"]["badness"] == "good"  # 0.3x the size
    assert bars["Latency p50, smallest batch (ms)"]["badness"] == "warn"  # the interval holds 1: no measurable change


def test_layer_bars_are_coloured_by_absolute_sqnr_not_by_rank() -> None:
    """Every layer at 35-40 dB is fine even though one is the worst; 8 dB is bad even when alone."""
    fine = {"diagnosis": {"layers": [{"name": f"l{i}", "sqnr_db": 35.0 + i} for i in range(5)]}}
    assert {row["badness"] for row in layer_rows(fine)} == {"good"}
    damaged = {"diagnosis": {"layers": [{"name": "a", "sqnr_db": 8.0}, {"name": "b", "sqnr_db": 15.0}]}}
    assert [row["badness"] for row in layer_rows(damaged)] == ["bad", "warn"]


def test_inconclusive_report_says_the_metric_judges_nothing(tmp_path: Path) -> None:
    report = tiny_report(tmp_path, gate={"max_metric_drop": 0.5}, evaluation=False)
    page = _render(report)
    assert report["gate"]["verdict"] == "inconclusive"
    assert "Inconclusive: no evaluation data" in page and "(synthetic inputs: judges nothing)" in page
    assert "metric and fidelity: synthetic" in page
