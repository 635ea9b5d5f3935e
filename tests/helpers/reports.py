"""Real job reports from the library's own runner on the tiny ONNX classifier (seconds, no service)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers import files


def tiny_report(
    tmp_path: Path, *, gate: dict, evaluation: bool = True, method: str = "quant_rtn", split: bool = False
) -> dict:
    """A report for 4-bit `method` on `files.tiny_onnx`; `split`: one dataset given for both roles."""
    from compression.job import JobSpec, run_job

    model = files.tiny_onnx(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    data = files.npz(
        tmp_path / "eval.npz", input=rng.standard_normal((64, 8)).astype(np.float32), labels=rng.integers(0, 3, 64)
    )
    spec = JobSpec(
        model_path=model,
        method=method,
        config={"bits": 4, "group_size": None},
        calibration_path=data if split else None,
        evaluation_path=data if evaluation else None,
        gate=gate,
        work_dir=tmp_path / "work",
        benchmark_budget_s=0.2,
        benchmark_threads=1,
        calibration_id="d1" if split else None,
        evaluation_id="d1" if evaluation else None,
    )
    return run_job(spec, progress=lambda *_: None, should_cancel=lambda: False).report
