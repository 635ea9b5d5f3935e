"""Load a user's model (ONNX, torch.export `.pt2`, Hugging Face directory or archive) as an nn.Module.

ONNX and `.pt2` both end up as an `OnnxModule` (a `.pt2` is first exported to ONNX with the torch
dynamo exporter), so every non-HF model is compressed, evaluated and exported through one path.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from compression.archives import ArchiveLimits
from compression.formats import ModelKind
from compression.io.detect import detect_format, find_file_dir, safe_extract
from compression.io.errors import ModelLoadError
from compression.io.hf import load_hf_dir
from compression.io.loaded import Format, InputSpec, LoadedModel, Task, describe_module
from compression.io.onnx_checks import default_opset
from compression.io.onnx_graph import fold_initializer_identities
from compression.io.onnx_torch import OnnxModule
from compression.io.pt2_safety import sanitize_pt2

ONNX_DTYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}


def _onnx_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    init_names = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in init_names:
            continue
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, shape, ONNX_DTYPE_NAMES.get(tensor_type.elem_type, "unknown")))
    return specs


def _guess_task(model: onnx.ModelProto) -> Task:
    output = model.graph.output[0].type.tensor_type.shape
    return "classifier" if len(output.dim) == 2 else "generic"


def _read_onnx(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=True)
        onnx.checker.check_model(model)
    except Exception as error:  # protobuf, checker and missing external data errors alike
        raise ModelLoadError("invalid_model", f"invalid ONNX model: {error}") from error
    if len(model.graph.node) == 0:
        raise ModelLoadError("invalid_model", "the ONNX graph has no nodes")
    return model


def load_onnx(path: Path, work_dir: Path, *, model_format: Format = "onnx") -> LoadedModel:
    """Load an ONNX file. When the graph needs normalizing (local functions inlined, tied constants
    untied), the normalized graph is saved under work_dir and becomes `source_onnx`."""
    model = _read_onnx(path)
    changed = bool(model.functions)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    changed |= fold_initializer_identities(model)
    if changed:
        path = work_dir / "normalized.onnx"
        onnx.save_model(model, str(path), save_as_external_data=model.ByteSize() > 1_800_000_000)
    module = OnnxModule(model).eval()
    info = describe_module(module, f"onnx graph ({len(model.graph.node)} nodes)", opset=default_opset(model))
    info["layer_initializers"] = {name: layer.initializers for name, layer in module.layer_initializers.items()}
    return LoadedModel(model_format, module, _onnx_input_specs(model), _guess_task(model), None, path, info)


def _export_program_to_onnx(path: Path, work_dir: Path) -> Path:
    sanitized = sanitize_pt2(path, work_dir / "sanitized.pt2")
    try:
        program = torch.export.load(str(sanitized))
    except Exception as error:
        raise ModelLoadError("invalid_model", f"unreadable torch.export archive: {error}") from error
    target = work_dir / "from_pt2.onnx"
    try:
        exported = torch.onnx.export(program, (), dynamo=True, optimize=True, verbose=False)
        exported.save(str(target), external_data=False)  # one self-contained file: its size is the model's
    except Exception as error:
        raise ModelLoadError("unsupported_operator", f"the .pt2 program does not export to ONNX: {error}") from error
    return target


def load_model(path: Path, *, work_dir: Path | None = None, limits: ArchiveLimits | None = None) -> LoadedModel:
    """Load `path`, detecting the format from its content. Archives are unpacked under `work_dir`,
    within `limits` (default: `ArchiveLimits()`).

    Raises ModelLoadError with code invalid_model, pickle_refused, unsupported_operator,
    archive_too_large or decompression_bomb.
    """
    path = Path(path)
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="modelpress-load-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    return LOADERS[detect_format(path, limits)](path, work_dir, limits)


def _load_onnx_file(path: Path, work_dir: Path, limits: ArchiveLimits | None) -> LoadedModel:
    return load_onnx(path, work_dir)


def _load_onnx_zip(path: Path, work_dir: Path, limits: ArchiveLimits | None) -> LoadedModel:
    root = safe_extract(path, work_dir / "onnx", limits)
    onnx_files = sorted(root.rglob("*.onnx"), key=lambda p: len(p.parts))
    return load_onnx(onnx_files[0], work_dir)


def _load_pt2(path: Path, work_dir: Path, limits: ArchiveLimits | None) -> LoadedModel:
    loaded = load_onnx(_export_program_to_onnx(path, work_dir), work_dir, model_format="torch_export")
    loaded.info["converted_via"] = "torch.export.load -> torch.onnx.export(dynamo, optimize: BatchNorm folded)"
    return loaded


def _load_hf(path: Path, work_dir: Path, limits: ArchiveLimits | None) -> LoadedModel:
    root = path if path.is_dir() else safe_extract(path, work_dir / "hf", limits)
    model_dir = find_file_dir(root, "config.json")
    if model_dir is None:
        raise ModelLoadError("invalid_model", "no config.json found in the Hugging Face archive")
    return load_hf_dir(model_dir)


Loader = Callable[[Path, Path, ArchiveLimits | None], LoadedModel]
LOADERS: dict[ModelKind, Loader] = {
    "onnx": _load_onnx_file,
    "onnx_zip": _load_onnx_zip,
    "torch_export": _load_pt2,
    "hf_dir": _load_hf,
    "hf_archive": _load_hf,
}
