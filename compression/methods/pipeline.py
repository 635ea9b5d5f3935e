"""pipeline: several methods in order as one job, e.g. prune_structured then quant_int8.

Each step runs its own method on the previous step's model (`PipelineConfig.step_configs()`: the pipeline's
skip_layers added, its seed where a step set none). The result is the last step's: its model, its quantized
layers (what the export stores; an earlier step's quantization survives as its fake-quantized weights) and its
skipped layers; `stats["steps"]` records every step: method, config, its own report section, parameters,
size and FLOPs per sample after it, seconds. The job judges the final model with one gate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compression import registry
from compression.configs import MethodConfigBase, PipelineConfig
from compression.evaluate import model_size
from compression.evaluate.size import estimate_flops
from compression.types import Batches, CompressionResult, ProgressFn, no_progress, scaled_progress

StepRunner = Callable[[int, MethodConfigBase, nn.Module, ProgressFn], CompressionResult]
"""run_step(index, step config, the model so far, progress) -> that step's result."""


def compress(
    model: nn.Module, calib: Batches | None, config: PipelineConfig, *, progress: ProgressFn | None = None
) -> CompressionResult:
    """Registry entry point: each step's `compress` on the previous step's model, all with `calib`."""

    def run_step(index: int, step: MethodConfigBase, current: nn.Module, report: ProgressFn) -> CompressionResult:
        return registry.compress(current, calib, step, progress=report)

    return run_steps(model, calib, config, run_step, progress=progress)


def run_steps(
    model: nn.Module,
    calib: Batches | None,
    config: PipelineConfig,
    run_step: StepRunner,
    *,
    progress: ProgressFn | None = None,
) -> CompressionResult:
    """Run every step in order through `run_step`; the last step's result with every step's record."""
    progress = progress or no_progress
    steps = config.step_configs()
    example = _example(calib)
    records: list[dict[str, Any]] = []
    current, flops = model, _flops(model, example, None)
    before = flops
    result: CompressionResult | None = None
    for index, step in enumerate(steps):
        report = scaled_progress(progress, index / len(steps), (index + 1) / len(steps))
        report(0.0, f"step {index + 1}/{len(steps)}: {step.method}")
        started = time.perf_counter()
        result = run_step(index, step, current, report)
        flops = _flops(result.model, example, flops)
        records.append(step_record(step, result, time.perf_counter() - started, flops))
        current = result.model
    assert result is not None
    return _final(result, steps, records, model, (before, flops))


def step_record(step: MethodConfigBase, result: CompressionResult, seconds: float, flops: float | None) -> dict:
    """One step in `stats["steps"]`: what ran and the model's numbers after it."""
    return {
        "method": step.method,
        "config": step.model_dump(mode="json"),
        "report_section": registry.spec_for(step).report_section(result),
        "seconds": round(seconds, 3),
        "params": model_size(result.model)["params"],
        "size_bytes": step_size(result),
        "flops_per_sample": flops,
        "quantized_layers": len(result.quantized),
        "notes": list(result.notes),
    }


def step_size(result: CompressionResult) -> int:
    """Bytes after a step: a graph's ONNX bytes; else fp32 tensors, quantized weights as codes + fp32 (S, Z)."""
    graph = getattr(result.model, "onnx_bytes", None)
    if graph is not None:
        return len(graph)
    from compression.pipeline.run import estimated_bytes  # the job's own pre-export size estimate

    return estimated_bytes(result)


def _example(calib: Batches | None) -> dict[str, torch.Tensor] | None:
    if calib is None or not len(calib):
        return None
    return {name: tensor[:8] for name, tensor in calib.inputs[0].items()}


def _flops(model: nn.Module, example: dict[str, torch.Tensor] | None, previous: float | None) -> float | None:
    """FLOPs per sample of Conv/Linear layers; a graph run by ONNX Runtime (int8) keeps its input's count."""
    if example is None:
        return previous
    with torch.inference_mode(False), torch.no_grad():
        counted = estimate_flops(model, example)["per_sample_flops"]
    return previous if counted is None else counted


def _final(
    result: CompressionResult,
    steps: list[MethodConfigBase],
    records: list[dict[str, Any]],
    original: nn.Module,
    flops: tuple[float | None, float | None],
) -> CompressionResult:
    chain = " -> ".join(step.method for step in steps)
    result.stats = {
        "steps": records,
        "chain": chain,
        "params_before": model_size(original)["params"],
        "params_after": records[-1]["params"],
        "flops_per_sample_before": flops[0],
        "flops_per_sample_after": flops[1],
    }
    notes = [f"pipeline {chain}: each step ran on the previous step's model; one gate judges the final model"]
    for index, record in enumerate(records):
        notes += [f"step {index + 1} ({record['method']}): {note}" for note in record["notes"]]
    result.notes = notes
    return result
