"""The job pipeline's view of `quant_int8`: the job's own graph is quantized (the upload's ONNX, or the
torch export the pipeline would ship), and the artifact is that QDQ graph, byte for byte what was measured."""

from __future__ import annotations

from pathlib import Path

import torch

from compression.configs import Int8Config
from compression.errors import CompressionError
from compression.io import LoadedModel
from compression.io.ort_module import OrtGraphModule
from compression.methods.quant_int8 import compress, float_graph, quantize_graph
from compression.methods.spec import MethodRun, MethodSpec
from compression.pipeline.context import example
from compression.types import CompressionResult


def run_on_job_graph(run: MethodRun) -> CompressionResult:
    if run.calib is None or not len(run.calib):
        raise CompressionError("calibration_required", "quant_int8 needs calibration data for activation ranges")
    work = run.job.work_dir / "int8"
    work.mkdir(parents=True, exist_ok=True)
    graph = float_graph(run.loaded, example(run.calib), work)
    return quantize_graph(graph, run.calib, run.config, work, run.progress)


def write_graph(
    result: CompressionResult, loaded: LoadedModel, path: Path, example: dict[str, torch.Tensor]
) -> dict[str, str]:
    """The QDQ graph as the ONNX artifact; every quantized layer is stored as int8 behind DequantizeLinear."""
    if not isinstance(result.model, OrtGraphModule):
        raise CompressionError("export_failed", "quant_int8 results carry their ONNX graph; this one does not")
    path.write_bytes(result.model.onnx_bytes)
    return dict.fromkeys(result.quantized, "int8 QDQ (DequantizeLinear)")


SPEC = MethodSpec(config_class=Int8Config, compress=compress, cost=3.0, run=run_on_job_graph, write_onnx=write_graph)
