"""run_job on a tiny causal LM (Hugging Face directory): the job writes the compressed-tensors `hf_dir`,
the `gguf` file and, on request, the float `hf_float_dir`, lists them in the manifest and says in the
report what each layer became."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gguf
import numpy as np
import onnxruntime as ort
import torch

from compression.job import JobSpec, run_job
from tests.compression.test_compressed_tensors_export import _load, _logits
from tests.compression.test_gguf_export import tiny_llama

warnings.filterwarnings("ignore")


def _run(model_dir: Path, work: Path, config: dict) -> tuple[dict, dict[str, Path]]:
    spec = JobSpec(
        model_path=model_dir, method="quant_rtn", config=config, calibration_path=None, evaluation_path=None,
        gate=None, work_dir=work, seq_len=16, benchmark_repeats=3, benchmark_budget_s=0.5,
    )  # fmt: skip
    output = run_job(spec, progress=lambda *_: None, should_cancel=lambda: False)
    return output.report, output.artifacts


def test_causal_lm_job_writes_compressed_tensors_and_gguf(tmp_path: Path) -> None:
    tiny_llama(tmp_path / "llama")
    config = {"bits": 4, "group_size": 32, "symmetric": True, "hf_float_dir": True}
    report, artifacts = _run(tmp_path / "llama", tmp_path / "work", config)
    assert {"onnx", "safetensors", "manifest", "hf_dir", "hf_float_dir", "gguf"} <= set(artifacts)
    formats = report["export_check"]["formats"]
    assert formats["hf_dir"]["format"] == "compressed-tensors pack-quantized"
    assert formats["hf_dir"]["packed_layers"] == 14 and not formats["hf_dir"]["float_layers"]
    assert formats["gguf"]["written"] is True and formats["gguf"]["types"] == {"Q4_0": 14, "F16": 2, "F32": 5}
    manifest = json.loads(artifacts["manifest"].read_text())
    assert manifest["artifacts"]["gguf"]["sha256"].startswith("sha256:")
    assert manifest["artifacts"]["hf_dir"] == {"file": "hf_model", "directory": True}
    reader = gguf.GGUFReader(str(artifacts["gguf"]))
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")} == {"Q4_0", "F32"}
    ids = torch.randint(0, 128, (2, 16))  # the exported graph's sequence length is the job's seq_len
    session = ort.InferenceSession(str(artifacts["onnx"]), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())}
    wanted = {i.name for i in session.get_inputs()}
    onnx_logits = session.run(None, {k: v for k, v in feeds.items() if k in wanted})[0]
    for folder in (artifacts["hf_dir"], artifacts["hf_float_dir"]):
        got = _logits(_load(folder), ids).numpy()
        np.testing.assert_allclose(got, onnx_logits, rtol=0, atol=1e-4 * np.abs(onnx_logits).max())


def test_float_offsets_and_no_float_dir_unless_asked(tmp_path: Path) -> None:
    tiny_llama(tmp_path / "llama")
    config = {"bits": 8, "group_size": 32, "zero_point": "float"}
    report, artifacts = _run(tmp_path / "llama", tmp_path / "work", config)
    assert "hf_float_dir" not in artifacts and {"hf_dir", "gguf"} <= set(artifacts)
    formats = report["export_check"]["formats"]
    assert formats["hf_dir"]["format"] == "float (no layer expressible)"
    assert len(formats["hf_dir"]["float_layers"]) == 14
    assert formats["gguf"]["types"] == {"F16": 16, "F32": 5}
    assert len(formats["gguf"]["stored_in_float"]) == 14


def test_integer_zero_points_ship_packed_in_every_format(tmp_path: Path) -> None:
    """The default zero_point ('integer'): hf_dir is the real pack-quantized checkpoint with zero points (the job's
    artifact check loads it with plain transformers), GGUF stores the layers as Q4_1, and the report measures the
    ONNX's MatMulNBits at the other accuracy_level."""
    tiny_llama(tmp_path / "llama")
    report, _ = _run(tmp_path / "llama", tmp_path / "work", {"bits": 4, "group_size": 32})
    formats = report["export_check"]["formats"]
    assert formats["hf_dir"]["packed_layers"] == 14 and not formats["hf_dir"]["float_layers"]
    assert formats["gguf"]["types"]["Q4_1"] == 14
    assert report["export_check"]["artifacts"]["hf_dir"]["passed"]
    assert report["fidelity"]["accuracy_level"]["compared_with"] == 4
