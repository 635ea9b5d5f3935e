"""Content-addressed artifact store: objects are named `sha256:<hex>` and written atomically.

Uploads are streamed into a `Spool` (a temp file in the store's own directory, hashed while
written, size-limited); `commit` fsyncs it and renames it into place (local) or uploads it (S3).
Nothing half-written is ever visible under a content address.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import urlparse

from app.core.settings import get_settings

CHUNK = 1024 * 1024
SPOOL_PREFIX = "upload-"


class TooLarge(Exception):
    """The stream passed the size limit; the spool is already discarded."""


@dataclass
class Spool:
    """A hashed, size-limited temp file an upload streams into."""

    path: Path
    limit: int
    size: int = 0
    address: str | None = None
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256)
    _fh: IO[bytes] | None = None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self.discard()
            raise TooLarge(f"upload passed the limit of {self.limit} bytes")
        if self._fh is None:
            self._fh = open(self.path, "wb")  # noqa: SIM115 - closed in close()/discard()
        self._fh.write(chunk)
        self._hash.update(chunk)

    def close(self) -> str:
        """Flush and fsync; returns the content address. Idempotent."""
        if self.address is not None:
            return self.address
        if self._fh is None:
            self._fh = open(self.path, "wb")  # noqa: SIM115
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self.address = f"sha256:{self._hash.hexdigest()}"
        return self.address

    def discard(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)


class Store(Protocol):
    def spool(self, *, limit: int) -> Spool: ...
    def commit(self, spool: Spool) -> str: ...
    def put_file(self, path: Path) -> tuple[str, int]: ...
    def exists(self, address: str) -> bool: ...
    def fetch(self, address: str, dest: Path) -> Path: ...
    def iter_bytes(self, address: str) -> Iterator[bytes]: ...
    def healthy(self) -> bool: ...
    def sweep_spool(self, *, older_than_s: float) -> int: ...


def remove_stale_spools(directory: Path, older_than_s: float) -> int:
    """Remove spool files untouched for `older_than_s` (left by a crashed upload); returns how many.

    An upload in progress writes to its spool continuously, so its modification time stays fresh.
    """
    cutoff, removed = time.time() - older_than_s, 0
    for path in directory.glob(f"{SPOOL_PREFIX}*"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # another process swept or committed it meanwhile
    return removed


def _hex(address: str) -> str:
    algo, _, hexdigest = address.partition(":")
    if algo != "sha256" or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise ValueError(f"not a content address: {address!r}")
    return hexdigest


def hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return f"sha256:{digest.hexdigest()}", size


class LocalStore:
    """Objects under `root/sha256/ab/<hex>`; temp files under `root/tmp` on the same filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def path_of(self, address: str) -> Path:
        hexdigest = _hex(address)
        return self.root / "sha256" / hexdigest[:2] / hexdigest

    def spool(self, *, limit: int) -> Spool:
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", prefix=SPOOL_PREFIX)
        os.close(fd)
        return Spool(path=Path(name), limit=limit)

    def commit(self, spool: Spool) -> str:
        address = spool.close()
        target = self.path_of(address)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(spool.path, target)
        _fsync_dir(target.parent)
        return address

    def put_file(self, path: Path) -> tuple[str, int]:
        spool = self.spool(limit=2**62)
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                spool.write(chunk)
        return self.commit(spool), spool.size

    def exists(self, address: str) -> bool:
        return self.path_of(address).is_file()

    def fetch(self, address: str, dest: Path) -> Path:
        shutil.copyfile(self.path_of(address), dest)
        return dest

    def iter_bytes(self, address: str) -> Iterator[bytes]:
        with open(self.path_of(address), "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def healthy(self) -> bool:
        return (self.root / "tmp").is_dir() and os.access(self.root, os.W_OK)

    def sweep_spool(self, *, older_than_s: float) -> int:
        return remove_stale_spools(self.root / "tmp", older_than_s)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Store:
    """Objects at `s3://bucket/prefix/sha256/<hex>`; an upload is spooled locally, then put whole."""

    def __init__(self, bucket: str, prefix: str, spool_dir: Path, client: object) -> None:
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client
        self.spool_dir = spool_dir
        spool_dir.mkdir(parents=True, exist_ok=True)

    def key_of(self, address: str) -> str:
        key = f"sha256/{_hex(address)}"
        return f"{self.prefix}/{key}" if self.prefix else key

    def spool(self, *, limit: int) -> Spool:
        fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix=SPOOL_PREFIX)
        os.close(fd)
        return Spool(path=Path(name), limit=limit)

    def commit(self, spool: Spool) -> str:
        address = spool.close()
        try:
            if not self.exists(address):
                self.client.upload_file(str(spool.path), self.bucket, self.key_of(address))  # type: ignore[attr-defined]
        finally:
            spool.path.unlink(missing_ok=True)
        return address

    def put_file(self, path: Path) -> tuple[str, int]:
        address, size = hash_file(path)
        if not self.exists(address):
            self.client.upload_file(str(path), self.bucket, self.key_of(address))  # type: ignore[attr-defined]
        return address, size

    def exists(self, address: str) -> bool:
        key = self.key_of(address)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)  # type: ignore[attr-defined]
        except Exception:
            return False
        return True

    def fetch(self, address: str, dest: Path) -> Path:
        self.client.download_file(self.bucket, self.key_of(address), str(dest))  # type: ignore[attr-defined]
        return dest

    def iter_bytes(self, address: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self.key_of(address))["Body"]  # type: ignore[attr-defined]
        yield from body.iter_chunks(CHUNK)

    def sweep_spool(self, *, older_than_s: float) -> int:
        return remove_stale_spools(self.spool_dir, older_than_s)

    def healthy(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)  # type: ignore[attr-defined]
        except Exception:
            return False
        return True


def make_store(url: str, *, data_dir: Path) -> Store:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    if parsed.scheme == "s3":
        import boto3

        settings = get_settings()
        client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region)
        return S3Store(parsed.netloc, parsed.path, data_dir / "spool", client)
    raise ValueError(f"unsupported store URL: {url}")


@lru_cache
def get_store() -> Store:
    settings = get_settings()
    return make_store(settings.resolved_store_url, data_dir=settings.data_dir)
