"""Importance criteria for structured pruning: Torch-Pruning importance objects plus a name and notes.

A criterion, called on a torch_pruning `Group`, returns one score per unit of the group's root layer
(higher = kept), so `MetaPruner` ranks with it directly; `prepare(model, calib)` collects what scoring
needs before a step, `release(model)` drops it. Each layer's scores are scaled to mean 1 before the
group reduction, so layers of different scale count equally.
- "l1"/"l2": torch_pruning's group magnitude Σ|w|^p; "bn_scale": its BatchNorm |γ| (Network Slimming),
  L1 for groups without BatchNorm; "taylor": its first-order |w·∂L/∂w| with gradients of the
  cross-entropy on the calibration labels (without labels: the activation criterion).
- "activation" (no torch_pruning equivalent): ‖X_c‖₂·‖W[:, c]‖₂ for layers reading the unit (its
  contribution to the next layer, as in Wanda), mean |y_c| for norm outputs and unread layers; the
  per-channel statistics come from one calibration pass (`capture.calibrate`, `ChannelStats`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as tp_function

from compression.primitives.capture import NORMS, WEIGHTED, ChannelStats, calibrate
from compression.primitives.depgraph import ChannelGroup
from compression.types import Batches, primary_output

_IN_FUNCTIONS = (tp_function.prune_linear_in_channels, tp_function.prune_conv_in_channels)
_Stats = tuple[torch.Tensor, torch.Tensor]


class Criterion:
    """What modelpress adds to a torch_pruning importance: a config name, report notes, set-up and tear-down."""

    name: str = ""

    def prepare(self, model: nn.Module, calib: Batches) -> None:
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


class MagnitudeImportance(Criterion, _LayersWeighedEqually, tp.importance.GroupMagnitudeImportance):
    def __init__(self, p: int = 1) -> None:
        super().__init__(p=p)
        self.name = f"l{p}"


class BNScaleImportance(Criterion, _LayersWeighedEqually, tp.importance.BNScaleImportance):
    name = "bn_scale"

    def __init__(self) -> None:
        super().__init__()
        self.without_bn: set[int] = set()

    def __call__(self, group: Any) -> torch.Tensor | None:
        scores = super().__call__(group)
        if scores is not None:
            return scores
        self.without_bn.add(id(group[0].dep.target.module))
        return MagnitudeImportance(1)(group)

    @property
    def notes(self) -> list[str]:
        count = len(self.without_bn)
        return [f"bn_scale: {count} group(s) without BatchNorm were scored by L1 magnitude"] if count else []


class TaylorImportance(Criterion, _LayersWeighedEqually, tp.importance.GroupTaylorImportance):
    name = "taylor"

    def __init__(self, max_batches: int = 16) -> None:
        super().__init__()
        self.max_batches = max_batches
        self.fallback: ActivationImportance | None = None
        self.saved: list[tuple[nn.Parameter, bool]] = []

    def prepare(self, model: nn.Module, calib: Batches) -> None:
        if not calib.labels:
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
        if self.fallback:
            self.fallback.release(model)
        for param, flag in self.saved:
            param.grad = None
            param.requires_grad_(flag)
        self.saved = []

    def __call__(self, group: Any) -> torch.Tensor | None:
        return self.fallback(group) if self.fallback else super().__call__(group)

    @property
    def notes(self) -> list[str]:
        note = "taylor: calibration batches have no labels; used the activation criterion instead"
        return [note] if self.fallback else []


class ActivationImportance(Criterion, tp.importance.Importance):
    name = "activation"

    def __init__(self, max_batches: int = 16) -> None:
        self.max_batches = max_batches
        self.stats: dict[nn.Module, _Stats] = {}

    def prepare(self, model: nn.Module, calib: Batches) -> None:
        self.stats = _activation_stats(model, calib, self.max_batches)

    def release(self, model: nn.Module) -> None:
        self.stats = {}

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        has_reader = any(dep.handler in _IN_FUNCTIONS for dep, _ in group)
        parts = [
            (scores, item.root_idxs)
            for item in group
            if (scores := self._member_scores(item.dep.target.module, item.dep.handler, item.idxs, has_reader))
            is not None
        ]
        return _mean_of_normalized(_unit_count(group), parts) if parts else None

    def _member_scores(self, module: Any, fn: Any, idxs: list[int], has_reader: bool) -> torch.Tensor | None:
        if not isinstance(module, nn.Module) or module not in self.stats:
            return None
        mean_square_in, mean_abs_out = self.stats[module]
        index = torch.as_tensor(idxs, dtype=torch.long)
        if fn in _IN_FUNCTIONS:
            if getattr(module, "groups", 1) > 1:
                return None
            column = module.weight.detach().double().pow(2).transpose(0, 1).flatten(1).sum(1).sqrt()
            return (mean_square_in.sqrt() * column)[index]
        if isinstance(module, NORMS) or (isinstance(module, WEIGHTED) and not has_reader):
            return mean_abs_out[index]
        return None


def _activation_stats(model: nn.Module, calib: Batches, max_batches: int) -> dict[nn.Module, _Stats]:
    """(mean x_c² of the input, mean |y_c| of the output) per channel of every weighted and norm layer."""
    recorder = ChannelStats()
    model.eval()
    calibrate(model, calib.inputs[:max_batches], [recorder])
    return recorder.stats()


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


def score_groups(criterion: Criterion, groups: Sequence[ChannelGroup]) -> list[torch.Tensor]:
    """One score per unit of every group, each group's scores normalized to mean 1 (uniform when unscored)."""
    scores = []
    for group in groups:
        raw = criterion(group.tp)
        unit = torch.ones(group.size) if raw is None else raw.detach().float().cpu()[: group.size]
        mean = unit.mean()
        scores.append(unit / mean if mean > 0 else torch.ones(group.size))
    return scores


def make_importance(name: str) -> Criterion:
    """The criterion for a config value: "l1" | "l2" | "bn_scale" | "taylor" | "activation"."""
    factories: dict[str, Callable[[], Criterion]] = {
        "l1": lambda: MagnitudeImportance(1),
        "l2": lambda: MagnitudeImportance(2),
        "bn_scale": BNScaleImportance,
        "taylor": TaylorImportance,
        "activation": ActivationImportance,
    }
    return factories[name]()
