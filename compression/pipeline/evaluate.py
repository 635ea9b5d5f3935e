"""The `evaluate` stage: the shipped artifact measured, the PyTorch model as a cross-check.

Task metric and fidelity come from the two ONNX files in ONNX Runtime (the original's and the compressed
one, in the sessions the benchmark then times): `fidelity.measured_on = "onnx"`. The PyTorch side runs
first and its weights are freed before the sessions open, so the two never sit in memory together. The PyTorch models
(the compressed one holds fake-quantized float weights) are measured on the same data as a cross-check,
`fidelity.cross_check`, with how far their metric is from the artifact's. The export check compares the
ONNX with the PyTorch model, and every other model artifact with the ONNX, at one tolerance; the gate
reads it as its `export_check` (without a gate, a failed export check fails the job).

When the compressed graph has MatMulNBits nodes, `fidelity.accuracy_level` measures what their accuracy_level
costs: the same file with every node at the other setting (0 when the job ships 1-4, 4 when it ships 0) in one
more ORT session on the evaluation batches, against the shipped one: argmax (top-1) agreement of the two
outputs, and the task metric of each.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from compression.evaluate import compare_outputs, estimate_flops, layer_diagnosis
from compression.evaluate.fidelity import metric_drop, spearman_metric
from compression.evaluate.latency import make_session
from compression.io import LoadedModel
from compression.io.artifact_checks import (
    EXPORT_TOLERANCE,
    artifact_outputs,
    compare_artifacts,
    onnx_outputs,
    output_agreement,
    torch_outputs,
)
from compression.io.data import read_pairs
from compression.io.onnx_rewrite import matmul_nbits_levels, set_accuracy_level
from compression.io.ort_model import OrtModel
from compression.pipeline.context import JobError, JobSpec, Stages, example, to_device
from compression.pipeline.export import Runtimes, open_runtimes
from compression.pipeline.resources import release_weights
from compression.types import Batches, CompressionResult

CHECK_ROWS = 64  # rows of the evaluation data every artifact is run on for the export check


def _fidelity(
    original: nn.Module, compressed: nn.Module, loaded: LoadedModel, batches: Batches, pairs: list | None, spec: JobSpec
) -> dict[str, Any]:
    fidelity = compare_outputs(original, compressed, batches, task=loaded.task)
    if pairs and loaded.task == "encoder":
        fidelity["metric"] = spearman_metric(original, compressed, loaded.tokenizer, pairs, spec.seq_len)
    return fidelity


def _difference(onnx: Any, torch_value: Any) -> float | None:
    numbers = all(isinstance(v, int | float) and math.isfinite(v) for v in (onnx, torch_value))
    return float(onnx) - float(torch_value) if numbers else None


def cross_check(onnx: dict[str, Any], torch_side: dict[str, Any]) -> dict[str, Any]:
    """The PyTorch models' numbers on the same data, and the artifact's minus them (0: they agree)."""
    keys = ("top1_agreement", "kl_divergence", "sqnr_db", "mean_cosine")
    metric = torch_side["metric"]
    return {
        "measured_on": "torch",
        "what": "the PyTorch original and compressed (fake-quantized) models on the same evaluation data",
        "metric": {k: metric.get(k) for k in ("name", "original", "compressed", "drop")},
        **{k: torch_side.get(k) for k in keys},
        "onnx_minus_torch": {
            "metric_original": _difference(onnx["metric"].get("original"), metric.get("original")),
            "metric_compressed": _difference(onnx["metric"].get("compressed"), metric.get("compressed")),
            "metric_drop": _difference(onnx["metric"].get("drop"), metric.get("drop")),
        },
    }


@dataclass
class TorchReference:
    """What the export check needs from the PyTorch side, computed before any ONNX Runtime session opens:
    the rows, the compressed model's outputs on them and every other artifact's (`artifact_outputs`)."""

    rows: dict[str, torch.Tensor]
    compressed: list[np.ndarray]
    artifacts: dict[str, Any]


def torch_reference(result: CompressionResult, artifacts: dict, eval_data: Batches) -> TorchReference:
    rows = example(eval_data, CHECK_ROWS)
    return TorchReference(rows, torch_outputs(result.model, rows), artifact_outputs(artifacts, rows, result))


def export_check(runtimes: Runtimes, reference: TorchReference, exact: OrtModel | None = None) -> dict[str, Any]:
    """The ONNX against the PyTorch model, and every other model artifact against the ONNX, on the same rows.
    `exact`: the shipped graph with its MatMulNBits at accuracy_level 0, checked in its place when the job ships
    int8 activations (their error is measured by `fidelity.accuracy_level`, not a wrong export)."""
    onnx_side = onnx_outputs(exact or runtimes.compressed, reference.rows)
    check = {
        **output_agreement(onnx_side, reference.compressed),
        "compared_to": "torch",
        "rows": int(next(iter(reference.rows.values())).shape[0]),
    }
    if exact is not None:
        check["checked_at_accuracy_level"] = 0
    others = compare_artifacts(reference.artifacts, onnx_side)
    checked = [c for c in others.values() if c.get("checked", True)]
    errors = [c.get("max_rel_error") for c in (check, *checked)]
    worst = None if any(e is None for e in errors) else max(errors)
    return {
        **check,
        "passed": bool(check["passed"] and all(c["passed"] for c in checked)),
        "onnx_passed": bool(check["passed"]),
        "worst_rel_error": worst,
        "tolerance": EXPORT_TOLERANCE,
        "artifacts": others,
    }


def _other_level_model(path: Path, spec: JobSpec) -> tuple[OrtModel, int, int] | None:
    """(the shipped file at the other accuracy_level in an ORT session, shipped level, other level), or None
    without MatMulNBits. The rewritten copy sits beside the shipped file (its external data resolve the same)
    only until the session has read it."""
    model = onnx.load(str(path), load_external_data=False)
    levels = matmul_nbits_levels(model)
    if not levels:
        return None
    shipped = max(levels)
    other = 0 if shipped else 4
    set_accuracy_level(model, other)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".accuracy-level-") as work:
        copy = Path(work) / path.name
        onnx.save_model(model, str(copy))
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            (Path(work) / f"{path.name}.data").symlink_to(path.parent / f"{path.name}.data")
        session = make_session(copy, threads=spec.benchmark_threads)
    return OrtModel(session, path), shipped, other


def accuracy_level_effect(
    runtimes: Runtimes,
    opened: tuple[OrtModel, int, int],
    loaded: LoadedModel,
    eval_data: Batches,
    pairs: list | None,
    spec: JobSpec,
    metric: dict,
) -> dict[str, Any]:
    """`fidelity.accuracy_level`: the shipped ONNX against itself at the other MatMulNBits accuracy_level
    (`opened`: that model, the shipped level, the other level)."""
    other_model, shipped, other = opened
    agreement = compare_outputs(runtimes.compressed, other_model, eval_data, task=loaded.task)
    if metric["name"] in ("accuracy", "perplexity"):  # measured on both outputs by the comparison itself
        values = {shipped: agreement["metric"]["original"], other: agreement["metric"]["compressed"]}
    else:  # a metric relative to the original model: the other level against the original
        other_metric = _fidelity(runtimes.original, other_model, loaded, eval_data, pairs, spec)["metric"]
        values = {shipped: metric["compressed"], other: other_metric["compressed"]}
    cost = {"original": values[0], "compressed": values[max(values)]}
    return {
        "shipped": shipped,
        "compared_with": other,
        "what": f"the exported model with its MatMulNBits nodes at accuracy_level {other} instead of {shipped}, "
        "run on the same evaluation batches in ONNX Runtime",
        "top1_agreement": agreement["top1_agreement"],
        "mean_cosine": agreement["mean_cosine"],
        "sqnr_db": agreement["sqnr_db"],
        "samples": agreement["samples"],
        "metric": {
            "name": metric["name"],
            "by_level": {str(level): value for level, value in sorted(values.items())},
            "drop_from_level_0": metric_drop({**cost, "higher_is_better": metric.get("higher_is_better", True)}),
        },
    }


def _measure_accuracy_level(
    runtimes: Runtimes, loaded: LoadedModel, eval_data: Batches, pairs: list | None, spec: JobSpec, fidelity: dict
) -> OrtModel | None:
    """Sets `fidelity.accuracy_level` (graphs with MatMulNBits); returns the level-0 twin of a graph shipped at
    another level, for the export check."""
    path = runtimes.compressed.path
    opened = _other_level_model(Path(path), spec) if path is not None else None
    if opened is None:
        return None
    fidelity["accuracy_level"] = accuracy_level_effect(
        runtimes, opened, loaded, eval_data, pairs, spec, fidelity["metric"]
    )
    return opened[0] if opened[1] != 0 else None


def _diagnosis(loaded: LoadedModel, result: CompressionResult, batches: Batches) -> tuple[dict, dict]:
    few = Batches(inputs=batches.inputs[:4])
    diagnosis = layer_diagnosis(loaded.module, result.model, few, loaded.info.get("quantizable_layers", []))
    first = batches.inputs[0]
    return diagnosis, {
        "original": estimate_flops(loaded.module, first),
        "compressed": estimate_flops(result.model, first),
    }


def _torch_side(
    loaded: LoadedModel, result: CompressionResult, eval_data: Batches, artifacts: dict, spec: JobSpec, stages: Stages
) -> tuple[dict[str, Any], dict, dict, TorchReference, list | None]:
    """Everything measured on the PyTorch models, the original's weights freed as soon as it is done with
    and the compressed one's after: the ONNX Runtime sessions then open without either in memory."""
    pairs = read_pairs(spec.evaluation_path) if spec.evaluation_path and loaded.tokenizer else None
    loaded.module.to(spec.device)
    result.model.to(spec.device)
    batches = to_device(eval_data, spec.device)
    torch_fidelity = _fidelity(loaded.module, result.model, loaded, batches, pairs, spec)
    stages.report(0.3, "per-layer diagnosis")
    diagnosis, flops = _diagnosis(loaded, result, batches)
    loaded.module.cpu()
    result.model.cpu()
    if result.model is not loaded.module:
        release_weights(loaded.module)
    stages.report(0.5, "running the compressed model and its artifacts for the export check")
    reference = torch_reference(result, artifacts, eval_data)
    release_weights(result.model, loaded.module)
    return torch_fidelity, diagnosis, flops, reference, pairs


def evaluate_stage(
    loaded: LoadedModel,
    result: CompressionResult,
    eval_data: Batches,
    baseline: Path,
    artifacts: dict,
    spec: JobSpec,
    stages: Stages,
) -> tuple[dict[str, Any], Runtimes]:
    """The PyTorch side first (then its weights are freed), then the ONNX files in the sessions the benchmark
    stage goes on to time (returned with the measurements)."""
    stages.start("evaluate", "measuring the PyTorch models (the cross-check)")
    try:
        torch_fidelity, diagnosis, flops, reference, pairs = _torch_side(
            loaded, result, eval_data, artifacts, spec, stages
        )
        stages.report(0.7, "measuring the exported models in ONNX Runtime")
        runtimes = open_runtimes(baseline, artifacts["onnx"], spec)
        fidelity = _fidelity(runtimes.original, runtimes.compressed, loaded, eval_data, pairs, spec)
        fidelity["measured_on"] = "onnx"
        fidelity["onnx_provider"] = runtimes.compressed.provider
        exact = _measure_accuracy_level(runtimes, loaded, eval_data, pairs, spec, fidelity)
        fidelity["cross_check"] = cross_check(fidelity, torch_fidelity)
        check = export_check(runtimes, reference, exact)
    except JobError:
        raise
    except Exception as error:
        raise JobError("evaluation_failed", f"{type(error).__name__}: {error}") from error
    if not check["passed"] and not spec.gate:
        raise JobError("export_mismatch", f"the shipped artifacts disagree beyond {EXPORT_TOLERANCE}: {check}")
    stages.end()
    return {"fidelity": fidelity, "diagnosis": diagnosis, "flops": flops, "export_check": check}, runtimes
