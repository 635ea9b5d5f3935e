"""mixed_precision, candidate weights: every (layer, width) quantized once with the configured quantizer
(RTN, or GPTQ / decoupleQ's layer-wise stage on the float-model Hessians of the one calibration pass,
`mixed_precision_calibration`), and a copy of the model with each layer at its allocated width."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn

from compression.configs import MixedPrecisionConfig
from compression.methods.mixed_precision_costs import FLOAT_BITS
from compression.methods.quant_decoupleq import decoupleq_quantize
from compression.methods.quant_gptq import gptq_quantize
from compression.methods.quant_rtn import rtn_quantize
from compression.primitives.capture import Hessians
from compression.primitives.layers import get_weight_matrix, set_weight_matrix
from compression.primitives.sequential import BlockCapture, quantize_sequentially
from compression.primitives.weight_quant import MatrixQuantizer, quantize_module
from compression.types import Batches, QuantizedLayer


def matrix_quantizer(config: MixedPrecisionConfig, bits: int) -> MatrixQuantizer:
    """(W, H) -> (codes, S, Z) at `bits` with the configured quantizer (library defaults otherwise)."""
    group, sym = config.group_size, config.zero_point

    def quantize(weight: torch.Tensor, hessian: torch.Tensor | None) -> tuple:
        if config.quantizer == "rtn":
            return rtn_quantize(weight, bits, group, sym)
        assert hessian is not None, f"{config.quantizer} needs a Hessian"
        if config.quantizer == "gptq":
            return gptq_quantize(weight, hessian, bits, group, sym)
        return decoupleq_quantize(weight, hessian, bits, group, sym)

    return quantize


class CandidateWeights:
    """Each (layer, bits) quantized at most once with the configured quantizer, then reused. GPTQ and
    decoupleQ use the layer Hessians recorded by the calibration pass (`hessians`; None for RTN)."""

    def __init__(self, layers: dict[str, nn.Module], hessians: Hessians | None, config: MixedPrecisionConfig):
        self.layers, self.hessians, self.config = layers, hessians, config
        self.done: dict[tuple[str, int], QuantizedLayer] = {}

    def _hessian(self, name: str) -> torch.Tensor | None:
        return None if self.config.quantizer == "rtn" or self.hessians is None else self.hessians.hessian(name)

    def layer(self, name: str, bits: int) -> QuantizedLayer:
        if (name, bits) not in self.done:
            settings = SimpleNamespace(bits=bits, group_size=self.config.group_size)
            quantizer = matrix_quantizer(self.config, bits)
            self.done[name, bits] = quantize_module(name, self.layers[name], quantizer, self._hessian(name), settings)
        return self.done[name, bits]

    def matrix(self, name: str, bits: int) -> torch.Tensor:
        rows = get_weight_matrix(self.layers[name]).shape[0]
        return self.layer(name, bits).dequantize().reshape(rows, -1)


def quantize_at(
    model: nn.Module,
    bits: dict[str, int],
    weights: CandidateWeights,
    calib: Batches,
    config: MixedPrecisionConfig,
    blocks: BlockCapture,
) -> tuple[nn.Module, dict[str, QuantizedLayer]]:
    """A copy of the float `model` with each layer at its allocated width (16 = left float). GPTQ /
    decoupleQ re-run block by block from `blocks`, the float blocks' inputs recorded on `calib` by the
    calibration pass; their Hessians are then taken on the quantized earlier blocks (true sequential)."""
    work = copy.deepcopy(model)
    modules = dict(work.named_modules())
    chosen = {name: modules[name] for name, b in bits.items() if b < FLOAT_BITS}
    if config.quantizer == "rtn":
        done = {name: weights.layer(name, bits[name]) for name in chosen}
        for name, layer in done.items():
            set_weight_matrix(chosen[name], layer.dequantize().reshape(get_weight_matrix(chosen[name]).shape))
        return work, done

    def quantize_layer(name: str, module: nn.Module, hessian: torch.Tensor) -> QuantizedLayer:
        settings = SimpleNamespace(bits=bits[name], group_size=config.group_size)
        return quantize_module(name, module, matrix_quantizer(config, bits[name]), hessian, settings)

    with torch.no_grad():
        done, _ = quantize_sequentially(work, calib, chosen, quantize_layer, captured=blocks)
    return work, done
