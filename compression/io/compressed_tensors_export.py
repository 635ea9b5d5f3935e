"""The `hf_dir` artifact as a compressed-tensors checkpoint (`pack-quantized`), the form vLLM and
transformers load quantized Linear weights from.

compressed-tensors dequantizes a weight as W = (q - zp)·scale, q a signed integer code, zp an INTEGER
zero point (or none when symmetric). Ours is W = c·S + Z with a float Z (compression.primitives.quant).
A layer is written packed only where that is the same weight, checked by decoding what we would write
with compressed-tensors' own decompressor and comparing with our dequantized weight (bit for bit when
symmetric; to float32 rounding, (q - zp)·S vs c·S + Z, with an integer zero point):

- symmetric layers (Z = 0): q = c, scale = S, no zero point; every bit width 2, 3, 4, 8 (the format packs
  1..8 bits densely into int32), per group (`strategy: group`) or per channel (`strategy: channel`);
- integer zero-point layers (the quantizers' `zero_point: "integer"`, Z = -zp·S with zp in the code range,
  `QuantizedLayer.integer_zero_points`): q = c, scale = S, `weight_zero_point` = zp, `symmetric: false`;
  free float offsets (`zero_point: "float"`) have no compressed-tensors form and stay float.

Every other quantized layer (a float offset Z, an embedding table, a non-Linear layer) is written with its
dequantized float weights, listed in the config's `ignore` and named, with the reason, in the returned
section. With no layer expressible the directory is a plain float checkpoint (no quantization_config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from compression.io.export import untied_state_dict
from compression.io.hf import inner_model
from compression.types import CompressionResult, QuantizedLayer

CHECKPOINT = "model.safetensors"
# (q - zp)·S and our c·S + Z round differently by an ulp or so: the same codes, scale and zero point
ROUNDING = 2.0**-20


def _args(layer: QuantizedLayer, symmetric: bool) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    strategy = "channel" if layer.group_size is None else "group"
    return QuantizationArgs(
        num_bits=layer.bits, type="int", symmetric=symmetric, strategy=strategy, group_size=layer.group_size
    )


def _packed_tensors(layer: QuantizedLayer, zp: torch.Tensor | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    tensors = {
        "weight_packed": pack_to_int32(layer.codes.to(torch.int8).contiguous(), layer.bits),
        "weight_scale": layer.scales.to(dtype).contiguous(),
        "weight_shape": torch.tensor(layer.codes.shape, dtype=torch.int64),
    }
    if zp is not None:
        tensors["weight_zero_point"] = pack_to_int32(zp.contiguous(), layer.bits, packed_dim=0)
    return tensors


def _decoded(tensors: dict[str, torch.Tensor], args: Any) -> torch.Tensor:
    """The weight compressed-tensors' own decompressor reads back from `tensors`."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]


FLOAT_OFFSET = (
    "float zero offset Z (not an integer multiple of S): compressed-tensors zero points are integers "
    "(quantize with zero_point 'integer' or 'none' for a packed layer)"
)


def _decode_difference(tensors: dict[str, torch.Tensor], args: Any, want: torch.Tensor) -> tuple[float | None, str]:
    """(max |decoded - ours|, or None when the library reads back something else, and why)."""
    try:
        decoded = _decoded(tensors, args)
    except Exception as error:  # a layout the library cannot read back is not written
        return None, f"compressed-tensors cannot decode this layout: {type(error).__name__}: {error}"
    if decoded.shape != want.shape:
        return None, f"compressed-tensors decodes shape {tuple(decoded.shape)}, not {tuple(want.shape)}"
    diff = (decoded.double() - want.double()).abs().max().item() if want.numel() else 0.0
    if diff > ROUNDING * want.abs().max().item():
        return None, f"compressed-tensors decodes a different weight (max |diff| {diff:.3g})"
    return diff, "bit for bit" if diff == 0 else f"to float rounding, max |diff| {diff:.3g}"


def pack_layer(
    layer: QuantizedLayer, module: nn.Module, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor] | None, Any, str]:
    """(packed tensors or None, QuantizationArgs, why) for one quantized layer."""
    if layer.kind != "linear" or not isinstance(module, nn.Linear):
        return None, None, f"{layer.kind} layer: compressed-tensors checkpoints here pack Linear weights only"
    symmetric = bool((layer.zeros == 0).all())
    zp = None if symmetric else layer.integer_zero_points()
    if not symmetric and zp is None:
        return None, None, FLOAT_OFFSET
    args = _args(layer, symmetric)
    tensors = _packed_tensors(layer, zp, dtype)
    diff, exact = _decode_difference(tensors, args, layer.dequantize().to(dtype))
    if diff is None:
        return None, None, exact
    how = "symmetric" if symmetric else "integer zero point"
    return tensors, args, f"{layer.bits}-bit {args.strategy} {how}: pack-quantized, decodes {exact}"


def _quantization_config(groups: dict[str, tuple[Any, list[str]]], ignore: list[str]) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    schemes = {
        f"group_{index}": QuantizationScheme(targets=sorted(targets), weights=args)
        for index, (args, targets) in enumerate(groups.values())
    }
    config = QuantizationConfig(
        config_groups=schemes, format="pack-quantized", quantization_status="compressed", ignore=sorted(ignore)
    )
    dumped = config.model_dump(mode="json", exclude_none=True)
    if any(not args.symmetric for args, _ in groups.values()):
        # transformers cannot build asymmetric pack-quantized layers compressed (packed zero points, llm-compressor
        # issue 1618): ask it to dequantize at load; vLLM and compressed-tensors ignore the key
        dumped["dequantize"] = True
    return dumped


def _layer_tensors(
    result: CompressionResult, inner: nn.Module, prefix: str, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[Any, list[str]]], dict[str, str]]:
    """(packed tensors by checkpoint name, config groups, HF module name -> how it was written)."""
    packed: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[Any, list[str]]] = {}
    written: dict[str, str] = {}
    for name, layer in sorted(result.quantized.items()):
        module_name = name.removeprefix(prefix)
        tensors, args, why = pack_layer(layer, inner.get_submodule(module_name), dtype)
        if tensors is None:
            written[module_name] = f"float (dequantized): {why}"
            continue
        written[module_name] = why
        packed.update({f"{module_name}.{key}": value for key, value in tensors.items()})
        key = json.dumps(args.model_dump(mode="json"), sort_keys=True)
        groups.setdefault(key, (args, []))[1].append(module_name)
    return packed, groups, written


def write_compressed_tensors(result: CompressionResult, tokenizer: Any, out_dir: Path) -> dict[str, Any]:
    """Write `result` as a Hugging Face directory whose quantized Linear layers are compressed-tensors
    `pack-quantized`; returns the report section (per layer: packed or float, and why)."""
    inner, prefix = inner_model(result.model)
    dtype = next(inner.parameters()).dtype
    packed, groups, written = _layer_tensors(result, inner, prefix, dtype)
    floats, ties = untied_state_dict(inner)
    tensors = {
        k: v.cpu().contiguous() for k, v in floats.items() if k.removesuffix(".weight") not in groups_targets(groups)
    }
    tensors.update(packed)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = inner.config.to_dict()
    config.pop("quantization_config", None)
    if groups:
        float_linears = [
            n for n, m in inner.named_modules() if isinstance(m, nn.Linear) and n not in groups_targets(groups)
        ]
        config["quantization_config"] = _quantization_config(groups, float_linears)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    save_file(tensors, str(out_dir / CHECKPOINT), metadata={"format": "pt"})
    generation = getattr(inner, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return {
        "format": "compressed-tensors pack-quantized" if groups else "float (no layer expressible)",
        "packed_layers": sum(len(targets) for _, targets in groups.values()),
        "float_layers": {n: why for n, why in written.items() if why.startswith("float")},
        "layers": written,
        "tied": ties,
    }


def groups_targets(groups: dict[str, tuple[Any, list[str]]]) -> set[str]:
    return {target for _, targets in groups.values() for target in targets}
