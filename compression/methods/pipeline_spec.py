"""The job pipeline's view of `pipeline`: every step runs through its own method's hooks (`run`, `adapt_config`,
`pick`) on a `LoadedModel` whose module is the previous step's model, with the calibration data up to that
step's own cap; only the last step measures candidates on the evaluation data, and the artifact is written
the way the last step's method writes it."""

from __future__ import annotations

import dataclasses

from torch import nn

from compression import registry
from compression.configs import MethodConfigBase, PipelineConfig
from compression.io import LoadedModel
from compression.io.loaded import quantizable_layer_names
from compression.methods.pipeline import compress, run_steps
from compression.methods.spec import MethodRun, MethodSpec, WriteOnnxFn
from compression.pipeline.context import to_device
from compression.pipeline.data import head
from compression.types import CompressionResult, ProgressFn


def step_loaded(loaded: LoadedModel, model: nn.Module) -> LoadedModel:
    """The job's loaded model with `model` (a previous step's result) in place of the upload's module."""
    if model is loaded.module:
        return loaded
    info = {**loaded.info, "params": sum(p.numel() for p in model.parameters())}
    info["quantizable_layers"] = quantizable_layer_names(model)
    return dataclasses.replace(loaded, module=model, info=info)


def _run_step(
    run: MethodRun, index: int, config: MethodConfigBase, model: nn.Module, progress: ProgressFn
) -> CompressionResult:
    loaded = step_loaded(run.loaded, model)
    spec = registry.spec_for(config)
    config = spec.adapt_config(config, loaded) if spec.adapt_config else config
    calib = head(run.calib, config.calibration_cap(run.job.calibration_samples)) if run.calib is not None else None
    last = index == len(run.config.steps) - 1
    measure = run.measure if last else None
    step = MethodRun(loaded, calib, config, run.job, progress, measure, run.evaluation_source)
    result = spec.run(step) if spec.run else None
    if result is None:
        module, data = loaded.module.to(run.job.device), to_device(calib, run.job.device)
        result = spec.compress(module, data, config, progress=progress)
    return spec.pick(result, step) if spec.pick else result


def run_pipeline(run: MethodRun) -> CompressionResult:
    """Every step through its own method's job hooks (module docstring)."""

    def run_step(index: int, config: MethodConfigBase, model: nn.Module, progress: ProgressFn) -> CompressionResult:
        return _run_step(run, index, config, model, progress)

    assert isinstance(run.config, PipelineConfig)
    return run_steps(run.loaded.module, run.calib, run.config, run_step, progress=run.progress)


def last_step_writer(config: PipelineConfig) -> WriteOnnxFn | None:
    """The artifact is written as the last step's method writes it (quant_int8: its QDQ graph)."""
    return registry.spec_for(config.step_configs()[-1]).write_onnx


SPEC = MethodSpec(
    config_class=PipelineConfig,
    compress=compress,
    cost=10.0,
    run=run_pipeline,
    write_onnx_for=last_step_writer,
    measures=True,
)
