"""One calibration pass: the model runs once per calibration batch with recorders attached.

A `Recorder` is forward hooks plus per-batch bookkeeping; `calibrate(model, batches, recorders)` runs the
pass and every recorder reads what its consumer needs from the same activations:
- `BlockArgs`: each repeated block's call arguments (hidden states kept for block 0 only), checked to
  chain output -> input: GPTQ / decoupleQ's block-by-block quantization (`sequential`), mixed precision.
- `BlockOutputs`: float outputs of a few evenly spaced blocks within a byte budget: the sensitivity
  pass replays them instead of recomputing the float blocks before the measured layer.
- `Outputs`: the model's primary output per batch (the float reference of every fidelity measurement).
- `Hessians`: per-layer H = mean x xᵀ (`hessian.HessianAccumulator`): GPTQ / decoupleQ candidates of
  mixed precision; `sequential.collect_hessians` uses the same recorder on block forwards.
- `ChannelStats`: per-channel mean x² of the input and mean |y| of the output: pruning's activation
  importance.
- `Macs`: multiply-accumulates per sample (`macs.call_macs`, the one MAC counter).
- `Stages`: layers that read the same input tensor, in execution order, on the first batch.
- `LayerOutputs`: each named layer's output on the current batch (the per-layer diagnosis runs the
  original and the compressed model batch by batch with one each).
Mixed precision attaches all of them to one pass of the float model; GPTQ / decoupleQ attach `BlockArgs`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from compression.primitives.hessian import HessianAccumulator
from compression.primitives.macs import batch_rows, call_macs
from compression.types import primary_output

_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


class Recorder:
    """Hooks attached for the pass, told when each batch begins and ends."""

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return []

    def begin(self, index: int, batch: dict[str, Any]) -> None:
        """Batch `index` is about to run."""

    def end(self, index: int, output: Any) -> None:
        """Batch `index` ran and returned `output`."""


@torch.no_grad()
def calibrate(model: nn.Module, batches: Sequence[dict[str, Any]], recorders: Sequence[Recorder]) -> None:
    """Run `model(**batch)` once per batch with every recorder's hooks attached."""
    handles = [handle for recorder in recorders for handle in recorder.attach(model)]
    try:
        for index, batch in enumerate(batches):
            for recorder in recorders:
                recorder.begin(index, batch)
            output = model(**batch)
            for recorder in recorders:
                recorder.end(index, output)
    finally:
        for handle in handles:
            handle.remove()


def token_mask(batch: dict[str, Any]) -> torch.Tensor | None:
    """The batch's 2-D attention mask (padding tokens are dropped from Hessians), or None."""
    mask = batch.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _active(index: int, batches: Collection[int] | None) -> bool:
    return batches is None or index in batches


class Outputs(Recorder):
    """The model's primary output per batch (float32), for the batches in `batches` (default all)."""

    def __init__(self, batches: Collection[int] | None = None) -> None:
        self.batches, self.outputs = batches, []

    def end(self, index: int, output: Any) -> None:
        if _active(index, self.batches):
            self.outputs.append(primary_output(output).float())


class Hessians(Recorder):
    """Per-layer Hessian accumulators fed on the batches in `batches` (default all), padding dropped."""

    def __init__(self, layers: dict[str, nn.Module], batches: Collection[int] | None = None) -> None:
        self.layers, self.batches = layers, batches
        self.accumulators = {name: HessianAccumulator(name) for name in layers}
        self.mask: torch.Tensor | None = None
        self.on = True

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return [module.register_forward_pre_hook(partial(self._hook, name)) for name, module in self.layers.items()]

    def _hook(self, name: str, module: nn.Module, args: tuple) -> None:
        if self.on:
            self.accumulators[name].add(module, args[0], self.mask)

    def begin(self, index: int, batch: dict[str, Any]) -> None:
        self.on, self.mask = _active(index, self.batches), token_mask(batch)

    def hessian(self, name: str) -> torch.Tensor:
        """`[groups, d, d]` float64; raises CompressionError when the layer never saw a sample."""
        return self.accumulators[name].hessian()


def _channel_last(tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """[samples, channels] view: channels are dim 1 for conv/BN maps, the last dim otherwise."""
    channel_first = isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
    if channel_first and tensor.dim() > 2:
        tensor = tensor.movedim(1, -1)
    return tensor.reshape(-1, tensor.shape[-1]).double()


class ChannelStats(Recorder):
    """(mean x_c² of the input, mean |y_c| of the output) per channel of every Linear / Conv / norm layer."""

    def __init__(self) -> None:
        self.sums: dict[nn.Module, list[Any]] = {}

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, WEIGHTED + NORMS)]

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x, y = _channel_last(args[0], module), _channel_last(output, module)
        total = self.sums.setdefault(module, [0.0, 0, 0.0, 0])
        total[0], total[1] = total[0] + x.pow(2).sum(0), total[1] + x.shape[0]
        total[2], total[3] = total[2] + y.abs().sum(0), total[3] + y.shape[0]

    def stats(self) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        return {module: (t[0] / t[1], t[2] / t[3]) for module, t in self.sums.items()}


class Macs(Recorder):
    """Multiply-accumulates per sample of each layer over the pass (0: never called)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers, self.total, self.rows = layers, dict.fromkeys(layers, 0), 0

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return [module.register_forward_hook(partial(self._hook, name)) for name, module in self.layers.items()]

    def _hook(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.total[name] += call_macs(module, output) or 0

    def begin(self, index: int, batch: dict[str, Any]) -> None:
        self.rows += batch_rows(batch)

    def per_sample(self) -> dict[str, float]:
        return {name: value / max(1, self.rows) for name, value in self.total.items()}


class Stages(Recorder):
    """Groups of layers reading the same input tensor, in execution order, on the first batch, and the
    layers called more than once in it (q/k/v, gate/up, a conv and its 1x1 shortcut share a stage)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers, self.on = layers, True
        self.seen: dict[str, tuple] = {}
        self.repeated: set[str] = set()
        self.alive: list[torch.Tensor] = []  # keeps inputs alive so no two tensors share an address

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return [module.register_forward_pre_hook(partial(self._hook, name)) for name, module in self.layers.items()]

    def _hook(self, name: str, module: nn.Module, args: tuple) -> None:
        if not self.on:
            return
        if name in self.seen:
            self.repeated.add(name)
            return
        self.alive.append(args[0])
        self.seen[name] = (args[0].data_ptr(), tuple(args[0].shape), args[0].stride())

    def begin(self, index: int, batch: dict[str, Any]) -> None:
        self.on = index == 0

    def end(self, index: int, output: Any) -> None:
        self.alive.clear()

    def stages(self) -> list[list[str]]:
        self.alive.clear()
        grouped: dict[tuple, list[str]] = {}
        for name, key in self.seen.items():
            grouped.setdefault(key, []).append(name)
        return list(grouped.values())


class LayerOutputs(Recorder):
    """Each named layer's output on the current batch (the first tensor of a tuple), float32."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.outputs = names, {}

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        modules = dict(model.named_modules())
        return [modules[n].register_forward_hook(partial(self._hook, n)) for n in self.names if n in modules]

    def _hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        if isinstance(tensor, torch.Tensor):
            self.outputs[name] = tensor.detach().float()

    def begin(self, index: int, batch: dict[str, Any]) -> None:
        self.outputs.clear()


@dataclass
class BlockInputs:
    """Per calibration batch: the block's positional and keyword arguments and the token mask."""

    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"block returned {type(output).__name__}, expected a tensor")
    return output


def split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, args with a hole, kwargs with a hole): hidden is args[0] or kwargs['hidden_states']."""
    if args:
        return args[0], (None, *args[1:]), kwargs
    return kwargs["hidden_states"], args, {**kwargs, "hidden_states": None}


def join_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor | None) -> tuple[tuple, dict]:
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


class BlockArgs(Recorder):
    """Every block's call arguments per batch; hidden states are kept for block 0 only (the others are
    rebuilt block by block), so the pass holds one block's activations."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        self.blocks = blocks
        self.captured = [BlockInputs() for _ in blocks]
        self.masks: list[torch.Tensor | None] = []
        self.probe: dict[str, torch.Tensor] = {}

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return [
            block.register_forward_pre_hook(partial(self._hook, index), with_kwargs=True)
            for index, block in enumerate(self.blocks)
        ]

    def _hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, rest_args, rest_kwargs = split_hidden(*_sanitize(args, kwargs))
        if index == 1 and not self.captured[1].args:
            self.probe["hidden"] = hidden
        joined_args, joined_kwargs = join_hidden(rest_args, rest_kwargs, hidden if index == 0 else None)
        self.captured[index].args.append(joined_args)
        self.captured[index].kwargs.append(joined_kwargs)

    def begin(self, index: int, batch: dict[str, Any]) -> None:
        self.masks.append(token_mask(batch))

    @torch.no_grad()
    def inputs(self) -> list[BlockInputs] | None:
        """Per block, its inputs; None when the blocks are not called exactly once per forward or do not
        chain output -> input (block 0 rerun on its arguments must give block 1's first input)."""
        if any(len(inputs.args) != len(self.masks) for inputs in self.captured):
            return None
        for inputs in self.captured:
            inputs.masks = self.masks
        first = block_output(self.blocks[0](*self.captured[0].args[0], **self.captured[0].kwargs[0]))
        expected = self.probe["hidden"]
        if first.shape != expected.shape or not torch.allclose(first, expected, rtol=1e-4, atol=1e-5):
            return None
        return self.captured


def tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def _input_size(batch: dict[str, Any]) -> int:
    return next((v.numel() for v in batch.values() if isinstance(v, torch.Tensor)), 1)


class BlockOutputs(Recorder):
    """Raw outputs of evenly spaced blocks among 0..L-2 on the batches `start`.. `start + len(batches) - 1`
    of the pass, as many blocks as fit in `budget_bytes`. The total is estimated when block 0 first
    returns: its output's bytes times the recorded batches' input sizes relative to the first one."""

    def __init__(self, blocks: nn.ModuleList, batches: Sequence[dict[str, Any]], start: int, budget_bytes: int) -> None:
        self.blocks, self.sizes, self.budget = blocks, [_input_size(b) for b in batches], budget_bytes
        self.recorded = range(start, start + len(batches))
        self.calls = [0] * len(blocks)
        self.keep: dict[int, list[Any]] | None = None
        self.on = False

    def attach(self, model: nn.Module) -> list[RemovableHandle]:
        return [block.register_forward_hook(partial(self._hook, i)) for i, block in enumerate(self.blocks)]

    def begin(self, index: int, batch: dict[str, Any]) -> None:
        self.on = index in self.recorded

    def _hook(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.on:
            return
        self.calls[index] += 1
        if self.keep is None and index == 0:
            total = tensor_bytes(output) * sum(self.sizes) / max(1, self.sizes[0])
            count = min(len(self.blocks) - 1, int(self.budget // max(1.0, total)))
            chosen = np.linspace(0, len(self.blocks) - 2, count).round().astype(int).tolist() if count >= 1 else []
            self.keep = {int(k): [] for k in chosen}
        if self.keep is not None and index in self.keep:
            self.keep[index].append(output)

    def records(self) -> dict[int, list[Any]]:
        """Block index -> its output per recorded batch; empty when some block did not run exactly once
        per batch (no replay then) or no block fits the budget."""
        if any(calls != len(self.recorded) for calls in self.calls) or not self.keep:
            return {}
        return self.keep
