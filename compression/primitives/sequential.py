"""Block-by-block calibration, as GPTQ does it, for any model whose `model(**batch)` runs.

1. Find the repeated blocks: the `nn.ModuleList` of same-type modules holding the most quantizable
   weights (`encoder.layer`, `model.layers`, ...). One float forward per batch (`capture.calibrate` with
   a `BlockArgs` recorder, or a pass the caller already ran) records every block's call arguments;
   block 0's hidden states are kept, the other blocks' are rebuilt as we go. If the blocks do not chain
   (block i's output is not block i+1's input) the whole model is one block.
2. Inside a block, layers are quantized in stages of layers that read the same input tensor (q/k/v,
   gate/up, a conv and its shortcut), in execution order. Each stage's Hessians come from a forward of
   the block with every earlier stage already quantized ("true sequential"); the forward stops early
   once the stage's layers have all fired.
3. The next block is fed the outputs of the already-quantized block. Layers outside the blocks (and
   all layers of a model without blocks, e.g. a CNN) are handled the same way with the whole model as
   the block and the calibration batches as its inputs.
Peak memory: the model, one block's inputs and outputs for all batches (plus its float outputs when a
block refinement is requested), and the Hessians of one stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compression.primitives.capture import (
    BlockArgs,
    BlockInputs,
    Hessians,
    Stages,
    block_output,
    calibrate,
    join_hidden,
    split_hidden,
    token_mask,
)
from compression.primitives.layers import find_layers, set_weight_matrix
from compression.primitives.quant import dequantize_layer
from compression.types import Batches, QuantizedLayer

QuantizeLayerFn = Callable[[str, nn.Module, torch.Tensor], QuantizedLayer]
"""(layer name, module, Hessian [groups, d, d]) -> the quantized layer."""


@dataclass
class BlockContext:
    """What a block refinement gets: the block, its inputs, its float outputs, its quantized layers."""

    block: nn.Module
    prefix: str
    inputs: BlockInputs
    float_outputs: list[torch.Tensor]
    layers: dict[str, tuple[nn.Module, QuantizedLayer]]  # full name -> (module, layer)
    done_prefixes: tuple[str, ...] = ()  # submodules (local names) already refined as blocks of their own

    def local_name(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name


RefineBlockFn = Callable[[BlockContext], dict[str, QuantizedLayer]]


@dataclass
class BlockCapture:
    """The repeated blocks (their ModuleList's name, None when the model has none) and, when they chain,
    every block's float inputs per batch (from `capture.BlockArgs`)."""

    name: str | None
    inputs: list[BlockInputs] | None

    def how(self) -> str:
        if self.name is None:
            return "whole model as one block"
        if self.inputs is None:
            return f"whole model as one block ({self.name} do not chain)"
        return f"{len(self.inputs)} blocks under '{self.name}'"


class _StopForward(Exception):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of >= 2 same-type modules that holds the most quantizable weights, with its name."""
    best: tuple[str, nn.ModuleList] | None = None
    best_weights = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        weights = sum(layer.weight.numel() for layer in find_layers(module).values())
        if weights > best_weights:
            best, best_weights = (name, module), weights
    return best


def batches_on(calib: Batches, device: torch.device) -> list[dict[str, Any]]:
    return [
        {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        for batch in calib
    ]


def whole_model_inputs(batches: list[dict[str, Any]]) -> BlockInputs:
    return BlockInputs([() for _ in batches], list(batches), [token_mask(batch) for batch in batches])


def block_args_recorder(model: nn.Module) -> tuple[str, BlockArgs] | None:
    """The recorder of the model's repeated blocks' call arguments, with their name (None: no blocks)."""
    found = find_blocks(model)
    return None if found is None else (found[0], BlockArgs(found[1]))


def capture_blocks(model: nn.Module, batches: list[dict[str, Any]]) -> BlockCapture:
    """One calibration pass recording the blocks' inputs (no pass when the model has no blocks)."""
    found = block_args_recorder(model)
    if found is None:
        return BlockCapture(None, None)
    calibrate(model, batches, [found[1]])
    return BlockCapture(found[0], found[1].inputs())


def with_hidden(inputs: BlockInputs, hidden: list[torch.Tensor]) -> BlockInputs:
    """`inputs` with the hidden states of each batch filled in."""
    joined = [join_hidden(a, k, h) for a, k, h in zip(inputs.args, inputs.kwargs, hidden, strict=True)]
    return BlockInputs([args for args, _ in joined], [kwargs for _, kwargs in joined], inputs.masks)


def call_block(block: nn.Module, inputs: BlockInputs, index: int) -> Any:
    return block(*inputs.args[index], **inputs.kwargs[index])


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's output hidden states per batch."""
    return [block_output(call_block(block, inputs, index)) for index in range(len(inputs.args))]


@torch.no_grad()
def discover_stages(
    block: nn.Module, inputs: BlockInputs, layers: dict[str, nn.Module]
) -> tuple[list[list[str]], set[str]]:
    """Groups of layers reading the same input tensor, in execution order (first batch), and the set of
    layers called more than once per forward (those disable the early stop)."""
    recorder = Stages(layers)
    handles = recorder.attach(block)
    try:
        call_block(block, inputs, 0)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.stages(), recorder.repeated


@torch.no_grad()
def collect_hessians(
    block: nn.Module,
    inputs: BlockInputs,
    layers: dict[str, nn.Module],
    early_stop: bool,
) -> dict[str, torch.Tensor]:
    """Hessians `[groups, d, d]` of `layers` over every batch, from forwards of `block` (a `Hessians`
    recorder; the forward stops once every layer fired when `early_stop`)."""
    recorder = Hessians(layers)
    fired: set[str] = set()

    def stop(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            fired.add(name)
            if early_stop and len(fired) == len(layers):
                raise _StopForward

        return hook

    handles = recorder.attach(block)  # registered first: each layer is accumulated before `stop` runs
    handles += [module.register_forward_pre_hook(stop(name)) for name, module in layers.items()]
    try:
        for index in range(len(inputs.args)):
            recorder.mask = inputs.masks[index]
            fired.clear()
            with contextlib.suppress(_StopForward):
                call_block(block, inputs, index)
    finally:
        for handle in handles:
            handle.remove()
    return {name: recorder.hessian(name) for name in layers}


def quantize_block(
    block: nn.Module,
    prefix: str,
    inputs: BlockInputs,
    layers: dict[str, nn.Module],
    quantize_layer: QuantizeLayerFn,
    refine: RefineBlockFn | None = None,
    done_prefixes: tuple[str, ...] = (),
) -> dict[str, QuantizedLayer]:
    """Quantize `layers` (full names -> modules inside `block`) stage by stage; the block's weights are
    overwritten with the dequantized values. Layers the block never calls are left out of the result."""
    if not layers:
        return {}
    float_outputs = run_block(block, inputs) if refine is not None else []
    stages, repeated = discover_stages(block, inputs, layers)
    done: dict[str, QuantizedLayer] = {}
    for stage in stages:
        stage_layers = {name: layers[name] for name in stage}
        hessians = collect_hessians(block, inputs, stage_layers, early_stop=not (repeated & set(stage)))
        for name in stage:
            done[name] = quantize_layer(name, layers[name], hessians.pop(name))
            _write_dequantized(layers[name], done[name])
    if refine is not None and done:
        quantized = {name: (layers[name], layer) for name, layer in done.items()}
        context = BlockContext(block, prefix, inputs, float_outputs, quantized, done_prefixes)
        done.update(refine(context))
        for name, layer in done.items():
            _write_dequantized(layers[name], layer)
    return done


def _write_dequantized(module: nn.Module, layer: QuantizedLayer) -> None:
    set_weight_matrix(module, dequantize_layer(layer, module.weight.device))


def quantize_sequentially(
    model: nn.Module,
    calib: Batches,
    layers: dict[str, nn.Module],
    quantize_layer: QuantizeLayerFn,
    refine: RefineBlockFn | None = None,
    captured: BlockCapture | None = None,
) -> tuple[dict[str, QuantizedLayer], str]:
    """Quantize `layers` of `model` in place, block by block; returns them and how blocks were found.
    `captured`: the blocks' float inputs on `calib` from an earlier pass of the float model (it is left
    intact); without it one calibration pass records them (`capture_blocks`)."""
    batches = batches_on(calib, next(model.parameters()).device)
    owned = captured is None
    captured = capture_blocks(model, batches) if captured is None else captured
    if captured.name is None or captured.inputs is None:
        done = quantize_block(model, "", whole_model_inputs(batches), layers, quantize_layer, refine)
        return done, captured.how()
    pending = captured.inputs if owned else list(captured.inputs)  # an owned list is freed block by block
    blocks = model.get_submodule(captured.name)
    first = pending[0]
    hidden = [split_hidden(a, k)[0] for a, k in zip(first.args, first.kwargs, strict=True)]
    done: dict[str, QuantizedLayer] = {}
    rest = dict(layers)
    for index, block in enumerate(blocks):
        prefix = f"{captured.name}.{index}" if captured.name else str(index)
        inside = {name: rest.pop(name) for name in list(rest) if name.startswith(prefix + ".")}
        inputs = with_hidden(pending[index], hidden)
        done.update(quantize_block(block, prefix, inputs, inside, quantize_layer, refine))
        hidden = run_block(block, inputs)
        pending[index] = inputs = BlockInputs()  # free this block's arguments
    if rest:
        inputs = whole_model_inputs(batches)
        done.update(quantize_block(model, "", inputs, rest, quantize_layer, refine, (captured.name + ".",)))
    return done, captured.how()
