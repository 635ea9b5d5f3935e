"""One model-format detector, shared by the API's upload inspection and the worker's loader.

Torch-free and onnx-free (the API image imports it). It judges content, never names: a pickle by its
protocol header, a zip by its local-file magic, a tar by its `ustar` magic (or a compressed stream that
opens as a tar), an ONNX ModelProto by its first field. Archives are classified from their member names;
a member that is a pickle refuses the whole archive before anything else is considered.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath
from typing import Literal

ModelKind = Literal["onnx", "onnx_zip", "torch_export", "hf_dir", "hf_archive"]
FileKind = Literal["pickle", "zip", "tar", "onnx", "unknown"]

SAFE_FORMATS = (
    "ONNX (.onnx, or a zip with external data), torch.export (.pt2), "
    "a Hugging Face directory (zip/tar with config.json and *.safetensors)"
)
PICKLE_MEMBER_SUFFIXES = (".pkl", ".pickle")
ONNX_MAGIC = b"\x08"  # a serialized ModelProto starts with field 1 (ir_version, varint)
ZIP_MAGIC = b"PK\x03\x04"
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


class FormatRefused(Exception):
    """`code` is `pickle_refused`, `invalid_model` or `unknown_format`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def pickle_refused(why: str) -> FormatRefused:
    return FormatRefused("pickle_refused", f"{why}; modelpress never unpickles uploads. Upload one of: {SAFE_FORMATS}.")


def read_head(path: Path, size: int = 512) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def is_pickle(head: bytes) -> bool:
    """A pickle stream of protocol 2-5 (`\\x80` PROTO opcode then the protocol number)."""
    return len(head) > 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def is_tar(path: Path, head: bytes) -> bool:
    """A POSIX/GNU tar by its magic, or a gzip/bzip2/xz stream that opens as a tar.

    `tarfile.is_tarfile` alone would scan a whole large non-tar file (a run of zero blocks reads as an
    empty archive), so plain files are judged by their header only.
    """
    if head[257:262] == b"ustar":
        return True
    if not head.startswith(COMPRESSED_MAGIC):
        return False
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError):
        return False


def file_kind(path: Path) -> FileKind:
    """What container a single uploaded file is, from its first bytes."""
    head = read_head(path)
    if is_pickle(head):
        return "pickle"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if is_tar(path, head):
        return "tar"
    if head.startswith(ONNX_MAGIC):
        return "onnx"
    return "unknown"


def archive_kind(names: list[str]) -> ModelKind:
    """What an archive holds, from its regular files' names; FormatRefused when it is none of ours."""
    if any(n.endswith("archive_format") for n in names) and any(n.endswith("models/model.json") for n in names):
        return "torch_export"
    if any(n.endswith(PICKLE_MEMBER_SUFFIXES) for n in names):
        raise pickle_refused("the archive is a torch.save checkpoint (pickle)")
    if any(PurePosixPath(n).name == "config.json" for n in names):
        return "hf_archive"
    if sum(n.endswith(".onnx") for n in names) == 1:
        return "onnx_zip"
    raise FormatRefused("unknown_format", f"archive holds no model. Upload one of: {SAFE_FORMATS}.")
