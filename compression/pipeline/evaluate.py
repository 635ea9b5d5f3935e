"""The `evaluate` stage: the original and the compressed model compared on the same data."""

from __future__ import annotations

from typing import Any

from compression.evaluate import compare_outputs, estimate_flops, layer_diagnosis
from compression.evaluate.fidelity import spearman_metric
from compression.io import LoadedModel
from compression.io.data import read_pairs
from compression.pipeline.context import JobError, JobSpec, Stages, to_device
from compression.types import Batches, CompressionResult


def evaluate_stage(
    loaded: LoadedModel, result: CompressionResult, eval_data: Batches, spec: JobSpec, stages: Stages
) -> dict[str, Any]:
    stages.start("evaluate", "comparing outputs with the original")
    batches = to_device(eval_data, spec.device)
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
