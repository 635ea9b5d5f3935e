"""GGUF artifact: our codes in Q4_1 / Q4_0 / Q8_0 blocks, read back with gguf's reader and dequantizer,
and loaded by transformers' GGUF loader (llama.cpp's names, q/k layout and Gemma norm convention)."""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from compression.configs import RTNConfig
from compression.io import load_model
from compression.io.errors import ExportError
from compression.io.gguf_export import write_gguf
from compression.methods.quant_rtn import compress as rtn

warnings.filterwarnings("ignore")
SMALL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}


def tiny_llama(folder: Path):  # type: ignore[no-untyped-def]
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return load_model(folder)


def tiny_gemma3(folder: Path):  # type: ignore[no-untyped-def]
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        **SMALL,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        max_position_embeddings=64,
        sliding_window=16,
    )  # fmt: skip  (head_dim = query_pre_attn_scalar, as in Gemma-3-270M: llama.cpp scales by 1/sqrt(head_dim))
    model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():  # trained Gemma norms are far from 0; random ones make the (1 + w) shift visible
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return load_model(folder)


def _blocks(reader, name: str) -> tuple[str, np.ndarray]:  # type: ignore[no-untyped-def]
    tensor = next(t for t in reader.tensors if t.name == name)
    return tensor.tensor_type.name, np.asarray(tensor.data)


def _spec_decode(type_name: str, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [rows, cols], d [rows, blocks], m [rows, blocks]) from GGML's block layout, written out here
    from the format spec (not from the writer): Q4_1 = f16 d, f16 m, 16 bytes (q[j] | q[j+16] << 4)."""
    rows = data.shape[0]
    size = {"Q4_1": 20, "Q4_0": 18, "Q8_0": 34}[type_name]
    blocks = data.reshape(rows, -1, size)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    head = 4 if type_name == "Q4_1" else 2
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if head == 4 else np.zeros_like(d)
    body = blocks[..., head:]
    if type_name == "Q8_0":
        q = body.copy().view(np.int8).astype(np.int32)
    else:
        q = np.concatenate([body & 0x0F, body >> 4], axis=-1).astype(np.int32)
    return q.reshape(rows, -1), d, m


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        output = model(input_ids=ids)
    return output if isinstance(output, torch.Tensor) else output.logits


def _gguf_model(path: Path):  # type: ignore[no-untyped-def]
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def test_llama_4bit_codes_are_q4_1_blocks_and_transformers_loads_the_file(tmp_path: Path) -> None:
    loaded = tiny_llama(tmp_path / "llama")
    result = rtn(loaded.module, None, RTNConfig(bits=4, group_size=64, quantize_embeddings=8))
    path = tmp_path / "model.gguf"
    section = write_gguf(result, loaded.tokenizer, path)
    reader = gguf.GGUFReader(str(path))
    layer = result.quantized["model.model.layers.0.mlp.down_proj"]
    type_name, data = _blocks(reader, "blk.0.ffn_down.weight")
    assert type_name == "Q4_1"
    q, d, m = _spec_decode(type_name, data)
    assert np.array_equal(q - 8, layer.codes.numpy()), "codes are kept bit for bit"
    scales = layer.scales.numpy().repeat(2, axis=1)  # group 64 = two 32-value blocks with the same (S, Z)
    zeros = layer.zeros.numpy().repeat(2, axis=1)
    assert np.array_equal(d, scales.astype(np.float16).astype(np.float32))
    assert np.array_equal(m, (zeros - 8 * d).astype(np.float16).astype(np.float32))
    decoded = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_1)
    ours = layer.dequantize().numpy()
    assert np.abs(decoded - ours).max() <= 2e-3 * np.abs(ours).max(), "only the float16 rounding of S and Z"
    assert section["stored_in_float"] == {
        "model.embed_tokens.weight": "float: 8-bit with a float offset Z: Q8_0 holds d·q only and no GGUF "
        "8-bit type holds a minimum"
    }
    assert _blocks(reader, "token_embd.weight")[0] == "F16" and _blocks(reader, "output_norm.weight")[0] == "F32"
    ids = torch.randint(0, 128, (2, 12))
    want = _logits(result.model, ids)
    got = _logits(_gguf_model(path), ids)
    assert (got - want).abs().max() <= 5e-3 * want.abs().max()


def test_symmetric_8bit_is_q8_0_and_symmetric_4bit_is_q4_0(tmp_path: Path) -> None:
    loaded = tiny_llama(tmp_path / "llama")
    result = rtn(loaded.module, None, RTNConfig(bits=8, group_size=32, symmetric=True, quantize_embeddings=4))
    path = tmp_path / "model.gguf"
    section = write_gguf(result, loaded.tokenizer, path)
    assert section["types"] == {"Q8_0": 14, "Q4_0": 1, "F16": 1, "F32": 5} and not section["stored_in_float"]
    reader = gguf.GGUFReader(str(path))
    for gguf_name, name, offset in (
        ("blk.1.ffn_up.weight", "model.model.layers.1.mlp.up_proj", 0),
        ("token_embd.weight", "model.model.embed_tokens", 8),
    ):
        layer = result.quantized[name]
        type_name, data = _blocks(reader, gguf_name)
        q, d, _ = _spec_decode(type_name, data)
        assert np.array_equal(q - offset, layer.codes.numpy()), gguf_name
        assert np.array_equal(d, layer.scales.numpy().astype(np.float16).astype(np.float32))
        decoded = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])
        assert np.abs(decoded - layer.dequantize().numpy()).max() <= 2e-3 * layer.dequantize().abs().max().item()
    ids = torch.randint(0, 128, (2, 12))
    want = _logits(result.model, ids)
    assert (_logits(_gguf_model(path), ids) - want).abs().max() <= 5e-3 * want.abs().max()


def test_llama_q_and_k_rows_follow_llama_cpp_rotary_layout(tmp_path: Path) -> None:
    """The q/k permutation is what makes the file right: undoing it by hand gives our rows back."""
    loaded = tiny_llama(tmp_path / "llama")
    result = rtn(loaded.module, None, RTNConfig(bits=4, group_size=32))
    path = tmp_path / "model.gguf"
    write_gguf(result, loaded.tokenizer, path)
    reader = gguf.GGUFReader(str(path))
    layer = result.quantized["model.model.layers.0.self_attn.k_proj"]
    q, _, _ = _spec_decode(*_blocks(reader, "blk.0.attn_k.weight"))
    heads, rows = 2, layer.codes.shape[0]
    assert not np.array_equal(q - 8, layer.codes.numpy())
    unpermuted = (q - 8).reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(rows, -1)
    assert np.array_equal(unpermuted, layer.codes.numpy())


def test_gemma3_two_bit_codes_widen_to_q4_1_and_norms_shift(tmp_path: Path) -> None:
    loaded = tiny_gemma3(tmp_path / "gemma")
    result = rtn(loaded.module, None, RTNConfig(bits=2, group_size=32))
    path = tmp_path / "model.gguf"
    section = write_gguf(result, loaded.tokenizer, path, float_type="F32")
    assert section["architecture"] == "gemma3" and section["types"]["Q4_1"] == 14
    assert "output.weight" not in section["tensors"], "tied head: llama.cpp reads token_embd"
    reader = gguf.GGUFReader(str(path))
    layer = result.quantized["model.model.layers.1.self_attn.o_proj"]
    q, _, _ = _spec_decode(*_blocks(reader, "blk.1.attn_output.weight"))
    assert np.array_equal(q - 2, layer.codes.numpy()) and set(np.unique(q)) <= {0, 1, 2, 3}
    norm = np.asarray(next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight").data)
    want_norm = result.model.model.model.layers[0].input_layernorm.weight.detach().numpy() + 1
    assert np.array_equal(norm, want_norm)
    ids = torch.randint(0, 128, (2, 12))
    want = _logits(result.model, ids)
    assert (_logits(_gguf_model(path), ids) - want).abs().max() <= 5e-3 * want.abs().max()


def test_settings_gguf_cannot_hold_are_written_in_float_and_named(tmp_path: Path) -> None:
    loaded = tiny_llama(tmp_path / "llama")
    result = rtn(loaded.module, None, RTNConfig(bits=4, group_size=16))
    section = write_gguf(result, loaded.tokenizer, tmp_path / "model.gguf")
    assert section["types"] == {"F16": 16, "F32": 5}
    reasons = set(section["stored_in_float"].values())
    assert reasons == {"float: group_size 16 puts several scales in one 32-value GGUF block"}
    assert len(section["stored_in_float"]) == 14


def test_unmapped_architecture_is_refused(tmp_path: Path) -> None:
    import transformers

    config = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    loaded = load_model(tmp_path / "gpt2")
    result = rtn(loaded.module, None, RTNConfig(bits=4, group_size=32))
    with pytest.raises(ExportError, match=r"no llama\.cpp mapping for model type 'gpt2'"):
        write_gguf(result, loaded.tokenizer, tmp_path / "model.gguf")
