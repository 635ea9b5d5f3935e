"""One multiply-accumulate counter for Linear, Hugging Face Conv1D and Conv layers, from a hooked forward.

Used by the report's FLOPs, mixed precision's BitOps and structured pruning's cost model, so the three
agree on what a layer costs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from compression.primitives.layers import layer_kind


def call_macs(module: nn.Module, output: torch.Tensor) -> int | None:
    """Multiply-accumulates of one call of `module` that produced `output`; None for other modules."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if layer_kind(module) == "conv1d_hf":
        return output.numel() * module.weight.shape[0]
    return None


def counted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module `call_macs` counts, by qualified name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd) or layer_kind(m) == "conv1d_hf"
    }


def batch_rows(batch: dict[str, Any]) -> int:
    """The leading dimension of the batch's first tensor input (1 when there is none)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


@contextmanager
def mac_hooks(layers: dict[str, nn.Module]) -> Iterator[dict[str, int]]:
    """Counts each layer's multiply-accumulates over the forwards run inside the block (0: never called)."""
    macs = dict.fromkeys(layers, 0)

    def hook(name: str, module: nn.Module, output: torch.Tensor) -> None:
        macs[name] += call_macs(module, output) or 0

    handles = [m.register_forward_hook(lambda m, a, out, n=n: hook(n, m, out)) for n, m in layers.items()]
    try:
        yield macs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def count_macs(model: nn.Module, batch: dict[str, Any], layers: dict[str, nn.Module] | None = None) -> dict[str, int]:
    """Multiply-accumulates of each layer (default: every counted layer) in one forward of `batch`."""
    with mac_hooks(counted_layers(model) if layers is None else layers) as macs:
        model(**batch)
    return macs
