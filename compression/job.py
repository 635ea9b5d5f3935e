"""One compression job end to end: the worker's only entry point into the library.

`run_job` goes through the stages `load`, `compress`, `evaluate`, `export`, `benchmark` and returns a
JSON-serializable report plus the artifact paths. `preflight` answers quickly, without compressing,
whether a job can run and what it will cost.

Data rules (stated in `report["data"]`): methods that need calibration data use the calibration set,
else the evaluation set (said so), else the job fails with `calibration_required`. Fidelity is
measured on the evaluation set, else on the calibration set (optimistic: said so), else on a few
synthetic inputs (said so; no task metric then).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from compression.archives import ArchiveLimits
from compression.configs import (
    CONFIG_CLASSES,
    Gate,
    MethodConfigBase,
    MixedPrecisionConfig,
    PruneStructuredConfig,
    parse_config,
)
from compression.errors import CompressionError
from compression.evaluate import (
    check_gate,
    compare_outputs,
    estimate_flops,
    layer_diagnosis,
    model_size,
    ort_latency,
)
from compression.evaluate.fidelity import spearman_metric
from compression.io import ExportOptions, LoadedModel, export_artifacts, load_batches, load_model, verify_onnx
from compression.io.data import read_pairs
from compression.io.export import sha256_file, write_onnx
from compression.io.hf import export_hf_dir
from compression.io.model import InputSpec
from compression.types import Batches, CompressionResult

ProgressCallback = Callable[[str, float, str], None]
STAGES: dict[str, tuple[float, float]] = {
    "load": (0.0, 0.10),
    "compress": (0.10, 0.65),
    "evaluate": (0.65, 0.82),
    "export": (0.82, 0.90),
    "benchmark": (0.90, 1.0),
}
SYNTHETIC_SAMPLES = 32
# fp32 logits one forward may produce (512 MB): a 262k-vocabulary LM at 512 tokens gets one row per
# batch, where 8 rows (and the float64 copies the fidelity metrics take) would need tens of GB.
LOGITS_PER_FORWARD = 1 << 27


@dataclass
class JobSpec:
    model_path: Path
    method: str
    config: dict
    calibration_path: Path | None
    evaluation_path: Path | None
    gate: dict | None
    work_dir: Path
    device: str = "cpu"
    calibration_samples: int = 512
    evaluation_samples: int = 10_000
    batch_size: int = 64
    seq_len: int = 512
    benchmark_repeats: int = 30
    benchmark_budget_s: float = 10.0  # wall-time cap per model and batch size; repeats shrink to fit
    onnx_accuracy_level: int = 0  # MatMulNBits: 0 exact fp32 activations, 4 int8 activations (faster, lossy)
    max_memory_bytes: int | None = None  # the worker's per-job limit: a larger pre-flight estimate is refused
    archive_limits: ArchiveLimits = field(default_factory=ArchiveLimits)  # uploads unpack within these


@dataclass
class JobOutput:
    report: dict
    artifacts: dict[str, Path] = field(default_factory=dict)


class JobError(Exception):
    """A job failed for a stated reason: `code` is stable (API error bodies), `message` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _Stages:
    """Maps a stage's own 0..1 progress onto the job's, and honours cancellation at every report."""

    def __init__(self, progress: ProgressCallback, should_cancel: Callable[[], bool]) -> None:
        self.progress, self.should_cancel = progress, should_cancel
        self.timings: dict[str, float] = {}
        self._stage, self._started = "load", time.perf_counter()

    def start(self, stage: str, message: str) -> None:
        self.check_cancel()
        self._stage, self._started = stage, time.perf_counter()
        self.report(0.0, message)

    def end(self) -> None:
        self.timings[self._stage] = round(time.perf_counter() - self._started, 3)

    def report(self, fraction: float, message: str) -> None:
        self.check_cancel()
        low, high = STAGES[self._stage]
        self.progress(self._stage, low + (high - low) * min(max(fraction, 0.0), 1.0), message)

    def check_cancel(self) -> None:
        if self.should_cancel():
            raise JobError("cancelled", f"cancelled during {self._stage}")


def json_safe(value: Any) -> Any:
    """Report values JSON can carry: tensors to lists, paths to str, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist() if value.numel() > 1 else value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def _parse(method: str, config: dict) -> MethodConfigBase:
    try:
        return parse_config(method, config)
    except KeyError as error:
        raise JobError("unknown_method", f"unknown method {method!r}; known: {sorted(CONFIG_CLASSES)}") from error
    except ValidationError as error:
        raise JobError("invalid_config", str(error)) from error


def _synthetic_batches(specs: list[InputSpec], loaded: LoadedModel, count: int, seq_len: int) -> Batches:
    generator = torch.Generator().manual_seed(0)
    vocab = getattr(loaded.tokenizer, "vocab_size", None) or 1000
    batch: dict[str, torch.Tensor] = {}
    for spec in specs:
        shape = [count if i == 0 and d is None else (d or min(seq_len, 32)) for i, d in enumerate(spec.shape)]
        if spec.dtype.startswith("float"):
            batch[spec.name] = torch.randn(shape, generator=generator).to(getattr(torch, spec.dtype))
        elif spec.name == "attention_mask":
            batch[spec.name] = torch.ones(shape, dtype=torch.long)
        else:
            batch[spec.name] = torch.randint(0, vocab, shape, generator=generator, dtype=getattr(torch, spec.dtype))
    return Batches(inputs=[batch])


def _caps(spec: JobSpec, loaded: LoadedModel) -> tuple[int, int]:
    """(calibration, evaluation) sample caps; LM windows are long, so far fewer of them."""
    if loaded.task == "causal_lm":
        return min(spec.calibration_samples, 32), min(spec.evaluation_samples, 16)
    return spec.calibration_samples, spec.evaluation_samples


def rows_per_forward(loaded: LoadedModel, seq_len: int, wanted: int) -> int:
    """`wanted`, or fewer rows for a causal LM whose logits would pass LOGITS_PER_FORWARD (at least 1)."""
    vocab = (loaded.info.get("vocab_size") or 0) if loaded.task == "causal_lm" else 0
    return max(1, min(wanted, LOGITS_PER_FORWARD // max(1, seq_len * vocab)))


def latency_batches(loaded: LoadedModel, seq_len: int) -> tuple[int, ...]:
    """ORT batch sizes to time: 1 and 32, the larger one capped like every other forward."""
    return tuple(sorted({1, rows_per_forward(loaded, seq_len, 32)}))


def _read(path: Path | None, loaded: LoadedModel, spec: JobSpec, cap: int) -> Batches | None:
    if path is None:
        return None
    batch = rows_per_forward(loaded, spec.seq_len, 8 if loaded.task == "causal_lm" else spec.batch_size)
    return load_batches(
        path, loaded, batch_size=batch, max_samples=cap, seq_len=spec.seq_len, limits=spec.archive_limits
    )


def _describe(batches: Batches | None, source: str | None) -> dict[str, Any] | None:
    if batches is None:
        return None
    samples = sum(next(iter(b.values())).shape[0] for b in batches.inputs)
    return {
        "source": source,
        "samples": samples,
        "batches": len(batches),
        "labels": batches.labels is not None,
    }


def head(batches: Batches, samples: int) -> Batches:
    """The first `samples` rows of `batches` (whole batches, the last one cut)."""
    inputs, labels, left = [], [], samples
    for index, batch in enumerate(batches.inputs):
        if left <= 0:
            break
        inputs.append({name: tensor[:left] for name, tensor in batch.items()})
        if batches.labels is not None:
            labels.append(batches.labels[index][:left])
        left -= next(iter(batch.values())).shape[0]
    return Batches(inputs=inputs, labels=labels if batches.labels is not None else None)


def plan_data(
    config: MethodConfigBase,
    calib: Batches | None,
    evaluation: Batches | None,
    loaded: LoadedModel,
    *,
    seq_len: int,
    calibration_cap: int,
) -> tuple[Batches | None, Batches, dict[str, Any]]:
    """(batches for the method, batches for fidelity, the report's `data` section)."""
    notes: list[str] = []
    method_data, method_source = calib, "calibration" if calib is not None else None
    if config.needs_calibration and calib is None:
        if evaluation is None:
            raise JobError("calibration_required", f"{config.method} needs calibration data; none was given")
        method_data, method_source = head(evaluation, calibration_cap), "evaluation"
        notes.append(f"{config.method} needs calibration data and none was given: it used the evaluation set")
    eval_data, eval_source = evaluation, "evaluation"
    if evaluation is None and calib is not None:
        eval_data, eval_source = calib, "calibration"
        notes.append("no evaluation set: fidelity measured on the calibration data (optimistic)")
    if eval_data is None:
        eval_data = _synthetic_batches(loaded.input_specs, loaded, SYNTHETIC_SAMPLES, seq_len)
        eval_source = "synthetic"
        notes.append(f"no data at all: fidelity on {SYNTHETIC_SAMPLES} synthetic random inputs, no task metric")
    section = {
        "calibration": _describe(calib, "calibration"),
        "evaluation": _describe(eval_data, eval_source),
        "method_data": _describe(method_data, method_source),
        "used_for": {"method": method_source, "fidelity": eval_source},
        "notes": notes,
    }
    return method_data, eval_data, section


def _to_device(batches: Batches | None, device: str) -> Batches | None:
    if batches is None or device == "cpu":
        return batches
    moved = [{k: v.to(device) for k, v in b.items()} for b in batches.inputs]
    return Batches(inputs=moved, labels=[t.to(device) for t in batches.labels] if batches.labels else None)


def _example(batches: Batches, rows: int = 8) -> dict[str, torch.Tensor]:
    return {name: tensor[:rows].cpu() for name, tensor in batches.inputs[0].items()}


def _method_reason(result: CompressionResult, name: str) -> str | None:
    """The method's own explanation of a layer, when it gives one (mixed precision does)."""
    layers = result.stats.get("layers")
    entry = layers.get(name) if isinstance(layers, dict) else None
    return entry.get("reason") if isinstance(entry, dict) else None


def _layer_rows(result: CompressionResult, loaded: LoadedModel) -> list[dict[str, Any]]:
    rows = []
    for name in loaded.info.get("quantizable_layers", []):
        if name in result.quantized:
            q = result.quantized[name]
            reason = _method_reason(result, name)
            rows.append(
                {"name": name, "bits": q.bits, "group_size": q.group_size, "status": "quantized", "reason": reason}
            )
        else:
            reason = result.skipped.get(name, "left unchanged by the method")
            rows.append({"name": name, "bits": None, "group_size": None, "status": "float", "reason": reason})
    extra = [n for n in result.quantized if n not in loaded.info.get("quantizable_layers", [])]
    for name in extra:
        q = result.quantized[name]
        rows.append({"name": name, "bits": q.bits, "group_size": q.group_size, "status": "quantized", "reason": None})
    return rows


def _path_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _loaded_inputs(
    spec: JobSpec, stages: _Stages
) -> tuple[LoadedModel, MethodConfigBase, Batches | None, Batches, dict]:
    config = _parse(spec.method, spec.config)
    stages.start("load", "loading the model")
    try:
        loaded = load_model(spec.model_path, work_dir=spec.work_dir / "load", limits=spec.archive_limits)
        _refuse_if_over_memory(loaded, config, spec.max_memory_bytes)
        stages.report(0.6, f"loaded a {loaded.format} {loaded.task} model ({loaded.info['params']:,} params)")
        calib_cap, eval_cap = _caps(spec, loaded)
        calib = _read(spec.calibration_path, loaded, spec, calib_cap)
        evaluation = _read(spec.evaluation_path, loaded, spec, eval_cap)
    except CompressionError as error:
        raise JobError(error.code, error.message) from error
    method_data, eval_data, data_section = plan_data(
        config, calib, evaluation, loaded, seq_len=spec.seq_len, calibration_cap=calib_cap
    )
    stages.end()
    return loaded, config, method_data, eval_data, data_section


def _compress(
    loaded: LoadedModel, calib: Batches | None, config: MethodConfigBase, spec: JobSpec, stages: _Stages
) -> CompressionResult:
    from compression.registry import compress

    stages.start("compress", f"running {config.method}")
    try:
        if isinstance(config, PruneStructuredConfig) and config.target.metric == "latency" and calib is not None:
            from compression.methods.prune_structured import prune_structured

            hook = _ort_latency_hook(loaded, calib, spec)
            result = prune_structured(loaded.module, calib, config, measure_latency=hook, progress=stages.report)
        else:
            result = compress(
                loaded.module.to(spec.device), _to_device(calib, spec.device), config, progress=stages.report
            )
    except JobError:
        raise
    except CompressionError as error:
        raise JobError(error.code, error.message) from error
    except (MemoryError, torch.cuda.OutOfMemoryError) as error:
        raise JobError("out_of_memory", f"{config.method} ran out of memory: {error}") from error
    except Exception as error:
        raise JobError("compression_failed", f"{config.method} failed: {type(error).__name__}: {error}") from error
    stages.end()
    return result


def _ort_latency_hook(loaded: LoadedModel, calib: Batches, spec: JobSpec) -> Callable[[nn.Module], float]:
    """measure_latency(model) for a latency target: export the candidate and time it in ONNX Runtime
    at its largest batch, the same way the benchmark stage times the shipped model."""
    example = _example(calib, 8)
    batch = max(latency_batches(loaded, spec.seq_len))
    feeds = {name: t.numpy() for name, t in _example(calib, batch).items()}
    counter = iter(range(10**6))

    def measure(model: nn.Module) -> float:
        path = spec.work_dir / f"latency_probe_{next(counter)}.onnx"
        write_onnx(CompressionResult(model=model, method="probe"), loaded, path, example)
        budget = min(2.0, spec.benchmark_budget_s)
        # best of two medians: the first session on a busy machine often runs cold
        runs = [ort_latency(path, feeds, batch_sizes=(batch,), budget_s=budget) for _ in range(2)]
        path.unlink(missing_ok=True)
        return min(next(iter(r["batches"].values()))["median_ms"] for r in runs) / 1000.0

    return measure


def _evaluate(
    loaded: LoadedModel, result: CompressionResult, eval_data: Batches, spec: JobSpec, stages: _Stages
) -> dict[str, Any]:
    stages.start("evaluate", "comparing outputs with the original")
    batches = _to_device(eval_data, spec.device)
    try:
        fidelity = compare_outputs(loaded.module, result.model, batches, task=loaded.task)
        pairs = read_pairs(spec.evaluation_path) if spec.evaluation_path and loaded.tokenizer else None
        if pairs and loaded.task == "encoder":
            stages.report(0.4, f"Spearman on {len(pairs)} scored pairs")
            fidelity["metric"] = spearman_metric(loaded.module, result.model, loaded.tokenizer, pairs, spec.seq_len)
        stages.report(0.6, "per-layer diagnosis")
        few = Batches(inputs=batches.inputs[:4])
        diagnosis = layer_diagnosis(loaded.module, result.model, few, loaded.info.get("quantizable_layers", []))
        example = batches.inputs[0]
        flops = {
            "original": estimate_flops(loaded.module, example),
            "compressed": estimate_flops(result.model, example),
        }
    except JobError:
        raise
    except Exception as error:
        raise JobError("evaluation_failed", f"{type(error).__name__}: {error}") from error
    stages.end()
    return {"fidelity": fidelity, "diagnosis": diagnosis, "flops": flops}


def _digest(path: Path | None) -> str | None:
    if path is None:
        return None
    return sha256_file(path) if Path(path).is_file() else None


def _export(
    loaded: LoadedModel,
    result: CompressionResult,
    eval_data: Batches,
    spec: JobSpec,
    config: MethodConfigBase,
    data_section: dict[str, Any],
    stages: _Stages,
) -> tuple[dict[str, Path], dict[str, Any]]:
    stages.start("export", "writing ONNX, safetensors and the manifest")
    loaded.module.cpu()
    result.model.cpu()
    manifest = {
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "inputs": {
            "model": _digest(spec.model_path),
            "calibration": _digest(spec.calibration_path),
            "evaluation": _digest(spec.evaluation_path),
        },
        "data": data_section,
    }
    try:
        artifacts = export_artifacts(
            result,
            loaded,
            spec.work_dir / "artifacts",
            example=_example(eval_data),
            manifest=manifest,
            options=ExportOptions(accuracy_level=spec.onnx_accuracy_level),
        )
        if loaded.format == "hf_dir":
            artifacts["hf_dir"] = export_hf_dir(result.model, loaded, spec.work_dir / "artifacts" / "hf_model")
        check = verify_onnx(artifacts["onnx"], result.model, _example(eval_data, 64))
    except CompressionError as error:
        raise JobError(error.code, error.message) from error
    if not check.get("passed") and (check.get("max_rel_error") or 1.0) > 0.1:
        raise JobError("export_mismatch", f"the exported ONNX disagrees with the compressed model: {check}")
    stages.end()
    return artifacts, check


def _latency_pair(
    original: Path, compressed: Path, eval_data: Batches, spec: JobSpec, batch_sizes: tuple[int, ...]
) -> dict[str, Any]:
    feeds = {name: t.numpy() for name, t in _example(eval_data, max(batch_sizes)).items()}
    timing = {"repeats": spec.benchmark_repeats, "budget_s": spec.benchmark_budget_s, "batch_sizes": batch_sizes}
    before = ort_latency(original, feeds, **timing)
    after = ort_latency(compressed, feeds, **timing)
    speedups = {
        batch: before["batches"][batch]["median_ms"] / after["batches"][batch]["median_ms"]
        for batch in before["batches"]
        if batch in after["batches"] and after["batches"][batch]["median_ms"] > 0
    }
    first = min(speedups, key=int) if speedups else None
    return {
        "original": before,
        "compressed": after,
        "speedup_by_batch": speedups,
        "speedup": speedups.get(first),
    }


def _baseline_onnx(loaded: LoadedModel, eval_data: Batches, spec: JobSpec) -> Path:
    if loaded.source_onnx is not None:
        return loaded.source_onnx
    path = spec.work_dir / "baseline.onnx"
    write_onnx(CompressionResult(model=loaded.module, method="none"), loaded, path, _example(eval_data))
    return path


def _benchmark(
    loaded: LoadedModel, artifacts: dict[str, Path], eval_data: Batches, spec: JobSpec, stages: _Stages
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


def _fraction_at_target(
    config: MethodConfigBase, result: CompressionResult, rows: list[dict[str, Any]], loaded: LoadedModel
) -> float | None:
    target = getattr(config, "bits", None) or getattr(config, "budget_bits", None)
    if target is None:
        return None
    sizes = {
        name: module.weight.numel()
        for name, module in result.model.named_modules()
        if name in {r["name"] for r in rows} and hasattr(module, "weight")
    }
    total = sum(sizes.values())
    at_target = sum(sizes.get(r["name"], 0) for r in rows if r["bits"] is not None and r["bits"] <= target)
    return at_target / total if total else None


def _model_section(size_bytes: int, params: int, metric: Any, latency: dict[str, Any], flops: dict) -> dict[str, Any]:
    batch_one = latency["batches"].get(min(latency["batches"], key=int)) if latency["batches"] else None
    return {
        "size_bytes": size_bytes,
        "params": params,
        "metric": metric,
        "latency_ms": batch_one["median_ms"] if batch_one else None,
        "flops_per_sample": flops.get("per_sample_flops"),
    }


def _model_summary(loaded: LoadedModel) -> dict[str, Any]:
    inputs = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in loaded.input_specs]
    return {
        "format": loaded.format,
        "task": loaded.task,
        "architecture": loaded.info.get("architecture"),
        "inputs": inputs,
    }


def build_report(
    spec: JobSpec,
    config: MethodConfigBase,
    loaded: LoadedModel,
    result: CompressionResult,
    measured: dict[str, Any],
    artifacts: dict[str, Path],
    baseline: Path,
) -> dict[str, Any]:
    fidelity, latency, flops = measured["fidelity"], measured["latency"], measured["flops"]
    metric = fidelity["metric"]
    layers = _layer_rows(result, loaded)
    original = _model_section(
        _path_bytes(baseline),
        model_size(loaded.module)["params"],
        metric["original"],
        latency["original"],
        flops["original"],
    )
    original["upload_bytes"] = _path_bytes(spec.model_path)
    compressed = _model_section(
        _path_bytes(artifacts["onnx"]),
        model_size(result.model)["params"],
        metric["compressed"],
        latency["compressed"],
        flops["compressed"],
    )
    compressed["safetensors_bytes"] = _path_bytes(artifacts["safetensors"])
    compressed["bits"] = model_size(result.model, result=result)["bits"]
    compressed["fraction_at_target_bits"] = _fraction_at_target(config, result, layers, loaded)
    report: dict[str, Any] = {
        "method": config.method,
        "config": config.model_dump(mode="json"),
        "variant_notes": list(result.notes),
        "model": _model_summary(loaded),
        "original": original,
        "compressed": compressed,
        "fidelity": fidelity,
        "latency": latency,
        "diagnosis": measured["diagnosis"],
        "layers": layers,
        "skipped": dict(result.skipped),
        "stats": result.stats,
        "export_check": measured["export_check"],
        "data": measured["data"],
        "timings_s": measured["timings"],
        "gate": None,
    }
    if spec.gate:
        report["gate"] = check_gate(Gate(**spec.gate), report)
    return json_safe(report)


def _adapt_config(config: MethodConfigBase, loaded: LoadedModel) -> MethodConfigBase:
    """Method settings that follow from the model: mixed precision scores encoders by embedding cosine."""
    if isinstance(config, MixedPrecisionConfig) and config.task_metric == "auto" and loaded.task == "encoder":
        return config.model_copy(update={"task_metric": "cosine"})
    return config


def _gate_picks_pareto_point(
    result: CompressionResult, loaded: LoadedModel, calib: Batches | None, config: MethodConfigBase, spec: JobSpec
) -> CompressionResult:
    """For a mixed-precision sweep with a metric gate: ship the cheapest measured point that passes."""
    from compression.methods.mixed_precision import apply_allocation, pick_cheapest_passing

    points = result.stats.get("pareto") or []
    gate = Gate(**spec.gate) if spec.gate else None
    if not isinstance(config, MixedPrecisionConfig) or len(points) < 2 or gate is None or calib is None:
        return result
    if gate.max_metric_drop is None:
        return result
    chosen = pick_cheapest_passing(points, gate.max_metric_drop, gate.drop_is_relative)
    if chosen is None:
        result.notes.append("no Pareto point passed the metric gate on calibration data: shipped budget_bits")
        return result
    for point in points:
        point["chosen"] = point is chosen
    if chosen["budget"] == config.budget_bits:
        return result
    picked = apply_allocation(loaded.module, calib, config, chosen["allocation"])
    picked.stats = {**result.stats, **picked.stats, "chosen_budget": chosen["budget"]}
    picked.notes = [
        *result.notes,
        f"the gate picked budget {chosen['budget']} ({chosen['avg_bits']:.2f} average "
        "bits): the cheapest sweep point whose measured metric drop passed",
    ]
    return picked


def run_job(spec: JobSpec, *, progress: ProgressCallback, should_cancel: Callable[[], bool]) -> JobOutput:
    """Run one job: load, compress, evaluate, export, benchmark. Raises JobError with a stable code."""
    spec.work_dir = Path(spec.work_dir)
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    stages = _Stages(progress, should_cancel)
    loaded, config, method_data, eval_data, data_section = _loaded_inputs(spec, stages)
    config = _adapt_config(config, loaded)
    result = _compress(loaded, method_data, config, spec, stages)
    result = _gate_picks_pareto_point(result, loaded, method_data, config, spec)
    measured = _evaluate(loaded, result, eval_data, spec, stages)
    artifacts, export_check = _export(loaded, result, eval_data, spec, config, data_section, stages)
    latency, baseline = _benchmark(loaded, artifacts, eval_data, spec, stages)
    measured.update(latency=latency, export_check=export_check, data=data_section, timings=stages.timings)
    report = build_report(spec, config, loaded, result, measured, artifacts, baseline)
    progress("benchmark", 1.0, "done")
    return JobOutput(report=report, artifacts=artifacts)


# Rough work per calibration forward pass, relative to one plain forward pass (for time estimates).
_METHOD_COST = {
    "quant_rtn": 1.0,
    "quant_gptq": 3.0,
    "quant_decoupleq": 8.0,
    "mixed_precision": 12.0,
    "prune_structured": 6.0,
    "prune_unstructured": 1.0,
    "data_free": 1.0,
}


def _dependency_check(loaded: LoadedModel, sample: Batches, config: MethodConfigBase) -> dict[str, Any]:
    """Structured pruning needs a dependency graph: trace it now, and for CNNs remove one channel of every
    group from a copy and run it, so a model with hard-coded channel counts fails here, not in the worker."""
    import copy

    from compression.primitives import depgraph
    from compression.primitives.layers import matches_any

    def protected(name: str) -> bool:
        return matches_any(name, config.skip_layers)

    try:
        if depgraph.build_transformer_groups(loaded.module, protected) is not None:
            return _check("dependency_graph", True, "attention heads and MLP neurons found")
        trial = copy.deepcopy(loaded.module)
        scan = depgraph.build_cnn_groups(trial, sample.inputs[0], protected)
        for group in scan.groups:
            depgraph.prune_group(trial, group, [0])
        _trial_forward(trial, sample.inputs[0])
    except CompressionError as error:
        return _check("dependency_graph", False, f"{error.code}: {error.message}")
    ok = bool(scan.groups)
    message = f"{len(scan.groups)} prunable channel groups" if ok else "nothing_to_prune: no prunable channel group"
    return _check("dependency_graph", ok, message)


def _trial_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    failed: list[str] = []

    def remember(name: str) -> Callable[..., None]:
        return lambda *_: failed.append(name)

    hooks = [m.register_forward_pre_hook(remember(n)) for n, m in model.named_modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(**batch)
    except Exception as error:
        where = failed[-1] if failed else "the model"
        raise CompressionError(
            "untraceable_model",
            f"removing one channel per group breaks module {where!r}: {error} (an operator with a fixed channel "
            "count, such as a hard-coded Reshape or channel shuffle); add it to skip_layers or use quantization",
        ) from error
    finally:
        for hook in hooks:
            hook.remove()


def _check(name: str, ok: bool, message: str) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "message": message}


def _planned_skips(loaded: LoadedModel, config: MethodConfigBase) -> list[dict[str, str]]:
    from compression.configs import QuantizerFields
    from compression.primitives.layers import matches_any

    if isinstance(config, QuantizerFields):
        from compression.primitives.weight_quant import plan_layers

        return [{"name": n, "reason": r} for n, r in plan_layers(loaded.module, config).skipped.items()]
    names = loaded.info.get("quantizable_layers", [])
    return [{"name": n, "reason": "matches config.skip_layers"} for n in names if matches_any(n, config.skip_layers)]


def _data_check(role: str, path: Path, loaded: LoadedModel) -> tuple[dict[str, Any], Batches | None]:
    try:
        batches = load_batches(path, loaded, batch_size=8, max_samples=8, seq_len=64)
    except CompressionError as error:
        return _check(f"{role}_matches_model", False, f"{error.code}: {error.message}"), None
    return _check(f"{role}_matches_model", True, "inputs match the model"), batches


def _hessian_bytes(loaded: LoadedModel) -> int:
    total = 0
    for name, module in loaded.module.named_modules():
        if name in loaded.info.get("quantizable_layers", []):
            cols = module.weight[0].numel()
            total = max(total, 8 * cols * cols)
    return total


@torch.no_grad()
def _forward_seconds(loaded: LoadedModel, batch: dict[str, torch.Tensor]) -> float:
    loaded.module.eval()(**batch)  # warm-up: the first call pays one-off allocation costs
    start = time.perf_counter()
    loaded.module(**batch)
    return time.perf_counter() - start


def memory_estimate(loaded: LoadedModel, config: MethodConfigBase) -> int:
    """Rough peak bytes: 3 model copies + the largest layer Hessian (the pre-flight's number)."""
    hessians = _hessian_bytes(loaded) if config.needs_calibration else 0
    return 3 * 4 * loaded.info["params"] + hessians


def _refuse_if_over_memory(loaded: LoadedModel, config: MethodConfigBase, limit: int | None) -> None:
    estimate = memory_estimate(loaded, config)
    if limit is not None and estimate > limit:
        raise JobError(
            "resource_limit",
            f"exceeds_worker_memory: the pre-flight estimate of peak memory, {estimate} bytes, exceeds the "
            f"worker's per-job memory limit of {limit} bytes",
        )


def _estimates(loaded: LoadedModel, config: MethodConfigBase, sample: Batches, calib_samples: int) -> dict[str, Any]:
    rows = next(iter(sample.inputs[0].values())).shape[0]
    per_sample = _forward_seconds(loaded, sample.inputs[0]) / max(rows, 1)
    seconds = per_sample * calib_samples * _METHOD_COST.get(config.method, 4.0) + per_sample * 2000
    return {
        "peak_memory_bytes": memory_estimate(loaded, config),
        "seconds": round(seconds + 5.0, 1),
        "basis": "rough: 3 model copies + the largest layer Hessian; time from one timed forward pass",
    }


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
        parsed = _parse(method, config)
    except JobError as error:
        return {"ok": False, "checks": [_check("config_valid", False, error.message)]}
    try:
        loaded = load_model(Path(model_path), work_dir=work_dir)
    except CompressionError as error:
        return {"ok": False, "checks": [_check("model_loads", False, f"{error.code}: {error.message}")]}
    checks = [_check("model_loads", True, f"{loaded.format} {loaded.task} model, {loaded.info['params']:,} params")]
    layers = loaded.info.get("quantizable_layers", [])
    checks.append(_check("has_layers", bool(layers), f"{len(layers)} Linear/Conv layers to work on"))
    export_note = (
        "every ONNX operator is supported by the converter and the exporter"
        if loaded.source_onnx is not None
        else "exported with torch.onnx (dynamo) at the export stage; not checked here"
    )
    checks.append(_check("exportable", True, export_note))
    has_data = calibration_path is not None or evaluation_path is not None
    need = parsed.needs_calibration
    message = f"{method} {'needs' if need else 'does not need'} calibration data"
    if need and calibration_path is None and evaluation_path is not None:
        message += "; the evaluation set will be used for calibration"
    checks.append(_check("calibration_present", has_data or not need, message))
    sample = None
    for role, path in (("calibration", calibration_path), ("evaluation", evaluation_path)):
        if path is not None:
            check, batches = _data_check(role, Path(path), loaded)
            checks.append(check)
            sample = sample or batches
    sample = sample or _synthetic_batches(loaded.input_specs, loaded, 4, 64)
    if parsed.method == "prune_structured":
        checks.append(_dependency_check(loaded, sample, parsed))
    return {
        "ok": all(c["ok"] for c in checks),
        "checks": checks,
        "format": loaded.format,
        "task": loaded.task,
        "params": loaded.info["params"],
        "quantizable_layers": len(layers),
        "skipped_layers": _planned_skips(loaded, parsed),
        "estimates": _estimates(loaded, parsed, sample, JobSpec.calibration_samples),
    }
