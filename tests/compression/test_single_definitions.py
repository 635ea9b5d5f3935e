"""One concept, one place: the API and the loader detect formats alike, every MAC count agrees with an
independent count, and the layers reported as quantizable are the layers the quantizers quantize."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from app.core.inspect import InspectError, inspect_model_file
from compression.configs import RTNConfig
from compression.evaluate import estimate_flops
from compression.io.detect import detect_format
from compression.io.errors import ModelLoadError
from compression.io.loaded import quantizable_layer_names
from compression.methods.mixed_precision_costs import layer_macs
from compression.methods.quant_rtn import compress as quant_rtn
from compression.primitives.layers import find_layers
from compression.primitives.prune_costs import measure_costs
from tests.helpers.files import pickled, tiny_onnx, torch_save_zip


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _api_verdict(path: Path) -> str:
    try:
        return inspect_model_file(path).format
    except InspectError as error:
        return error.code


def _loader_verdict(path: Path) -> str:
    try:
        return detect_format(path)
    except ModelLoadError as error:
        return error.code


API_FORMAT = {"onnx_zip": "onnx", "hf_archive": "hf_dir"}


def _hostile_and_plain_files(tmp_path: Path) -> dict[str, Path]:
    onnx_file = tiny_onnx(tmp_path / "m.onnx")
    return {
        "onnx": onnx_file,
        "pickle": pickled(tmp_path / "p.bin"),
        "torch_save": torch_save_zip(tmp_path / "t.pt"),
        # a pickle member next to a HF config: the loader used to call this a HF archive
        "config_and_pickle_zip": _zip(tmp_path / "cp.zip", {"m/config.json": b"{}", "m/weights.pickle": b"\x80\x04."}),
        "config_and_pickle_tar": _tar(tmp_path / "cp.tgz", {"m/config.json": b"{}", "m/data.pkl": b"\x80\x04."}),
        "two_onnx_zip": _zip(
            tmp_path / "two.zip", {"a.onnx": onnx_file.read_bytes(), "b.onnx": onnx_file.read_bytes()}
        ),
        "onnx_zip": _zip(tmp_path / "one.zip", {"a.onnx": onnx_file.read_bytes()}),
        "words": _zip(tmp_path / "w.zip", {"readme.txt": b"hello"}),
    }


def test_api_and_loader_detect_the_same_format_or_refuse_with_the_same_code(tmp_path: Path) -> None:
    verdicts = {}
    for label, path in _hostile_and_plain_files(tmp_path).items():
        api, loader = _api_verdict(path), _loader_verdict(path)
        verdicts[label] = api
        assert API_FORMAT.get(loader, loader) == api, (label, api, loader)
    assert verdicts["config_and_pickle_zip"] == verdicts["config_and_pickle_tar"] == "pickle_refused"
    assert verdicts["pickle"] == verdicts["torch_save"] == "pickle_refused"
    assert verdicts["two_onnx_zip"] == verdicts["words"] == "unknown_format"
    assert verdicts["onnx"] == verdicts["onnx_zip"] == "onnx"


class _Mixed(nn.Module):
    """Conv2d (grouped), a plain Conv1d and two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.temporal = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 16, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2)  # [N, 8, 16]
        h = self.temporal(h)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def _hand_count(rows: int) -> dict[str, int]:
    """MACs written out from the layer shapes: out elements x inputs per output element."""
    return {
        "conv": rows * 8 * 4 * 4 * (4 // 2) * 3 * 3,
        "temporal": rows * 8 * 16 * 8 * 3,
        "fc1": rows * 16 * 128,
        "fc2": rows * 3 * 16,
    }


def test_report_flops_mixed_precision_and_pruning_count_the_same_macs() -> None:
    torch.manual_seed(0)
    model, rows = _Mixed().eval(), 5
    batch = {"x": torch.randn(rows, 4, 4, 4)}
    expected = _hand_count(rows)
    assert estimate_flops(model, batch)["layers"] == expected
    per_sample = layer_macs(model, dict(model.named_children()), batch)
    assert {n: v * rows for n, v in per_sample.items()} == pytest.approx(expected)
    costs = measure_costs(model, batch)
    assert {n: costs.modules[n].macs * rows for n in expected} == pytest.approx(expected)


def test_reported_quantizable_layers_are_the_layers_the_quantizer_quantizes() -> None:
    torch.manual_seed(0)
    model = _Mixed().eval()
    batches = [{"x": torch.randn(4, 4, 4, 4)}]
    result = quant_rtn(model, batches, RTNConfig(bits=8, group_size=None, quantize_head=8))
    names = quantizable_layer_names(model)
    assert names == list(find_layers(model)) == sorted(result.quantized, key=names.index)
    assert "temporal" not in names  # a plain Conv1d is neither counted nor quantized
