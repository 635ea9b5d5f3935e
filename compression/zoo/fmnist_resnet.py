"""Fixture model: a tiny ResNet (77,754 params) trained on Fashion-MNIST, plus its data loader.

Architecture: 3x3 stem conv (1 -> 16), then three stages of one BasicBlock each (16, 32, 64 channels;
stages 2 and 3 downsample with stride 2 and a 1x1 conv + BN shortcut), BatchNorm and ReLU throughout,
global average pooling, Linear(64 -> 10). Input `input`: float32 [N, 1, 28, 28], pixels scaled to
[0, 1] then normalized with `(x - 0.2860) / 0.3530` (the Fashion-MNIST training-set mean and std).

The committed weights (`fmnist_resnet.safetensors`, next to this file) come from
`benchmarks/train_fmnist_resnet.py` (seed 0, AdamW lr 3e-3, OneCycle, batch 128, horizontal flips,
3 epochs; 96.6 s on 2 CPU threads). Measured fp32 top-1 on the 10k test set: 90.79 %.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
WEIGHTS_PATH = Path(__file__).with_name("fmnist_resnet.safetensors")
MEAN, STD = 0.2860, 0.3530
INPUT_NAME = "input"
CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
TEST_ACCURACY = 0.9079  # fp32 top-1 on the 10k test set, as printed by the training run


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class FmnistResNet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(input))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_fmnist_resnet(width: int = 16, num_classes: int = 10) -> FmnistResNet:
    """A freshly initialized fixture ResNet (call `torch.manual_seed` first for reproducible weights)."""
    return FmnistResNet(width, num_classes)


def load_pretrained(path: Path = WEIGHTS_PATH) -> FmnistResNet:
    """The trained fixture ResNet in eval mode, weights read from safetensors (never pickle)."""
    model = build_fmnist_resnet()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def fashion_mnist_available(root: Path = FMNIST_DIR) -> bool:
    return (root / "t10k-images-idx3-ubyte.gz").is_file()


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(
    split: Literal["train", "test"] = "test", limit: int | None = None, root: Path = FMNIST_DIR
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 1, 28, 28] normalized as the model expects, labels int64 [N])."""
    prefix = "train" if split == "train" else "t10k"
    if not fashion_mnist_available(root):
        raise FileNotFoundError(f"Fashion-MNIST not found under {root} (apt-get install dataset-fashion-mnist)")
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0)
    return (pixels - MEAN) / STD, torch.from_numpy(labels.astype(np.int64))


def export_fmnist_onnx(path: Path, *, batch_norm: bool = True, opset: int = 18) -> Path:
    """Write the pretrained fixture as ONNX with a dynamic batch axis and input name `input`.

    batch_norm=True keeps BatchNormalization nodes (TorchScript exporter in PRESERVE mode, so
    BN-aware methods see them); False uses the dynamo exporter, which folds BN into the convs.
    """
    model = load_pretrained()
    example = (torch.zeros(2, 1, 28, 28),)
    if batch_norm:
        torch.onnx.export(
            model, example, str(path), input_names=[INPUT_NAME], output_names=["logits"],
            dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False, dynamo=False,
        )  # fmt: skip
    else:
        torch.onnx.export(
            model, example, str(path), input_names=[INPUT_NAME], output_names=["logits"],
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}}, opset_version=opset, dynamo=True,
        )  # fmt: skip
    return path
