"""Content-addressed store: local directory and S3 (moto), atomic commits, size limits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.storage.store import LocalStore, S3Store, Store, TooLarge


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
        return
    import boto3
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="artifacts")
        yield S3Store("artifacts", "/modelpress", tmp_path / "spool", client)


def _spooled(store: Store, data: bytes, limit: int = 10**9) -> str:
    spool = store.spool(limit=limit)
    for start in range(0, len(data), 7):
        spool.write(data[start : start + 7])
    return store.commit(spool)


def test_commit_is_content_addressed_and_round_trips(store: Store, tmp_path: Path) -> None:
    data = b"modelpress" * 1000
    address = _spooled(store, data)
    assert address == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.exists(address)
    assert b"".join(store.iter_bytes(address)) == data
    assert store.fetch(address, tmp_path / "copy").read_bytes() == data
    assert _spooled(store, data) == address, "the same content has the same address"
    assert store.healthy()


def test_put_file_and_unknown_address(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "artifact.bin"
    path.write_bytes(b"\x00\x01" * 5000)
    address, size = store.put_file(path)
    assert size == 10000 and store.exists(address)
    assert not store.exists("sha256:" + "0" * 64)
    with pytest.raises(ValueError):
        store.exists("md5:abc")


def test_size_limit_discards_the_spool(store: Store) -> None:
    spool = store.spool(limit=10)
    spool.write(b"12345")
    with pytest.raises(TooLarge):
        spool.write(b"678901")
    assert not spool.path.exists()


def test_local_commit_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    address = _spooled(store, b"x" * 100)
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert store.path_of(address).read_bytes() == b"x" * 100
