"""The job report: what was done to each layer, both models side by side, the gate's verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compression import registry
from compression.configs import Gate, MethodConfigBase
from compression.evaluate import check_gate, model_size
from compression.io import LoadedModel
from compression.pipeline.context import JobSpec, json_safe
from compression.types import CompressionResult


def _method_reason(result: CompressionResult, name: str) -> str | None:
    """The method's own explanation of a layer, when it gives one in `stats["layers"][name]["reason"]`."""
    layers = result.stats.get("layers")
    entry = layers.get(name) if isinstance(layers, dict) else None
    return entry.get("reason") if isinstance(entry, dict) else None


def layer_rows(result: CompressionResult, loaded: LoadedModel) -> list[dict[str, Any]]:
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


def path_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def fraction_at_target(config: MethodConfigBase, result: CompressionResult, rows: list[dict[str, Any]]) -> float | None:
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


def _sides(
    spec: JobSpec, loaded: LoadedModel, result: CompressionResult, measured: dict[str, Any], artifacts: dict[str, Path]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report's `original` and `compressed` sections."""
    metric, latency, flops = measured["fidelity"]["metric"], measured["latency"], measured["flops"]
    original = _model_section(
        path_bytes(measured["baseline"]),
        model_size(loaded.module)["params"],
        metric["original"],
        latency["original"],
        flops["original"],
    )
    original["upload_bytes"] = path_bytes(spec.model_path)
    compressed = _model_section(
        path_bytes(artifacts["onnx"]),
        model_size(result.model)["params"],
        metric["compressed"],
        latency["compressed"],
        flops["compressed"],
    )
    compressed["safetensors_bytes"] = path_bytes(artifacts["safetensors"])
    compressed["bits"] = model_size(result.model, result=result)["bits"]
    return original, compressed


def build_report(
    spec: JobSpec,
    config: MethodConfigBase,
    loaded: LoadedModel,
    result: CompressionResult,
    measured: dict[str, Any],
    artifacts: dict[str, Path],
) -> dict[str, Any]:
    """`measured`: fidelity, latency, flops, diagnosis, export_check, data, timings, resources, baseline (ONNX path)."""
    layers = layer_rows(result, loaded)
    original, compressed = _sides(spec, loaded, result, measured, artifacts)
    compressed["fraction_at_target_bits"] = fraction_at_target(config, result, layers)
    report: dict[str, Any] = {
        "method": config.method,
        "config": config.model_dump(mode="json"),
        "variant_notes": list(result.notes),
        "model": _model_summary(loaded),
        "original": original,
        "compressed": compressed,
        "fidelity": measured["fidelity"],
        "latency": measured["latency"],
        "diagnosis": measured["diagnosis"],
        "layers": layers,
        "skipped": dict(result.skipped),
        "stats": registry.spec_for(config).report_section(result),
        "export_check": measured["export_check"],
        "data": measured["data"],
        "timings_s": measured["timings"],
        "resources": measured.get("resources"),
        "device": spec.device,  # the device the worker gave the job: `cuda` on a GPU worker, else `cpu`
        "gate": None,
    }
    if spec.gate:
        report["gate"] = check_gate(Gate(**spec.gate), report)
    return json_safe(report)
