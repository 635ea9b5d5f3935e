"""The `load` and `compress` stages: parse the config, load the model and data, run the method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compression import registry
from compression.configs import MethodConfigBase
from compression.devices import GPU_OUT_OF_MEMORY, gpu_oom_message
from compression.errors import CompressionError
from compression.evaluate import compare_outputs, model_size
from compression.evaluate.fidelity import spearman_metric
from compression.io import LoadedModel, load_model
from compression.io.data import read_pairs
from compression.methods.spec import MeasureFn, MethodRun
from compression.pipeline.context import JobError, JobSpec, Stages, parse, to_device
from compression.pipeline.data import plan_data, read_job_data, sample_caps
from compression.pipeline.preflight import refuse_if_over_memory
from compression.pipeline.report import fraction_at_target, layer_rows
from compression.types import Batches, CompressionResult


@dataclass
class JobInputs:
    loaded: LoadedModel
    config: MethodConfigBase
    method_data: Batches | None
    eval_data: Batches
    data_section: dict[str, Any]


def load_inputs(spec: JobSpec, stages: Stages) -> JobInputs:
    config = parse(spec.method, spec.config)
    stages.start("load", "loading the model")
    try:
        loaded = load_model(spec.model_path, work_dir=spec.work_dir / "load", limits=spec.archive_limits)
        refuse_if_over_memory(loaded, config, spec.max_memory_bytes)
        stages.report(0.6, f"loaded a {loaded.format} {loaded.task} model ({loaded.info['params']:,} params)")
        calib, evaluation, split = read_job_data(spec, loaded, config)
    except CompressionError as error:
        raise JobError(error.code, error.message) from error
    cap = sample_caps(spec, loaded, config)[0]
    method_data, eval_data, data_section = plan_data(
        config, calib, evaluation, loaded, seq_len=spec.seq_len, split=split, calibration_cap=cap
    )
    stages.end()
    adapt = registry.spec_for(config).adapt_config
    config = adapt(config, loaded) if adapt else config
    return JobInputs(loaded, config, method_data, eval_data, data_section)


def estimated_bytes(result: CompressionResult) -> int:
    """Stored size before export: fp32 tensors, quantized weights as their codes plus fp32 scales/zeros."""
    float_bytes = model_size(result.model)["float_bytes"]
    for layer in result.quantized.values():
        per_group = 4 if bool((layer.zeros == 0).all()) else 8
        float_bytes += layer.codes.numel() * (layer.bits / 8 - 4) + layer.scales.numel() * per_group
    return int(float_bytes)


def candidate_measure(inputs: JobInputs, spec: JobSpec) -> MeasureFn:
    """How a method's `pick` measures a candidate: the evaluate stage's task metric on the evaluation
    batches, and the size and at-target fraction the gate reads (latency needs the export: not here)."""
    loaded, batches = inputs.loaded, to_device(inputs.eval_data, spec.device)
    pairs = read_pairs(spec.evaluation_path) if spec.evaluation_path and loaded.tokenizer else None

    def measure(candidate: CompressionResult) -> dict[str, Any]:
        fidelity = compare_outputs(loaded.module, candidate.model, batches, task=loaded.task)
        if pairs and loaded.task == "encoder":
            fidelity["metric"] = spearman_metric(loaded.module, candidate.model, loaded.tokenizer, pairs, spec.seq_len)
        rows = layer_rows(candidate, loaded)
        compressed = {
            "size_bytes": estimated_bytes(candidate),
            "fraction_at_target_bits": fraction_at_target(inputs.config, candidate, rows),
        }
        return {"fidelity": fidelity, "compressed": compressed}

    return measure


def compress_stage(inputs: JobInputs, spec: JobSpec, stages: Stages) -> CompressionResult:
    """Run the method (its own `run` hook when it has one), then let it pick among its candidates."""
    config, method = inputs.config, registry.spec_for(inputs.config)
    source = inputs.data_section.get("used_for", {}).get("fidelity")
    measure = candidate_measure(inputs, spec) if method.pick or method.measures else None
    run = MethodRun(inputs.loaded, inputs.method_data, config, spec, stages.report, measure, source)
    stages.start("compress", f"running {config.method}")
    try:
        result = method.run(run) if method.run else None
        if result is None:
            model, calib = inputs.loaded.module.to(spec.device), to_device(inputs.method_data, spec.device)
            result = method.compress(model, calib, config, progress=stages.report)
    except JobError:
        raise
    except CompressionError as error:
        raise JobError(error.code, error.message) from error
    except torch.cuda.OutOfMemoryError as error:
        message = gpu_oom_message(error, where=f"{config.method} (compress stage)")
        raise JobError(GPU_OUT_OF_MEMORY, message) from error
    except MemoryError as error:
        raise JobError("out_of_memory", f"{config.method} ran out of memory: {error}") from error
    except Exception as error:
        raise JobError("compression_failed", f"{config.method} failed: {type(error).__name__}: {error}") from error
    stages.end()
    return method.pick(result, run) if method.pick else result
