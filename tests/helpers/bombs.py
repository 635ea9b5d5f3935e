"""Decompression bombs built on the fly: zeros streamed through zipfile / tarfile compression.

A 2 GiB member of zeros deflates to about 2 MB and takes seconds to build; nothing large is ever
held in memory or written uncompressed.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

GiB = 1024**3
CHUNK = bytes(1024 * 1024)


def _zeros(size: int) -> Iterator[bytes]:
    for _ in range(size // len(CHUNK)):
        yield CHUNK
    yield bytes(size % len(CHUNK))


def safetensors_prefix(data_bytes: int) -> bytes:
    """A valid safetensors header for one float32 tensor of `data_bytes` bytes (the zeros follow)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [data_bytes // 4], "data_offsets": [0, data_bytes]}})
    encoded = header.encode().ljust(len(header) + (-len(header) % 8))
    return len(encoded).to_bytes(8, "little") + encoded


def hf_zip_bomb(path: Path, size: int = 2 * GiB) -> Path:
    """config.json + model.safetensors whose data is `size` bytes of zeros."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("config.json", json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
        with archive.open("model.safetensors", "w", force_zip64=True) as handle:
            handle.write(safetensors_prefix(size))
            for chunk in _zeros(size):
                handle.write(chunk)
    return path


def npz_bomb(path: Path, size: int = 2 * GiB) -> Path:
    """An `.npz` whose `input.npy` declares float32[size // 4] zeros."""
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("input.npy", "w", force_zip64=True) as handle,
    ):
        header = {"descr": "<f4", "fortran_order": False, "shape": (size // 4,)}
        np.lib.format.write_array_header_1_0(handle, header)
        for chunk in _zeros(size):
            handle.write(chunk)
    return path


class _ZeroReader:
    def read(self, size: int = -1) -> bytes:
        return bytes(max(size, 0))


def tar_gz_bomb(path: Path, *, members: int = 1, member_size: int = 2 * GiB) -> Path:
    """An HF-shaped tar.gz: config.json, then `members` files of `member_size` zeros each."""
    with tarfile.open(path, "w:gz", compresslevel=9) as archive:
        config = json.dumps({"model_type": "bert"}).encode()
        info = tarfile.TarInfo("model/config.json")
        info.size = len(config)
        archive.addfile(info, io.BytesIO(config))
        for index in range(members):
            info = tarfile.TarInfo(f"model/shard-{index}.bin")
            info.size = member_size
            archive.addfile(info, _ZeroReader())  # type: ignore[arg-type]
    return path


def onnx_external_data_bomb(path: Path, size: int = 2 * GiB) -> Path:
    """A zip of model.onnx whose initializer lives in weights.bin: `size` bytes of zeros."""
    count = size // 4
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[count])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(size))):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "bomb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [count])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [count])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("model.onnx", model.SerializeToString())
        with archive.open("weights.bin", "w", force_zip64=True) as handle:
            for chunk in _zeros(size):
                handle.write(chunk)
    return path
