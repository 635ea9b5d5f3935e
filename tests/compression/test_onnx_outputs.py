"""ONNX graphs with several outputs: the importer returns all of them, in graph order; methods, metrics
and the export check take the first as the primary output and the export keeps (and checks) every one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compression.configs import RTNConfig
from compression.evaluate.fidelity import compare_outputs
from compression.io import export_artifacts, load_model, verify_onnx
from compression.io.loaded import LoadedModel
from compression.methods.quant_rtn import compress as rtn
from compression.types import Batches


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.logits = nn.Linear(8, 5)
        self.embedding = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.logits(features), self.embedding(features)


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = tmp_path_factory.mktemp("two_heads")
    torch.manual_seed(0)
    path = folder / "two_heads.onnx"
    torch.onnx.export(TwoHeads().eval(), (torch.randn(2, 3, 12, 12),), str(path), input_names=["input"],
                      output_names=["logits", "embedding"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})  # fmt: skip
    return load_model(path, work_dir=folder / "work")


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def _ort(path: Path, images: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images.numpy()})


def test_every_output_is_returned_in_graph_order(two_heads: LoadedModel) -> None:
    images = _images()
    with torch.no_grad():
        got = two_heads.module(input=images)
    assert isinstance(got, tuple) and [t.shape for t in got] == [(6, 5), (6, 4)]
    for tensor, want in zip(got, _ort(two_heads.source_onnx, images), strict=True):
        np.testing.assert_allclose(tensor.numpy(), want, rtol=1e-5, atol=1e-6)
    assert two_heads.task == "classifier"  # from the first output


def test_quantize_evaluate_and_export_keep_every_output(two_heads: LoadedModel, tmp_path: Path) -> None:
    result = rtn(two_heads.module, None, RTNConfig(bits=8, group_size=None, quantize_head=8))
    fidelity = compare_outputs(two_heads.module, result.model, Batches([{"input": _images(1)}]))
    assert fidelity["samples"] == 6 and fidelity["top1_agreement"] is not None
    paths = export_artifacts(result, two_heads, tmp_path, example={"input": _images(2)}, manifest={})
    check = verify_onnx(paths["onnx"], result.model, {"input": _images(3)})
    assert check["passed"], check
    with torch.no_grad():
        want = result.model(input=_images(3))
    got = _ort(paths["onnx"], _images(3))
    assert len(got) == 2
    for array, tensor in zip(got, want, strict=True):
        np.testing.assert_allclose(array, tensor.numpy(), atol=1e-4 * float(tensor.abs().max()))
