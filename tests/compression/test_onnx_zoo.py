"""A zoo of architectures people export with `torch.onnx.export` (opset 17), each through the importer and
every built-in method, then export, with ONNX Runtime agreeing at both ends (quant_int8 quantizes the
uploaded graph itself, through its spec's job-level hooks, as a job runs it).

EfficientNet-style (depthwise MBConv, squeeze-excite, hard-swish), a ViT-style encoder (patch conv,
attention written out, LayerNorm, GELU), a ConvNeXt-style block (7x7 depthwise, channels-last LayerNorm,
GELU, layer scale) and the MobileNetV2-style model of `test_onnx_mobilenet`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compression.configs import METHOD_KEYS, STEP_CONFIG_CLASSES, method_key
from compression.errors import CompressionError
from compression.io import export_artifacts, load_model, verify_onnx
from compression.io.loaded import LoadedModel
from compression.methods.spec import MethodRun
from compression.registry import get_method, get_spec, parse_config
from compression.types import Batches
from tests.compression.test_onnx_mobilenet import (  # noqa: F401 - one_thread: the module's autouse fixture
    TinyMobileNetV2,
    one_thread,
    random_images,
    randomized,
    run_ort,
)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.expand(nn.functional.silu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * scale


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()
        )
        self.se = SqueezeExcite(hidden, max(cin // 4, 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class TinyEfficientNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(MBConv(16, 16, 1), MBConv(16, 24, 2), MBConv(24, 24, 1))
        self.classifier = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.stem(x)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.position = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.blocks = nn.Sequential(EncoderBlock(dim, 4), EncoderBlock(dim, 4))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(1))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.act, self.down = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.depthwise(x).permute(0, 2, 3, 1))
        y = self.gamma * self.down(self.act(self.up(y)))
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x)).mean((2, 3))))


ZOO: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v2": TinyMobileNetV2,
    "efficientnet": TinyEfficientNet,
    "vit": TinyViT,
    "convnext": TinyConvNeXt,
}
EXPECTED_OPS = {
    "mobilenet_v2": {"Clip", "Pad"},
    "efficientnet": {"HardSwish", "Sigmoid", "Mul", "ReduceMean"},
    "vit": {"LayerNormalization", "Softmax", "MatMul", "Erf"},
    "convnext": {"LayerNormalization", "Transpose", "Erf"},
}
METHODS: dict[str, dict] = {
    "quant_rtn": {"bits": 4, "group_size": None, "quantize_head": 8},
    "quant_gptq": {"bits": 4, "group_size": None},
    "quant_decoupleq": {"bits": 4, "group_size": None, "iterations": 1, "blockwise": False},
    "prune_structured": {"recovery": "none", "target": {"metric": "ratio", "reduction": 0.3}, "iterative_steps": 1},
    "prune_unstructured": {"sparsity": 0.5},
    "mixed_precision": {"quantizer": "rtn", "candidates": [4, 8], "budget_bits": 6, "group_size": None,
                        "sensitivity_samples": 8},
    "data_free": {"prune_ratio": 0.3, "bits": 8},
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, LoadedModel]:
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    path = folder / f"{name}.onnx"
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(randomized(ZOO[name]), (random_images(2),), str(path), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False, dynamic_axes=axes)  # fmt: skip
    return name, load_model(path, work_dir=folder / "work")


def test_importer_matches_onnxruntime(zoo_model: tuple[str, LoadedModel]) -> None:
    name, loaded = zoo_model
    ops = {node.op_type for node in onnx.load(str(loaded.source_onnx)).graph.node}
    assert EXPECTED_OPS[name] <= ops, sorted(ops)
    images = random_images()
    with torch.no_grad():
        got = loaded.module(input=images).numpy()
    np.testing.assert_allclose(got, run_ort(loaded.source_onnx, images), rtol=1e-4, atol=1e-5)


# Structured pruning of an imported transformer graph is refused, not guessed: attention's head products
# mix channels, and the exporter's separate bias Add ties each projection to a constant. Hugging Face
# uploads of the same architectures take the layout-aware transformer path instead.
REFUSED = {("vit", "prune_structured"), ("convnext", "prune_structured")}


def _calibration() -> Batches:
    return Batches([{"input": random_images(seed=s)} for s in range(2, 4)], None)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_and_exports(zoo_model: tuple[str, LoadedModel], method: str, tmp_path: Path) -> None:
    name, loaded = zoo_model
    config = parse_config(method, METHODS[method])
    calib = _calibration() if config.uses_calibration else None
    if (name, method) in REFUSED:
        with pytest.raises(CompressionError) as refused:
            get_method(method)(loaded.module, calib, config)
        assert refused.value.code == "untraceable_model" and "mixes or reorders channels" in refused.value.message
        return
    result = get_method(method)(loaded.module, calib, config)
    assert result.quantized or result.stats, f"{method} changed nothing and said nothing"
    images = random_images(seed=9)
    paths = export_artifacts(result, loaded, tmp_path, example={"input": images[:2]}, manifest={})
    check = verify_onnx(paths["onnx"], result.model, {"input": images})
    assert check["passed"], check
    with torch.no_grad():
        want = result.model(input=images).numpy()
    np.testing.assert_allclose(run_ort(paths["onnx"], images), want, atol=1e-3 * np.abs(want).max())


def test_every_builtin_method_is_in_the_zoo() -> None:
    """Every method a pipeline can run as a step; a pipeline is only its steps."""
    steps = {method_key(cls) for cls in STEP_CONFIG_CLASSES}
    assert set(METHODS) | {"quant_int8"} == steps and set(METHOD_KEYS) - steps == {"pipeline"}


def test_quant_int8_quantizes_the_imported_graph(zoo_model: tuple[str, LoadedModel], tmp_path: Path) -> None:
    """The job's path: the spec's `run` hook quantizes the upload's own graph to QDQ, `write_onnx` ships it."""
    name, loaded = zoo_model
    spec, config = get_spec("quant_int8"), parse_config("quant_int8", {})
    job = SimpleNamespace(work_dir=tmp_path)  # the one JobSpec field the hook reads
    assert spec.run is not None and spec.write_onnx is not None
    result = spec.run(MethodRun(loaded, _calibration(), config, job, lambda *_: None))  # type: ignore[arg-type]
    assert result is not None
    path = tmp_path / "int8.onnx"
    stored = spec.write_onnx(result, loaded, path, {"input": random_images(2)})
    assert stored and set(stored.values()) == {"int8 QDQ (DequantizeLinear)"}, stored
    images = random_images(seed=9)
    with torch.no_grad():
        want, shipped = loaded.module(input=images).numpy(), result.model(input=images).numpy()
    np.testing.assert_array_equal(run_ort(path, images), shipped)  # what was measured is what ships
    assert np.abs(shipped - want).max() <= 0.1 * np.abs(want).max(), name  # measured: at most 5.3 % (ConvNeXt)
