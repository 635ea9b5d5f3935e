"""quant_int8: static W8A8 (per-channel int8 weights, calibrated 8-bit activations) as a QDQ ONNX graph.

Built on ONNX Runtime's quantization toolkit: `quant_pre_process` (shape inference, BatchNorm folded
into Conv), `quantize_static` in QDQ format with a `CalibrationDataReader` over the job's calibration
batches (min-max, percentile or entropy ranges). ONNX Runtime fuses each DequantizeLinear -> op ->
QuantizeLinear into its integer kernel (QLinearConv, QLinearMatMul, QGemm) when it loads the graph.

What this module adds: the graph comes from the job's model (the upload's ONNX, or the torch export),
each quantized node is named after its module (so `skip_layers` and the report speak in layer names),
the per-node diagnosis and auto-skip (`quant_int8_diagnosis`), and the quantized weights as
`QuantizedLayer`s for the report and the packed safetensors. The result's model is the QDQ graph
itself, run by ONNX Runtime (`OrtGraphModule`): what the job measures is what it ships.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from compression.configs import Int8Config
from compression.io.export import base_graph
from compression.io.loaded import LoadedModel
from compression.io.ort_module import OrtGraphModule
from compression.io.torch_onnx import match_layers_by_value
from compression.types import Batches, CompressionResult, ProgressFn, QuantizedLayer, no_progress

WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
TRANSFORMER_OPS = ["MatMul", "Gemm"]
CALIBRATION = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


@dataclass
class FloatGraph:
    """The float graph to quantize, and its weight nodes' module names (node name -> module name)."""

    path: Path
    modules: dict[str, str] = field(default_factory=dict)


class BatchReader:
    """ONNX Runtime's `CalibrationDataReader` protocol over job batches: one feed dict per batch."""

    def __init__(self, batches: Batches, input_names: list[str]) -> None:
        self.feeds = [
            {name: tensor.detach().cpu().numpy() for name, tensor in batch.items() if name in input_names}
            for batch in batches.inputs
        ]
        self._items: Iterator[dict[str, np.ndarray]] = iter(self.feeds)

    @classmethod
    def of(cls, feeds: list[dict[str, np.ndarray]]) -> BatchReader:
        reader = cls(Batches(inputs=[]), [])
        reader.feeds, reader._items = feeds, iter(feeds)
        return reader

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    initializers = {init.name for init in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]


def float_graph(loaded: LoadedModel, example: dict[str, torch.Tensor], work: Path) -> FloatGraph:
    """The job's model as a float ONNX file under `work` (the upload's graph, or the torch export, whose
    token inputs take any sequence length: text batches are padded per batch)."""
    source = CompressionResult(model=loaded.module, method="float")
    model, layers, _ = base_graph(source, loaded, example)
    if not layers:  # a torch export: find each layer's node by its weight values
        layers, _ = match_layers_by_value(model.graph, loaded.module, loaded.info.get("quantizable_layers", []))
    path = work / "float.onnx"
    onnx.save_model(model, str(path))
    return FloatGraph(path, {model.graph.node[layer.node_index].name: name for name, layer in layers.items()})


def module_float_graph(model: nn.Module, example: dict[str, torch.Tensor], work: Path) -> FloatGraph:
    """`float_graph` for a plain module (the library call, no `LoadedModel`)."""
    from compression.io.loaded import describe_module

    loaded = LoadedModel("torch_export", model, [], "generic", info=describe_module(model, type(model).__name__))
    return float_graph(loaded, example, work)


def prepare(graph: FloatGraph, work: Path, notes: list[str]) -> FloatGraph:
    """ONNX Runtime's pre-processing (symbolic shape inference, constant folding, BatchNorm into Conv)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = work / "prepared.onnx"
    for skip_symbolic in (False, True):
        try:
            # its symbolic shape inference dumps a model (and external data) into the working directory when
            # it gives up: keep that in the job's folder, not the user's
            with contextlib.chdir(work):
                quant_pre_process(str(graph.path.resolve()), str(target.resolve()), skip_symbolic_shape=skip_symbolic)
            return FloatGraph(target, graph.modules)
        except Exception as error:  # the toolkit's shape inference does not know every graph
            failure = f"{type(error).__name__}: {error}"
    notes.append(f"ONNX Runtime's pre-processing failed ({failure}); the graph was quantized as exported")
    return graph


def weight_nodes(model: onnx.ModelProto, op_types: list[str], activation_matmuls: bool) -> list[onnx.NodeProto]:
    """Nodes of the quantized op types with a constant weight (plus activation MatMuls when asked)."""
    constants = {init.name for init in model.graph.initializer}
    picked = []
    for node in model.graph.node:
        if node.op_type not in op_types or node.op_type not in WEIGHT_OPS:
            continue
        if node.op_type == "MatMul" and node.input[1] not in constants and not activation_matmuls:
            continue
        picked.append(node)
    return picked


def default_op_types(model: onnx.ModelProto, config: Int8Config) -> list[str] | None:
    """The config's op types; null: ORT's full set (None) for graphs with Conv, MatMul/Gemm otherwise."""
    if config.op_types is not None:
        return list(config.op_types)
    return None if any(node.op_type == "Conv" for node in model.graph.node) else list(TRANSFORMER_OPS)


def skipped_nodes(model: onnx.ModelProto, modules: dict[str, str], patterns: list[str]) -> dict[str, str]:
    """Nodes `skip_layers` names (by node or module name, or fnmatch pattern): node name -> the pattern."""
    matched = {}
    for node in model.graph.node:
        names = [node.name, modules.get(node.name, "")]
        for pattern in patterns:
            if any(name and (name == pattern or fnmatch.fnmatchcase(name, pattern)) for name in names):
                matched[node.name] = pattern
                break
    return matched


def activation_matmul_nodes(model: onnx.ModelProto) -> list[str]:
    constants = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & constants]


def calibrator_options(config: Int8Config) -> dict[str, Any]:
    """Options of ONNX Runtime's calibrators. Entropy gets 2048 histogram bins searched for the best
    128-bin window: with the toolkit's default (128 and 128) there is one candidate, the full range."""
    if config.calibration == "entropy":
        return {"num_bins": 2048, "num_quantized_bins": 128}
    if config.calibration == "percentile":
        return {"percentile": config.percentile}
    return {}


@dataclass
class Quantizer:
    """Quantizes one prepared float graph any number of times with different excluded nodes; the
    activation ranges are calibrated once into ONNX Runtime's calibration cache and reused."""

    graph: FloatGraph
    calib: Batches
    config: Int8Config
    work: Path
    op_types: list[str] | None = None
    always_excluded: list[str] = field(default_factory=list)
    builds: int = 0

    @property
    def cache(self) -> Path:
        return self.work / "calibration.json"

    def _method(self) -> Any:
        from onnxruntime.quantization import CalibrationMethod

        return getattr(CalibrationMethod, CALIBRATION[self.config.calibration])

    def calibrate(self) -> None:
        """Activation ranges of every tensor the op types touch, from the calibration batches."""
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        op_types = self.op_types or sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
        reader = BatchReader(self.calib, graph_inputs(onnx.load(str(self.graph.path))))
        with tempfile.TemporaryDirectory(prefix="calibrate-", dir=self.work) as folder:
            calibrator = create_calibrator(
                self.graph.path,
                op_types,
                augmented_model_path=str(Path(folder) / "augmented.onnx"),
                calibrate_method=self._method(),
                extra_options=calibrator_options(self.config),
            )
            for feed in reader.feeds:  # one batch at a time: text batches differ in padded length, and the
                calibrator.collect_data(BatchReader.of([feed]))  # histogram calibrators stack what one call saw
                calibrator.clear_collected_data()
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their settings
                ranges = calibrator.compute_data()
            save_tensors_data(ranges, self.cache)

    def quantize(self, exclude: list[str]) -> Path:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if not self.cache.is_file():
            self.calibrate()
        target = self.work / f"int8_{self.builds}.onnx"
        self.builds += 1
        activation = QuantType.QUInt8 if self.config.activation_type == "uint8" else QuantType.QInt8
        logging.getLogger().disabled = True  # the toolkit logs advice on the root logger for every call
        try:
            quantize_static(
                str(self.graph.path),
                str(target),
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=self.op_types,
                per_channel=self.config.per_channel,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=sorted({*self.always_excluded, *exclude}),
                calibrate_method=self._method(),
                calibration_cache_path=str(self.cache),
            )
        finally:
            logging.getLogger().disabled = False
        return target


def make_quantizer(graph: FloatGraph, calib: Batches, config: Int8Config, work: Path) -> tuple[Quantizer, dict]:
    """The quantizer and the nodes left float by configuration: node name -> reason."""
    model = onnx.load(str(graph.path))
    op_types = default_op_types(model, config)
    reasons = {
        node: f"matches skip_layers {pattern!r}"
        for node, pattern in skipped_nodes(model, graph.modules, list(config.skip_layers)).items()
    }
    if not config.activation_matmuls:
        for node in activation_matmul_nodes(model):
            reasons.setdefault(node, "MatMul of two activations (activation_matmuls is off)")
    quantizer = Quantizer(graph, calib, config, work, op_types, sorted(reasons))
    return quantizer, reasons


def _dequantize_inputs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {node.output[0]: node for node in model.graph.node if node.op_type == "DequantizeLinear"}


def _row_axis(node: onnx.NodeProto) -> int:
    """The weight axis of the output channels: Conv and Gemm(transB) 0, MatMul and Gemm 1."""
    if node.op_type == "Conv":
        return 0
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return 0 if node.op_type == "Gemm" and trans_b else 1


def _layer_from_dq(name: str, node: onnx.NodeProto, dq: onnx.NodeProto, inits: dict[str, Any]) -> QuantizedLayer:
    codes = numpy_helper.to_array(inits[dq.input[0]])
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 else 0 * scale
    rows = np.moveaxis(codes, _row_axis(node), 0)
    flat = rows.reshape(rows.shape[0], -1)
    scales = np.broadcast_to(scale.reshape(-1, 1), (flat.shape[0], 1))
    zeros = np.broadcast_to((-zero * scale).reshape(-1, 1), (flat.shape[0], 1))
    return QuantizedLayer(
        name=name,
        kind="conv2d" if node.op_type == "Conv" else "linear",
        bits=8,
        group_size=None,
        codes=torch.from_numpy(flat.astype(np.int8)),
        scales=torch.from_numpy(scales.copy()),
        zeros=torch.from_numpy(zeros.copy()),
        orig_shape=tuple(rows.shape),
    )


def quantized_layers(model: onnx.ModelProto, modules: dict[str, str]) -> dict[str, QuantizedLayer]:
    """Each weight node whose weight is an int8 initializer behind a DequantizeLinear, keyed by its
    module name (the node name when no module is known)."""
    inits = {init.name: init for init in model.graph.initializer}
    dequantized = _dequantize_inputs(model)
    layers = {}
    for node in model.graph.node:
        dq = dequantized.get(node.input[1]) if node.op_type in WEIGHT_OPS and len(node.input) > 1 else None
        if dq is None or dq.input[0] not in inits:
            continue
        name = modules.get(node.name, node.name)
        layers[name] = _layer_from_dq(name, node, dq, inits)
    return layers


def qdq_counts(model: onnx.ModelProto) -> dict[str, int]:
    ops = [node.op_type for node in model.graph.node]
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear")}


def build_result(
    path: Path, graph: FloatGraph, left_float: dict[str, str], stats: dict, notes: list[str]
) -> CompressionResult:
    """The result: the QDQ graph as the model, its int8 weights per layer, every weight node left float."""
    model = onnx.load(str(path))
    layers = quantized_layers(model, graph.modules)
    skipped = {graph.modules.get(node, node): reason for node, reason in left_float.items()}
    for node in weight_nodes(model, list(WEIGHT_OPS), activation_matmuls=False):
        name = graph.modules.get(node.name, node.name)
        if name not in layers:
            skipped.setdefault(name, "not quantized by ONNX Runtime (op type not selected or unsupported)")
    stats = {**stats, "qdq_nodes": qdq_counts(model), "quantized_nodes": len(layers)}
    module = OrtGraphModule(path.read_bytes())
    return CompressionResult(module, "quant_int8", layers, skipped, stats, notes)


def quantize_graph(
    graph: FloatGraph,
    calib: Batches,
    config: Int8Config,
    work: Path,
    progress: ProgressFn = no_progress,
) -> CompressionResult:
    """Static int8 of a float ONNX graph: pre-process, calibrate, quantize, diagnose, auto-skip."""
    from compression.methods.quant_int8_diagnosis import diagnose_and_skip

    notes = [
        f"static W8A8 QDQ via onnxruntime.quantization: {config.calibration} calibration, "
        f"{'per-channel' if config.per_channel else 'per-tensor'} int8 weights, {config.activation_type} "
        "activations"
    ]
    progress(0.05, "ONNX Runtime pre-processing")
    prepared = prepare(graph, work, notes)
    quantizer, left_float = make_quantizer(prepared, calib, config, work)
    progress(0.15, f"calibrating activation ranges ({config.calibration})")
    path = quantizer.quantize([])
    progress(0.45, "diagnosing nodes")
    path, diagnosis, auto_skipped = diagnose_and_skip(quantizer, path, progress)
    left_float.update(auto_skipped)
    stats = {
        "calibration": config.calibration,
        "op_types": quantizer.op_types or "all types ONNX Runtime quantizes",
        "calibration_samples": sum(next(iter(b.values())).shape[0] for b in calib.inputs),
        "diagnosis": diagnosis,
        "auto_skipped": sorted(auto_skipped),
        "graph_builds": quantizer.builds,
    }
    return build_result(path, prepared, left_float, stats, notes)


def compress(
    model: nn.Module, calib: Batches | None, config: Int8Config, *, progress: ProgressFn | None = None
) -> CompressionResult:
    """Static int8 of a torch module (exported to ONNX with torch.onnx first); the job runs `quantize_graph`
    on the job's own graph instead (see quant_int8_spec). The input model is untouched."""
    if calib is None or not len(calib):
        from compression.errors import CompressionError

        raise CompressionError("calibration_required", "quant_int8 needs calibration data for activation ranges")
    example = {name: tensor[:8].cpu() for name, tensor in calib.inputs[0].items()}
    with tempfile.TemporaryDirectory(prefix="modelpress-int8-") as name:
        work = Path(name)
        graph = module_float_graph(model, example, work)
        return quantize_graph(graph, calib, config, work, progress or no_progress)
