"""The report's `latency.generation` for causal LMs with an `ort_genai` artifact: prefill and decode tokens/s
at batch 1, the original (the same model builder's fp32 folder of the uploaded model) against the shipped
`ort_genai` folder, with the KV cache (compression.evaluate.generation).

The cost is bounded: one fp32 builder run, then rounds within the job's benchmark budget per model
(`benchmark_budget_s`, at most `benchmark_repeats` rounds); the prompt is 512 tokens, or what the model's
context leaves after `NEW_TOKENS` decode steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compression.errors import CompressionError
from compression.evaluate.generation import paired_generation
from compression.io import LoadedModel
from compression.io.ort_genai_export import run_builder, unzip_genai
from compression.pipeline.context import JobSpec, Stages

PROMPT_TOKENS = 512
NEW_TOKENS = 32
MAX_ROUNDS = 50


def _context(folder: Path) -> tuple[int, int]:
    """(context length, vocabulary size) from genai_config.json."""
    model = json.loads((folder / "genai_config.json").read_text())["model"]
    return int(model["context_length"]), int(model["vocab_size"])


def _original_folder(loaded: LoadedModel, work: Path) -> Path:
    """The uploaded model through the same builder at fp32 (float MatMul, same attention and cache ops)."""
    folder = work / "original"
    if not (folder / "genai_config.json").exists():
        run_builder(Path(loaded.info["model_dir"]), folder, "fp32", {})
    return folder


def generation_latency(loaded: LoadedModel, artifacts: dict[str, Path], spec: JobSpec, stages: Stages) -> dict:
    """{measured: True, prefill, decode, ...} or {measured: False, why}."""
    if "ort_genai" not in artifacts:
        return {"measured": False, "why": "no ort_genai artifact (the export check's formats say why)"}
    if not loaded.info.get("model_dir"):
        return {"measured": False, "why": "the original model has no Hugging Face directory to build from"}
    stages.report(0.9, "timing prefill and decode with onnxruntime-genai (KV cache)")
    work = spec.work_dir / "generation"
    try:
        compressed = unzip_genai(artifacts["ort_genai"], work / "compressed")
        original = _original_folder(loaded, work)
        context, vocab = _context(compressed)
        new_tokens = min(NEW_TOKENS, max(1, context // 4))
        section: dict[str, Any] = paired_generation(
            original,
            compressed,
            prompt_tokens=min(PROMPT_TOKENS, context - new_tokens - 1),
            new_tokens=new_tokens,
            vocab_size=vocab,
            threads=spec.benchmark_threads,
            budget_s=spec.benchmark_budget_s,
            max_rounds=min(MAX_ROUNDS, spec.benchmark_repeats),
        )
    except CompressionError as error:
        return {"measured": False, "why": error.message}
    except Exception as error:  # a timing that cannot run says why; the job's other results stand
        return {"measured": False, "why": f"{type(error).__name__}: {error}"}
    return {"measured": True, "original_built_with": "onnxruntime-genai model builder, -p fp32", **section}
