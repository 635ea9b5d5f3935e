"""Detect a model file's format from its content (never from its name) and unpack archives safely."""

from __future__ import annotations

import lzma
import tarfile
import zipfile
import zlib
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from compression.archives import (
    ArchiveLimits,
    ArchiveRefused,
    UnpackBudget,
    check_zip_declared,
    copy_counted,
    tar_members,
)
from compression.formats import SAFE_FORMATS, FormatRefused, ModelKind, archive_kind, file_kind, pickle_refused
from compression.io.errors import ModelLoadError

Detected = ModelKind
PICKLE_MESSAGE = "pickled files (torch.save, .bin, .pkl) are refused: loading them runs code. Upload " + SAFE_FORMATS


def _parse_onnx_bytes(data: bytes) -> onnx.ModelProto | None:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        return None
    return model if model.ir_version > 0 and len(model.graph.node) > 0 else None


def detect_format(path: Path, limits: ArchiveLimits | None = None) -> Detected:
    """What `path` holds; raises ModelLoadError(invalid_model | pickle_refused | archive_too_large |
    decompression_bomb). Archives are judged by their headers within `limits`, never unpacked here."""
    try:
        return _detect(path, limits or ArchiveLimits())
    except (ArchiveRefused, FormatRefused) as error:
        raise ModelLoadError(error.code, error.message) from error


def _detect(path: Path, limits: ArchiveLimits) -> Detected:
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf_dir"
        raise ModelLoadError("invalid_model", "a model directory must hold a Hugging Face config.json")
    if not path.is_file() or path.stat().st_size == 0:
        raise ModelLoadError("invalid_model", "the model file is missing or empty")
    kind = file_kind(path)
    if kind == "pickle":
        raise pickle_refused("the file is a Python pickle")
    if kind == "zip":
        with zipfile.ZipFile(path) as archive:
            check_zip_declared(archive, path.stat().st_size, limits)
            return archive_kind([i.filename for i in archive.infolist() if not i.is_dir()])
    if kind == "tar":
        return _tar_kind(path, limits)
    if kind == "onnx" and _parse_onnx_bytes(path.read_bytes()) is not None:
        return "onnx"
    raise ModelLoadError("invalid_model", f"not a readable model: expected {SAFE_FORMATS} (file truncated?)")


def _tar_kind(path: Path, limits: ArchiveLimits) -> Detected:
    budget = UnpackBudget(limits, path.stat().st_size)
    try:
        with tarfile.open(path) as archive:
            return archive_kind([m.name for m in tar_members(archive, budget) if m.isfile()])
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as error:
        raise ModelLoadError("invalid_model", f"unreadable tar archive: {error}") from error


def safe_extract(path: Path, dest: Path, limits: ArchiveLimits | None = None) -> Path:
    """Unpack a zip or tar (optionally compressed) under `dest`, refusing links, paths that escape it,
    and decompression bombs (ModelLoadError archive_too_large | decompression_bomb)."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    budget = UnpackBudget(limits or ArchiveLimits(), path.stat().st_size)
    try:
        if zipfile.is_zipfile(path):
            _extract_zip(path, root, budget)
        else:
            _extract_tar(path, root, budget)
    except ArchiveRefused as error:
        raise ModelLoadError(error.code, error.message) from error
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError) as error:
        raise ModelLoadError("invalid_model", f"unreadable archive: {error}") from error
    return root


def _extract_zip(path: Path, root: Path, budget: UnpackBudget) -> None:
    with zipfile.ZipFile(path) as archive:
        check_zip_declared(archive, budget.archive_bytes, budget.limits)
        for info in archive.infolist():
            target = (root / info.filename).resolve()
            if not target.is_relative_to(root):
                raise ModelLoadError("invalid_model", f"archive member escapes the archive: {info.filename}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, target.open("wb") as sink:
                copy_counted(source, sink, budget)


def _extract_tar(path: Path, root: Path, budget: UnpackBudget) -> None:
    with tarfile.open(path) as archive:
        for member in tar_members(archive, budget):
            archive.extract(member, root, filter="data")


def find_file_dir(root: Path, filename: str) -> Path | None:
    """The shallowest directory under root holding `filename`."""
    hits = sorted(root.rglob(filename), key=lambda p: len(p.parts))
    return hits[0].parent if hits else None
