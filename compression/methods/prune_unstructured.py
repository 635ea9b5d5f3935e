"""prune_unstructured: magnitude sparsity or N:M semi-structured masks, zeros stored in dense weights.

- "unstructured": in every Conv/Linear, the `sparsity` fraction of weights with the smallest |w| is zeroed.
- "2:4" / "4:8": in every group of M consecutive weights along the input dimension (for convs the input
  channels at one kernel position, the layout NVIDIA sparse tensor cores use), the M-N smallest are zeroed:
  50% sparsity whatever `sparsity` says.

What it buys, stated plainly in the notes: the returned model has the same shapes and runs at the same
speed on CPU (PyTorch and ONNX Runtime CPU kernels multiply the zeros). Only the size with a sparse
encoding shrinks (reported per layer: bitmask, CSR or N:M metadata, the smallest), and 2:4 can run
faster only on GPUs with sparse tensor cores. No calibration data is used.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from compression.configs import PruneUnstructuredConfig
from compression.primitives.layers import find_layers, layer_kind, matches_any, tied_weight_owner
from compression.types import Batches, CompressionResult, ProgressFn, no_progress


def magnitude_mask(matrix: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask zeroing the round(sparsity·numel) smallest |w| (ties: lower flat index first)."""
    count = round(matrix.numel() * sparsity)
    order = torch.argsort(matrix.abs().flatten(), stable=True)
    keep = torch.ones(matrix.numel(), dtype=torch.bool)
    keep[order[:count]] = False
    return keep.reshape(matrix.shape)


def n_m_mask(matrix: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the n largest |w| of every m consecutive columns of each row (cols % m == 0)."""
    rows, cols = matrix.shape
    groups = matrix.abs().reshape(rows, cols // m, m)
    order = torch.argsort(-groups, dim=-1, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)


def _pattern_view(module: nn.Module) -> torch.Tensor:
    """[out, in_flat] with input channels fastest (convs: out, kh, kw, in), the N:M grouping axis last."""
    weight = module.weight.detach()
    if layer_kind(module) == "conv1d_hf":
        return weight.t()
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    return weight.reshape(weight.shape[0], -1)


def _from_pattern_view(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    shape = module.weight.shape
    if layer_kind(module) == "conv1d_hf":
        return matrix.t()
    if len(shape) == 4:
        return matrix.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    return matrix.reshape(shape)


def sparse_sizes(keep: torch.Tensor, value_bytes: int, pattern: str) -> dict[str, int]:
    """Bytes of one [rows, cols] mask's weights stored densely and with each sparse encoding."""
    rows, cols = keep.shape
    nnz, numel = int(keep.sum()), keep.numel()
    index_bytes = 2 if cols <= 65536 else 4
    sizes = {
        "dense": numel * value_bytes,
        "bitmask": nnz * value_bytes + math.ceil(numel / 8),
        "csr": nnz * (value_bytes + index_bytes) + (rows + 1) * 4,
    }
    if pattern != "unstructured":
        m = int(pattern.split(":")[1])
        sizes[pattern] = nnz * value_bytes + math.ceil(nnz * math.ceil(math.log2(m)) / 8)
    return sizes


def compress(
    model: nn.Module,
    calib: Batches | None,
    config: PruneUnstructuredConfig,
    *,
    progress: ProgressFn | None = None,
) -> CompressionResult:
    """Mask a deep copy of `model`; the input is untouched and no data is needed."""
    progress = progress or no_progress
    work = copy.deepcopy(model)
    layers = find_layers(work)
    skipped: dict[str, str] = {}
    per_layer: dict[str, dict[str, Any]] = {}
    for position, (name, module) in enumerate(layers.items()):
        reason = _skip_reason(work, name, module, config)
        if reason:
            skipped[name] = reason
        else:
            per_layer[name] = _mask_layer(module, config)
        progress((position + 1) / len(layers), f"masked {name}")
    stats = _summary(work, per_layer, config)
    return CompressionResult(
        model=work, method="prune_unstructured", skipped=skipped, stats=stats, notes=_notes(stats, config)
    )


def _skip_reason(model: nn.Module, name: str, module: nn.Module, config: PruneUnstructuredConfig) -> str | None:
    if matches_any(name, config.skip_layers):
        return "skip_layers"
    owner = tied_weight_owner(model, name)
    if owner is not None:
        return f"weight tied to '{owner}' (masking it would also zero that layer)"
    if config.pattern != "unstructured":
        m = int(config.pattern.split(":")[1])
        if _pattern_view(module).shape[1] % m:
            return f"input size per kernel position is not a multiple of {m}: no {config.pattern} grouping"
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            return f"grouped convolution: no {config.pattern} grouping along its inputs"
    return None


@torch.no_grad()
def _mask_layer(module: nn.Module, config: PruneUnstructuredConfig) -> dict[str, Any]:
    weight = module.weight
    matrix = _pattern_view(module)
    if config.pattern == "unstructured":
        keep = magnitude_mask(matrix, config.sparsity)
    else:
        n, m = (int(part) for part in config.pattern.split(":"))
        keep = n_m_mask(matrix, n, m)
    weight.copy_(_from_pattern_view(module, matrix * keep))
    sizes = sparse_sizes(keep, weight.element_size(), config.pattern)
    encoding = min(sizes, key=lambda key: sizes[key])
    return {
        "numel": keep.numel(),
        "nonzero": int(keep.sum()),
        "sparsity": 1 - float(keep.float().mean()),
        "encoding": encoding,
        "bytes_dense": sizes["dense"],
        "bytes_sparse": sizes[encoding],
    }


def _summary(model: nn.Module, per_layer: dict[str, dict[str, Any]], config: PruneUnstructuredConfig) -> dict:
    state = {id(t): t for t in model.state_dict().values()}.values()
    model_bytes = sum(t.numel() * t.element_size() for t in state)
    pruned_dense = sum(layer["bytes_dense"] for layer in per_layer.values())
    pruned_sparse = sum(layer["bytes_sparse"] for layer in per_layer.values())
    numel = sum(layer["numel"] for layer in per_layer.values())
    zeros = numel - sum(layer["nonzero"] for layer in per_layer.values())
    params = sum(p.numel() for p in model.parameters())
    return {
        "pattern": config.pattern,
        "sparsity_target": config.sparsity if config.pattern == "unstructured" else 0.5,
        "sparsity_pruned_layers": zeros / max(numel, 1),
        "sparsity_model": zeros / max(params, 1),
        "params": params,
        "size_dense_bytes": model_bytes,
        "size_sparse_bytes": model_bytes - pruned_dense + pruned_sparse,
        "layers": per_layer,
    }


def _notes(stats: dict[str, Any], config: PruneUnstructuredConfig) -> list[str]:
    notes = [
        f"{stats['sparsity_pruned_layers']:.1%} of the pruned layers' weights are zero "
        f"({stats['sparsity_model']:.1%} of all parameters), pattern {config.pattern}",
        f"size: {stats['size_dense_bytes']} bytes dense, {stats['size_sparse_bytes']} bytes with the "
        "smallest sparse encoding per layer (bitmask, CSR or N:M metadata; values kept at their dtype)",
        "no CPU speedup: the zeros are stored in dense weights with unchanged shapes, and PyTorch / ONNX "
        "Runtime CPU kernels multiply them like any other value",
    ]
    if config.pattern == "2:4":
        notes.append("2:4 can be faster only on GPUs with sparse tensor cores (NVIDIA Ampere or newer)")
    if config.pattern != "unstructured" and config.sparsity != 0.5:
        notes.append(f"sparsity {config.sparsity} ignored: {config.pattern} fixes it at 50%")
    return notes
