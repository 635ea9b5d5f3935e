"""`MethodSpec`: everything the job pipeline needs to know about a method, declared by the method.

A method is its torch-free config class (`compression.configs`: fields, defaults, data needs), its
`compress` function, and this inert declaration of the job-level behaviour it needs. The pipeline calls
these hooks and never names a method. Each built-in method declares its spec in
`compression/methods/<key>_spec.py`; others call `compression.registry.register(spec)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from compression.configs import MethodConfigBase
from compression.types import Batches, CompressionResult, ProgressFn

if TYPE_CHECKING:
    from compression.io import LoadedModel
    from compression.pipeline.context import JobSpec


class CompressFn(Protocol):
    def __call__(
        self,
        model: nn.Module,
        calib: Batches | None,
        config: Any,
        *,
        progress: ProgressFn | None = None,
    ) -> CompressionResult: ...


MeasureFn = Callable[[CompressionResult], dict[str, Any]]
"""measure(candidate) -> the report sections the gate reads (`fidelity`, `compressed`), measured like the
job's own evaluation, on the evaluation batches; latency is not measured (it needs the exported file)."""


@dataclass
class MethodRun:
    """What a method's job-level hooks see: the loaded model, the method's data, the job's request, and
    (for `pick`) a way to measure a candidate on the evaluation data and where that data came from."""

    loaded: LoadedModel
    calib: Batches | None
    config: MethodConfigBase
    job: JobSpec
    progress: ProgressFn
    measure: MeasureFn | None = None
    evaluation_source: str | None = None  # the report's data.used_for.fidelity: evaluation, calibration, ...


WriteOnnxFn = Callable[[CompressionResult, "LoadedModel", Path, dict[str, torch.Tensor]], dict[str, str]]
"""write_onnx(result, loaded, path, example) -> layer name -> storage kind: writes the ONNX artifact."""

PreflightCheck = Callable[["LoadedModel", Batches, Any], dict[str, Any]]
"""check(loaded, sample batches, config) -> {name, ok, message}, run by the pre-flight after the common checks."""


def report_stats(result: CompressionResult) -> dict[str, Any]:
    return result.stats


@dataclass(frozen=True)
class MethodSpec:
    """A method's declaration. Only `config_class` and `compress` are required."""

    config_class: type[MethodConfigBase]
    compress: CompressFn
    # work per calibration sample, relative to one plain forward pass (the pre-flight's time estimate)
    cost: float = 4.0
    # settings that follow from the loaded model, e.g. a task metric that depends on the model's task
    adapt_config: Callable[[Any, LoadedModel], MethodConfigBase] | None = None
    # replaces the plain `compress(model, calib, config)` call when it returns a result (None: plain call)
    run: Callable[[MethodRun], CompressionResult | None] | None = None
    # chooses among the candidate results a method produced (a sweep), given the job's gate
    pick: Callable[[CompressionResult, MethodRun], CompressionResult] | None = None
    preflight_checks: tuple[PreflightCheck, ...] = ()
    # writes the ONNX artifact itself, for a method whose result already is a graph (static int8's QDQ graph
    # run in ONNX Runtime); None: the result's torch module is exported and its quantized layers rewritten.
    # Such a method ships that graph only: no Hugging Face directory is saved from its module.
    write_onnx: WriteOnnxFn | None = None
    # for a method whose artifact depends on its config (a pipeline ships what its last step ships):
    # config -> the `write_onnx` that applies; None: `write_onnx` above
    write_onnx_for: Callable[[Any], WriteOnnxFn | None] | None = None
    # True: its `run` hook measures candidates (`MethodRun.measure`) although it has no `pick` (a pipeline whose
    # last step picks)
    measures: bool = False
    # the report's `stats` section
    report_section: Callable[[CompressionResult], dict[str, Any]] = report_stats

    @property
    def key(self) -> str:
        return self.config_class.model_fields["method"].default

    def onnx_writer(self, config: MethodConfigBase) -> WriteOnnxFn | None:
        """The `write_onnx` hook for `config` (None: the result's torch module is exported)."""
        return self.write_onnx_for(config) if self.write_onnx_for else self.write_onnx

    @property
    def data(self) -> dict[str, Any]:
        """{calibration: required | optional | none, kinds: [dataset kinds]} from the config class."""
        return self.config_class.data_needs()
