"""Archive safety shared by the API's upload inspection and the worker's extraction (torch-free).

Zip, tar and `.npz` uploads can be small on the wire and expand without bound (decompression bombs).
Wherever an archive is opened the same two rules apply: the total unpacked size stays under
`max_unpacked_bytes`, and nothing larger than `ratio_floor_bytes` expands more than `max_ratio` times.
Declared sizes are checked from the headers first; the bytes actually produced are counted while
streaming as well, because a header can lie.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ArchiveLimits:
    max_unpacked_bytes: int = 8 * 1024**3
    max_ratio: float = 100.0
    ratio_floor_bytes: int = 1024**2  # smaller members (configs, vocabularies) may compress as well as they like


class ArchiveRefused(Exception):
    """An archive that would expand past the limits. Codes: archive_too_large, decompression_bomb."""

    status = 413

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def check_expansion(unpacked: int, packed: int, limits: ArchiveLimits, what: str) -> None:
    if unpacked > limits.max_unpacked_bytes:
        raise ArchiveRefused(
            "archive_too_large", f"{what} unpacks to more than the limit of {limits.max_unpacked_bytes} bytes"
        )
    if unpacked > limits.ratio_floor_bytes and unpacked > limits.max_ratio * max(packed, 1):
        raise ArchiveRefused(
            "decompression_bomb",
            f"{what} expands {unpacked} bytes from {packed}: more than {limits.max_ratio:g} times; "
            "store very repetitive data uncompressed (zip -0, a plain tar, np.savez)",
        )


class UnpackBudget:
    """Counts the bytes actually unpacked from one archive of `archive_bytes` bytes on disk."""

    def __init__(self, limits: ArchiveLimits, archive_bytes: int) -> None:
        self.limits, self.archive_bytes, self.used = limits, archive_bytes, 0

    def take(self, count: int) -> None:
        self.reach(self.used + count)

    def reach(self, position: int) -> None:
        self.used = max(self.used, position)
        check_expansion(self.used, self.archive_bytes, self.limits, "the archive")


def check_zip_declared(archive: zipfile.ZipFile, archive_bytes: int, limits: ArchiveLimits) -> None:
    """Refuse by the central directory alone: per-member ratio, total size, sizes the file cannot hold."""
    infos = archive.infolist()
    if sum(i.compress_size for i in infos) > archive_bytes:
        raise zipfile.BadZipFile("the members' declared compressed sizes exceed the file")
    for info in infos:
        check_expansion(info.file_size, info.compress_size, limits, f"archive member {info.filename!r}")
    check_expansion(sum(i.file_size for i in infos), archive_bytes, limits, "the archive")


def read_zip_member(archive: zipfile.ZipFile, name: str, budget: UnpackBudget, cap: int) -> bytes:
    with archive.open(name) as handle:
        return read_counted(handle, budget, cap, name)


def read_counted(handle: IO[bytes], budget: UnpackBudget, cap: int, name: str) -> bytes:
    """The whole stream, counted against `budget`; a member past `cap` bytes is refused (413)."""
    chunks, size = [], 0
    while chunk := handle.read(min(CHUNK, cap + 1 - size)):
        size += len(chunk)
        budget.take(len(chunk))
        if size > cap:
            raise ArchiveRefused("archive_too_large", f"archive member {name!r} is larger than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def copy_counted(source: IO[bytes], target: IO[bytes], budget: UnpackBudget) -> None:
    while chunk := source.read(CHUNK):
        budget.take(len(chunk))
        target.write(chunk)


def tar_members(archive: tarfile.TarFile, budget: UnpackBudget) -> Iterator[tarfile.TarInfo]:
    """Members one header at a time, each refused before its data is decompressed when the stream
    position it reaches (the bytes unpacked so far) passes the limits."""
    for member in archive:
        budget.reach(member.offset_data + member.size)
        yield member


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype


def npz_headers(path: str, archive_bytes: int, limits: ArchiveLimits) -> dict[str, NpyHeader]:
    """Shape and dtype of each array in an `.npz`, from the `.npy` headers only (no array is read).

    Raises ArchiveRefused for a bomb and ValueError for anything that is not a `.npz` of plain arrays.
    """
    with zipfile.ZipFile(path) as archive:
        check_zip_declared(archive, archive_bytes, limits)
        headers = {}
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is not a .npy array")
            with archive.open(info) as handle:
                headers[info.filename[: -len(".npy")]] = _npy_header(handle, info)
        return headers


def _npy_header(handle: IO[bytes], info: zipfile.ZipInfo) -> NpyHeader:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    del fortran
    if dtype.hasobject:
        raise ValueError(f"array {info.filename!r} holds Python objects (pickled); plain arrays only")
    data_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if handle.tell() + data_bytes != info.file_size:
        raise ValueError(f"array {info.filename!r} declares {data_bytes} bytes of data; the member disagrees")
    return NpyHeader(tuple(int(s) for s in shape), dtype)
