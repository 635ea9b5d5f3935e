"""How closely each shipped artifact matches, with one tolerance.

- The export check: the ONNX (in ONNX Runtime) against the PyTorch model it was exported from.
- Every other model artifact against the ONNX, on the same inputs: the packed safetensors (its codes
  unpacked and dequantized with the S and Z it stores, into the model's own layers), the Hugging Face
  directory (loaded back with `transformers`) and the `ort_genai` decoder (run on the whole sequence with
  an empty KV cache). The manifest is not a model and is not run.

`max_rel_error` is max |got - want| / max |want| over every output; `passed` is `max_rel_error <=
EXPORT_TOLERANCE`. Top-1 agreement and mean cosine are on the first (primary) output.
"""

from __future__ import annotations

import copy
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from compression.io.ort_model import OrtModel
from compression.primitives.layers import set_weight_matrix
from compression.primitives.pack import unpack_codes
from compression.types import CompressionResult, QuantizedLayer

# One tolerance for every artifact comparison. Exact exports (accuracy_level 0) agree to ~1e-5; int8
# activations in MatMulNBits (accuracy_level 4) cost ~6e-3; a wrong layer or scale is far above 2e-2.
EXPORT_TOLERANCE = 2e-2
Outputs = list[np.ndarray]


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if not want.size:
        return 0.0
    scale = float(np.abs(want).max()) or 1.0
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) / scale


def output_agreement(got_all: Outputs, want_all: Outputs, tolerance: float = EXPORT_TOLERANCE) -> dict[str, Any]:
    """{passed, max_rel_error, top1_agreement, mean_cosine, tolerance} of `got_all` against `want_all`."""
    if len(got_all) != len(want_all):
        return {"passed": False, "reason": f"{len(got_all)} outputs != {len(want_all)} reference outputs"}
    for got, want in zip(got_all, want_all, strict=True):
        if got.shape != want.shape:
            return {"passed": False, "reason": f"output shape {got.shape} != {want.shape}", "tolerance": tolerance}
    rel = max(_relative_error(got, want) for got, want in zip(got_all, want_all, strict=True))
    got, want = got_all[0].astype(np.float64), want_all[0].astype(np.float64)
    agree = float((got.argmax(-1) == want.argmax(-1)).mean()) if got.ndim >= 2 else None
    flat_got, flat_want = got.reshape(len(got), -1), want.reshape(len(want), -1)
    norms = np.linalg.norm(flat_got, axis=1) * np.linalg.norm(flat_want, axis=1)
    cosine = float(np.mean((flat_got * flat_want).sum(1) / np.maximum(norms, 1e-30)))
    return {
        "passed": rel <= tolerance,
        "max_rel_error": rel,
        "top1_agreement": agree,
        "mean_cosine": cosine,
        "tolerance": tolerance,
    }


@torch.no_grad()
def torch_outputs(model: nn.Module, example: dict[str, torch.Tensor]) -> Outputs:
    output = model.eval()(**example)
    return [t.detach().float().cpu().numpy() for t in (output if isinstance(output, tuple | list) else (output,))]


def packed_layers(path: Path) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor], set[str]]:
    """The packed safetensors file read back: its quantized layers (codes, S, Z as stored), its float
    tensors and the names it left out as ties to another tensor."""
    with safe_open(str(path), framework="pt") as handle:
        meta, ties = json.loads(handle.metadata()["layers"]), json.loads(handle.metadata().get("tied", "{}"))
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    layers = {}
    for name, info in meta.items():
        codes = unpack_codes(tensors.pop(f"{name}.qweight"), info["bits"], info["cols"])
        scales, zeros = tensors.pop(f"{name}.scales"), tensors.pop(f"{name}.zeros")
        layers[name] = QuantizedLayer(
            name, info["kind"], info["bits"], info["group_size"], codes, scales, zeros, tuple(info["orig_shape"])
        )
    return layers, tensors, set(ties)


def load_packed_model(path: Path, template: nn.Module) -> nn.Module:
    """A copy of `template` holding exactly what the packed safetensors file stores (dequantized in fp32)."""
    layers, floats, tied = packed_layers(path)
    model = copy.deepcopy(template).cpu()
    missing = set(model.state_dict()) - set(floats) - tied - {f"{name}.weight" for name in layers}
    if missing:
        raise ValueError(f"the packed file lacks {sorted(missing)[:5]}")
    model.load_state_dict(floats, strict=False)
    for name, layer in layers.items():
        matrix = layer.dequantize().reshape(layer.codes.shape[0], -1)
        set_weight_matrix(model.get_submodule(name), matrix)
    return model


def _hf_dir_model(path: Path, result: CompressionResult) -> nn.Module:
    from compression.io.hf import load_hf_dir

    return load_hf_dir(Path(path)).module


def _genai_model(path: Path, result: CompressionResult) -> nn.Module:
    from compression.io.ort_genai_export import GenaiLogits

    return GenaiLogits(Path(path))


ARTIFACT_RUNNERS: dict[str, Callable[[Path, CompressionResult], nn.Module]] = {
    "safetensors": lambda path, result: load_packed_model(path, result.model),
    "hf_dir": _hf_dir_model,
    "ort_genai": _genai_model,
}


WEIGHTS_ONLY = (
    "weights only: the compressed model is the shipped graph itself (e.g. quantized activations), so the "
    "packed weights are not a runnable model to compare"
)


def _holds_layers(result: CompressionResult) -> bool:
    """Whether the packed weights file can be run: the compressed model has a module for each packed layer."""
    modules = dict(result.model.named_modules())
    return all(name in modules for name in result.quantized)


def artifact_outputs(
    artifacts: dict[str, Path], example: dict[str, torch.Tensor], result: CompressionResult
) -> dict[str, Outputs | dict[str, Any]]:
    """Each model artifact other than the ONNX, loaded (one at a time) and run on `example`: its outputs, or
    its check already decided where it is not runnable or does not load or run."""
    outputs: dict[str, Outputs | dict[str, Any]] = {}
    for kind, path in artifacts.items():
        runner = ARTIFACT_RUNNERS.get(kind)
        if runner is None:
            continue
        if kind == "safetensors" and not _holds_layers(result):
            outputs[kind] = {"checked": False, "passed": None, "compared_to": "onnx", "reason": WEIGHTS_ONLY}
            continue
        try:
            outputs[kind] = torch_outputs(runner(path, result), example)
        except Exception as error:  # an artifact that does not load or run does not match
            outputs[kind] = {"passed": False, "reason": f"{type(error).__name__}: {error}", "compared_to": "onnx"}
        gc.collect()  # the artifact's model goes before the next one loads
    return outputs


def compare_artifacts(outputs: dict[str, Outputs | dict[str, Any]], onnx_outputs: Outputs) -> dict[str, dict]:
    """`artifact_outputs` compared with the ONNX's outputs on the same example."""
    return {
        kind: got if isinstance(got, dict) else {**output_agreement(got, onnx_outputs), "compared_to": "onnx"}
        for kind, got in outputs.items()
    }


def check_artifacts(
    artifacts: dict[str, Path], onnx_outputs: Outputs, example: dict[str, torch.Tensor], result: CompressionResult
) -> dict[str, dict[str, Any]]:
    """Each model artifact other than the ONNX, run on `example` and compared with the ONNX's outputs."""
    return compare_artifacts(artifact_outputs(artifacts, example, result), onnx_outputs)


def onnx_outputs(onnx: OrtModel, example: dict[str, torch.Tensor]) -> Outputs:
    return [np.asarray(out, dtype=np.float32) for out in onnx.run(onnx.feeds(example))]
