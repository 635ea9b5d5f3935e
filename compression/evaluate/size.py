"""Model size, effective bits per weight (nominal vs actual storage) and a FLOPs estimate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from compression.primitives.layers import find_layers
from compression.primitives.macs import batch_rows, count_macs, counted_layers
from compression.types import CompressionResult


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _scale_bits(result: CompressionResult, name: str) -> int:
    layer = result.quantized[name]
    per_group = 32 if bool((layer.zeros == 0).all()) else 64  # fp32 S (+ fp32 Z when asymmetric), as shipped
    return layer.scales.numel() * per_group


def bits_per_weight(result: CompressionResult) -> dict[str, Any]:
    """Nominal (the codes' bit width) vs actual (codes + fp32 scales/zeros) bits per quantized weight,
    and the average over ALL weights of the quantizable layers, float layers counted at 32 bits."""
    quant_weights = sum(q.codes.numel() for q in result.quantized.values())
    code_bits = sum(q.codes.numel() * q.bits for q in result.quantized.values())
    scale_bits = sum(_scale_bits(result, name) for name in result.quantized)
    float_weights = 0
    for name, module in find_layers(result.model).items():
        if name not in result.quantized:
            float_weights += module.weight.numel()
    total = quant_weights + float_weights
    return {
        "quantized_weights": quant_weights,
        "float_weights": float_weights,
        "nominal_bits": code_bits / quant_weights if quant_weights else None,
        "actual_bits": (code_bits + scale_bits) / quant_weights if quant_weights else None,
        "all_weights_bits": (code_bits + scale_bits + 32 * float_weights) / total if total else None,
    }


def model_size(model: nn.Module, path: Path | None = None, result: CompressionResult | None = None) -> dict[str, Any]:
    """{params, float_bytes (fp32 state), file_bytes (when `path`), bits (when `result`)}."""
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    report: dict[str, Any] = {"params": param_count(model), "float_bytes": float_bytes}
    if path is not None:
        path = Path(path)
        extra = sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
        report["file_bytes"] = path.stat().st_size + extra
    if result is not None:
        report["bits"] = bits_per_weight(result)
    return report


def estimate_flops(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Multiply-accumulate count of Conv and Linear layers for one forward pass of `batch` (x2 = FLOPs);
    None for a model without torch layers to count (a graph run by ONNX Runtime)."""
    if not counted_layers(model):
        return {"macs": None, "flops": None, "per_sample_flops": None, "layers": {}}
    macs = {name: n for name, n in count_macs(model.eval(), batch).items() if n}
    total = sum(macs.values())
    return {"macs": total, "flops": 2 * total, "per_sample_flops": 2 * total / batch_rows(batch), "layers": macs}
