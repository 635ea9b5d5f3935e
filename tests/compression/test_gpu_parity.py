"""Same results on CPU and GPU: each method compresses the Fashion-MNIST ResNet on both devices from the same
calibration images and seed; both results, evaluated on the CPU, agree within tolerance. Runs where CUDA is
visible (marker `gpu`; skipped with the reason elsewhere)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compression.configs import (
    DataFreeConfig,
    DecoupleQConfig,
    GPTQConfig,
    MethodConfigBase,
    PruneStructuredConfig,
    RTNConfig,
)
from compression.pipeline.context import to_device
from compression.registry import compress
from compression.types import Batches, CompressionResult
from compression.zoo.fmnist_resnet import fashion_mnist_available, load_fashion_mnist, load_pretrained

pytestmark = pytest.mark.gpu

# (config, least top-1 agreement between the CPU and GPU results, largest top-1 gap in points)
CASES: dict[str, tuple[MethodConfigBase, float, float]] = {
    "rtn": (RTNConfig(bits=4, group_size=None), 0.999, 0.1),
    "gptq": (GPTQConfig(bits=4, group_size=None), 0.98, 0.5),
    "decoupleq": (DecoupleQConfig(bits=4, group_size=None, blockwise=False, iterations=2), 0.98, 0.5),
    "prune_structured": (PruneStructuredConfig(target={"metric": "flops", "reduction": 0.3}), 0.97, 1.0),
    "data_free": (DataFreeConfig(prune_ratio=0.2, bits=8), 0.99, 0.5),
}


@pytest.fixture(scope="module")
def fmnist() -> tuple[nn.Module, Batches, torch.Tensor, torch.Tensor]:
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    train, _ = load_fashion_mnist("train", limit=256)
    test, labels = load_fashion_mnist("test", limit=2000)
    calib = Batches([{"input": train[i : i + 128]} for i in range(0, len(train), 128)])
    return load_pretrained().eval(), calib, test, labels


def _predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model = model.to("cpu").eval()
    with torch.no_grad():
        return torch.cat([model(images[i : i + 500]).argmax(1) for i in range(0, len(images), 500)])


def _run(model: nn.Module, calib: Batches, config: MethodConfigBase, device: str) -> CompressionResult:
    torch.manual_seed(0)
    return compress(model.to(device), to_device(calib, device), config)


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_and_cuda_results_agree(name: str, fmnist: tuple[nn.Module, Batches, torch.Tensor, torch.Tensor]) -> None:
    model, calib, test, labels = fmnist
    config, min_agreement, max_gap_points = CASES[name]
    on_cpu = _run(model, calib, config, "cpu")
    on_gpu = _run(model, calib, config, "cuda")
    assert next(on_gpu.model.parameters()).device.type == "cuda", "the method ran on the GPU"
    cpu_pred, gpu_pred = _predict(on_cpu.model, test), _predict(on_gpu.model, test)
    agreement = (cpu_pred == gpu_pred).float().mean().item()
    gap = abs((cpu_pred == labels).float().mean().item() - (gpu_pred == labels).float().mean().item()) * 100
    assert agreement >= min_agreement and gap <= max_gap_points, (name, agreement, gap)
    cpu_params = sum(p.numel() for p in on_cpu.model.parameters())
    assert cpu_params == sum(p.numel() for p in on_gpu.model.parameters()), "the same structure on both devices"
    for layer, quantized in on_cpu.quantized.items():
        same = (quantized.codes == on_gpu.quantized[layer].codes.cpu()).float().mean().item()
        assert same >= 0.98, f"{name}: only {same:.3f} of {layer}'s integer codes match across devices"
