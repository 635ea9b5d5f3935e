"""GGUF for llama.cpp: our quantized codes written as GGUF blocks wherever a GGUF type holds them exactly.

Our convention (compression.primitives.quant): W = c·S + Z, c a signed code in [-2^(b-1), 2^(b-1)-1],
S and Z float per row and group of input columns. GGUF's legacy block types keep one scale per 32
consecutive input values (one row's block), which is our grouping whenever the group size is a multiple
of 32 (or per channel) and the row length is a multiple of 32:

- Q4_1 (d, m, 32 unsigned nibbles q): W = d·q + m. With q = c + 2^(b-1): d = S, m = Z - 2^(b-1)·S.
  decoupleQ's and every asymmetric quantizer's 4-bit (S, Z) form.
- Q4_0 (d, 32 nibbles): W = d·(q - 8) = d·c. Symmetric 4-bit (Z = 0).
- Q8_0 (d, 32 int8 q): W = d·q. Symmetric 8-bit (Z = 0); an 8-bit Z has no GGUF type.
- 2- and 3-bit codes fit 4-bit nibbles unchanged: they are written as Q4_1 / Q4_0 (same weights, 4.5-5
  bits per weight on disk). GGUF's own 2/3-bit types (Q2_K, Q3_K) store their block scales as 4- or
  6-bit integers under a super-block scale, which cannot hold our float S and Z.

d and m are float16 in GGUF (the format fixes it), so a weight differs from ours by the float16 rounding
of S and Z; `write_gguf` decodes what it wrote with gguf's own dequantizer and reports the largest
difference per tensor. Codes are kept bit for bit.

Tensor names and metadata follow llama.cpp's converter for the mapped architectures (`ARCHITECTURES`):
Llama-family (llama, mistral: q/k rows permuted to llama.cpp's rotary layout) and Gemma 3 (norm weights
stored as 1 + w). Float tensors: 1-D as F32, matrices as F16 (or F32 on request).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compression.io.errors import ExportError
from compression.io.hf import inner_model
from compression.types import CompressionResult, QuantizedLayer

BLOCK = 32


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face model type becomes a llama.cpp architecture."""

    gguf_name: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's llama graph wants q/k rows in its interleaved rotary order
    norm_shift: float  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w


ARCHITECTURES = {
    "llama": Arch("LLAMA", permute_qk=True, norm_shift=0.0),
    "mistral": Arch("LLAMA", permute_qk=True, norm_shift=0.0),
    "gemma3_text": Arch("GEMMA3", permute_qk=False, norm_shift=1.0),
}


def gguf_type(layer: QuantizedLayer) -> tuple[str | None, str]:
    """(GGUF type name or None, why): the exact GGUF block type for this layer's codes."""
    cols = int(layer.codes.shape[1])
    if layer.kind not in ("linear", "embedding"):
        return None, f"{layer.kind} layers have no llama.cpp tensor"
    if cols % BLOCK:
        return None, f"{cols} input columns are not whole 32-value GGUF blocks"
    if layer.group_size is not None and layer.group_size % BLOCK:
        return None, f"group_size {layer.group_size} puts several scales in one 32-value GGUF block"
    symmetric = bool((layer.zeros == 0).all())
    if layer.bits == 8:
        if symmetric:
            return "Q8_0", "8-bit symmetric: Q8_0 (d·q), codes kept"
        return None, "8-bit with a float offset Z: Q8_0 holds d·q only and no GGUF 8-bit type holds a minimum"
    if layer.bits not in (2, 3, 4):
        return None, f"{layer.bits}-bit codes have no exact GGUF type"
    name = "Q4_0" if symmetric else "Q4_1"
    how = "d·(q-8), Z = 0" if symmetric else f"d·q + m, q = c + {q4_1_offset(layer.bits)}"
    if layer.bits == 4:
        return name, f"4-bit: {name} ({how}), codes kept"
    return name, (
        f"{layer.bits}-bit codes stored in 4-bit {name} blocks ({how}): same weights, 4-bit size; GGUF's "
        f"{layer.bits}-bit K-quants store integer block scales that cannot hold float S and Z"
    )


def _per_block(values: torch.Tensor, layer: QuantizedLayer) -> np.ndarray:
    """[rows, n_groups] -> [rows, n_blocks] float32: each 32-column block takes its group's value."""
    blocks = layer.codes.shape[1] // BLOCK
    group = layer.group_size or layer.codes.shape[1]
    index = torch.arange(blocks) * BLOCK // group
    return values.float()[:, index].numpy()


def q4_1_offset(bits: int) -> int:
    """q = c + 2^(b-1) (our unsigned code): m = Z - 2^(b-1)·d stays close to the group's minimum, so its
    float16 rounding stays small (2-bit codes offset by 8 would put m 6·d further away)."""
    return 2 ** (bits - 1)


def encode_blocks(layer: QuantizedLayer, type_name: str) -> np.ndarray:
    """The layer's codes as GGUF blocks: uint8 [rows, n_blocks · bytes per block]."""
    rows, cols = layer.codes.shape
    codes = layer.codes.numpy().astype(np.int16).reshape(rows, cols // BLOCK, BLOCK)
    scale = _per_block(layer.scales, layer).astype(np.float16)
    d = scale[..., None].view(np.uint8)
    if type_name == "Q8_0":
        body = codes.astype(np.int8).view(np.uint8)
        return np.concatenate([d, body], axis=-1).reshape(rows, -1)
    offset = 8 if type_name == "Q4_0" else q4_1_offset(layer.bits)
    nibbles = (codes + offset).astype(np.uint8)
    packed = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2 :] << 4)
    if type_name == "Q4_0":
        return np.concatenate([d, packed], axis=-1).reshape(rows, -1)
    minimum = _per_block(layer.zeros, layer) - offset * scale.astype(np.float32)
    m = minimum.astype(np.float16)[..., None].view(np.uint8)
    return np.concatenate([d, m, packed], axis=-1).reshape(rows, -1)


def _qk_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives q/k: per head, the two rotary halves interleaved."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, 2, half).transpose(1, 2).reshape(-1)


def _permuted(layer: QuantizedLayer, order: torch.Tensor) -> QuantizedLayer:
    return QuantizedLayer(
        layer.name, layer.kind, layer.bits, layer.group_size,
        layer.codes[order], layer.scales[order], layer.zeros[order], layer.orig_shape,
    )  # fmt: skip


@dataclass
class _Writer:
    """One GGUF file being assembled: tensors, their per-tensor record, the checks."""

    writer: Any
    arch: Arch
    config: Any
    float_type: str
    tensors: dict[str, dict[str, Any]]

    def row_order(self, hf_name: str, rows: int) -> torch.Tensor | None:
        if not self.arch.permute_qk:
            return None
        if ".self_attn.q_proj." in hf_name:
            return _qk_permutation(rows, self.config.num_attention_heads)
        if ".self_attn.k_proj." in hf_name:
            return _qk_permutation(rows, self.config.num_key_value_heads)
        return None

    def add_quantized(self, name: str, hf_name: str, layer: QuantizedLayer, type_name: str, why: str) -> None:
        import gguf

        order = self.row_order(hf_name, layer.codes.shape[0])
        layer = layer if order is None else _permuted(layer, order)
        blocks = encode_blocks(layer, type_name)
        qtype = gguf.GGMLQuantizationType[type_name]
        self.writer.add_tensor(name, blocks, raw_dtype=qtype)
        decoded = gguf.quants.dequantize(blocks, qtype)
        ours = layer.dequantize().reshape(decoded.shape).numpy()
        self.tensors[name] = {"source": hf_name, "type": type_name, "why": why, **_deviation(decoded, ours)}

    def add_float(self, name: str, hf_name: str, tensor: torch.Tensor, why: str) -> None:
        order = self.row_order(hf_name, tensor.shape[0]) if tensor.ndim == 2 else None
        data = (tensor if order is None else tensor[order]).detach().float().numpy()
        if self.arch.norm_shift and hf_name.endswith("norm.weight"):
            data = data + np.float32(self.arch.norm_shift)
        half = self.float_type == "F16" and data.ndim > 1 and np.abs(data).max(initial=0) < 65504
        stored = data.astype(np.float16) if half else np.ascontiguousarray(data)
        self.writer.add_tensor(name, stored)
        type_name = "F16" if half else "F32"
        self.tensors[name] = {"source": hf_name, "type": type_name, "why": why, **_deviation(stored, data)}


def _deviation(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    diff = np.abs(got.astype(np.float32) - want.astype(np.float32))
    return {"max_abs_diff": float(diff.max(initial=0.0)), "max_abs": float(np.abs(want).max(initial=0.0))}


def _arch_for(inner: nn.Module) -> Arch:
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(
            "gguf_unsupported",
            f"no llama.cpp mapping for model type {model_type!r}; mapped: {sorted(ARCHITECTURES)}",
        )
    return ARCHITECTURES[model_type]


def _rope_theta(config: Any, layer_type: str) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(layer_type, params) if isinstance(params.get(layer_type), dict) else params
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return None if theta is None else float(theta)


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _common_metadata(writer: Any, config: Any) -> None:
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))


def _llama_metadata(writer: Any, config: Any) -> None:
    writer.add_rope_dimension_count(_head_dim(config))
    theta = _rope_theta(config, "full_attention")
    if theta is not None:
        writer.add_rope_freq_base(theta)


def _gemma3_metadata(writer: Any, config: Any) -> None:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != _head_dim(config):
        raise ExportError(
            "gguf_unsupported",
            f"query_pre_attn_scalar {scalar} != head_dim {_head_dim(config)}: llama.cpp's gemma3 graph scales "
            "attention by 1/sqrt(head_dim) and has no key for another scale",
        )
    for layer_type, add in (("full_attention", writer.add_rope_freq_base), ("sliding_attention", None)):
        theta = _rope_theta(config, layer_type)
        if theta is not None:
            (add or writer.add_rope_freq_base_swa)(theta)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _tokenizer_metadata(writer: Any, tokenizer: Any, vocab_size: int) -> str:
    """llama.cpp's tokenizer keys from a Llama/Gemma-style (SentencePiece BPE with byte fallback)
    tokenizer.json, through gguf's own vocab readers; returns what was written (or why not)."""
    import gguf

    if tokenizer is None:
        return "no tokenizer in the upload: tokenizer.ggml.* not written (llama.cpp needs them to run the file)"
    with tempfile.TemporaryDirectory(prefix="modelpress-gguf-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        try:
            vocab = gguf.LlamaHfVocab(Path(folder))
        except (FileNotFoundError, TypeError, KeyError, OSError) as error:
            return f"tokenizer.ggml.* not written: only SentencePiece-style BPE tokenizers are mapped ({error})"
        tokens, scores, types = [], [], []
        for text, score, token_type in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(token_type))
        if len(tokens) > vocab_size:
            return f"tokenizer.ggml.* not written: {len(tokens)} tokens for a {vocab_size}-row embedding table"
        tokens += [f"[PAD{index}]".encode() for index in range(len(tokens), vocab_size)]
        scores += [-1000.0] * (vocab_size - len(scores))
        types += [int(gguf.TokenType.UNUSED)] * (vocab_size - len(types))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(Path(folder), n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return f"tokenizer.ggml.* written (llama / SentencePiece, {vocab_size} tokens)"


METADATA = {"LLAMA": _llama_metadata, "GEMMA3": _gemma3_metadata}


def _plan(result: CompressionResult, prefix: str) -> dict[str, tuple[QuantizedLayer, str | None, str]]:
    """HF weight name -> (layer, GGUF type or None, why) for every quantized layer."""
    plan = {}
    for name, layer in result.quantized.items():
        hf_name = name.removeprefix(prefix) + ".weight"
        plan[hf_name] = (layer, *gguf_type(layer))
    return plan


def _add_tensors(state: _Writer, result: CompressionResult, inner: nn.Module, prefix: str) -> list[str]:
    import gguf

    from compression.io.export import untied_state_dict

    names = gguf.TensorNameMap(gguf.MODEL_ARCH[state.arch.gguf_name], int(state.config.num_hidden_layers))
    plan = _plan(result, prefix)
    floats, _ = untied_state_dict(inner)
    unmapped = []
    for hf_name, tensor in floats.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unmapped.append(hf_name)
            continue
        layer, type_name, why = plan.get(hf_name, (None, None, "not quantized: kept in float"))
        if layer is not None and type_name is not None:
            state.add_quantized(name, hf_name, layer, type_name, why)
        else:
            state.add_float(name, hf_name, tensor, why if layer is None else f"float: {why}")
    return unmapped


def _file_type(tensors: dict[str, dict[str, Any]]) -> int:
    import gguf

    quantized = Counter(t["type"] for t in tensors.values() if t["type"].startswith("Q"))
    if not quantized:
        return int(gguf.LlamaFileType.MOSTLY_F16 if any(t["type"] == "F16" for t in tensors.values()) else 0)
    return int(gguf.LlamaFileType[f"MOSTLY_{quantized.most_common(1)[0][0]}"])


def write_gguf(result: CompressionResult, tokenizer: Any, path: Path, *, float_type: str = "F16") -> dict[str, Any]:
    """Write `result` as one GGUF file; returns the report section (per-tensor type, why, max deviation).

    Raises ExportError("gguf_unsupported") when the architecture is not mapped or a weight has no
    llama.cpp name (no partial file is written).
    """
    import gguf

    inner, prefix = inner_model(result.model)
    arch = _arch_for(inner)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_name]])
    state = _Writer(writer, arch, inner.config, float_type, {})
    unmapped = _add_tensors(state, result, inner, prefix)
    if unmapped:
        raise ExportError("gguf_unsupported", f"weights without a llama.cpp tensor name: {unmapped[:5]}")
    writer.add_name(str(getattr(inner.config, "_name_or_path", "") or inner.config.model_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_file_type(state.tensors))
    _common_metadata(writer, inner.config)
    METADATA[arch.gguf_name](writer, inner.config)
    tokenizer_note = _tokenizer_metadata(writer, tokenizer, int(inner.config.vocab_size))
    writer.add_string("modelpress.method", result.method)
    writer.add_string("modelpress.tensors", json.dumps({k: v["type"] for k, v in state.tensors.items()}))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return _section(state.tensors, arch, tokenizer_note)


def _section(tensors: dict[str, dict[str, Any]], arch: Arch, tokenizer_note: str) -> dict[str, Any]:
    quantized = {n: t for n, t in tensors.items() if t["type"].startswith("Q")}
    not_exact = {t["source"]: t["why"] for t in tensors.values() if t["why"].startswith("float: ")}
    return {
        "architecture": arch.gguf_name.lower(),
        "types": dict(Counter(t["type"] for t in tensors.values())),
        "quantized_max_abs_diff": max((t["max_abs_diff"] for t in quantized.values()), default=0.0),
        "float_max_abs_diff": max((t["max_abs_diff"] for n, t in tensors.items() if n not in quantized), default=0.0),
        "stored_in_float": not_exact,
        "tokenizer": tokenizer_note,
        "tensors": tensors,
    }
