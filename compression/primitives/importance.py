"""Importance criteria for structured pruning: small strategy objects that score every unit of a group.

Each criterion scores the elements of every group member (a module dimension), sums them per unit,
normalizes each member's scores to mean 1 and averages the members covering a unit, so that units of
different groups are comparable in a global ranking. Higher = more important = kept.

- `MagnitudeImportance(p)`: Σ|w|^p of the weight slice (L1: p=1, L2: p=2); BatchNorm/LayerNorm: |γ|^p.
- `BNScaleImportance`: |γ| of the BatchNorm layers in the group (Network Slimming); groups without
  BatchNorm fall back to L1.
- `TaylorImportance`: first-order Taylor |w·∂L/∂w| summed over the slice, gradients of the task loss
  (cross-entropy on the calibration labels) accumulated over calibration batches. BatchNorm γ and β are
  included (torch_pruning 1.6.1's Taylor skips BatchNorm). Needs labels: without them it falls back
  to the activation criterion and says so.
- `ActivationImportance`: for layers reading the units, ‖X_c‖₂·‖W[:, c]‖₂ (the unit's contribution to
  the next layer, as in Wanda); for BatchNorm/LayerNorm outputs, mean |y_c|; else mean |output|.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from compression.primitives.depgraph import ChannelGroup, Member
from compression.types import Batches, primary_output

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class Importance(Protocol):
    name: str
    notes: list[str]

    def __call__(self, model: nn.Module, groups: Sequence[ChannelGroup], calib: Batches | None) -> list[torch.Tensor]:
        """One score vector of length `group.size` per group."""
        ...


def slice_along(tensor: torch.Tensor, member: Member, module: nn.Module) -> torch.Tensor:
    """Rows of `tensor` (a weight-shaped tensor) for `member.idxs`, flattened: [len(idxs), -1]."""
    idxs = torch.as_tensor(member.idxs, dtype=torch.long)
    if member.dim == "out" or tensor.dim() == 1:
        if isinstance(module, nn.Embedding):
            return tensor[:, idxs].t().reshape(len(member.idxs), -1)
        return tensor[idxs].reshape(len(member.idxs), -1)
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        idxs = idxs % tensor.shape[1]
    return tensor[:, idxs].transpose(0, 1).reshape(len(member.idxs), -1)


def to_units(member: Member, element_scores: torch.Tensor, size: int) -> torch.Tensor:
    """Per-unit sums of a member's element scores; NaN for units the member does not cover."""
    units = torch.as_tensor(member.units, dtype=torch.long)
    scores = torch.zeros(size, dtype=torch.float64).index_add_(0, units, element_scores.double())
    covered = torch.zeros(size, dtype=torch.bool)
    covered[units] = True
    return scores.masked_fill(~covered, float("nan"))


def combine(size: int, per_member: list[torch.Tensor]) -> torch.Tensor:
    """Mean over members of member scores normalized to mean 1 over the units each member covers."""
    total = torch.zeros(size, dtype=torch.float64)
    covered = torch.zeros(size, dtype=torch.float64)
    for scores in per_member:
        present = ~scores.isnan()
        mean = scores[present].mean() if present.any() else torch.tensor(0.0, dtype=torch.float64)
        if mean <= 0:
            continue
        total += torch.nan_to_num(scores / mean, nan=0.0)
        covered += present.double()
    return (total / covered.clamp_min(1.0)).float()


def _weighted_scores(
    model: nn.Module, group: ChannelGroup, element_fn: Callable[[nn.Module, Member], torch.Tensor | None]
) -> torch.Tensor:
    per_member = []
    for member in group.members:
        module = model.get_submodule(member.module)
        scores = element_fn(module, member)
        if scores is not None:
            per_member.append(to_units(member, scores, group.size))
    return combine(group.size, per_member)


@dataclass
class MagnitudeImportance:
    p: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"l{self.p}"

    @torch.no_grad()
    def __call__(self, model: nn.Module, groups: Sequence[ChannelGroup], calib: Batches | None) -> list[torch.Tensor]:
        return [_weighted_scores(model, group, self._element_scores) for group in groups]

    def _element_scores(self, module: nn.Module, member: Member) -> torch.Tensor | None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return None
        return slice_along(weight.detach().abs().pow(self.p), member, module).sum(1)


@dataclass
class BNScaleImportance:
    name: str = "bn_scale"
    notes: list[str] = field(default_factory=list)

    @torch.no_grad()
    def __call__(self, model: nn.Module, groups: Sequence[ChannelGroup], calib: Batches | None) -> list[torch.Tensor]:
        fallback = MagnitudeImportance(1)
        scores, without_bn = [], 0
        for group in groups:
            bns = [
                m for m in group.members if isinstance(model.get_submodule(m.module), nn.modules.batchnorm._BatchNorm)
            ]
            if not bns:
                without_bn += 1
                scores.append(fallback(model, [group], None)[0])
                continue
            per_member = [
                to_units(m, model.get_submodule(m.module).weight.detach().abs()[m.idxs], group.size) for m in bns
            ]
            scores.append(combine(group.size, per_member))
        if without_bn:
            self.notes.append(f"bn_scale: {without_bn} group(s) without BatchNorm were scored by L1 magnitude")
        return scores


@dataclass
class TaylorImportance:
    max_batches: int = 16
    name: str = "taylor"
    notes: list[str] = field(default_factory=list)

    def __call__(self, model: nn.Module, groups: Sequence[ChannelGroup], calib: Batches | None) -> list[torch.Tensor]:
        if calib is None or not calib.labels:
            self.notes.append("taylor: calibration batches have no labels; used the activation criterion instead")
            return ActivationImportance(self.max_batches)(model, groups, calib)
        grads = _loss_gradients(model, calib, self.max_batches)
        with torch.no_grad():
            return [_weighted_scores(model, group, lambda m, mem: _taylor(m, mem, grads)) for group in groups]


def _loss_gradients(model: nn.Module, calib: Batches, max_batches: int) -> dict[int, torch.Tensor]:
    params = [p for p in model.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    model.eval()
    try:
        with torch.enable_grad():
            for batch, labels in list(zip(calib.inputs, calib.labels or [], strict=False))[:max_batches]:
                logits = primary_output(model(**batch))
                nn.functional.cross_entropy(logits.float().flatten(0, -2), labels.flatten().long()).backward()
        return {id(p): p.grad.detach().clone() for p in params if p.grad is not None}
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.grad = None
            p.requires_grad_(flag)


def _taylor(module: nn.Module, member: Member, grads: dict[int, torch.Tensor]) -> torch.Tensor | None:
    scores = None
    names = ("weight", "bias") if isinstance(module, _NORMS) else ("weight",)
    for name in names:
        param = getattr(module, name, None)
        if not isinstance(param, torch.Tensor) or id(param) not in grads:
            continue
        part = slice_along((param.detach() * grads[id(param)]).abs(), member, module).sum(1)
        scores = part if scores is None else scores + part
    return scores


@dataclass
class ActivationImportance:
    max_batches: int = 16
    name: str = "activation"
    notes: list[str] = field(default_factory=list)

    @torch.no_grad()
    def __call__(self, model: nn.Module, groups: Sequence[ChannelGroup], calib: Batches | None) -> list[torch.Tensor]:
        if calib is None or len(calib) == 0:
            self.notes.append("activation: no calibration data; used L2 magnitude instead")
            return MagnitudeImportance(2)(model, groups, None)
        wanted = {member.module for group in groups for member in group.members}
        stats = _activation_stats(model, calib, wanted, self.max_batches)
        scores = []
        for group in groups:
            has_reader = any(member.dim == "in" for member in group.members)
            scores.append(_weighted_scores(model, group, lambda m, mem, r=has_reader: _activation(m, mem, r, stats)))
        return scores


@dataclass
class _ChannelStats:
    input_sq: torch.Tensor | None = None  # Σ x_c² over samples, per input channel
    output_abs: torch.Tensor | None = None  # Σ |y_c|, per output channel
    count_in: int = 0
    count_out: int = 0


def _channel_last(tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """[samples, channels] view: channels are dim 1 for conv/BN maps, the last dim otherwise."""
    channel_first = isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
    if channel_first and tensor.dim() > 2:
        tensor = tensor.movedim(1, -1)
    return tensor.reshape(-1, tensor.shape[-1]).double()


def _activation_stats(model: nn.Module, calib: Batches, wanted: set[str], max_batches: int) -> dict[str, _ChannelStats]:
    stats = {name: _ChannelStats() for name in wanted}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            record = stats[name]
            x, y = _channel_last(args[0], module), _channel_last(output, module)
            record.input_sq = x.pow(2).sum(0) + (record.input_sq if record.input_sq is not None else 0)
            record.output_abs = y.abs().sum(0) + (record.output_abs if record.output_abs is not None else 0)
            record.count_in += x.shape[0]
            record.count_out += y.shape[0]

        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in wanted]
    model.eval()
    try:
        for batch in calib.inputs[:max_batches]:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _activation(
    module: nn.Module, member: Member, has_reader: bool, stats: dict[str, _ChannelStats]
) -> torch.Tensor | None:
    record = stats.get(member.module)
    if record is None or record.output_abs is None or record.input_sq is None:
        return None
    idxs = torch.as_tensor(member.idxs, dtype=torch.long)
    weighted = isinstance(module, nn.Linear | nn.modules.conv._ConvNd)
    if member.dim == "in" and weighted:
        if getattr(module, "groups", 1) > 1:
            return None
        rms = (record.input_sq / max(record.count_in, 1)).sqrt()
        column = slice_along(module.weight.detach().double().pow(2), member, module).sum(1).sqrt()
        return rms[idxs] * column
    if isinstance(module, _NORMS) or (weighted and not has_reader):
        return (record.output_abs / max(record.count_out, 1))[idxs]
    return None


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
