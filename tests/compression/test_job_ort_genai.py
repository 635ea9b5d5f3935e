"""run_job on a tiny causal LM with a tokenizer: the job writes the `ort_genai` zip, lists it in the manifest,
run-checks it against the ONNX and reports prefill / decode tokens/s of the original and the compressed
model (onnxruntime-genai, KV cache)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from tests.compression.test_gguf_export import tiny_llama
from tests.compression.test_job_llm_formats import _run
from tests.compression.test_ort_genai_export import with_tokenizer

pytest.importorskip("onnxruntime_genai")
warnings.filterwarnings("ignore")


def test_causal_lm_job_ships_ort_genai_and_reports_generation_speed(tmp_path: Path) -> None:
    with_tokenizer(tiny_llama, tmp_path / "llama")
    # the default zero points (integer) map onto GPTQ's qzeros
    report, artifacts = _run(tmp_path / "llama", tmp_path / "work", {"bits": 4, "group_size": 32})
    assert artifacts["ort_genai"].name == "model_genai.zip"
    section = report["export_check"]["formats"]["ort_genai"]
    assert section["written"] is True and section["matmul_nbits"] == {"int4 block 32": 14}
    manifest = json.loads(artifacts["manifest"].read_text())
    assert manifest["artifacts"]["ort_genai"]["sha256"].startswith("sha256:")
    check = report["export_check"]["artifacts"]["ort_genai"]
    assert check["passed"] is True and check["max_rel_error"] < 1e-4
    generation = report["latency"]["generation"]
    assert generation["measured"] is True, generation
    assert generation["prefill"]["tokens"] == 64 - 16 - 1 and generation["decode"]["tokens"] == 16
    for phase in ("prefill", "decode"):
        for side in ("original", "compressed"):
            rate = generation[phase][side]
            assert rate["tok_s"] > 0 and rate["tok_s_ci95"][0] <= rate["tok_s"] <= rate["tok_s_ci95"][1]
        low, high = generation[phase]["speedup_ci95"]
        assert low <= generation[phase]["speedup"] <= high


def test_float_offsets_say_why_no_ort_genai(tmp_path: Path) -> None:
    with_tokenizer(tiny_llama, tmp_path / "llama")
    config = {"bits": 4, "group_size": 32, "zero_point": "float"}
    report, artifacts = _run(tmp_path / "llama", tmp_path / "work", config)
    assert "ort_genai" not in artifacts
    assert "float zero offset Z" in report["export_check"]["formats"]["ort_genai"]["why"]
    assert report["latency"]["generation"]["measured"] is False
