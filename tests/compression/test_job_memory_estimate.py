"""The worker's own pre-flight refuses a job whose memory estimate exceeds the worker's per-job limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from compression.job import JobError, JobSpec, run_job
from compression.pipeline.preflight import preflight
from tests.helpers import files


def _spec(tmp_path: Path, max_memory_bytes: int | None) -> JobSpec:
    return JobSpec(
        model_path=files.tiny_onnx(tmp_path / "tiny.onnx"),
        method="quant_rtn",
        config={"bits": 4, "group_size": None},
        calibration_path=None,
        evaluation_path=None,
        gate=None,
        work_dir=tmp_path / "work",
        max_memory_bytes=max_memory_bytes,
    )


def test_run_job_refuses_an_estimate_over_the_memory_limit_before_compressing(tmp_path: Path) -> None:
    spec = _spec(tmp_path, max_memory_bytes=1000)
    estimate = preflight(spec.model_path, spec.method, spec.config)["estimates"]["peak_memory_bytes"]
    assert estimate > 1000
    stages: list[str] = []
    with pytest.raises(JobError) as error:
        run_job(spec, progress=lambda stage, *_: stages.append(stage), should_cancel=lambda: False)
    assert error.value.code == "resource_limit"
    assert "exceeds_worker_memory" in error.value.message and f"{estimate} bytes" in error.value.message
    assert set(stages) == {"load"}


def test_run_job_within_the_memory_limit_runs(tmp_path: Path) -> None:
    spec = _spec(tmp_path, max_memory_bytes=10**9)
    output = run_job(spec, progress=lambda *_: None, should_cancel=lambda: False)
    assert "onnx" in output.artifacts


def test_the_refusal_names_the_estimate_its_stage_and_the_weights(tmp_path: Path) -> None:
    from compression.io import load_model
    from compression.pipeline.context import parse
    from compression.pipeline.preflight import PROCESS_BYTES, STAGE_WEIGHT_COPIES, memory_breakdown

    spec = _spec(tmp_path, max_memory_bytes=PROCESS_BYTES)
    loaded = load_model(spec.model_path, work_dir=tmp_path / "load")
    breakdown = memory_breakdown(loaded, parse(spec.method, spec.config))
    weights = breakdown["weight_bytes"]
    assert weights == sum(t.numel() * 4 for t in loaded.module.state_dict().values())
    assert breakdown["stages"] == {s: int(PROCESS_BYTES + c * weights) for s, c in STAGE_WEIGHT_COPIES.items()}
    stage = max(STAGE_WEIGHT_COPIES, key=STAGE_WEIGHT_COPIES.get)  # no Hessians: quant_rtn needs no data
    assert breakdown["peak_stage"] == stage and breakdown["peak_bytes"] == breakdown["stages"][stage] > PROCESS_BYTES
    with pytest.raises(JobError) as error:
        run_job(spec, progress=lambda *_: None, should_cancel=lambda: False)
    message = error.value.message
    assert f"{breakdown['peak_bytes']} bytes (stage {stage!r}, {weights} bytes of weights)" in message
    assert f"limit of {PROCESS_BYTES} bytes" in message
