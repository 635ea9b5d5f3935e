"""Block-by-block calibration, as GPTQ does it, for any model whose `model(**batch)` runs.

1. Find the repeated blocks: the `nn.ModuleList` of same-type modules holding the most quantizable
   weights (`encoder.layer`, `model.layers`, ...). One float forward per batch records every block's
   call arguments; block 0's hidden states are kept, the other blocks' are rebuilt as we go. If the
   blocks do not chain (block i's output is not block i+1's input) the whole model is one block.
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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compression.primitives.hessian import HessianAccumulator
from compression.primitives.layers import find_layers, set_weight_matrix
from compression.primitives.quant import dequantize_layer
from compression.types import Batches, QuantizedLayer

QuantizeLayerFn = Callable[[str, nn.Module, torch.Tensor], QuantizedLayer]
"""(layer name, module, Hessian [groups, d, d]) -> the quantized layer."""

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


@dataclass
class BlockInputs:
    """Per calibration batch: the block's positional and keyword arguments and the token mask."""

    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)


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


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"block returned {type(output).__name__}, expected a tensor")
    return output


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, args with a hole, kwargs with a hole): hidden is args[0] or kwargs['hidden_states']."""
    if args:
        return args[0], (None, *args[1:]), kwargs
    return kwargs["hidden_states"], args, {**kwargs, "hidden_states": None}


def _join_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")


def _sanitize(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Drop KV caches, positional or keyword (re-running a block must not append to them)."""
    clean_args = tuple(None if _is_cache(value) else value for value in args)
    clean = {k: (None if k in _CACHE_KWARGS or _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in clean:
        clean["use_cache"] = False
    return clean_args, clean


def _token_mask(batch: dict[str, Any]) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def batches_on(calib: Batches, device: torch.device) -> list[dict[str, Any]]:
    return [
        {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        for batch in calib
    ]


def whole_model_inputs(batches: list[dict[str, Any]]) -> BlockInputs:
    return BlockInputs([() for _ in batches], list(batches), [_token_mask(batch) for batch in batches])


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[dict[str, Any]]
) -> list[BlockInputs] | None:
    """Every block's call arguments per batch (hidden states kept for block 0 only), or None when the
    blocks are not called exactly once per forward or do not chain output -> input."""
    captured = [BlockInputs() for _ in blocks]
    probe: dict[str, torch.Tensor] = {}

    def make_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, rest_args, rest_kwargs = _split_hidden(*_sanitize(args, kwargs))
            if index == 1 and not captured[1].args:
                probe["hidden"] = hidden
            keep = hidden if index == 0 else None
            joined_args, joined_kwargs = _join_hidden(rest_args, rest_kwargs, keep)
            captured[index].args.append(joined_args)
            captured[index].kwargs.append(joined_kwargs)

        return hook

    handles = [block.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if any(len(inputs.args) != len(batches) for inputs in captured):
        return None
    for inputs in captured:
        inputs.masks = [_token_mask(batch) for batch in batches]
    first = block_output(blocks[0](*captured[0].args[0], **captured[0].kwargs[0]))
    expected = probe["hidden"]
    if first.shape != expected.shape or not torch.allclose(first, expected, rtol=1e-4, atol=1e-5):
        return None
    return captured


def with_hidden(inputs: BlockInputs, hidden: list[torch.Tensor]) -> BlockInputs:
    """`inputs` with the hidden states of each batch filled in."""
    joined = [_join_hidden(a, k, h) for a, k, h in zip(inputs.args, inputs.kwargs, hidden, strict=True)]
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
    seen: dict[str, tuple] = {}
    repeated: set[str] = set()
    alive: list[torch.Tensor] = []  # keeps inputs alive so no two tensors share an address

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if name in seen:
                repeated.add(name)
                return
            alive.append(args[0])
            seen[name] = (args[0].data_ptr(), tuple(args[0].shape), args[0].stride())

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in layers.items()]
    try:
        call_block(block, inputs, 0)
    finally:
        for handle in handles:
            handle.remove()
    stages: dict[tuple, list[str]] = {}
    for name, key in seen.items():
        stages.setdefault(key, []).append(name)
    return list(stages.values()), repeated


@torch.no_grad()
def collect_hessians(
    block: nn.Module,
    inputs: BlockInputs,
    layers: dict[str, nn.Module],
    early_stop: bool,
) -> dict[str, torch.Tensor]:
    """Hessians `[groups, d, d]` of `layers` over every batch, from forwards of `block`."""
    accumulators = {name: HessianAccumulator(name) for name in layers}
    state: dict[str, Any] = {"mask": None, "fired": set()}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            accumulators[name].add(module, args[0], state["mask"])
            state["fired"].add(name)
            if early_stop and len(state["fired"]) == len(layers):
                raise _StopForward

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in layers.items()]
    try:
        for index in range(len(inputs.args)):
            state["mask"], state["fired"] = inputs.masks[index], set()
            with contextlib.suppress(_StopForward):
                call_block(block, inputs, index)
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.hessian() for name, acc in accumulators.items()}


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
) -> tuple[dict[str, QuantizedLayer], str]:
    """Quantize `layers` of `model` in place, block by block; returns them and how blocks were found."""
    device = next(model.parameters()).device
    batches = batches_on(calib, device)
    found = find_blocks(model)
    captured = capture_block_inputs(model, found[1], batches) if found else None
    if found is None or captured is None:
        done = quantize_block(model, "", whole_model_inputs(batches), layers, quantize_layer, refine)
        return done, "whole model as one block" + ("" if found is None else f" ({found[0]} do not chain)")
    blocks_name, blocks = found
    first = captured[0]
    hidden = [_split_hidden(a, k)[0] for a, k in zip(first.args, first.kwargs, strict=True)]
    done: dict[str, QuantizedLayer] = {}
    rest = dict(layers)
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}" if blocks_name else str(index)
        inside = {name: rest.pop(name) for name in list(rest) if name.startswith(prefix + ".")}
        inputs = with_hidden(captured[index], hidden)
        done.update(quantize_block(block, prefix, inputs, inside, quantize_layer, refine))
        hidden = run_block(block, inputs)
        captured[index] = inputs = BlockInputs()  # free this block's arguments
    if rest:
        inputs = whole_model_inputs(batches)
        done.update(quantize_block(model, "", inputs, rest, quantize_layer, refine, (blocks_name + ".",)))
    return done, f"{len(blocks)} blocks under '{blocks_name}'"
