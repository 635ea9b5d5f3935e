"""The `export` and `benchmark` stages: write the artifacts and the original's ONNX, open both in ONNX Runtime
(the sessions the evaluate stage measures and this module times), time them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compression import registry
from compression.configs import MethodConfigBase
from compression.errors import CompressionError
from compression.evaluate.latency import make_session, paired_latency
from compression.io import ExportOptions, LoadedModel, export_artifacts
from compression.io.export import sha256_file, write_onnx
from compression.io.ort_model import OrtModel
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


@dataclass
class Runtimes:
    """The two ONNX files the job measures, each in the one ORT session its metric and latency both use."""

    original: OrtModel
    compressed: OrtModel


def open_runtimes(baseline: Path, compressed: Path, spec: JobSpec) -> Runtimes:
    def open_one(path: Path) -> OrtModel:
        return OrtModel(make_session(path, threads=spec.benchmark_threads), path)

    try:
        return Runtimes(open_one(baseline), open_one(compressed))
    except Exception as error:
        raise JobError("export_failed", f"ONNX Runtime cannot open the exported model: {error}") from error


def export_stage(
    loaded: LoadedModel,
    result: CompressionResult,
    eval_data: Batches,
    spec: JobSpec,
    config: MethodConfigBase,
    data_section: dict[str, Any],
    stages: Stages,
) -> tuple[dict[str, Path], Path, dict[str, Any]]:
    """Write the artifacts and the original's ONNX (what the compressed one is measured against); the third
    value says which serving formats were written and what each could not express."""
    stages.start("export", "writing ONNX, safetensors, the manifest and the serving formats")
    write_graph = registry.spec_for(config).onnx_writer(config)
    loaded.module.cpu()
    result.model.cpu()
    try:
        artifacts = export_artifacts(
            result,
            loaded,
            spec.work_dir / "artifacts",
            example=example(eval_data),
            manifest=_manifest(spec, config, data_section),
            options=ExportOptions(accuracy_level=getattr(config, "accuracy_level", 0)),
            write_graph=write_graph,
        )
        formats: dict[str, Any] = {"note": "the method ships its own ONNX graph; no serving format derives from it"}
        if write_graph is None:
            served, formats = serving_artifacts(
                result, loaded, spec.work_dir / "artifacts", config, manifest=artifacts["manifest"]
            )
            artifacts.update(served)
        stages.report(0.7, "exporting the original model for the side-by-side measurement")
        baseline = _baseline_onnx(loaded, eval_data, spec)
    except CompressionError as error:
        raise JobError(error.code, error.message) from error
    stages.end()
    return artifacts, baseline, formats


def _latency_pair(
    runtimes: Runtimes, eval_data: Batches, spec: JobSpec, batch_sizes: tuple[int, ...]
) -> dict[str, Any]:
    feeds = runtimes.compressed.feeds(example(eval_data, max(batch_sizes)))
    return paired_latency(
        runtimes.original.session,
        runtimes.compressed.session,
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
    runtimes: Runtimes, loaded: LoadedModel, eval_data: Batches, spec: JobSpec, stages: Stages
) -> dict[str, Any]:
    stages.start("benchmark", "timing both models with ONNX Runtime")
    try:
        batch_sizes = latency_batches(loaded, spec.seq_len)
        latency = _latency_pair(runtimes, eval_data, spec, batch_sizes)
    except JobError:
        raise
    except Exception as error:
        raise JobError("benchmark_failed", f"{type(error).__name__}: {error}") from error
    stages.end()
    return latency
