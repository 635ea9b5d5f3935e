"""Bounded input: decompression bombs, oversized request bodies and multipart parts, malformed uploads.

Every refusal is a 4xx with a code, and leaves nothing behind in the store (no spool file, no object).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import bombs, files

SMALL_LIMITS = {"MODELPRESS_MAX_UNPACKED_BYTES": str(64 * 1024**2)}


def _code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def _assert_nothing_stored(tmp_path: Path) -> None:
    store = tmp_path / "var" / "store"
    assert not list((store / "tmp").iterdir()), "the spool file must be discarded"
    assert not (store / "sha256").exists()


@pytest.fixture
def small_api(service_env, make_api):  # type: ignore[no-untyped-def]
    service_env(**SMALL_LIMITS)
    return make_api()


# ---- decompression bombs at inspection ---------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "build"),
    [
        ("/v1/models", lambda p: bombs.hf_zip_bomb(p, 32 * 1024**2)),
        ("/v1/models", lambda p: bombs.tar_gz_bomb(p, member_size=32 * 1024**2)),
        ("/v1/models", lambda p: bombs.onnx_external_data_bomb(p, 32 * 1024**2)),
        ("/v1/datasets", lambda p: bombs.npz_bomb(p, 32 * 1024**2)),
    ],
    ids=["hf_zip", "tar_gz", "onnx_zip", "npz"],
)
def test_bombs_are_refused_with_413(small_api, tmp_path, route, build) -> None:  # type: ignore[no-untyped-def]
    response = small_api.upload(route, build(tmp_path / "bomb.bin"))
    assert response.status_code == 413, response.text
    assert _code(response) == "decompression_bomb"
    _assert_nothing_stored(tmp_path)


def test_archive_past_the_total_limit_is_refused(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(MODELPRESS_MAX_UNPACKED_BYTES=str(1024**2))
    noise = np.random.default_rng(0).integers(0, 255, 2 * 1024**2, dtype=np.uint8).tobytes()
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w") as archive:  # stored: ratio 1, only the total is too large
        archive.writestr("config.json", "{}")
        archive.writestr("model.safetensors", bombs.safetensors_prefix(len(noise)) + noise)
    response = make_api().upload("/v1/models", path)
    assert response.status_code == 413 and _code(response) == "archive_too_large"
    _assert_nothing_stored(tmp_path)


def test_tar_gz_of_many_small_members_is_counted_as_a_whole(small_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No member passes the ratio floor alone; the stream position read so far does."""
    path = bombs.tar_gz_bomb(tmp_path / "many.tar.gz", members=64, member_size=512 * 1024)
    response = small_api.upload("/v1/models", path)
    assert response.status_code == 413 and _code(response) == "decompression_bomb"


def test_npz_is_inspected_from_headers_and_still_described(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = files.npz(tmp_path / "d.npz", input=np.zeros((4, 8), np.float32), labels=np.zeros(4, np.int64))
    info = api.upload("/v1/datasets", path).json()["info"]
    assert info["arrays"] == {
        "input": {"shape": [4, 8], "dtype": "float32"},
        "labels": {"shape": [4], "dtype": "int64"},
    }
    assert info["samples"] == 4


def test_npz_of_object_arrays_is_refused(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "objects.npz"
    np.savez(path, input=np.array([{"a": 1}, None], dtype=object))
    response = api.upload("/v1/datasets", path)
    assert response.status_code == 422 and _code(response) == "invalid_dataset"
    _assert_nothing_stored(tmp_path)


@pytest.fixture
def serve_process(service_env, make_api, tmp_path) -> Iterator[Callable[[], tuple[str, int, object]]]:  # type: ignore[no-untyped-def]
    """A live `modelpress serve --workers 0` at the default settings: (url, pid, ApiClient)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[str, int, object]:
        service_env()
        port = 19000 + os.getpid() % 1000
        log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed with the process
        command = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "0"]
        procs.append(subprocess.Popen(command, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        return url, procs[0].pid, make_api()

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def _peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_a_2_gib_zip_bomb_leaves_the_api_small(serve_process, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url, pid, api = serve_process()
    bomb = bombs.hf_zip_bomb(tmp_path / "bomb.zip")  # ~2 MB on the wire, 2 GiB unpacked
    assert bomb.stat().st_size < 4 * 1024**2
    before = _peak_rss_bytes(pid)
    with open(bomb, "rb") as handle:
        response = httpx.post(
            f"{url}/v1/models", headers=api.headers(), files={"file": ("bomb.zip", handle)}, timeout=120
        )
    assert response.status_code == 413 and _code(response) == "decompression_bomb", response.text
    grown = _peak_rss_bytes(pid) - before
    assert grown < 100 * 1024**2, f"the API's peak RSS grew by {grown} bytes"
    _assert_nothing_stored(tmp_path)


# ---- malformed uploads: 4xx, and the spool is discarded ---------------------------------------


def _hf_zip(path: Path, *, config: bytes = b"{}", weights: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", config)
        archive.writestr("model.safetensors", weights)
    return path


_WEIGHTS = bombs.safetensors_prefix(16) + bytes(16)


@pytest.mark.parametrize(
    ("config", "weights"),
    [
        (b'{"model_type": "bert",', _WEIGHTS),
        (b"[1, 2]", _WEIGHTS),
        (b"{}", (10**6).to_bytes(8, "little") + b"{}"),  # header length past the end of the file
        (b"{}", (8).to_bytes(8, "little") + b"not json"),
        (b"{}", (2**63).to_bytes(8, "little") + b"{}"),  # a huge header length
        (b"{}", b"\x01\x02"),  # truncated before the length
        (b"{}", (16).to_bytes(8, "little") + b'{"w": {"a": 1}} '),  # an entry without a shape
    ],
    ids=[
        "config_not_json",
        "config_not_object",
        "length_past_end",
        "header_not_json",
        "huge_length",
        "short",
        "no_shape",
    ],
)
def test_malformed_hf_uploads_are_422_and_leave_no_spool(api, tmp_path, config, weights) -> None:  # type: ignore[no-untyped-def]
    response = api.upload("/v1/models", _hf_zip(tmp_path / "model.zip", config=config, weights=weights))
    assert response.status_code == 422, response.text
    assert _code(response) == "invalid_model"
    _assert_nothing_stored(tmp_path)


def test_malformed_tar_upload_is_422(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in (("m/config.json", b"{nope"), ("m/model.safetensors", _WEIGHTS)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    response = api.upload("/v1/models", path)
    assert response.status_code == 422 and _code(response) == "invalid_model"
    _assert_nothing_stored(tmp_path)


def test_startup_sweeps_old_spool_files_and_keeps_fresh_ones(service_env, make_api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service_env(MODELPRESS_SPOOL_ORPHAN_AGE_S="600")
    spool_dir = tmp_path / "var" / "store" / "tmp"
    spool_dir.mkdir(parents=True, exist_ok=True)
    orphan, fresh = spool_dir / "upload-orphan", spool_dir / "upload-fresh"
    orphan.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 100)
    an_hour_ago = time.time() - 3600
    os.utime(orphan, (an_hour_ago, an_hour_ago))
    make_api()
    assert not orphan.exists()
    assert fresh.exists()


# ---- request bodies ------------------------------------------------------------------------


@pytest.fixture
def tiny_body_api(service_env, make_api):  # type: ignore[no-untyped-def]
    service_env(MODELPRESS_MAX_JSON_BODY_BYTES="4096")
    return make_api()


def test_json_body_past_the_limit_is_413_before_auth(tiny_body_api) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"model_id": "x", "method": "quant_rtn", "config": {"skip_layers": ["a" * 100] * 100}})
    response = tiny_body_api.client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and _code(response) == "body_too_large"
    response = tiny_body_api.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and _code(response) == "body_too_large"


def test_chunked_json_body_past_the_limit_is_413(tiny_body_api) -> None:  # type: ignore[no-untyped-def]
    def chunks() -> Iterator[bytes]:
        yield b'{"model_id": "'
        for _ in range(100):
            yield b"a" * 100
        yield b'"}'

    response = tiny_body_api.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 413 and _code(response) == "body_too_large"


def test_small_chunked_json_body_still_reaches_the_route(tiny_body_api) -> None:  # type: ignore[no-untyped-def]
    def chunks() -> Iterator[bytes]:
        yield b'{"model_id": "nope", '
        yield b'"method": "quant_rtn"}'

    response = tiny_body_api.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 404 and _code(response) == "not_found"


def test_skip_layers_is_bounded(api) -> None:  # type: ignore[no-untyped-def]
    config = {"bits": 4, "skip_layers": [f"layer.{i}" for i in range(5000)]}
    response = api.post("/v1/jobs", json={"model_id": "x", "method": "quant_rtn", "config": config})
    assert response.status_code == 422 and _code(response) == "invalid_config"
    assert "skip_layers" in json.dumps(response.json()["error"])


# ---- multipart -----------------------------------------------------------------------------


def _multipart(parts: list[tuple[bytes, bytes]]) -> tuple[bytes, dict[str, str]]:
    boundary = b"modelpressboundary"
    body = b"".join(b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n" for headers, data in parts)
    return body + b"--" + boundary + b"--\r\n", {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


def _file_part(tmp_path: Path) -> tuple[bytes, bytes]:
    data = files.tiny_onnx(tmp_path / "tiny.onnx").read_bytes()
    return b'Content-Disposition: form-data; name="file"; filename="tiny.onnx"', data


def _padding(lines: int, size: int) -> bytes:
    return b"".join(b"X-Padding-%d: " % i + b"p" * size + b"\r\n" for i in range(lines))


def _field(name: str, value: bytes) -> tuple[bytes, bytes]:
    return f'Content-Disposition: form-data; name="{name}"'.encode(), value


@pytest.mark.parametrize(
    ("extra", "status", "code"),
    [
        ([_field(f"f{i}", b"v") for i in range(40)], 400, "too_many_parts"),
        ([(_padding(1, 40_000) + _field("note", b"")[0], b"v")], 400, "invalid_part_header"),
        ([(_padding(7, 3_000) + _field("note", b"")[0], b"v")], 400, "invalid_part_header"),
        ([_field("note", b"v" * 100_000)], 413, "fields_too_large"),
    ],
    ids=["parts", "header_line", "header_lines", "fields"],
)
def test_multipart_parts_are_bounded(api, tmp_path, extra, status, code) -> None:  # type: ignore[no-untyped-def]
    body, headers = _multipart([*extra, _file_part(tmp_path)])
    response = api.post("/v1/models", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert _code(response) == code
    _assert_nothing_stored(tmp_path)


def test_a_second_file_part_is_refused(api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    body, headers = _multipart([_file_part(tmp_path), _file_part(tmp_path)])
    response = api.post("/v1/models", content=body, headers=headers)
    assert response.status_code == 400 and _code(response) == "duplicate_file"
    _assert_nothing_stored(tmp_path)
