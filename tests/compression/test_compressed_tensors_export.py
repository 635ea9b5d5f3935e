"""The `hf_dir` checkpoint in compressed-tensors `pack-quantized` form: transformers loads it (its
CompressedTensorsHfQuantizer, decompressing on the CPU) and gives our model's logits; layers the format
cannot hold are written dequantized and named with the reason."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from compression.configs import RTNConfig
from compression.io import ExportOptions, export_artifacts
from compression.io.compressed_tensors_export import CHECKPOINT, FLOAT_OFFSET, write_compressed_tensors
from compression.methods.quant_rtn import compress as rtn
from tests.compression.test_gguf_export import tiny_gemma3, tiny_llama

warnings.filterwarnings("ignore")


def _load(folder: Path):  # type: ignore[no-untyped-def]
    import transformers

    quantization = transformers.CompressedTensorsConfig(run_compressed=False)
    config = json.loads((folder / "config.json").read_text())
    kwargs = {"quantization_config": quantization} if "quantization_config" in config else {}
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        output = model(input_ids=ids)
    return output if isinstance(output, torch.Tensor) else output.logits


def _keys(folder: Path) -> set[str]:
    with safe_open(str(folder / CHECKPOINT), "pt") as checkpoint:
        return set(checkpoint.keys())


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (2, 64), (3, None), (8, 32)])
def test_symmetric_layers_are_packed_and_transformers_loads_our_weights(tmp_path: Path, bits, group) -> None:
    loaded = tiny_llama(tmp_path / "llama")
    result = rtn(loaded.module, None, RTNConfig(bits=bits, group_size=group, symmetric=True))
    section = write_compressed_tensors(result, loaded.tokenizer, tmp_path / "ct")
    assert section["packed_layers"] == 14 and not section["float_layers"]
    quantization = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == "pack-quantized"
    (scheme,) = quantization["config_groups"].values()
    assert scheme["weights"]["num_bits"] == bits and scheme["weights"]["symmetric"] is True
    assert scheme["weights"]["strategy"] == ("channel" if group is None else "group")
    assert "lm_head" in quantization["ignore"]
    keys = _keys(tmp_path / "ct")
    assert "model.layers.0.mlp.up_proj.weight_packed" in keys and "model.layers.0.mlp.up_proj.weight" not in keys
    model = _load(tmp_path / "ct")
    layer = result.quantized["model.model.layers.1.self_attn.q_proj"]
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, layer.dequantize())
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(_logits(model, ids), _logits(result.model, ids), rtol=0, atol=1e-6)


def test_checkpoint_logits_match_the_onnx_artifact(tmp_path: Path) -> None:
    loaded = tiny_llama(tmp_path / "llama")
    result = rtn(loaded.module, None, RTNConfig(bits=4, group_size=32, symmetric=True))
    write_compressed_tensors(result, loaded.tokenizer, tmp_path / "ct")
    ids = torch.randint(0, 128, (2, 12))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    paths = export_artifacts(
        result, loaded, tmp_path / "out", example=example, manifest={}, options=ExportOptions(accuracy_level=0)
    )
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    onnx_logits = session.run(None, {k: v.numpy() for k, v in example.items() if k in wanted})[0]
    got = _logits(_load(tmp_path / "ct"), ids).numpy()
    np.testing.assert_allclose(got, onnx_logits, rtol=0, atol=1e-4 * np.abs(onnx_logits).max())


def test_float_offsets_are_written_dequantized_and_named(tmp_path: Path) -> None:
    loaded = tiny_llama(tmp_path / "llama")
    result = rtn(loaded.module, None, RTNConfig(bits=4, group_size=32, zero_point="float"))  # free float Z
    section = write_compressed_tensors(result, loaded.tokenizer, tmp_path / "ct")
    assert section["format"] == "float (no layer expressible)" and section["packed_layers"] == 0
    assert set(section["float_layers"].values()) == {f"float (dequantized): {FLOAT_OFFSET}"}
    assert "quantization_config" not in json.loads((tmp_path / "ct" / "config.json").read_text())
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(_logits(_load(tmp_path / "ct"), ids), _logits(result.model, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_integer_zero_points_write_the_real_quantized_checkpoint(tmp_path: Path, bits: int) -> None:
    """zero_point 'integer': every quantized Linear is packed with its zero points, transformers loads our weights."""
    loaded = tiny_llama(tmp_path / "llama")
    result = rtn(loaded.module, None, RTNConfig(bits=bits, group_size=32, zero_point="integer"))
    assert all(layer.zero_point_kind() == "integer" for layer in result.quantized.values())
    section = write_compressed_tensors(result, loaded.tokenizer, tmp_path / "ct")
    assert section["packed_layers"] == len(result.quantized) and not section["float_layers"]
    assert section["layers"]["model.layers.0.mlp.down_proj"].startswith(f"{bits}-bit group integer zero point")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert {group["weights"]["symmetric"] for group in config["config_groups"].values()} == {False}
    assert "model.layers.0.mlp.down_proj.weight_zero_point" in _keys(tmp_path / "ct")
    assert config["dequantize"] is True  # plain from_pretrained cannot build packed zero points compressed
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32).eval()
    layer = result.quantized["model.model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight, layer.dequantize(), rtol=0, atol=1e-7)
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(_logits(model, ids), _logits(result.model, ids), rtol=0, atol=1e-6)


def test_gemma_with_quantized_embeddings_keeps_the_table_float_and_the_tie(tmp_path: Path) -> None:
    loaded = tiny_gemma3(tmp_path / "gemma")
    result = rtn(loaded.module, None, RTNConfig(bits=4, group_size=32, symmetric=True, quantize_embeddings=8))
    section = write_compressed_tensors(result, loaded.tokenizer, tmp_path / "ct")
    assert section["packed_layers"] == 14
    assert section["float_layers"] == {
        "model.embed_tokens": "float (dequantized): embedding layer: compressed-tensors checkpoints here pack "
        "Linear weights only"
    }
    assert section["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    model = _load(tmp_path / "ct")
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(_logits(model, ids), _logits(result.model, ids), rtol=0, atol=1e-6)
