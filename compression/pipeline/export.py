"""The `export` and `benchmark` stages: write the artifacts, check them, time both models in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compression import registry
from compression.configs import MethodConfigBase
from compression.errors import CompressionError
from compression.evaluate.latency import paired_latency
from compression.io import ExportOptions, LoadedModel, export_artifacts, verify_onnx
from compression.io.export import sha256_file, write_onnx
from compression.pipeline.context import JobError, JobSpec, Stages, example
from compression.pipeline.data import latency_batches
from compression.pipeline.formats import serving_artifacts
from compression.types import Batches, CompressionResult


def _digest(path: Path | None) -> str | None:
    if path is None:
        return None
    return sha256_file(path) if Path(path).is_file() else None


def _manifest(spec: JobSpec, config: MethodConfigBase, data_section: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "inputs": {
            "model": _digest(spec.model_path),
            "calibration": _digest(spec.calibration_path),
            "evaluation": _digest(spec.evaluation_path),
        },
        "data": data_section,
    }


def export_stage(
    loaded: LoadedModel,
    result: CompressionResult,
    eval_data: Batches,
    spec: JobSpec,
    config: MethodConfigBase,
    data_section: dict[str, Any],
    stages: Stages,
) -> tuple[dict[str, Path], dict[str, Any]]:
    stages.start("export", "writing ONNX, safetensors, the manifest and the serving formats")
    write_graph = registry.spec_for(config).write_onnx
    loaded.module.cpu()
    result.model.cpu()
    try:
        artifacts = export_artifacts(
            result,
            loaded,
            spec.work_dir / "artifacts",
            example=example(eval_data),
            manifest=_manifest(spec, config, data_section),
            options=ExportOptions(accuracy_level=spec.onnx_accuracy_level),
            write_graph=write_graph,
        )
        formats: dict[str, Any] = {"note": "the method ships its own ONNX graph; no serving format derives from it"}
        if write_graph is None:
            served, formats = serving_artifacts(
                result, loaded, spec.work_dir / "artifacts", config, manifest=artifacts["manifest"]
            )
            artifacts.update(served)
        check = verify_onnx(artifacts["onnx"], result.model, example(eval_data, 64))
    except CompressionError as error:
        raise JobError(error.code, error.message) from error
    check["formats"] = formats
    if not check.get("passed") and (check.get("max_rel_error") or 1.0) > 0.1:
        raise JobError("export_mismatch", f"the exported ONNX disagrees with the compressed model: {check}")
    stages.end()
    return artifacts, check


def _latency_pair(
    original: Path, compressed: Path, eval_data: Batches, spec: JobSpec, batch_sizes: tuple[int, ...]
) -> dict[str, Any]:
    feeds = {name: t.numpy() for name, t in example(eval_data, max(batch_sizes)).items()}
    return paired_latency(
        original,
        compressed,
        feeds,
        threads=spec.benchmark_threads,
        batch_sizes=batch_sizes,
        budget_s=spec.benchmark_budget_s,
        max_rounds=spec.benchmark_repeats,
    )


def _baseline_onnx(loaded: LoadedModel, eval_data: Batches, spec: JobSpec) -> Path:
    if loaded.source_onnx is not None:
        return loaded.source_onnx
    path = spec.work_dir / "baseline.onnx"
    write_onnx(CompressionResult(model=loaded.module, method="none"), loaded, path, example(eval_data))
    return path


def benchmark_stage(
    loaded: LoadedModel, artifacts: dict[str, Path], eval_data: Batches, spec: JobSpec, stages: Stages
) -> tuple[dict[str, Any], Path]:
    stages.start("benchmark", "timing both models with ONNX Runtime")
    try:
        baseline = _baseline_onnx(loaded, eval_data, spec)
        batch_sizes = latency_batches(loaded, spec.seq_len)
        latency = _latency_pair(baseline, artifacts["onnx"], eval_data, spec, batch_sizes)
    except JobError:
        raise
    except Exception as error:
        raise JobError("benchmark_failed", f"{type(error).__name__}: {error}") from error
    stages.end()
    return latency, baseline
