"""Serving-engine artifacts written beside the ONNX/safetensors/manifest trio (part of the `export` stage).

- `hf_dir` (Hugging Face uploads): a compressed-tensors `pack-quantized` checkpoint of the quantized
  Linear layers (compression.io.compressed_tensors_export); a plain float directory when nothing is
  quantized or nothing is expressible.
- `hf_float_dir` (on request, `config.hf_float_dir`): the dequantized float directory.
- `gguf` (causal LMs of a mapped architecture): llama.cpp's file (compression.io.gguf_export).
- `ort_genai` (causal LMs the onnxruntime-genai model builder maps, every decoder projection quantized with
  integer zero points at 2/4/8 bits): a zipped GenAI folder with a KV-cache decoder
  (compression.io.ort_genai_export).

Returns the artifact paths and the report section `formats`: per artifact, what each layer became and
why; for a format not written, why not. The manifest lists every artifact written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compression.configs import MethodConfigBase
from compression.io import LoadedModel
from compression.io.compressed_tensors_export import write_compressed_tensors
from compression.io.errors import ExportError
from compression.io.export import sha256_file
from compression.io.gguf_export import write_gguf
from compression.io.hf import export_hf_dir
from compression.io.ort_genai_export import write_ort_genai
from compression.types import CompressionResult


def _hf_artifacts(
    result: CompressionResult, loaded: LoadedModel, out_dir: Path, config: MethodConfigBase
) -> tuple[dict[str, Path], dict[str, Any]]:
    paths: dict[str, Path] = {}
    if result.quantized:
        paths["hf_dir"] = out_dir / "hf_model"
        section = write_compressed_tensors(result, loaded.tokenizer, paths["hf_dir"])
    else:
        paths["hf_dir"] = export_hf_dir(result.model, loaded, out_dir / "hf_model")
        section = {"format": "float (no quantized layers)"}
    if config.hf_float_dir:
        paths["hf_float_dir"] = export_hf_dir(result.model, loaded, out_dir / "hf_model_float")
    return paths, section


LmWriter = Callable[[CompressionResult, Any, Path], dict[str, Any]]
"""write(result, tokenizer, path) -> the format's report section; raises ExportError when it cannot."""


def _causal_lm_artifact(
    write: LmWriter, result: CompressionResult, loaded: LoadedModel, path: Path
) -> tuple[Path | None, dict]:
    """A serving format for causal LMs (GGUF, ort_genai): its path and section, or why it was not written."""
    if loaded.task != "causal_lm":
        return None, {"written": False, "why": f"written for causal LMs; this model is a {loaded.task}"}
    try:
        section = write(result, loaded.tokenizer, path)
    except ExportError as error:
        path.unlink(missing_ok=True)
        return None, {"written": False, "why": error.message}
    return path, {"written": True, **section}


def _list_in_manifest(manifest: Path, paths: dict[str, Path]) -> None:
    document = json.loads(manifest.read_text())
    for kind, path in paths.items():
        entry: dict[str, Any] = {"file": path.name}
        if path.is_file():
            entry["sha256"] = sha256_file(path)
        else:
            entry["directory"] = True
        document["artifacts"][kind] = entry
    manifest.write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def serving_artifacts(
    result: CompressionResult, loaded: LoadedModel, out_dir: Path, config: MethodConfigBase, manifest: Path
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write `hf_dir` (+ `hf_float_dir`) for Hugging Face uploads, `gguf` and `ort_genai` for causal LMs."""
    paths: dict[str, Path] = {}
    formats: dict[str, Any] = {}
    if loaded.format == "hf_dir":
        hf_paths, formats["hf_dir"] = _hf_artifacts(result, loaded, out_dir, config)
        paths.update(hf_paths)
    else:
        formats["hf_dir"] = {"written": False, "why": f"written for Hugging Face uploads; this is {loaded.format}"}
    gguf_path, formats["gguf"] = _causal_lm_artifact(write_gguf, result, loaded, out_dir / "model.gguf")
    if gguf_path is not None:
        paths["gguf"] = gguf_path
    genai_path, formats["ort_genai"] = _causal_lm_artifact(write_ort_genai, result, loaded, out_dir / "model_genai.zip")
    if genai_path is not None:
        paths["ort_genai"] = genai_path
    _list_in_manifest(manifest, paths)
    return paths, formats
