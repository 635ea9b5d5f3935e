"""Cost model for structured pruning: MACs and parameters per module from one hooked forward, and the
estimate after removing units of channel groups (used to search keep counts without pruning)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from compression.primitives.depgraph import ChannelGroup, attention_layouts
from compression.primitives.macs import batch_rows, call_macs

_TP_GRAPH = tp.DependencyGraph()  # never built: only its per-layer-type pruners are used


@dataclass
class ModuleCost:
    macs: float  # per sample, scales with kept-out x kept-in fractions
    macs_out: float  # per sample, scales with the kept-out fraction only (attention matmuls)
    weight: int  # scales with out x in (conv/linear) or out only (norms, depthwise, embeddings)
    bias: int  # scales with out
    out_size: int
    in_size: int
    two_sided: bool  # weight has separate out and in dimensions


@dataclass
class CostTable:
    modules: dict[str, ModuleCost]
    macs: float  # per sample, whole model
    params: int

    def estimate(self, removed: dict[tuple[str, str], int]) -> tuple[float, float]:
        """(MACs, params) after removing `removed[(module, 'out'|'in')]` elements of each dimension."""
        macs, params = self.macs, float(self.params)
        for name, cost in self.modules.items():
            fo = 1.0 - removed.get((name, "out"), 0) / max(cost.out_size, 1)
            fi = 1.0 - removed.get((name, "in"), 0) / max(cost.in_size, 1) if cost.two_sided else 1.0
            macs += cost.macs * (fo * fi - 1.0) + cost.macs_out * (fo - 1.0)
            params += cost.weight * (fo * fi - 1.0) + cost.bias * (fo - 1.0)
        return macs, params


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_costs(model: nn.Module, batch: dict[str, Any]) -> CostTable:
    """MACs per sample of every Conv/Linear (plus attention score/value matmuls) from one hooked forward."""
    table: dict[str, ModuleCost] = {}
    for name, module in model.named_modules():
        cost = _static_cost(module)
        if cost is not None:
            table[name] = cost
    q_layers = {layout.q for layout in attention_layouts(model)}
    handles = []
    for name, module in model.named_modules():
        if name in table and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            handles.append(module.register_forward_hook(_mac_hook(table[name], name in q_layers)))
    batch_size = batch_rows(batch)
    try:
        model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    for cost in table.values():
        cost.macs /= batch_size
        cost.macs_out /= batch_size
    total = sum(c.macs + c.macs_out for c in table.values())
    return CostTable(table, total, count_params(model))


def _mac_hook(cost: ModuleCost, is_query: bool) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        cost.macs += call_macs(module, output) or 0
        if is_query and isinstance(module, nn.Linear) and output.dim() == 3:
            # scores q·kᵀ and weights·v: 2·T·T·(heads·head_dim)
            cost.macs_out += 2 * output.shape[0] * output.shape[1] ** 2 * output.shape[2]

    return hook


def _static_cost(module: nn.Module) -> ModuleCost | None:
    own = dict(module.named_parameters(recurse=False))
    if not own:
        return None
    weight, bias = own.get("weight"), own.get("bias")
    weight_n = weight.numel() if weight is not None else 0
    bias_n = bias.numel() if bias is not None else 0
    extra = sum(p.numel() for key, p in own.items() if key not in ("weight", "bias"))
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups == module.out_channels and module.out_channels > 1
        return ModuleCost(0.0, 0.0, weight_n, bias_n, module.out_channels, module.in_channels, not depthwise)
    if isinstance(module, nn.Linear):
        return ModuleCost(0.0, 0.0, weight_n, bias_n, module.out_features, module.in_features, True)
    size = _channel_size(module)
    if size is None or extra:
        return None  # parameters of modules we never prune stay in the fixed part of the count
    return ModuleCost(0.0, 0.0, weight_n, bias_n, size, size, False)


def _channel_size(module: nn.Module) -> int | None:
    """Channels of a one-sided layer (norms, PReLU, embeddings) as torch_pruning's layer pruners count them."""
    pruner = _TP_GRAPH.get_pruner_of_module(module)
    return pruner.get_out_channels(module) if pruner is not None else None


def removed_counts(groups: list[ChannelGroup], removals: list[list[int]]) -> dict[tuple[str, str], int]:
    """Elements removed per (module, dimension) when each group drops its listed units."""
    counts: dict[tuple[str, str], int] = {}
    for group, removed in zip(groups, removals, strict=True):
        if not removed:
            continue
        mask = torch.zeros(group.size, dtype=torch.bool)
        mask[torch.as_tensor(removed, dtype=torch.long)] = True
        for member in group.members:
            hit = int(mask[torch.as_tensor(member.units, dtype=torch.long)].sum())
            key = (member.module, member.dim)
            counts[key] = counts.get(key, 0) + hit
    return counts
