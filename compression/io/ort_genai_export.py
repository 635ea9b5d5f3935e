"""The `ort_genai` artifact: a zipped ONNX Runtime GenAI folder (genai_config.json, tokenizer files and a
decoder ONNX with MatMulNBits weights and a KV cache: past_key_values.* in, present.* out).

The graph is not derived here: onnxruntime-genai's model builder (`onnxruntime_genai.models.builder`)
writes it from a pre-quantized GPTQ-format checkpoint that holds OUR codes, scales and zero points:

- GPTQ stores W = (q - zp)·S with unsigned q and an INTEGER zp. Ours is W = c·S + Z with signed c, so
  q = c + 2^(b-1) and zp = 2^(b-1) - Z/S, which exists only when Z is an integer multiple of S
  (symmetric layers: Z = 0; the integer-zero-point option). A float offset Z (decoupleQ's default, the
  min/max grids) has no GPTQ form and the artifact is not written (no re-derivation: it would not be the
  same weight).
- bits 2, 4 or 8 (the builder's GPTQ reader and MatMulNBits); 3-bit has no MatMulNBits form.
- MatMulNBits blocks are powers of two >= 16: a per-channel layer, or a group size that is not a power
  of two, is written with the largest such block that divides both the group and the input width, each
  block carrying its group's scale (the same weight).
- every decoder projection must be quantized (the GPTQ reader reads a float projection as codes); the
  embedding and an unquantized LM head stay float (excluded from the builder's own quantization).

The builder runs in a subprocess (it puts its own folder on sys.path) with `-p int4 -e cpu`; per-layer
bits and group sizes go in GPTQ's `dynamic` overrides. After the build every MatMulNBits initializer is
decoded and compared with our dequantized weight (the GPTQ reader round-trips the codes through a float
weight: this check is what makes the artifact ours).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from safetensors.torch import save_file
from torch import nn

from compression.io.errors import ExportError
from compression.io.export import untied_state_dict
from compression.io.hf import inner_model
from compression.types import CompressionResult, QuantizedLayer

ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
}
BITS = (2, 4, 8)
PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+$")
# (q - zp)·S against our c·S + Z: the same codes, scale and zero point round differently by an ulp or so
ROUNDING = 2.0**-20
BUILD_TIMEOUT_S = 1800


class GenaiUnsupported(ExportError):
    def __init__(self, message: str) -> None:
        super().__init__("ort_genai_unsupported", message)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise GenaiUnsupported(message)


def gptq_zero_point(layer: QuantizedLayer) -> torch.Tensor:
    """Unsigned integer zp [out, groups] with (c + 2^(b-1) - zp)·S == c·S + Z, i.e. Z = (2^(b-1) - zp)·S."""
    half = 2 ** (layer.bits - 1)
    shift = torch.round(-layer.zeros.double() / layer.scales.double())
    exact = torch.equal((-shift * layer.scales.double()).float(), layer.zeros.float())
    _check(exact, f"{layer.name}: float zero offset Z (not an integer multiple of S); GPTQ zero points are integers")
    zp = half + shift
    _check(bool(((zp >= 0) & (zp < 2 * half)).all()), f"{layer.name}: integer zero point outside 0..2^b-1")
    return zp.to(torch.int32)


def block_size(layer: QuantizedLayer, cols: int) -> int:
    """The largest power of two >= 16 (<= 256) dividing the input width and the layer's group size."""
    span = math.gcd(cols, layer.group_size or cols)
    size = 1 << (span & -span).bit_length() - 1
    _check(size >= 16, f"{layer.name}: group {layer.group_size} / width {cols} allow no MatMulNBits block >= 16")
    return min(size, 256)


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 0 into int32, lowest bits first (GPTQ's qweight layout): [rows, n] -> [rows*bits/32, n]."""
    per_word = 32 // bits
    grouped = values.to(torch.int64).reshape(-1, per_word, values.shape[1])
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).reshape(1, -1, 1)
    words = (grouped << shifts).sum(dim=1)
    return (words - ((words >> 31) & 1) * (1 << 32)).to(torch.int32)  # two's complement into int32


def gptq_tensors(layer: QuantizedLayer, cols: int) -> tuple[dict[str, torch.Tensor], int]:
    """({qweight, qzeros, scales, g_idx} in GPTQ v1 layout, block size) for one quantized Linear."""
    _check(layer.kind == "linear", f"{layer.name}: {layer.kind} layer; GPTQ holds Linear weights")
    _check(layer.bits in BITS, f"{layer.name}: {layer.bits}-bit; MatMulNBits and the GPTQ reader take 2, 4, 8")
    out, per_word = layer.codes.shape[0], 32 // layer.bits
    _check(cols % per_word == 0 and out % per_word == 0, f"{layer.name}: shape not a multiple of {per_word}")
    block = block_size(layer, cols)
    group = layer.group_size or cols
    index = torch.arange(0, cols, block) // group  # our group of each block
    scales, zp = layer.scales[:, index], gptq_zero_point(layer)[:, index]
    q = layer.codes.to(torch.int32) + 2 ** (layer.bits - 1)
    mask = 2**layer.bits - 1
    tensors = {
        "qweight": _pack_rows(q.T.contiguous(), layer.bits),
        "qzeros": _pack_rows((zp - 1) & mask, layer.bits).T.contiguous(),  # [groups, out/per_word]
        "scales": scales.T.float().contiguous(),
        "g_idx": (torch.arange(cols, dtype=torch.int32) // block),
    }
    return tensors, block


def _projections(inner: nn.Module) -> list[str]:
    return [n for n, m in inner.named_modules() if isinstance(m, nn.Linear) and PROJECTION.match(n)]


def _tied_head(inner: nn.Module, layers: dict[str, QuantizedLayer]) -> QuantizedLayer | None:
    """The head of a model whose head is tied to a quantized embedding table: the table's codes (the same
    matrix, [vocab, hidden]), so the head runs as MatMulNBits while the Gather keeps the float table."""
    head, table = inner.get_output_embeddings(), inner.get_input_embeddings()
    if head is None or table is None or head.weight is not table.weight:
        return None
    name = next((n for n, m in inner.named_modules() if m is table), None)
    layer = layers.get(name or "")
    if layer is None or layer.kind != "embedding":
        return None
    return dataclasses.replace(layer, kind="linear")


def _quantized_by_hf_name(result: CompressionResult, inner: nn.Module, prefix: str) -> dict[str, QuantizedLayer]:
    layers = {name.removeprefix(prefix): layer for name, layer in result.quantized.items()}
    missing = [n for n in _projections(inner) if n not in layers]
    why = "every decoder projection must be quantized (the GPTQ reader takes no float one)"
    _check(not missing, f"{why}: {missing[:3]}")
    chosen = {n: layer for n, layer in layers.items() if PROJECTION.match(n) or n == "lm_head"}
    tied = None if "lm_head" in chosen else _tied_head(inner, layers)
    return chosen if tied is None else {**chosen, "lm_head": tied}


def _gptq_config(settings: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """GPTQ quantization_config: the most common (bits, block) globally, the others as `dynamic` overrides."""
    counts: dict[tuple[int, int], int] = {}
    for setting in settings.values():
        counts[setting] = counts.get(setting, 0) + 1
    bits, block = max(counts, key=lambda s: counts[s])
    dynamic = {
        f"+:^{re.escape(name)}\\.": {"bits": b, "group_size": g}
        for name, (b, g) in sorted(settings.items())
        if (b, g) != (bits, block)
    }
    return {"quant_method": "gptq", "bits": bits, "group_size": block, "desc_act": False, "dynamic": dynamic}


def write_gptq_dir(
    result: CompressionResult, tokenizer: Any, out_dir: Path
) -> tuple[dict[str, tuple[int, int]], dict[str, QuantizedLayer]]:
    """A GPTQ-format Hugging Face directory of our codes; returns ({module name: (bits, block size)}, the
    layers written by module name)."""
    inner, prefix = inner_model(result.model)
    architecture = (getattr(inner.config, "architectures", None) or ["?"])[0]
    _check(architecture in ARCHITECTURES, f"{architecture} is not among the builder's mapped {sorted(ARCHITECTURES)}")
    _check(tokenizer is not None, "the model has no tokenizer (the builder and the GenAI folder need one)")
    layers = _quantized_by_hf_name(result, inner, prefix)
    tensors = {k: v.float().cpu().contiguous() for k, v in untied_state_dict(inner)[0].items()}
    settings = {}
    for name, layer in layers.items():
        module = inner.get_submodule(name)
        packed, block = gptq_tensors(layer, module.in_features)
        settings[name] = (layer.bits, block)
        tensors.pop(f"{name}.weight", None)
        tensors.update({f"{name}.{key}": value for key, value in packed.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    config = inner.config.to_dict()
    config["quantization_config"] = _gptq_config(settings)
    config["torch_dtype"] = config["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out_dir))
    return settings, layers


def run_builder(source: Path, out_dir: Path, precision: str, options: dict[str, str]) -> None:
    """onnxruntime-genai's model builder on `source` (CPU EP), in a subprocess (compression.io.genai_builder);
    raises ExportError on failure."""
    extra = [f"{key}={value}" for key, value in options.items()]
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the `compression` package
    with tempfile.TemporaryDirectory(prefix="genai_cache_") as cache:
        command = [sys.executable, "-m", "compression.io.genai_builder", "-i", str(source), "-o", str(out_dir)]
        command += ["-p", precision, "-e", "cpu", "-c", cache] + (["--extra_options", *extra] if extra else [])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path}
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-600:]
        raise ExportError("export_failed", f"onnxruntime-genai's model builder failed: {tail}")


def _unpack_bytes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[rows, bytes] uint8 -> [rows, count] values, lowest bits first (MatMulNBits' layout)."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    values = (packed[..., None] >> shifts) & (2**bits - 1)
    return values.reshape(packed.shape[0], -1)[:, :count].astype(np.int64)


def decode_matmul_nbits(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The float weight [N, K] a MatMulNBits node computes with: (q - zp)·S per block."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)
    q = _unpack_bytes(arrays[node.input[1]].reshape(n, -1), bits, blocks * block)[:, :k]
    scales = arrays[node.input[2]].reshape(n, blocks).astype(np.float64)
    if len(node.input) > 3 and node.input[3]:
        zp = _unpack_bytes(arrays[node.input[3]].reshape(n, -1), bits, blocks)
    else:
        zp = np.full((n, blocks), 2 ** (bits - 1))
    per_column = np.arange(k) // block
    return ((q - zp[:, per_column]) * scales[:, per_column]).astype(np.float32)


NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/([a-z_]+)/MatMulNBits$")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _node_layers(node_name: str) -> list[str] | None:
    """Our module names a MatMulNBits node holds (q, k, v for a fused qkv_proj), in its row order."""
    if node_name == "/lm_head/MatMulNBits":
        return ["lm_head"]
    match = NODE.match(node_name)
    if match is None:
        return None
    layer, block, proj = match.groups()
    scope = "self_attn" if block == "attn" else "mlp"
    return [f"model.layers.{layer}.{scope}.{p}" for p in FUSED.get(proj, (proj,))]


def verify_weights(onnx_path: Path, layers: dict[str, QuantizedLayer]) -> dict[str, Any]:
    """Decode every MatMulNBits weight of the built graph and compare it with our dequantized layers."""
    model = onnx.load(str(onnx_path), load_external_data=True)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    seen, worst = set(), 0.0
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        names = _node_layers(node.name)
        if names is None or not all(name in layers for name in names):
            raise ExportError("export_mismatch", f"ort_genai: {node.name} is no layer of ours")
        want = torch.cat([layers[name].dequantize().reshape(layers[name].codes.shape[0], -1) for name in names])
        got = torch.from_numpy(decode_matmul_nbits(node, arrays))
        diff = (got.double() - want.double()).abs().max().item() if got.shape == want.shape else math.inf
        if diff > ROUNDING * want.abs().max().item():
            raise ExportError("export_mismatch", f"ort_genai: {node.name} decodes another weight (|diff| {diff:.3g})")
        seen.update(names)
        worst = max(worst, diff)
    missing = sorted(set(layers) - seen)
    if missing:
        raise ExportError("export_mismatch", f"ort_genai: no MatMulNBits for {missing[:3]}")
    return {"matmul_nbits": len(seen), "max_abs_diff": worst}


def builder_options(settings: dict[str, tuple[int, int]], accuracy_level: int, tied: bool) -> dict[str, str]:
    """Extra options: our MatMulNBits as they are (the builder quantizes neither the embedding nor a float LM
    head; a float head tied to the embedding stays one shared table), q/k/v fused only when they share bits
    and block."""
    options = {"accuracy_level": str(accuracy_level), "shared_embeddings": "false", "op_types_to_quantize": "MatMul"}
    if "lm_head" not in settings:
        options["nodes_to_exclude"] = "/lm_head/MatMul,/model/embed_tokens/Gather"
        options["shared_embeddings"] = str(tied).lower()
    layers = {name.rsplit(".", 2)[0] for name in settings if name != "lm_head"}
    qkv = [{settings.get(f"{layer}.self_attn.{p}_proj") for p in "qkv"} for layer in layers]
    if any(len(kinds) > 1 for kinds in qkv):
        options["disable_qkv_fusion"] = "true"
    return options


def zip_folder(folder: Path, path: Path) -> None:
    """Text files deflated; the weights stored as they are (packed codes barely compress, and deflating a
    gigabyte of floats takes minutes)."""
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            small = file.stat().st_size < 2**20 or file.suffix == ".json"
            method = zipfile.ZIP_DEFLATED if small else zipfile.ZIP_STORED
            archive.write(file, file.relative_to(folder).as_posix(), compress_type=method)


def write_ort_genai(result: CompressionResult, tokenizer: Any, path: Path, accuracy_level: int = 0) -> dict[str, Any]:
    """Write the `ort_genai` zip at `path`; returns the report section. Raises ExportError (code
    `ort_genai_unsupported` when the model or a layer has no GPTQ / MatMulNBits form)."""
    _check(importlib.util.find_spec("onnxruntime_genai") is not None, "onnxruntime-genai is not installed")
    with tempfile.TemporaryDirectory(prefix="ort_genai_") as work:
        source, built = Path(work) / "gptq", Path(work) / "genai"
        settings, layers = write_gptq_dir(result, tokenizer, source)
        tied = bool(json.loads((source / "config.json").read_text()).get("tie_word_embeddings"))
        run_builder(source, built, "int4", builder_options(settings, accuracy_level, tied))
        check = verify_weights(built / "model.onnx", layers)
        zip_folder(built, path)
        files = sorted(p.name for p in built.iterdir())
    kinds: dict[str, int] = {}
    for bits, block in settings.values():
        kinds[f"int{bits} block {block}"] = kinds.get(f"int{bits} block {block}", 0) + 1
    head = layers.get("lm_head")
    return {
        "format": "onnxruntime-genai (model builder, GPTQ input of our codes)",
        "matmul_nbits": kinds,
        "lm_head": "float" if head is None else "codes" if head.name.endswith("lm_head") else "the tied table's codes",
        "accuracy_level": accuracy_level,
        "weights_check": {"passed": True, **check},
        "files": files,
    }


def unzip_genai(path: Path, folder: Path) -> Path:
    with zipfile.ZipFile(path) as archive:
        archive.extractall(folder)
    return folder


class GenaiLogits(nn.Module):
    """The GenAI decoder run on whole sequences with an empty KV cache: logits [B, T, vocab], as the ONNX
    export's (how the export check compares the artifact)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        super().__init__()
        self._folder = tempfile.TemporaryDirectory(prefix="ort_genai_check_")
        folder = unzip_genai(path, Path(self._folder.name))
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.head_size = int(decoder["head_size"])
        # sliding-window layers want a cache buffer of at least the window, even when it starts empty
        self.window = int(decoder.get("sliding_window", {}).get("window_size", 0))
        self.session = ort.InferenceSession(str(folder / decoder["filename"]), providers=["CPUExecutionProvider"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = input_ids.cpu().numpy().astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy().astype(np.int64)
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        capacity = max(ids.shape[1], self.window) if self.window else 0
        for spec in self.session.get_inputs():
            if spec.name.startswith("past_key_values."):
                shape = (ids.shape[0], spec.shape[1], capacity, self.head_size)
                feeds[spec.name] = np.zeros(shape, dtype=np.float32)
        return torch.from_numpy(self.session.run(["logits"], feeds)[0])
