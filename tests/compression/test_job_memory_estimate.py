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
