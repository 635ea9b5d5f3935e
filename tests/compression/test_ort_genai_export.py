"""`ort_genai` artifact: our codes through onnxruntime-genai's model builder (GPTQ input), read back by ONNX
Runtime's own MatMulNBits kernel, and greedy generation with onnxruntime-genai (KV cache) equal to
transformers' greedy generation on the compressed-tensors checkpoint / the compressed model."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from compression.configs import RTNConfig
from compression.evaluate.generation import greedy_generator, greedy_tokens, open_genai
from compression.io import load_model
from compression.io.compressed_tensors_export import write_compressed_tensors
from compression.io.errors import ExportError
from compression.io.ort_genai_export import GenaiLogits, unzip_genai, write_ort_genai
from compression.methods.quant_rtn import compress as rtn
from compression.primitives.layers import set_weight_matrix
from compression.primitives.quant import dequantize, minmax_params, quantize
from compression.types import CompressionResult, QuantizedLayer
from tests.compression.test_compressed_tensors_export import _load
from tests.compression.test_gguf_export import tiny_gemma3, tiny_llama

pytest.importorskip("onnxruntime_genai")
warnings.filterwarnings("ignore")
PROMPT = [1, 5, 9, 17, 33, 60, 7, 99]
NEW_TOKENS = 24


def tiny_tokenizer(folder: Path, bos: int, eos: int) -> None:
    """A word-level tokenizer over the tiny models' 128 ids, its special ids those of the model's config
    (built offline; the builder copies it and takes the end-of-sequence ids from it too)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)} | {"<s>": bos, "</s>": eos}
    vocab = {token: i for token, i in vocab.items() if token.startswith("<") or i not in (bos, eos)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="w0")
    fast.save_pretrained(folder)


def with_tokenizer(build, folder: Path):  # type: ignore[no-untyped-def]
    config = build(folder).module.model.config
    tiny_tokenizer(folder, config.bos_token_id, config.eos_token_id)
    return load_model(folder)


def ort_weights(onnx_path: Path) -> dict[str, np.ndarray]:
    """Each MatMulNBits node's weight [N, K] as ONNX Runtime's kernel computes with it: the node alone, fed
    the identity (X·Wᵀ = Wᵀ), independent of our decoder."""
    model = onnx.load(str(onnx_path), load_external_data=True)
    initializers = {t.name: t for t in model.graph.initializer}
    weights = {}
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        k = next(a.i for a in node.attribute if a.name == "K")
        single = helper.make_node(node.op_type, ["x", *node.input[1:]], ["y"], domain=node.domain)
        single.attribute.extend(node.attribute)
        graph = helper.make_graph(
            [single], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [initializers[name] for name in node.input[1:] if name],
        )  # fmt: skip
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        session = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString())
        weights[node.name] = session.run(None, {"x": np.eye(k, dtype=np.float32)})[0].T
    return weights


def _ours(result: CompressionResult, node: str) -> np.ndarray:
    parts = node.split("/")
    if parts[1] == "lm_head":
        names = ["model.lm_head"]
    else:
        scope = "self_attn" if parts[3] == "attn" else "mlp"
        projections = ["q_proj", "k_proj", "v_proj"] if parts[4] == "qkv_proj" else [parts[4]]
        names = [f"model.model.{parts[2]}.{scope}.{p}" for p in projections]
    return np.concatenate([result.quantized[n].dequantize().numpy() for n in names])


def assert_weights_are_ours(folder: Path, result: CompressionResult) -> int:
    weights = ort_weights(folder / "model.onnx")
    for node, got in weights.items():
        want = _ours(result, node)
        assert got.shape == want.shape, node
        np.testing.assert_allclose(got, want, rtol=0, atol=2.0**-20 * np.abs(want).max(), err_msg=node)
    return len(weights)


def genai_greedy(folder: Path, prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """onnxruntime-genai's greedy tokens after `prompt` and its last-position logits for the prompt."""
    model = open_genai(folder, threads=1)
    generator = greedy_generator(model, len(prompt) + new_tokens)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    logits = np.asarray(generator.get_logits()).reshape(-1)
    for _ in range(new_tokens):
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt) :]], logits


def transformers_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:  # type: ignore[no-untyped-def]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].numpy()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist(), logits


def test_llama_symmetric_4bit_greedy_equals_transformers_on_the_compressed_tensors_checkpoint(tmp_path: Path) -> None:
    loaded = with_tokenizer(tiny_llama, tmp_path / "llama")
    result = rtn(loaded.module, None, RTNConfig(bits=4, group_size=32, zero_point="none"))
    section = write_ort_genai(result, loaded.tokenizer, tmp_path / "genai.zip")
    assert section["matmul_nbits"] == {"int4 block 32": 14} and section["weights_check"]["max_abs_diff"] == 0.0
    assert section["lm_head"] == "float"
    folder = unzip_genai(tmp_path / "genai.zip", tmp_path / "genai")
    assert {"genai_config.json", "model.onnx", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    assert {"past_key_values.0.key", "present.1.value"} <= names, "a KV cache in and out"
    assert assert_weights_are_ours(folder, result) == 10, "q/k/v fused: 5 MatMulNBits per layer, head float"
    write_compressed_tensors(result, loaded.tokenizer, tmp_path / "ct")
    want_tokens, want_logits = transformers_greedy(_load(tmp_path / "ct"), PROMPT, NEW_TOKENS)
    got_tokens, got_logits = genai_greedy(folder, PROMPT, NEW_TOKENS)
    assert got_tokens == want_tokens
    assert np.abs(got_logits - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
    ids = torch.randint(0, 128, (2, 12))
    full = GenaiLogits(tmp_path / "genai.zip")(ids).numpy()
    with torch.no_grad():
        reference = result.model(input_ids=ids).numpy()
    assert np.abs(full - reference).max() <= 1e-4 * np.abs(reference).max()


def _integer_zero_point_layer(name: str, module: torch.nn.Linear, bits: int, group: int | None) -> QuantizedLayer:
    """An asymmetric layer whose offset is an integer number of steps (Z = -zp·S), the model set to it."""
    weight = module.weight.detach()
    scales, zeros = minmax_params(weight, bits, group, "integer")
    codes = quantize(weight, scales, zeros, bits, group)
    set_weight_matrix(module, dequantize(codes, scales, zeros, group))
    return QuantizedLayer(name, "linear", bits, group, codes, scales, zeros, tuple(weight.shape))


def test_integer_zero_points_mixed_bits_and_per_channel_gemma3(tmp_path: Path) -> None:
    """Asymmetric integer zero points, one 8-bit v_proj (q/k/v left unfused), a per-channel o_proj
    (written in 64-column blocks sharing the row's scale), a quantized LM head; Gemma-3 (sliding window)."""
    loaded = with_tokenizer(tiny_gemma3, tmp_path / "gemma")
    model = loaded.module
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            bits = 8 if name.endswith("layers.1.self_attn.v_proj") else 4
            group = None if name.endswith("layers.0.self_attn.o_proj") else 32
            quantized[name] = _integer_zero_point_layer(name, module, bits, group)
    result = CompressionResult(model=model, method="test", quantized=quantized)
    section = write_ort_genai(result, loaded.tokenizer, tmp_path / "genai.zip")
    assert section["matmul_nbits"] == {"int4 block 32": 12, "int8 block 32": 1, "int4 block 256": 1}
    folder = unzip_genai(tmp_path / "genai.zip", tmp_path / "genai")
    assert assert_weights_are_ours(folder, result) == 14, "unfused q, k, v"
    inner = model.model
    want_tokens, want_logits = transformers_greedy(inner, PROMPT, NEW_TOKENS)
    got_tokens, got_logits = genai_greedy(folder, PROMPT, NEW_TOKENS)
    assert got_tokens == want_tokens
    assert np.abs(got_logits - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
    short = greedy_tokens(open_genai(folder, threads=1), PROMPT[:3], 4)  # fewer tokens than the window
    assert short == transformers_greedy(inner, PROMPT[:3], 4)[0]
    ids = torch.randint(0, 128, (2, 24))  # longer than the 16-token window
    full = GenaiLogits(tmp_path / "genai.zip")(ids).numpy()
    with torch.no_grad():
        reference = model(input_ids=ids).numpy()
    assert np.abs(full - reference).max() <= 1e-4 * np.abs(reference).max()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (RTNConfig(bits=4, group_size=32, zero_point="float"), "float zero offset Z"),
        (RTNConfig(bits=3, group_size=32, zero_point="none"), "3-bit"),
    ],
)
def test_settings_without_a_genai_form_are_refused(tmp_path: Path, config: RTNConfig, match: str) -> None:
    loaded = with_tokenizer(tiny_llama, tmp_path / "llama")
    result = rtn(loaded.module, None, config)
    with pytest.raises(ExportError, match=match):
        write_ort_genai(result, loaded.tokenizer, tmp_path / "genai.zip")
    assert not (tmp_path / "genai.zip").exists()


def test_tied_head_runs_on_the_quantized_tables_codes(tmp_path: Path) -> None:
    """Gemma-3's head is its embedding table: with the table quantized, the head is a MatMulNBits of the
    table's codes and the Gather reads the dequantized table (both the compressed model's matrix)."""
    loaded = with_tokenizer(tiny_gemma3, tmp_path / "gemma")
    config = RTNConfig(bits=4, group_size=32, zero_point="none", quantize_embeddings=4)
    result = rtn(loaded.module, None, config)
    assert result.quantized["model.model.embed_tokens"].kind == "embedding"
    section = write_ort_genai(result, loaded.tokenizer, tmp_path / "genai.zip")
    assert section["lm_head"] == "the tied table's codes" and section["matmul_nbits"] == {"int4 block 32": 15}
    folder = unzip_genai(tmp_path / "genai.zip", tmp_path / "genai")
    weights = ort_weights(folder / "model.onnx")
    table = result.quantized["model.model.embed_tokens"].dequantize().numpy()
    np.testing.assert_allclose(weights["/lm_head/MatMulNBits"], table, rtol=0, atol=2.0**-20 * np.abs(table).max())
    want_tokens, want_logits = transformers_greedy(result.model.model, PROMPT, NEW_TOKENS)
    got_tokens, got_logits = genai_greedy(folder, PROMPT, NEW_TOKENS)
    assert got_tokens == want_tokens
    assert np.abs(got_logits - want_logits).max() <= 1e-4 * np.abs(want_logits).max()


def test_a_float_projection_or_no_tokenizer_is_refused(tmp_path: Path) -> None:
    loaded = with_tokenizer(tiny_llama, tmp_path / "llama")
    result = rtn(loaded.module, None, RTNConfig(bits=4, group_size=32, zero_point="none"))
    with pytest.raises(ExportError, match="tokenizer"):
        write_ort_genai(result, None, tmp_path / "genai.zip")
    result.quantized.pop("model.model.layers.1.mlp.up_proj")
    with pytest.raises(ExportError, match=r"every decoder projection must be quantized.*layers\.1\.mlp\.up_proj"):
        write_ort_genai(result, loaded.tokenizer, tmp_path / "genai.zip")


def test_blocks_and_gptq_packing_follow_the_layout() -> None:
    """Per-channel on a width that is no power of two (Gemma's 640) -> the largest power-of-two block that
    divides it; GPTQ qweight packs 8 codes per int32 down the input axis, lowest bits first, q = c + 8."""
    from compression.io.ort_genai_export import block_size, gptq_tensors

    codes = torch.randint(-8, 8, (16, 640), dtype=torch.int8)
    layer = QuantizedLayer("w", "linear", 4, None, codes, torch.rand(16, 1) + 0.1, torch.zeros(16, 1), (16, 640))
    assert block_size(layer, 640) == 128
    assert block_size(QuantizedLayer("w", "linear", 4, 512, codes, *[torch.ones(16, 2)] * 2, (16, 640)), 640) == 128
    tensors, block = gptq_tensors(layer, 640)
    assert block == 128 and tensors["scales"].shape == (5, 16) and tensors["qweight"].shape == (80, 16)
    assert torch.equal(tensors["scales"], layer.scales.T.expand(5, 16))
    words = tensors["qweight"].to(torch.int64) & 0xFFFFFFFF
    unpacked = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=1).reshape(640, 16)
    assert torch.equal(unpacked.T - 8, codes.to(torch.int64))
    zeros = tensors["qzeros"].to(torch.int64) & 0xFFFFFFFF  # GPTQ v1 stores zp - 1 = 7
    assert torch.equal(zeros, torch.full_like(zeros, int("77777777", 16)))
