"""Torch-free inspection of uploads: detect the format from content, refuse what is unsafe.

The API runs this on every upload before it records anything. It never unpickles, never executes
model code, and never extracts an archive: it only reads headers and member lists.
"""

from __future__ import annotations

import json
import logging
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar, cast

import numpy as np

from compression.archives import (
    ArchiveLimits,
    ArchiveRefused,
    UnpackBudget,
    check_zip_declared,
    npz_headers,
    read_counted,
    tar_members,
)
from compression.formats import (
    SAFE_FORMATS,
    FormatRefused,
    archive_kind,
    file_kind,
    is_pickle,
    pickle_refused,
    read_head,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_JSON_MEMBER_BYTES = 64 * 1024**2  # config.json, a .pt2's model.json: read whole, so bounded
MAX_ONNX_BYTES = 2 * 1024**3  # protobuf's own limit for one serialized ModelProto
MAX_SAFETENSORS_HEADER_BYTES = 32 * 1024**2
_PT2_DTYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    12: "bool",
    13: "bfloat16",
}
_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}


class InspectError(Exception):
    def __init__(self, code: str, message: str, status: int = 422, details: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status, self.details = code, message, status, details


@dataclass
class Inspection:
    format: str
    param_count: int | None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def inspect_model_file(path: Path, limits: ArchiveLimits | None = None) -> Inspection:
    """Format, parameter count and inputs of an upload; InspectError (4xx) for anything refused."""
    return _guarded(_inspect_model, path, limits or ArchiveLimits(), "invalid_model")


def _guarded(inspect: Callable[[Path, ArchiveLimits], T], path: Path, limits: ArchiveLimits, code: str) -> T:
    """Malformed input is the uploader's fault: whatever a parser raises becomes a 4xx with `code`."""
    try:
        return inspect(path, limits)
    except InspectError:
        raise
    except ArchiveRefused as exc:
        raise InspectError(exc.code, exc.message, status=exc.status) from exc
    except FormatRefused as exc:
        raise InspectError(exc.code, exc.message) from exc
    except Exception as exc:
        logger.info("upload refused: inspection failed", exc_info=True)
        raise InspectError(code, f"the upload could not be read ({type(exc).__name__}: {exc})") from exc


def _inspect_model(path: Path, limits: ArchiveLimits) -> Inspection:
    kind = file_kind(path)
    if kind == "pickle":
        raise pickle_refused("the file is a Python pickle")
    if kind == "zip":
        return _inspect_zip(path, limits)
    if kind == "tar":
        return _inspect_tar(path, limits)
    if kind != "onnx":
        raise InspectError("invalid_model", f"not a model file. Upload one of: {SAFE_FORMATS}.")
    return _inspect_onnx_bytes(path.read_bytes(), external={})


def check_member_name(name: str) -> None:
    """Refuse absolute paths and `..` components: nothing may land outside the archive's folder."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts or (posix.parts and posix.parts[0].endswith(":")):
        raise InspectError("unsafe_archive", f"archive member {name!r} escapes the archive")


def _zip_members(archive: zipfile.ZipFile) -> list[str]:
    names = []
    for info in archive.infolist():
        check_member_name(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InspectError("unsafe_archive", f"archive member {info.filename!r} is a symbolic link")
        if not info.is_dir():
            names.append(info.filename)
    return names


@dataclass
class _Members:
    """An open archive's regular files: names, declared sizes, and reads counted against the limits."""

    sizes: dict[str, int]
    opener: Callable[[str], IO[bytes]]
    budget: UnpackBudget
    container: str

    @property
    def names(self) -> list[str]:
        return list(self.sizes)

    def read(self, name: str, cap: int = MAX_JSON_MEMBER_BYTES) -> bytes:
        with self.opener(name) as handle:
            return read_counted(handle, self.budget, cap, name)

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as exc:
            raise InspectError("invalid_model", f"archive member {name!r} is not valid JSON: {exc}") from exc


def _inspect_zip(path: Path, limits: ArchiveLimits) -> Inspection:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_declared(archive, size, limits)
            names = _zip_members(archive)
            sizes = {name: archive.getinfo(name).file_size for name in names}
            return _inspect_archive(_Members(sizes, archive.open, UnpackBudget(limits, size), "zip"))
    except zipfile.BadZipFile as exc:
        raise InspectError("invalid_model", f"not a readable zip archive: {exc}") from exc


def _inspect_tar(path: Path, limits: ArchiveLimits) -> Inspection:
    size = path.stat().st_size
    try:
        with tarfile.open(path) as archive:
            members = list(tar_members(archive, UnpackBudget(limits, size)))
            for member in members:
                _check_tar_member(member)
            sizes = {m.name: m.size for m in members if m.isfile()}
            opener = cast(Callable[[str], IO[bytes]], archive.extractfile)
            return _inspect_archive(_Members(sizes, opener, UnpackBudget(limits, size), "tar"))
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise InspectError("invalid_model", f"not a readable tar archive: {exc}") from exc


def _check_tar_member(member: tarfile.TarInfo) -> None:
    check_member_name(member.name)
    if member.issym() or member.islnk():
        raise InspectError("unsafe_archive", f"archive member {member.name!r} is a link")
    if not (member.isfile() or member.isdir()):
        raise InspectError("unsafe_archive", f"archive member {member.name!r} is not a regular file")


def _inspect_archive(members: _Members) -> Inspection:
    names = members.names
    kind = archive_kind(names)
    if kind == "torch_export":
        return _inspect_pt2(members)
    if kind == "hf_archive":
        return _inspect_hf(members)
    onnx_file = next(n for n in names if n.endswith(".onnx"))
    external = {PurePosixPath(n).name: n for n in names if n != onnx_file}
    inspection = _inspect_onnx_bytes(members.read(onnx_file, cap=MAX_ONNX_BYTES), external=external)
    inspection.info["container"] = members.container
    return inspection


def _inspect_onnx_bytes(data: bytes, *, external: dict[str, str]) -> Inspection:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InspectError(
            "invalid_model", f"not an ONNX model or truncated: {exc}. Upload one of: {SAFE_FORMATS}."
        ) from exc
    if model.ir_version <= 0 or not model.graph.node:
        raise InspectError("invalid_model", f"not an ONNX model (no graph). Upload one of: {SAFE_FORMATS}.")
    missing = _missing_external_data(model, external)
    if missing:
        raise InspectError("invalid_model", f"ONNX external data files missing: {sorted(missing)}")
    initializers = {init.name for init in model.graph.initializer}
    params = sum(int(np.prod(init.dims)) if init.dims else 1 for init in model.graph.initializer)
    inputs = [_onnx_input(value) for value in model.graph.input if value.name not in initializers]
    ops = sorted({node.op_type for node in model.graph.node})
    opsets = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    info = {"producer": model.producer_name, "opsets": opsets, "ops": ops, "nodes": len(model.graph.node)}
    return Inspection("onnx", params, inputs, info)


def _missing_external_data(model: Any, external: dict[str, str]) -> set[str]:
    needed = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                needed.add(PurePosixPath(entry.value).name)
    return needed - set(external)


def _onnx_input(value: Any) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim]
    return {
        "name": value.name,
        "shape": shape,
        "dtype": _ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type)),
    }


def _inspect_pt2(members: _Members) -> Inspection:
    names = members.names
    weights_cfg = [n for n in names if "/data/" in f"/{n}" and n.endswith("_config.json")]
    model_json = next(n for n in names if n.endswith("models/model.json"))
    params = 0
    for cfg_name in weights_cfg:
        for entry in members.read_json(cfg_name).get("config", {}).values():
            if entry.get("use_pickle"):
                raise pickle_refused("the .pt2 archive stores pickled tensors")
            if "weights" in cfg_name:
                params += _pt2_numel(entry.get("tensor_meta", {}))
    graph = members.read_json(model_json)["graph_module"]
    inputs = _pt2_inputs(graph)
    return Inspection("torch_export", params, inputs, {"torch_version": None})


def _pt2_numel(meta: dict[str, Any]) -> int:
    numel = 1
    for size in meta.get("sizes", []):
        numel *= int(size.get("as_int", 1))
    return numel


def _pt2_inputs(graph: dict[str, Any]) -> list[dict[str, Any]]:
    values = graph.get("graph", {}).get("tensor_values", {})
    inputs = []
    for spec in graph.get("signature", {}).get("input_specs", []):
        tensor = spec.get("user_input", {}).get("arg", {}).get("as_tensor")
        if tensor is None:
            continue
        meta = values.get(tensor["name"], {})
        shape = [s.get("as_int") for s in meta.get("sizes", [])]
        inputs.append({"name": tensor["name"], "shape": shape, "dtype": _PT2_DTYPES.get(meta.get("dtype"), "unknown")})
    return inputs


def _inspect_hf(members: _Members) -> Inspection:
    names = members.names
    config_name = min((n for n in names if PurePosixPath(n).name == "config.json"), key=len)
    root = str(PurePosixPath(config_name).parent)
    config = members.read_json(config_name)
    if not isinstance(config, dict):
        raise InspectError("invalid_model", f"{config_name} must hold a JSON object")
    weights = [n for n in names if n.endswith(".safetensors") and str(PurePosixPath(n).parent) == root]
    if not weights:
        if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
            raise pickle_refused("the Hugging Face directory has only pickled weights (.bin/.pt)")
        raise InspectError("invalid_model", "the Hugging Face directory has no *.safetensors weights")
    params = sum(_safetensors_numel(members, n) for n in weights)
    tokenizer = any(PurePosixPath(n).name in {"tokenizer.json", "tokenizer.model", "vocab.txt"} for n in names)
    info = {
        "container": members.container,
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "has_tokenizer": tokenizer,
        "trust_remote_code": False,
    }
    inputs = [
        {"name": "input_ids", "shape": [None, None], "dtype": "int64"},
        {"name": "attention_mask", "shape": [None, None], "dtype": "int64"},
    ]
    return Inspection("hf_dir", params, inputs, info)


def _safetensors_numel(members: _Members, name: str) -> int:
    """Elements in a safetensors file, from its header alone: 8-byte little-endian length, then JSON."""
    with members.opener(name) as handle:
        header = _safetensors_header(handle, members.sizes[name], name)
    try:
        return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
    except (TypeError, KeyError, ValueError) as exc:
        raise InspectError("invalid_model", f"{name}: a safetensors tensor entry has no valid shape") from exc


def _safetensors_header(handle: IO[bytes], size: int, name: str) -> dict[str, Any]:
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise InspectError("invalid_model", f"{name}: the safetensors file is truncated")
    length = int.from_bytes(prefix, "little")
    if length > MAX_SAFETENSORS_HEADER_BYTES:
        raise InspectError(
            "invalid_model", f"{name}: a safetensors header of {length} bytes (limit {MAX_SAFETENSORS_HEADER_BYTES})"
        )
    if 8 + length > size:
        raise InspectError("invalid_model", f"{name}: the safetensors header length runs past the end of the file")
    try:
        header = json.loads(handle.read(length))
    except ValueError as exc:
        raise InspectError("invalid_model", f"{name}: the safetensors header is not JSON") from exc
    if not isinstance(header, dict):
        raise InspectError("invalid_model", f"{name}: the safetensors header is not a JSON object")
    return header


# ---- datasets -------------------------------------------------------------------------------


def inspect_dataset_file(path: Path, limits: ArchiveLimits | None = None) -> tuple[str, dict[str, Any]]:
    """Returns (kind, info) for `.npz` arrays or text (`.txt` lines / `.jsonl` with a `text` field)."""
    return _guarded(_inspect_dataset, path, limits or ArchiveLimits(), "invalid_dataset")


def _inspect_dataset(path: Path, limits: ArchiveLimits) -> tuple[str, dict[str, Any]]:
    head = read_head(path)
    if is_pickle(head):
        raise pickle_refused("the dataset is a Python pickle")
    if head.startswith(b"PK\x03\x04"):
        return "npz", _inspect_npz(path, limits)
    return "text", _inspect_text(path)


def _inspect_npz(path: Path, limits: ArchiveLimits) -> dict[str, Any]:
    """From the `.npy` headers only: no array is decompressed at upload."""
    try:
        arrays = npz_headers(path, path.stat().st_size, limits)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InspectError("invalid_dataset", f"not a readable .npz of plain arrays: {exc}") from exc
    if not arrays:
        raise InspectError("invalid_dataset", "the .npz holds no arrays")
    samples = {name: arr.shape[0] if arr.shape else 1 for name, arr in arrays.items()}
    if len(set(samples.values())) != 1:
        raise InspectError("invalid_dataset", f"arrays disagree on the number of samples: {samples}")
    described = {name: {"shape": list(arr.shape), "dtype": str(arr.dtype)} for name, arr in arrays.items()}
    return {"arrays": described, "samples": next(iter(samples.values())), "has_labels": "labels" in arrays}


def _inspect_text(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InspectError("invalid_dataset", "not .npz and not UTF-8 text") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise InspectError("invalid_dataset", "the text file is empty")
    if lines[0].lstrip().startswith("{"):
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise InspectError("invalid_dataset", f"jsonl line {number} is not JSON") from exc
            if not isinstance(record, dict) or not _text_record(record):
                raise InspectError(
                    "invalid_dataset", f"jsonl line {number} needs a string 'text' (or 'text_a', 'text_b', 'score')"
                )
        pairs = all("text_a" in json.loads(line) for line in lines)
        return {"format": "jsonl_pairs" if pairs else "jsonl", "samples": len(lines), "characters": len(text)}
    return {"format": "txt", "samples": len(lines), "characters": len(text)}


def _text_record(record: dict[str, Any]) -> bool:
    if isinstance(record.get("text"), str):
        return True
    return (
        isinstance(record.get("text_a"), str)
        and isinstance(record.get("text_b"), str)
        and isinstance(record.get("score"), int | float)
    )


def check_dataset_matches_model(
    model_inputs: list[dict[str, Any]],
    model_format: str,
    model_info: dict[str, Any],
    kind: str,
    info: dict[str, Any],
) -> list[str]:
    """Problems that make this dataset unusable with this model; empty when it fits."""
    if kind == "text":
        if model_format == "hf_dir" and model_info.get("has_tokenizer"):
            return []
        return ["text data needs a model with a tokenizer (a Hugging Face directory); upload .npz arrays instead"]
    arrays = {k: v for k, v in info["arrays"].items() if k != "labels"}
    problems = []
    expected = {spec["name"]: spec for spec in model_inputs}
    for name in sorted(set(expected) - set(arrays)):
        problems.append(f"input {name!r} missing (arrays present: {sorted(arrays)})")
    for name in sorted(set(arrays) - set(expected)):
        problems.append(f"array {name!r} is not a model input (inputs: {sorted(expected)})")
    for name in sorted(set(expected) & set(arrays)):
        problems.extend(_array_problems(name, expected[name], arrays[name]))
    return problems


def _array_problems(name: str, spec: dict[str, Any], array: dict[str, Any]) -> list[str]:
    problems = []
    if spec["dtype"] != "unknown" and array["dtype"] != spec["dtype"]:
        problems.append(f"input {name!r} has dtype {array['dtype']}, the model wants {spec['dtype']}")
    want, got = spec["shape"], array["shape"]
    if len(want) != len(got):
        problems.append(f"input {name!r} has shape {got}, the model wants rank {len(want)} {want}")
        return problems
    for axis, (w, g) in enumerate(zip(want, got, strict=True)):
        if axis > 0 and w not in (None, 0) and w != g:
            problems.append(f"input {name!r} has shape {got}, the model wants {want} (axis {axis})")
            break
    return problems
