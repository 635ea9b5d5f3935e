"""The pre-flight: answers quickly, without compressing, whether a job can run and what it will cost."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from compression import registry
from compression.configs import MethodConfigBase, QuantizerFields
from compression.errors import CompressionError
from compression.io import LoadedModel, load_batches, load_model
from compression.pipeline.context import JobError, JobSpec, check, parse
from compression.pipeline.data import synthetic_batches
from compression.primitives.layers import matches_any
from compression.types import Batches


def _hessian_bytes(loaded: LoadedModel) -> int:
    total = 0
    for name, module in loaded.module.named_modules():
        if name in loaded.info.get("quantizable_layers", []):
            cols = module.weight[0].numel()
            total = max(total, 8 * cols * cols)
    return total


# Peak resident memory per stage above the process itself (PROCESS_BYTES: torch, transformers, ONNX Runtime
# imported), in multiples of the loaded model's weight bytes W (fp32 as loaded), rounded up from
# report.resources of GPTQ W4 g128 jobs on random Llamas (benchmarks/memory.py; measured 3.3 / 5.1 / 4.1 / 3.6 W
# at 0.26 B parameters, 2.7 / 4.8 / 5.2 / 5.1 W at 0.09 B, where fixed costs weigh more): compress holds the original
# and the working copy; export both plus the ONNX graphs being written; evaluate both, then one artifact read
# back, then the two ONNX Runtime sessions; benchmark the sessions and what the allocator kept from before.
STAGE_WEIGHT_COPIES = {"compress": 3.5, "export": 5.5, "evaluate": 5.5, "benchmark": 5.5}
PROCESS_BYTES = 768 * 1024**2


def memory_breakdown(loaded: LoadedModel, config: MethodConfigBase) -> dict[str, Any]:
    """The pre-flight's peak estimate per stage (bytes), the peak and the stage it falls in."""
    weights = sum(t.numel() * t.element_size() for t in loaded.module.state_dict().values())
    hessians = _hessian_bytes(loaded) if config.needs_calibration else 0
    stages = {stage: int(PROCESS_BYTES + copies * weights) for stage, copies in STAGE_WEIGHT_COPIES.items()}
    stages["compress"] += hessians
    peak = max(stages, key=stages.get)
    return {"stages": stages, "peak_bytes": stages[peak], "peak_stage": peak, "weight_bytes": weights}


def memory_estimate(loaded: LoadedModel, config: MethodConfigBase) -> int:
    """The pre-flight's peak resident memory estimate (bytes): the largest of `memory_breakdown`'s stages."""
    return memory_breakdown(loaded, config)["peak_bytes"]


def refuse_if_over_memory(loaded: LoadedModel, config: MethodConfigBase, limit: int | None) -> None:
    breakdown = memory_breakdown(loaded, config)
    estimate = breakdown["peak_bytes"]
    if limit is not None and estimate > limit:
        raise JobError(
            "resource_limit",
            f"exceeds_worker_memory: the pre-flight estimate of peak memory, {estimate} bytes (stage "
            f"{breakdown['peak_stage']!r}, {breakdown['weight_bytes']} bytes of weights), exceeds the worker's "
            f"per-job memory limit of {limit} bytes",
        )


@torch.no_grad()
def _forward_seconds(loaded: LoadedModel, batch: dict[str, torch.Tensor]) -> float:
    loaded.module.eval()(**batch)  # warm-up: the first call pays one-off allocation costs
    start = time.perf_counter()
    loaded.module(**batch)
    return time.perf_counter() - start


def _estimates(loaded: LoadedModel, config: MethodConfigBase, sample: Batches, calib_samples: int) -> dict[str, Any]:
    rows = next(iter(sample.inputs[0].values())).shape[0]
    per_sample = _forward_seconds(loaded, sample.inputs[0]) / max(rows, 1)
    seconds = per_sample * calib_samples * registry.spec_for(config).cost + per_sample * 2000
    return {
        "peak_memory_bytes": memory_estimate(loaded, config),
        "seconds": round(seconds + 5.0, 1),
        "memory_by_stage": memory_breakdown(loaded, config)["stages"],
        "basis": "memory: the process plus per-stage copies of the weights (fitted to report.resources) and the "
        "largest layer Hessian; time from one timed forward pass",
    }


def _planned_skips(loaded: LoadedModel, config: MethodConfigBase) -> list[dict[str, str]]:
    if isinstance(config, QuantizerFields):
        from compression.primitives.weight_quant import plan_layers

        return [{"name": n, "reason": r} for n, r in plan_layers(loaded.module, config).skipped.items()]
    names = loaded.info.get("quantizable_layers", [])
    return [{"name": n, "reason": "matches config.skip_layers"} for n in names if matches_any(n, config.skip_layers)]


def _data_check(role: str, path: Path, loaded: LoadedModel) -> tuple[dict[str, Any], Batches | None]:
    try:
        batches = load_batches(path, loaded, batch_size=8, max_samples=8, seq_len=64)
    except CompressionError as error:
        return check(f"{role}_matches_model", False, f"{error.code}: {error.message}"), None
    return check(f"{role}_matches_model", True, "inputs match the model"), batches


def _model_checks(loaded: LoadedModel) -> list[dict[str, Any]]:
    checks = [check("model_loads", True, f"{loaded.format} {loaded.task} model, {loaded.info['params']:,} params")]
    layers = loaded.info.get("quantizable_layers", [])
    checks.append(check("has_layers", bool(layers), f"{len(layers)} Linear/Conv layers to work on"))
    export_note = (
        "every ONNX operator is supported by the converter and the exporter"
        if loaded.source_onnx is not None
        else "exported with torch.onnx (dynamo) at the export stage; not checked here"
    )
    checks.append(check("exportable", True, export_note))
    return checks


def _calibration_check(config: MethodConfigBase, calibration_path: Path | None, evaluation_path: Path | None) -> dict:
    has_data = calibration_path is not None or evaluation_path is not None
    need = config.needs_calibration
    message = f"{config.method} {'needs' if need else 'does not need'} calibration data"
    if need and calibration_path is None and evaluation_path is not None:
        message += "; the evaluation set will be used for calibration"
    return check("calibration_present", has_data or not need, message)


def _data_checks(
    loaded: LoadedModel, calibration_path: Path | None, evaluation_path: Path | None
) -> tuple[list[dict[str, Any]], Batches]:
    """One check per given data set, and a few sample batches (synthetic when no data matches)."""
    checks, sample = [], None
    for role, path in (("calibration", calibration_path), ("evaluation", evaluation_path)):
        if path is not None:
            data_check, batches = _data_check(role, Path(path), loaded)
            checks.append(data_check)
            sample = sample or batches
    return checks, sample or synthetic_batches(loaded.input_specs, loaded, 4, 64)


def preflight(
    model_path: Path,
    method: str,
    config: dict,
    calibration_path: Path | None = None,
    evaluation_path: Path | None = None,
    *,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Answer, without compressing, whether the job can run: {ok, checks: [{name, ok, message}], ...}."""
    try:
        parsed = parse(method, config)
    except JobError as error:
        return {"ok": False, "checks": [check("config_valid", False, error.message)]}
    try:
        loaded = load_model(Path(model_path), work_dir=work_dir)
    except CompressionError as error:
        return {"ok": False, "checks": [check("model_loads", False, f"{error.code}: {error.message}")]}
    checks = [*_model_checks(loaded), _calibration_check(parsed, calibration_path, evaluation_path)]
    data_checks, sample = _data_checks(loaded, calibration_path, evaluation_path)
    checks += data_checks
    checks += [method_check(loaded, sample, parsed) for method_check in registry.spec_for(parsed).preflight_checks]
    return {
        "ok": all(c["ok"] for c in checks),
        "checks": checks,
        "format": loaded.format,
        "task": loaded.task,
        "params": loaded.info["params"],
        "quantizable_layers": len(loaded.info.get("quantizable_layers", [])),
        "skipped_layers": _planned_skips(loaded, parsed),
        "estimates": _estimates(loaded, parsed, sample, JobSpec.calibration_samples),
    }
