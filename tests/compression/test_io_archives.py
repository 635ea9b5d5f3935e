"""Archives the worker unpacks stay within ArchiveLimits: bombs are refused before they are written out."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from compression.archives import ArchiveLimits
from compression.io import DatasetError, InputSpec, LoadedModel, ModelLoadError, load_batches, load_model
from compression.io.detect import safe_extract
from compression.job import JobError, JobSpec, run_job
from tests.helpers import bombs, files

MiB = 1024**2
SMALL = ArchiveLimits(max_unpacked_bytes=64 * MiB)


def _bytes_under(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_onnx_zip_bomb_is_refused_before_extraction(tmp_path: Path) -> None:
    """At the default limits: a ~2 MB zip of model.onnx + 2 GiB of zero external data."""
    bomb = bombs.onnx_external_data_bomb(tmp_path / "bomb.zip")
    assert bomb.stat().st_size < 4 * MiB
    with pytest.raises(ModelLoadError) as caught:
        load_model(bomb, work_dir=tmp_path / "work")
    assert caught.value.code == "decompression_bomb"
    assert _bytes_under(tmp_path / "work") == 0


def test_tar_gz_bomb_stops_at_the_member_header(tmp_path: Path) -> None:
    bomb = bombs.tar_gz_bomb(tmp_path / "bomb.tar.gz", member_size=32 * MiB)
    with pytest.raises(ModelLoadError) as caught:
        load_model(bomb, work_dir=tmp_path / "work", limits=SMALL)
    assert caught.value.code == "decompression_bomb"
    assert _bytes_under(tmp_path / "work") < MiB


def test_tar_gz_extraction_counts_the_bytes_of_all_members(tmp_path: Path) -> None:
    """No member passes the ratio floor on its own; what has been unpacked so far does."""
    bomb = bombs.tar_gz_bomb(tmp_path / "many.tar.gz", members=64, member_size=512 * 1024)
    with pytest.raises(ModelLoadError) as caught:
        safe_extract(bomb, tmp_path / "out", SMALL)
    assert caught.value.code == "decompression_bomb"
    assert _bytes_under(tmp_path / "out") <= SMALL.max_ratio * bomb.stat().st_size < 32 * MiB


def test_tar_past_the_total_limit_is_refused(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, 2 * MiB, dtype=np.uint8).tobytes()
    path = tmp_path / "noise.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("noise.bin")
        info.size = len(noise)
        archive.addfile(info, io.BytesIO(noise))
    with pytest.raises(ModelLoadError) as caught:
        safe_extract(path, tmp_path / "out", ArchiveLimits(max_unpacked_bytes=MiB))
    assert caught.value.code == "archive_too_large"


def test_zip_whose_declared_sizes_lie_is_refused(tmp_path: Path) -> None:
    """A central directory claiming a large compressed size (so the ratio looks harmless) is caught:
    the members cannot hold more compressed bytes than the file has."""
    path = tmp_path / "liar.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("weights.bin", bytes(32 * MiB))
    data = bytearray(path.read_bytes())
    entry = data.rindex(b"PK\x01\x02")  # the central directory entry of weights.bin
    data[entry + 20 : entry + 24] = (16 * MiB).to_bytes(4, "little")  # compressed size: ratio 2
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as caught:
        safe_extract(path, tmp_path / "out", SMALL)
    assert caught.value.code == "invalid_model"
    assert _bytes_under(tmp_path / "out") == 0


def test_npz_bomb_is_refused_before_any_array_is_read(tmp_path: Path) -> None:
    bomb = bombs.npz_bomb(tmp_path / "bomb.npz", 32 * MiB)
    loaded = LoadedModel("onnx", nn.Identity(), [InputSpec("input", (None,), "float32")], "classifier")
    with pytest.raises(DatasetError) as caught:
        load_batches(bomb, loaded, limits=SMALL)
    assert caught.value.code == "decompression_bomb"


def test_npz_whose_header_disagrees_with_its_member_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as archive, archive.open("input.npy", "w") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": (10**9,)})
        handle.write(bytes(64))
    loaded = LoadedModel("onnx", nn.Identity(), [InputSpec("input", (None,), "float32")], "classifier")
    with pytest.raises(DatasetError) as caught:
        load_batches(path, loaded)
    assert caught.value.code == "invalid_dataset"


def _noise_hf_zip(path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 255, 2 * MiB, dtype=np.uint8).tobytes()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.safetensors", bombs.safetensors_prefix(len(noise)) + noise)
    return path


@pytest.mark.parametrize("bad", ["model", "calibration"])
def test_a_job_unpacks_within_its_specs_limits(tmp_path: Path, bad: str) -> None:
    """2 MiB of noise passes the default limits; the spec's 1 MiB limit must reach both loaders."""
    model = files.tiny_onnx(tmp_path / "tiny.onnx")
    noise = np.random.default_rng(0).standard_normal((2 * MiB // 32, 8)).astype(np.float32)
    calibration = files.npz(tmp_path / "calib.npz", input=noise if bad == "calibration" else noise[:8])
    spec = JobSpec(
        model_path=_noise_hf_zip(tmp_path / "model.zip") if bad == "model" else model,
        method="quant_rtn",
        config={"bits": 4, "group_size": None},
        calibration_path=calibration,
        evaluation_path=None,
        gate=None,
        work_dir=tmp_path / "work",
        archive_limits=ArchiveLimits(max_unpacked_bytes=MiB),
    )
    with pytest.raises(JobError) as caught:
        run_job(spec, progress=lambda *event: None, should_cancel=lambda: False)
    assert caught.value.code == "archive_too_large", caught.value.message
