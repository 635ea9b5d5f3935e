"""The job-level hooks the built-in methods declare, run through `run_job` on a tiny ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compression import registry
from compression.configs import PruneStructuredConfig
from compression.io import load_batches, load_model
from compression.job import JobSpec, run_job
from compression.methods.prune_structured_spec import ort_latency_probe, run_with_latency_probe
from compression.methods.spec import MethodRun
from compression.types import no_progress
from tests.helpers import files


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    return {
        "model": files.tiny_onnx(tmp_path / "tiny.onnx", features=32, classes=10),
        "calib": files.npz(tmp_path / "calib.npz", input=rng.standard_normal((64, 32)).astype(np.float32)),
    }


def _job(tiny: dict[str, Path], work: Path, method: str, config: dict[str, Any], gate: dict | None) -> dict:
    spec = JobSpec(
        model_path=tiny["model"],
        method=method,
        config=config,
        calibration_path=tiny["calib"],
        evaluation_path=None,
        gate=gate,
        work_dir=work,
        benchmark_repeats=2,
        benchmark_budget_s=0.05,
    )
    return run_job(spec, progress=lambda *_: None, should_cancel=lambda: False).report


def test_mixed_precision_sweep_ships_the_cheapest_point_the_gate_passes(tiny: dict[str, Path], tmp_path: Path) -> None:
    config = {"quantizer": "rtn", "budget_bits": 8, "budgets": [2, 3, 4], "group_size": None, "sensitivity_samples": 32}
    report = _job(tiny, tmp_path / "work", "mixed_precision", config, {"max_metric_drop": 0.2})
    points = report["stats"]["pareto"]
    assert all(p["evaluation"]["passed"] == (p["evaluation"]["drop"] <= 0.2) for p in points)
    passing = [p for p in points if p["evaluation"]["passed"]]
    cheapest = min(passing, key=lambda p: p["avg_bits"])
    assert cheapest["budget"] < 8, "the sweep must offer a cheaper passing point for this test to mean anything"
    assert report["stats"]["chosen_budget"] == cheapest["budget"]
    assert [p["budget"] for p in points if p["chosen"]] == [cheapest["budget"]]
    # the points are judged on the data the job's own evaluation uses, and the report says which
    assert report["stats"]["selected_on"] == report["data"]["used_for"]["fidelity"]
    assert any(f"budget {cheapest['budget']} " in note and "cheapest" in note for note in report["variant_notes"])
    assert report["compressed"]["bits"]["nominal_bits"] == pytest.approx(cheapest["avg_bits"])


def test_mixed_precision_without_a_gate_ships_budget_bits(tiny: dict[str, Path], tmp_path: Path) -> None:
    config = {"quantizer": "rtn", "budget_bits": 8, "budgets": [2, 3], "group_size": None, "sensitivity_samples": 32}
    report = _job(tiny, tmp_path / "work", "mixed_precision", config, None)
    assert "chosen_budget" not in report["stats"]
    assert not any("the gate picked" in note for note in report["variant_notes"])


def test_latency_target_prunes_against_onnx_runtime_timings(tiny: dict[str, Path], tmp_path: Path) -> None:
    config = {"target": {"metric": "latency", "reduction": 0.3}, "round_to": 1}
    report = _job(tiny, tmp_path / "work", "prune_structured", config, None)
    assert registry.get_spec("prune_structured").run is run_with_latency_probe
    latency = report["stats"]["latency"]
    assert latency["trace"] and latency["base_s"] > 0
    assert report["compressed"]["params"] < report["original"]["params"]
    assert not list((tmp_path / "work").glob("latency_probe_*.onnx")), "probe models are removed after timing"


def test_latency_probe_times_an_exported_model_and_only_serves_latency_targets(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    loaded = load_model(tiny["model"], work_dir=tmp_path / "load")
    calib = load_batches(tiny["calib"], loaded, batch_size=16, max_samples=64, seq_len=16)
    job = JobSpec(tiny["model"], "prune_structured", {}, tiny["calib"], None, None, tmp_path, benchmark_budget_s=0.05)
    flops = MethodRun(loaded, calib, PruneStructuredConfig(), job, no_progress)
    assert run_with_latency_probe(flops) is None  # a FLOPs target runs the plain compress
    seconds = ort_latency_probe(flops, calib)(loaded.module)
    assert 0 < seconds < 1
    assert not list(tmp_path.glob("latency_probe_*.onnx"))
