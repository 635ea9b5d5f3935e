"""The CLI's closing summary on real reports (the library's own job runner on a small ONNX classifier):
the metric by name with a signed change, sizes in MB, latency in ms with the speedup and its interval,
the verdict with every check, and every note the report carries."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.client.cli import summary_table
from tests.helpers.reports import tiny_report


def _run(tmp_path: Path, evaluation: bool, gate: dict) -> dict:
    return tiny_report(tmp_path, gate=gate, evaluation=evaluation)


def _job(report: dict) -> dict:
    return {"id": "j1", "method": "quant_rtn", "model_filename": "tiny.onnx", "verdict": report["gate"]["verdict"]}


def test_summary_names_the_metric_and_shows_sizes_latency_and_signed_changes(tmp_path: Path) -> None:
    report = _run(tmp_path, evaluation=True, gate={"max_metric_drop": 0.5, "max_size_bytes": 1})
    report["data"]["notes"].append("a data note")  # every section's notes are printed, not only some
    report["latency"]["notes"].append("a latency note")
    report["export_check"]["notes"] = ["an export note"]
    text = summary_table(report, _job(report))
    lines = text.splitlines()
    assert lines[0] == "job j1: quant_rtn on tiny.onnx (onnx)"
    metric = report["fidelity"]["metric"]
    delta = metric["compressed"] - metric["original"]
    assert f"accuracy: {metric['original']:.4g} -> {metric['compressed']:.4g} (change {delta:+.4g}," in text
    original_mb, compressed_mb = (report[side]["size_bytes"] / 1e6 for side in ("original", "compressed"))
    assert f"size: {original_mb:.3g} MB -> {compressed_mb:.3g} MB" in text
    for batch, interval in report["latency"]["by_batch"].items():
        line = next(row for row in lines if row.startswith(f"latency batch {batch}:"))
        median = report["latency"]["compressed"]["batches"][batch]["median_ms"]
        assert f"-> {median:.3g} ms median" in line and f"speedup {interval['speedup']:.3g}x" in line
        low, high = interval["speedup_ci95"]
        assert f"95% interval {low:.3g}x to {high:.3g}x" in line
    ratio = compressed_mb / original_mb
    assert f"MB ({ratio:.3g}x, {100 * (ratio - 1):+.3g}%)" in text, "the size change is signed"
    assert "verdict: fail" in lines
    assert "  [FAIL] max_size_bytes: measured" in text and "  [PASS] max_metric_drop: measured" in text
    for note in [*report["variant_notes"], "a data note", "a latency note", "an export note"]:
        assert f"note: {note}" in lines


def test_summary_of_an_inconclusive_job_says_why(tmp_path: Path) -> None:
    report = _run(tmp_path, evaluation=False, gate={"max_metric_drop": 0.5})
    text = summary_table(report, _job(report))
    assert report["gate"]["verdict"] == "inconclusive"
    assert "verdict: inconclusive: no evaluation data, so nothing to judge the model on" in text
    assert "metric: not measured" in text
    assert any(line.startswith("note: no evaluation data") for line in text.splitlines())


@pytest.mark.parametrize(("name", "higher_is_better", "original", "compressed", "worse"), [
    ("perplexity", False, 21.2, 23.5, True),
    ("spearman", True, 0.80, 0.82, False),
])  # fmt: skip
def test_summary_says_which_direction_is_worse(  # type: ignore[no-untyped-def]
    tmp_path, name, higher_is_better, original, compressed, worse
) -> None:
    metric = {"name": name, "higher_is_better": higher_is_better, "original": original, "compressed": compressed}
    text = summary_table({"fidelity": {"metric": metric}}, {"id": "j", "method": "m", "verdict": None})
    assert f"{name}: {original:.4g} -> {compressed:.4g} (change {compressed - original:+.4g}, " in text
    assert ("not worse)" not in text) == worse
