"""A MobileNetV2-style ONNX model, as `torch.onnx.export` writes one, through the importer and the methods.

Depthwise convolutions, ReLU6 exported as `Clip` with min/max inputs, inverted residuals and explicit
`nn.ZeroPad2d` (a `Pad` whose pads come from a ConstantOfShape/Concat/Reshape/Slice(step -1)/Transpose
chain): the importer must match ONNX Runtime, and prune_structured and data_free must run on it and
export an ONNX that ONNX Runtime agrees with.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compression.configs import DataFreeConfig, PruneStructuredConfig
from compression.io import export_artifacts, load_model, verify_onnx
from compression.io.loaded import LoadedModel
from compression.methods import data_free, prune_structured
from compression.types import Batches


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu6: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if relu6 else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.expand = _conv_bn(cin, hidden, 1)
        # explicit padding, TF-style on the strided block ("same" padding is uneven there)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1) if stride == 2 else 1)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, cout, 1, relu6=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.pad(self.expand(x))))
        return x + y if self.residual else y


class TinyMobileNetV2(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.ZeroPad2d(1), _conv_bn(3, 16, 3, stride=2))
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 2), InvertedResidual(16, 24, 2, 3), InvertedResidual(24, 24, 1, 3)
        )
        self.head = _conv_bn(24, 32, 1)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1))


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomized(model_class: type[nn.Module]) -> nn.Module:
    """A seeded instance with non-trivial BatchNorm, so pruning criteria and compensation have work to do."""
    torch.manual_seed(0)
    model = model_class()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.3, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _random_model() -> nn.Module:
    return randomized(TinyMobileNetV2)


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = tmp_path_factory.mktemp("mobilenet")
    path = folder / "mobilenet.onnx"
    torch.onnx.export(_random_model(), (torch.randn(2, 3, 32, 32),), str(path), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"Pad", "Clip", "Conv", "Add"} <= ops
    return load_model(path, work_dir=folder / "work")


def random_images(count: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run_ort(path: Path, batch: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": batch.numpy()})[0]


def test_imported_mobilenet_matches_onnxruntime(mobilenet: LoadedModel) -> None:
    images = random_images()
    with torch.no_grad():
        got = mobilenet.module(input=images).numpy()
    want = run_ort(mobilenet.source_onnx, images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    depthwise = [m for m in mobilenet.module.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 3


def _export_and_check(result, mobilenet: LoadedModel, folder: Path) -> None:
    images = random_images(seed=2)
    paths = export_artifacts(result, mobilenet, folder, example={"input": images[:2]}, manifest={})
    check = verify_onnx(paths["onnx"], result.model, {"input": images})
    assert check["passed"], check
    with torch.no_grad():
        want = result.model(input=images).numpy()
    np.testing.assert_allclose(run_ort(paths["onnx"], images), want, atol=1e-4 * np.abs(want).max())


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_prune_structured_runs_and_exports(mobilenet: LoadedModel, tmp_path: Path) -> None:
    calib = Batches([{"input": random_images(seed=s)} for s in range(3)], None)
    config = PruneStructuredConfig.model_validate({"recovery": "none", "target": {"metric": "ratio", "reduction": 0.5}})
    result = prune_structured.compress(mobilenet.module, calib, config)
    assert _params(result.model) < 0.8 * _params(mobilenet.module)
    _export_and_check(result, mobilenet, tmp_path)


def test_data_free_runs_and_exports(mobilenet: LoadedModel, tmp_path: Path) -> None:
    """UDFC prunes only ReLU-like pairs, so on a ReLU6 network it quantizes without pruning; the imported
    graph must give the same decisions as the torch original (Clip(0, 6) read as ReLU6)."""
    config = DataFreeConfig(prune_ratio=0.3, bits=8)
    result = data_free.compress(mobilenet.module, None, config)
    reference = data_free.compress(_random_model(), None, config)
    assert result.stats["channels_pruned"] == reference.stats["channels_pruned"]
    assert len(result.quantized) == len(reference.quantized) > 0
    assert sum("activation relu6" in reason for reason in result.stats["not_pruned"].values()) == 1  # the head
    _export_and_check(result, mobilenet, tmp_path)
