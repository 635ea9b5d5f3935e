"""Importance criteria for structured pruning: Torch-Pruning importance objects with a name and notes.

Every criterion is a `torch_pruning.importance.Importance`: called on a torch_pruning `Group`, it returns
one score per unit of the group's root layer (higher = more important = kept), so `MetaPruner` ranks
with it directly. `prepare(model, calib)` runs before a pruning step's scoring (gradients, activation
statistics) and `release(model)` after it.

- `MagnitudeImportance(p)`: torch_pruning's group magnitude, Σ|w|^p of every coupled slice (L1: p=1,
  L2: p=2), mean over the group's layers, normalized to mean 1.
- `BNScaleImportance`: |γ| of the group's BatchNorm layers (Network Slimming); groups without
  BatchNorm fall back to L1.
- `TaylorImportance`: torch_pruning's first-order Taylor |w·∂L/∂w|, gradients of the task loss
  (cross-entropy on the calibration labels) accumulated over calibration batches. Needs labels:
  without them it uses the activation criterion and says so.
- `ActivationImportance` (no torch_pruning equivalent): for layers reading the units,
  ‖X_c‖₂·‖W[:, c]‖₂ (the unit's contribution to the next layer, as in Wanda); for BatchNorm/LayerNorm
  outputs, mean |y_c|; for a layer nobody in the group reads, mean |output|. Each layer's scores are
  normalized to mean 1 before averaging, so layers of different scale count equally.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as tp_function

from compression.primitives.depgraph import TP_FUNCTIONS, ChannelGroup
from compression.types import Batches, primary_output

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
_IN_FUNCTIONS = (tp_function.prune_linear_in_channels, tp_function.prune_conv_in_channels)


class _Criterion:
    """What modelpress adds to a torch_pruning importance: a config name, report notes, set-up and tear-down."""

    name: str = ""

    def prepare(self, model: nn.Module, calib: Batches | None) -> None:
        """Collect what scoring needs before a pruning step (nothing for weight-only criteria)."""

    def release(self, model: nn.Module) -> None:
        """Drop what `prepare` collected."""

    @property
    def notes(self) -> list[str]:
        return []


class _LayersWeighedEqually:
    """Scales each layer's scores to mean 1 before torch_pruning's group reduction: a residual group couples
    many layers, and without this the layers with the largest weights alone decide what goes."""

    def _reduce(self, group_imp: list[torch.Tensor], group_idxs: list[list[int]]) -> Any:
        scaled = [imp / imp.mean() if imp.numel() and imp.mean() > 0 else imp for imp in group_imp]
        return super()._reduce(scaled, group_idxs)  # type: ignore[misc]


class MagnitudeImportance(_Criterion, _LayersWeighedEqually, tp.importance.GroupMagnitudeImportance):
    def __init__(self, p: int = 1) -> None:
        super().__init__(p=p)
        self.name = f"l{p}"


class BNScaleImportance(_Criterion, _LayersWeighedEqually, tp.importance.BNScaleImportance):
    name = "bn_scale"

    def __init__(self) -> None:
        super().__init__()
        self.fallback = MagnitudeImportance(1)
        self.without_bn: set[int] = set()

    def __call__(self, group: Any) -> torch.Tensor | None:
        scores = super().__call__(group)
        if scores is not None:
            return scores
        self.without_bn.add(id(group[0].dep.target.module))
        return self.fallback(group)

    @property
    def notes(self) -> list[str]:
        count = len(self.without_bn)
        return [f"bn_scale: {count} group(s) without BatchNorm were scored by L1 magnitude"] if count else []


class TaylorImportance(_Criterion, _LayersWeighedEqually, tp.importance.GroupTaylorImportance):
    name = "taylor"

    def __init__(self, max_batches: int = 16) -> None:
        super().__init__()
        self.max_batches = max_batches
        self.fallback: ActivationImportance | None = None
        self.saved: list[tuple[nn.Parameter, bool]] = []

    def prepare(self, model: nn.Module, calib: Batches | None) -> None:
        if calib is None or not calib.labels:
            self.fallback = self.fallback or ActivationImportance(self.max_batches)
            self.fallback.prepare(model, calib)
            return
        self.saved = [(p, p.requires_grad) for p in model.parameters()]
        for param, _ in self.saved:
            param.requires_grad_(True)
            param.grad = None
        model.eval()
        with torch.enable_grad():
            for batch, labels in list(zip(calib.inputs, calib.labels, strict=False))[: self.max_batches]:
                logits = primary_output(model(**batch))
                nn.functional.cross_entropy(logits.float().flatten(0, -2), labels.flatten().long()).backward()

    def release(self, model: nn.Module) -> None:
        for param, flag in self.saved:
            param.grad = None
            param.requires_grad_(flag)
        self.saved = []

    def __call__(self, group: Any) -> torch.Tensor | None:
        return self.fallback(group) if self.fallback else super().__call__(group)

    @property
    def notes(self) -> list[str]:
        if self.fallback is None:
            return []
        return ["taylor: calibration batches have no labels; used the activation criterion instead"]


class ActivationImportance(_Criterion, tp.importance.Importance):
    name = "activation"

    def __init__(self, max_batches: int = 16) -> None:
        self.max_batches = max_batches
        self.stats: dict[nn.Module, _ChannelStats] = {}
        self.fell_back = False

    def prepare(self, model: nn.Module, calib: Batches | None) -> None:
        if calib is None or len(calib) == 0:
            self.fell_back = True
            return
        self.stats = _activation_stats(model, calib, self.max_batches)

    def release(self, model: nn.Module) -> None:
        self.stats = {}

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        if self.fell_back:
            return MagnitudeImportance(2)(group)
        has_reader = any(dep.handler in _IN_FUNCTIONS for dep, _ in group)
        parts = []
        for item in group:
            scores = self._member_scores(item.dep.target.module, item.dep.handler, item.idxs, has_reader)
            if scores is not None:
                parts.append((scores, item.root_idxs))
        return _mean_of_normalized(_unit_count(group), parts) if parts else None

    def _member_scores(self, module: Any, fn: Any, idxs: list[int], has_reader: bool) -> torch.Tensor | None:
        record = self.stats.get(module) if isinstance(module, nn.Module) else None
        if record is None:
            return None
        index = torch.as_tensor(idxs, dtype=torch.long)
        weighted = isinstance(module, _WEIGHTED)
        if fn in _IN_FUNCTIONS:
            if getattr(module, "groups", 1) > 1:
                return None
            rms = (record.input_sq / max(record.count_in, 1)).sqrt()
            column = module.weight.detach().double().pow(2).transpose(0, 1).flatten(1).sum(1).sqrt()
            return (rms * column)[index]
        if isinstance(module, _NORMS) or (weighted and not has_reader):
            return (record.output_abs / max(record.count_out, 1))[index]
        return None

    @property
    def notes(self) -> list[str]:
        return ["activation: no calibration data; used L2 magnitude instead"] if self.fell_back else []


class _ChannelStats:
    def __init__(self) -> None:
        self.input_sq: torch.Tensor | float = 0.0  # Σ x_c² over samples, per input channel
        self.output_abs: torch.Tensor | float = 0.0  # Σ |y_c|, per output channel
        self.count_in = 0
        self.count_out = 0

    def add(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = _channel_last(x, module), _channel_last(y, module)
        self.input_sq = self.input_sq + x.pow(2).sum(0)
        self.output_abs = self.output_abs + y.abs().sum(0)
        self.count_in += x.shape[0]
        self.count_out += y.shape[0]


def _channel_last(tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """[samples, channels] view: channels are dim 1 for conv/BN maps, the last dim otherwise."""
    channel_first = isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
    if channel_first and tensor.dim() > 2:
        tensor = tensor.movedim(1, -1)
    return tensor.reshape(-1, tensor.shape[-1]).double()


@torch.no_grad()
def _activation_stats(model: nn.Module, calib: Batches, max_batches: int) -> dict[nn.Module, _ChannelStats]:
    stats = {m: _ChannelStats() for m in model.modules() if isinstance(m, _WEIGHTED + _NORMS)}
    handles = [m.register_forward_hook(lambda mod, args, out: stats[mod].add(mod, args[0], out)) for m in stats]
    model.eval()
    try:
        for batch in calib.inputs[:max_batches]:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _unit_count(group: Any) -> int:
    return 1 + max(int(r) for item in group for r in item.root_idxs if r is not None)


def _mean_of_normalized(size: int, parts: list[tuple[torch.Tensor, list[int]]]) -> torch.Tensor:
    """Per unit: the mean over layers of that layer's unit sums, each layer normalized to mean 1."""
    total = torch.zeros(size, dtype=torch.float64)
    covered = torch.zeros(size, dtype=torch.float64)
    for scores, roots in parts:
        units = torch.as_tensor(roots, dtype=torch.long)
        sums = torch.zeros(size, dtype=torch.float64).index_add_(0, units, scores.double())
        present = torch.zeros(size, dtype=torch.float64).index_fill_(0, units, 1.0)
        mean = sums.sum() / present.sum()
        if mean > 0:
            total += sums / mean
            covered += present
    return (total / covered.clamp_min(1.0)).float()


def as_tp_group(model: nn.Module, group: ChannelGroup) -> Any:
    """A torch_pruning `Group` over the members of one of our groups (for the transformer layouts)."""
    tp_group = tp.dependency.Group()
    for member in group.members:
        node = tp.dependency.Node(model.get_submodule(member.module), None, member.module)
        fn = TP_FUNCTIONS[member.fn]
        tp_group.add_dep(tp.dependency.Dependency(fn, fn, source=node, target=node), list(member.idxs))
        tp_group[len(tp_group) - 1].root_idxs = list(member.units)
    return tp_group


def score_groups(criterion: Callable[[Any], torch.Tensor | None], model: nn.Module, groups: Sequence[ChannelGroup]):
    """One score per unit of every group, each group's scores normalized to mean 1 (uniform when unscored)."""
    scores = []
    for group in groups:
        raw = criterion(group.tp if group.tp is not None else as_tp_group(model, group))
        unit = torch.ones(group.size) if raw is None else raw.detach().float().cpu()[: group.size]
        mean = unit.mean()
        scores.append(unit / mean if mean > 0 else torch.ones(group.size))
    return scores


Importance = MagnitudeImportance | BNScaleImportance | TaylorImportance | ActivationImportance


def make_importance(name: str) -> Importance:
    """The criterion for a config value: "l1" | "l2" | "bn_scale" | "taylor" | "activation"."""
    factories: dict[str, Callable[[], Importance]] = {
        "l1": lambda: MagnitudeImportance(1),
        "l2": lambda: MagnitudeImportance(2),
        "bn_scale": BNScaleImportance,
        "taylor": TaylorImportance,
        "activation": ActivationImportance,
    }
    return factories[name]()
