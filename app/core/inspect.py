"""Torch-free inspection of uploads: detect the format from content, refuse what is unsafe.

The API runs this on every upload before it records anything. It never unpickles, never executes
model code, and never extracts an archive: it only reads headers and member lists.
"""

from __future__ import annotations

import json
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

SAFE_FORMATS = (
    "ONNX (.onnx, or a zip with external data), torch.export (.pt2), "
    "a Hugging Face directory (zip/tar with config.json and *.safetensors)"
)
ONNX_MAGIC = b"\x08"  # a serialized ModelProto starts with field 1 (ir_version, varint)
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


def inspect_model_file(path: Path) -> Inspection:
    head = _head(path)
    if _is_pickle(head):
        raise _pickle_refused("the file is a Python pickle")
    if head.startswith(b"PK\x03\x04"):
        return _inspect_zip(path)
    if _is_tar(path):
        return _inspect_tar(path)
    if not head.startswith(ONNX_MAGIC):
        raise InspectError("invalid_model", f"not a model file. Upload one of: {SAFE_FORMATS}.")
    return _inspect_onnx_bytes(path.read_bytes(), external={})


def _head(path: Path, size: int = 512) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(size)


def _is_pickle(head: bytes) -> bool:
    return len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _is_tar(path: Path) -> bool:
    """A POSIX/GNU tar by its `ustar` magic, or a compressed stream that opens as a tar.

    `tarfile.is_tarfile` alone would scan a whole large non-tar file (a run of zero blocks reads as an
    empty archive), so plain files are judged by their header.
    """
    head = _head(path, 512)
    if head[257:262] == b"ustar":
        return True
    if not head.startswith(_COMPRESSED_MAGIC):
        return False
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError):
        return False


def _pickle_refused(why: str) -> InspectError:
    return InspectError(
        "pickle_refused",
        f"{why}; modelpress never unpickles uploads. Upload one of: {SAFE_FORMATS}.",
    )


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


def _inspect_zip(path: Path) -> Inspection:
    try:
        with zipfile.ZipFile(path) as archive:
            names = _zip_members(archive)
            return _inspect_archive(names, lambda n: archive.read(n), "zip")
    except zipfile.BadZipFile as exc:
        raise InspectError("invalid_model", f"not a readable zip archive: {exc}") from exc


def _inspect_tar(path: Path) -> Inspection:
    try:
        with tarfile.open(path) as archive:
            members = archive.getmembers()
            for member in members:
                check_member_name(member.name)
                if member.issym() or member.islnk():
                    raise InspectError("unsafe_archive", f"archive member {member.name!r} is a link")
                if not (member.isfile() or member.isdir()):
                    raise InspectError("unsafe_archive", f"archive member {member.name!r} is not a regular file")
            names = [m.name for m in members if m.isfile()]
            return _inspect_archive(names, lambda n: archive.extractfile(n).read(), "tar")  # type: ignore[union-attr]
    except tarfile.TarError as exc:
        raise InspectError("invalid_model", f"not a readable tar archive: {exc}") from exc


def _inspect_archive(names: list[str], read: Any, container: str) -> Inspection:
    base = {PurePosixPath(n).name: n for n in names}
    if any(n.endswith("archive_format") for n in names) and any(n.endswith("models/model.json") for n in names):
        return _inspect_pt2(names, read)
    if any(n.endswith(("data.pkl", ".pkl", ".pickle")) for n in names):
        raise _pickle_refused("the archive is a torch.save checkpoint (pickle)")
    if "config.json" in base:
        return _inspect_hf(names, read, container)
    onnx_files = [n for n in names if n.endswith(".onnx")]
    if len(onnx_files) == 1:
        external = {PurePosixPath(n).name: n for n in names if n != onnx_files[0]}
        inspection = _inspect_onnx_bytes(read(onnx_files[0]), external=external)
        inspection.info["container"] = container
        return inspection
    raise InspectError("unknown_format", f"archive holds no model. Upload one of: {SAFE_FORMATS}.")


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


def _inspect_pt2(names: list[str], read: Any) -> Inspection:
    weights_cfg = [n for n in names if "/data/" in f"/{n}" and n.endswith("_config.json")]
    model_json = next(n for n in names if n.endswith("models/model.json"))
    params = 0
    for cfg_name in weights_cfg:
        for entry in json.loads(read(cfg_name)).get("config", {}).values():
            if entry.get("use_pickle"):
                raise _pickle_refused("the .pt2 archive stores pickled tensors")
            if "weights" in cfg_name:
                params += _pt2_numel(entry.get("tensor_meta", {}))
    graph = json.loads(read(model_json))["graph_module"]
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


def _inspect_hf(names: list[str], read: Any, container: str) -> Inspection:
    config_name = min((n for n in names if PurePosixPath(n).name == "config.json"), key=len)
    root = str(PurePosixPath(config_name).parent)
    config = json.loads(read(config_name))
    weights = [n for n in names if n.endswith(".safetensors") and str(PurePosixPath(n).parent) == root]
    if not weights:
        if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
            raise _pickle_refused("the Hugging Face directory has only pickled weights (.bin/.pt)")
        raise InspectError("invalid_model", "the Hugging Face directory has no *.safetensors weights")
    params = sum(_safetensors_numel(read(n)) for n in weights)
    tokenizer = any(PurePosixPath(n).name in {"tokenizer.json", "tokenizer.model", "vocab.txt"} for n in names)
    info = {
        "container": container,
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


def _safetensors_numel(data: bytes) -> int:
    if len(data) < 8:
        raise InspectError("invalid_model", "a safetensors file is truncated")
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError as exc:
        raise InspectError("invalid_model", "a safetensors header is unreadable") from exc
    return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")


# ---- datasets -------------------------------------------------------------------------------


def inspect_dataset_file(path: Path) -> tuple[str, dict[str, Any]]:
    """Returns (kind, info) for `.npz` arrays or text (`.txt` lines / `.jsonl` with a `text` field)."""
    head = _head(path)
    if _is_pickle(head):
        raise _pickle_refused("the dataset is a Python pickle")
    if head.startswith(b"PK\x03\x04"):
        return "npz", _inspect_npz(path)
    return "text", _inspect_text(path)


def _inspect_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise InspectError("invalid_dataset", f"not a readable .npz of plain arrays: {exc}") from exc
    if not arrays:
        raise InspectError("invalid_dataset", "the .npz holds no arrays")
    not_arrays = sorted(name for name, value in arrays.items() if not isinstance(value, np.ndarray))
    if not_arrays:  # np.load hands back members that are not .npy files as raw bytes
        raise InspectError("invalid_dataset", f"the .npz has members that are not .npy arrays: {not_arrays}")
    samples = {name: int(arr.shape[0]) if arr.ndim else 1 for name, arr in arrays.items()}
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
