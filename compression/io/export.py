"""Write a compression result as deployable artifacts: ONNX, safetensors (packed codes) and a manifest.

ONNX: for ONNX (and `.pt2`, loaded through ONNX) inputs the ORIGINAL graph is kept and only its
initializers change: every converted layer's current weights are written back (so pruned shapes
follow), and each quantized layer is replaced by `MatMulNBits` (Linear, 2/4/8 bits) or a packed
initializer with an in-graph dequantize subgraph (Conv, and 3-bit Linear). Other inputs are first
exported with `torch.onnx.export(dynamo=True)`, then rewritten the same way.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper, numpy_helper
from safetensors.torch import save_file
from torch import nn

from compression.io.artifact_checks import EXPORT_TOLERANCE, onnx_outputs, output_agreement, torch_outputs
from compression.io.errors import ExportError
from compression.io.loaded import LoadedModel
from compression.io.onnx_graph import WeightLayer
from compression.io.onnx_rewrite import (
    MATMUL_NBITS_BITS,
    Subgraph,
    dequant_weight_nodes,
    matmul_nbits_nodes,
    option_a_layout,
    packed_rows,
)
from compression.io.onnx_torch import OnnxModule
from compression.io.ort_model import OrtModel
from compression.io.torch_onnx import match_layers, torch_export_onnx
from compression.types import CompressionResult, QuantizedLayer

MANIFEST_VERSION = 1
UNUSED_STORAGE = "unused (its output does not reach the model's outputs, so the ONNX graph has no node for it)"
LIBRARIES = ("torch", "onnx", "onnxruntime", "safetensors", "numpy", "transformers", "modelpress")


@dataclass
class ExportOptions:
    # MatMulNBits accuracy_level (the job's from the quantizer config's `accuracy_level`): 0 = fp32 activations,
    # exact (ORT output = the fake-quant model); 4 = int8 activations on the prepacked forms (integer or no zero
    # points): faster on large layers, ~1e-2 relative error per layer (benchmarks/matmul_nbits.py).
    accuracy_level: int = 0
    use_matmul_nbits: bool = True


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _set_initializer(graph: onnx.GraphProto, name: str, value: torch.Tensor) -> None:
    for index, init in enumerate(graph.initializer):
        if init.name == name:
            dtype = numpy_helper.to_array(init).dtype
            array = value.detach().cpu().numpy().astype(dtype)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array, name))
            return
    raise KeyError(name)


def _layer_tensors(layer: WeightLayer, module: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {role: getattr(module, role) for role in layer.initializers if getattr(module, role, None) is not None}
    if layer.kind == "linear" and layer.transposed:
        tensors["weight"] = tensors["weight"].t()
    return tensors


def _add_missing_bias(graph: onnx.GraphProto, layer: WeightLayer, module: nn.Module) -> WeightLayer:
    """A method gave a bias-free Conv/Gemm a bias (e.g. UDFC's mean correction): add it to the node."""
    node = graph.node[layer.node_index]
    if getattr(module, "bias", None) is None or "bias" in layer.initializers:
        return layer
    if node.op_type not in ("Conv", "Gemm") or len(node.input) > 2:
        raise ExportError("export_failed", f"{layer.name}: cannot add a bias to an ONNX {node.op_type} node")
    name = f"{layer.name}.bias.added"
    bias = module.bias.detach().cpu().float().numpy()
    graph.initializer.append(numpy_helper.from_array(bias, name))
    node.input.append(name)
    return replace(layer, initializers={**layer.initializers, "bias": name})


def _sync_conv_group(graph: onnx.GraphProto, layer: WeightLayer, module: nn.Module) -> None:
    """A pruned depthwise/grouped conv has fewer groups: the node's `group` attribute follows the module."""
    node = graph.node[layer.node_index]
    if node.op_type != "Conv" or not isinstance(module, nn.Conv1d | nn.Conv2d):
        return
    kept = [attr for attr in node.attribute if attr.name != "group"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("group", module.groups)])


def sync_initializers(graph: onnx.GraphProto, layers: dict[str, WeightLayer], model: nn.Module) -> None:
    """Write every converted layer's (and constant's) current tensors back into the graph."""
    for name in list(layers):
        module = model.get_submodule(name)
        layer = layers[name] = _add_missing_bias(graph, layers[name], module)
        _sync_conv_group(graph, layer, module)
        for role, tensor in _layer_tensors(layer, module).items():
            _set_initializer(graph, layer.initializers[role], tensor)
    if isinstance(model, OnnxModule):
        for onnx_name in model._constant_keys:
            _set_initializer(graph, onnx_name, model.constant(onnx_name))


def _consumers(graph: onnx.GraphProto, tensor: str) -> int:
    return sum(tensor in node.input for node in graph.node)


def _quantized_node(
    graph: onnx.GraphProto, layer: WeightLayer, quant: QuantizedLayer, prefix: str, options: ExportOptions
) -> tuple[Subgraph, Subgraph, str]:
    """(nodes that go before the layer's node, nodes that replace it or [] to keep it, storage name)."""
    node = graph.node[layer.node_index]
    if layer.kind == "linear" and quant.bits in MATMUL_NBITS_BITS and options.use_matmul_nbits:
        bias = layer.initializers.get("bias")
        out = f"{prefix}_nobias" if bias else node.output[0]
        body = matmul_nbits_nodes(quant, node.input[0], out, prefix, accuracy_level=options.accuracy_level)
        if bias:
            body.nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=f"{prefix}_bias"))
        return Subgraph([], []), body, "MatMulNBits"
    weight_name = f"{prefix}_weight"
    before = dequant_weight_nodes(quant, weight_name, prefix, transpose=layer.transposed)
    node.input[1] = weight_name
    return before, Subgraph([node], []), "packed+dequantize"


def replace_quantized_layers(
    model: onnx.ModelProto,
    layers: dict[str, WeightLayer],
    quantized: dict[str, QuantizedLayer],
    options: ExportOptions,
) -> dict[str, str]:
    """Rewrite the graph in place; returns layer name -> storage ("MatMulNBits" | "packed+dequantize")."""
    graph = model.graph
    storage, before, replaced, unused = {}, [], {}, set()
    for index, (name, quant) in enumerate(sorted(quantized.items())):
        layer = layers[name]
        old_weight = layer.initializers["weight"]
        pre, body, storage[name] = _quantized_node(graph, layer, quant, f"q{index}", options)
        before += pre.nodes
        replaced[layer.node_index] = body.nodes
        graph.initializer.extend(pre.initializers + body.initializers)
        if storage[name] == "MatMulNBits":
            graph.node[layer.node_index].input[1] = ""  # so the consumer count below ignores it
        if _consumers(graph, old_weight) == 0:
            unused.add(old_weight)
    _remove_initializers(graph, unused)
    nodes = list(before)
    for index, node in enumerate(graph.node):
        nodes += replaced.get(index, [node])
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # shapes may be stale after pruning; ORT re-infers them
    if any(kind == "MatMulNBits" for kind in storage.values()):
        _ensure_opset(model, "com.microsoft", 1)
    return storage


def _remove_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """Delete in place, by index: rebuilding the repeated field copies every tensor (for a 1 GB
    graph, once per layer, that went past 19 GB of RSS)."""
    for field in (graph.initializer, graph.input):
        for index in reversed([i for i, value in enumerate(field) if value.name in names]):
            del field[index]


def _ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(opset.domain == domain for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def base_graph(
    result: CompressionResult, loaded: LoadedModel, example: dict[str, torch.Tensor]
) -> tuple[onnx.ModelProto, dict[str, WeightLayer], set[str]]:
    """The graph to rewrite, its weight layers keyed by module name (weights synced from result.model), and
    the quantized layers that take no part in the forward pass (so the graph has no node for them)."""
    if isinstance(result.model, OnnxModule) and loaded.source_onnx is not None:
        model = onnx.load(str(loaded.source_onnx), load_external_data=True)
        layers = dict(result.model.layer_initializers)
        sync_initializers(model.graph, layers, result.model)
        return model, layers, set()
    with tempfile.TemporaryDirectory(prefix="modelpress-export-") as work:
        model = torch_export_onnx(result.model.eval(), example, loaded.input_specs, Path(work))
    layers, unused = match_layers(model.graph, result.model, list(result.quantized), example)
    return model, layers, unused


def write_onnx(
    result: CompressionResult,
    loaded: LoadedModel,
    path: Path,
    example: dict[str, torch.Tensor],
    options: ExportOptions | None = None,
) -> dict[str, str]:
    """Write the compressed ONNX model; returns layer -> storage kind. Every quantized layer that takes part
    in the forward pass is stored quantized; one the graph lacks fails the export (`export_layer_missing`)."""
    options = options or ExportOptions()
    try:
        model, layers, unused = base_graph(result, loaded, example)
    except ExportError:
        raise
    except Exception as error:
        raise ExportError("export_failed", f"could not produce an ONNX graph: {error}") from error
    missing = sorted(result.quantized.keys() - layers.keys() - unused)
    if missing:
        raise ExportError("export_layer_missing", f"quantized layers not in the ONNX graph: {missing[:5]}")
    shipped = {name: q for name, q in result.quantized.items() if name not in unused}
    _refuse_shared_nodes({name: layers[name] for name in shipped})
    storage = replace_quantized_layers(model, layers, shipped, options)
    for name in unused:
        storage[name] = UNUSED_STORAGE
    if model.ByteSize() > 1_800_000_000:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))
    return storage


def _refuse_shared_nodes(layers: dict[str, WeightLayer]) -> None:
    owners: dict[int, str] = {}
    for name, layer in layers.items():
        if layer.node_index in owners:
            raise ExportError(
                "export_node_collision", f"quantized layers {owners[layer.node_index]!r} and {name!r} map to one node"
            )
        owners[layer.node_index] = name


def untied_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared storage once (safetensors refuses aliases, e.g. an LM head tied
    to its embeddings), and {dropped name: the name it shares storage with}."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors, ties = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in first:  # empty tensors all sit at address 0
            ties[name] = first[key]
            continue
        first[key] = name
        tensors[name] = tensor.detach()
    return tensors, ties


def write_safetensors(result: CompressionResult, path: Path) -> dict[str, Any]:
    """Packed codes + fp32 scales/zeros per quantized layer (the precision the ONNX stores and evaluation
    uses: one precision end to end), float tensors for everything else."""
    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, Any] = {}
    for name, quant in result.quantized.items():
        _, _, padded = option_a_layout(quant)
        tensors[f"{name}.qweight"] = torch.from_numpy(packed_rows(quant, quant.group_size))
        tensors[f"{name}.scales"] = quant.scales.to(torch.float32).contiguous()
        tensors[f"{name}.zeros"] = quant.zeros.to(torch.float32).contiguous()
        layers_meta[name] = {
            "kind": quant.kind,
            "bits": quant.bits,
            "group_size": quant.group_size,
            "cols": int(quant.codes.shape[1]),
            "padded_cols": padded,
            "orig_shape": list(quant.orig_shape),
        }
    quantized_weights = {f"{name}.weight" for name in result.quantized}
    floats, ties = untied_state_dict(result.model)
    for key, value in floats.items():
        if key not in quantized_weights and key not in tensors:
            tensors[key] = value.cpu().contiguous()
    metadata_ = {
        "format": "modelpress-packed-v1",
        "packing": "compression.primitives.pack: per row u = code + 2^(bits-1), padded to padded_cols "
        "with 2^(bits-1), little-endian bit stream",
        "dequantize": "W = (u - 2^(bits-1)) * scales[group] + zeros[group], groups of group_size columns",
        "scales_dtype": "float32",
        "layers": json.dumps(layers_meta),
        "tied": json.dumps(ties),
    }
    save_file(tensors, str(path), metadata=metadata_)
    return layers_meta


def export_artifacts(
    result: CompressionResult,
    loaded: LoadedModel,
    out_dir: Path,
    *,
    example: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    options: ExportOptions | None = None,
    write_graph: Callable[[CompressionResult, LoadedModel, Path, dict[str, torch.Tensor]], dict[str, str]]
    | None = None,
) -> dict[str, Path]:
    """Write `model.onnx`, `model.safetensors` and `manifest.json` under out_dir; returns kind -> path.
    `write_graph` replaces `write_onnx` for a result that carries its own graph (same signature, no options)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"onnx": out_dir / "model.onnx", "safetensors": out_dir / "model.safetensors"}
    if write_graph is not None:
        storage = write_graph(result, loaded, paths["onnx"], example)
    else:
        storage = write_onnx(result, loaded, paths["onnx"], example, options)
    layers_meta = write_safetensors(result, paths["safetensors"])
    for name, meta in layers_meta.items():
        meta["onnx_storage"] = storage.get(name)
    document = {
        "manifest_version": MANIFEST_VERSION,
        **manifest,
        "method": result.method,
        "source_format": loaded.format,
        "layers": layers_meta,
        "skipped": dict(result.skipped),
        "notes": list(result.notes),
        "libraries": library_versions(),
        "artifacts": {kind: {"file": p.name, "sha256": sha256_file(p)} for kind, p in paths.items()},
    }
    paths["manifest"] = out_dir / "manifest.json"
    paths["manifest"].write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
    return paths


def verify_onnx(
    onnx_model: Path | OrtModel,
    model: nn.Module,
    example: dict[str, torch.Tensor],
    *,
    tolerance: float = EXPORT_TOLERANCE,
) -> dict[str, Any]:
    """The export check: the exported ONNX in ONNX Runtime (a path, or the job's own session) against the torch
    model on `example`: relative max error over every output and the verdict at `tolerance`; top-1
    agreement and cosine on the first (primary) output."""
    runner = onnx_model if isinstance(onnx_model, OrtModel) else OrtModel.open(Path(onnx_model))
    check = output_agreement(onnx_outputs(runner, example), torch_outputs(model, example), tolerance)
    return {**check, "compared_to": "torch", "rows": int(next(iter(example.values())).shape[0])}
