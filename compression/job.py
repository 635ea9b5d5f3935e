"""One compression job end to end: the worker's only entry point into the library.

`run_job` goes through the stages `load`, `compress`, `export`, `evaluate`, `benchmark` (modules under
`compression.pipeline`; the exported ONNX is what the evaluate stage measures and the benchmark times) and
returns a JSON-serializable report plus the artifact paths. Each stage asks
the method's `MethodSpec` (`compression.registry`) for what differs between methods.
`compression.pipeline.preflight.preflight` answers quickly, without compressing, whether a job can run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compression.pipeline.context import JobError, JobOutput, JobSpec, ProgressCallback, Stages
from compression.pipeline.evaluate import evaluate_stage
from compression.pipeline.export import benchmark_stage, export_stage
from compression.pipeline.generation import generation_latency
from compression.pipeline.report import build_report
from compression.pipeline.run import compress_stage, load_inputs

__all__ = ["JobError", "JobOutput", "JobSpec", "ProgressCallback", "run_job"]


def run_job(spec: JobSpec, *, progress: ProgressCallback, should_cancel: Callable[[], bool]) -> JobOutput:
    """Run one job: load, compress, export, evaluate, benchmark. Raises JobError with a stable code."""
    spec.work_dir = Path(spec.work_dir)
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(progress, should_cancel)
    inputs = load_inputs(spec, stages)
    result = compress_stage(inputs, spec, stages)
    loaded, eval_data = inputs.loaded, inputs.eval_data
    artifacts, baseline, formats = export_stage(
        loaded, result, eval_data, spec, inputs.config, inputs.data_section, stages
    )
    measured, runtimes = evaluate_stage(loaded, result, eval_data, baseline, artifacts, spec, stages)
    measured["export_check"]["formats"] = formats
    latency = benchmark_stage(runtimes, loaded, eval_data, spec, stages)
    if loaded.task == "causal_lm":
        latency["generation"] = generation_latency(loaded, artifacts, spec, stages)
    measured.update(latency=latency, baseline=baseline, data=inputs.data_section, timings=stages.timings)
    measured["resources"] = stages.memory.section()
    report = build_report(spec, inputs.config, inputs.loaded, result, measured, artifacts)
    progress("benchmark", 1.0, "done")
    return JobOutput(report=report, artifacts=artifacts)
