"""Accuracy recovery after structured pruning, on the calibration batches only.

- `recalibrate_batchnorm`: pruning a layer's inputs shifts the statistics of every BatchNorm after it;
  the running mean/variance are re-estimated as a cumulative average over the calibration batches
  (weights untouched).
- `distill`: optimizer steps that pull the pruned model's outputs towards the original model's (KL on
  softened logits for classifiers with labels, relative MSE otherwise) on the calibration rows, with every
  10th row held out: training stops when the held-out loss stops improving (after learning-rate drops), when
  the time budget or the step cap runs out, and the weights of the best held-out loss are kept.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from compression.types import Batches, ProgressFn, no_progress, primary_output

DistillLoss = Literal["auto", "kl", "mse"]


def plain_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with inference-mode tensors cloned, so autograd can save them for backward."""
    return {k: v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v for k, v in batch.items()}


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, calib: Batches, *, max_batches: int | None = None) -> dict[str, Any]:
    """Re-estimate every BatchNorm's running statistics on `calib`; the model is left in eval mode."""
    layers = batchnorm_layers(model)
    batches = calib.inputs[:max_batches]
    if not layers or not batches:
        model.eval()
        return {"method": "bn_recalibration", "layers": len(layers), "batches": 0}
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: every batch weighs the same
        layer.train()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.eval()
    return {"method": "bn_recalibration", "layers": len(layers), "batches": len(batches)}


def _resolve_loss(loss: DistillLoss, calib: Batches, teacher_out: torch.Tensor) -> str:
    if loss != "auto":
        return loss
    return "kl" if calib.labels and teacher_out.dim() == 2 and teacher_out.shape[1] > 1 else "mse"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    if kind == "kl":
        log_p = nn.functional.log_softmax(student.float() / temperature, dim=-1)
        log_q = nn.functional.log_softmax(teacher.float() / temperature, dim=-1)
        return nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2
    scale = teacher.float().pow(2).mean().clamp_min(1e-12)
    return (student.float() - teacher.float()).pow(2).mean() / scale


def _train_mode_without_dropout(model: nn.Module) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()


@dataclass(frozen=True)
class DistillBudget:
    """When distillation stops: the held-out loss stopped improving (`patience` evaluations without a
    better value after `lr_drops` learning-rate drops), `time_budget_s` ran out, or `max_steps` ran."""

    max_steps: int
    time_budget_s: float
    patience: int = 5
    lr_drops: int = 2
    eval_every: int | None = None  # optimizer steps between held-out evaluations; None: one pass, within [10, 100]


HOLDOUT_EVERY = 10  # every 10th calibration row is held out to decide when to stop (every 2nd below 20 rows)
LR_DROP = 0.3  # the learning rate is multiplied by this when the held-out loss stalls
MIN_IMPROVEMENT = 1e-3  # relative: a held-out loss counts as better below best * (1 - this)
CURVE_POINTS = 32  # the report's held-out curve keeps at most this many evaluations
TARGET_CACHE_BYTES = 1 << 28  # teacher outputs kept in memory up to this; beyond, recomputed per step


def holdout_split(calib: Batches) -> tuple[Batches, Batches]:
    """(training rows, held-out rows): every `HOLDOUT_EVERY`-th row of the calibration data (every 2nd
    below 20 rows) is held out; held-out pieces of equal shape are joined back into batches."""
    rows = sum(primary_rows(batch) for batch in calib.inputs)
    step = HOLDOUT_EVERY if rows >= 2 * HOLDOUT_EVERY else 2
    train, held = Batches([], [] if calib.labels else None), Batches([], [] if calib.labels else None)
    start = 0
    for index, batch in enumerate(calib.inputs):
        count = primary_rows(batch)
        mask = (torch.arange(start, start + count) % step) == step - 1
        start += count
        for part, keep in ((train, ~mask), (held, mask)):
            if bool(keep.any()):
                part.inputs.append({k: v[keep] for k, v in batch.items()})
                if part.labels is not None:
                    part.labels.append(calib.labels[index][keep])  # type: ignore[index]
    size = max(primary_rows(b) for b in calib.inputs) if calib.inputs else 1
    return train, _regroup(held, size)


def primary_rows(batch: dict[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def _regroup(batches: Batches, size: int) -> Batches:
    """Consecutive batches whose tensors agree beyond the first dimension, joined up to `size` rows."""
    out = Batches([], [] if batches.labels is not None else None)
    for index, batch in enumerate(batches.inputs):
        last = out.inputs[-1] if out.inputs else None
        fits = last is not None and primary_rows(last) + primary_rows(batch) <= size
        if fits and all(last[k].shape[1:] == v.shape[1:] and last[k].dtype == v.dtype for k, v in batch.items()):
            out.inputs[-1] = {k: torch.cat([last[k], v]) for k, v in batch.items()}
            if out.labels is not None:
                out.labels[-1] = torch.cat([out.labels[-1], batches.labels[index]])  # type: ignore[index]
            continue
        out.inputs.append(dict(batch))
        if out.labels is not None:
            out.labels.append(batches.labels[index])  # type: ignore[index]
    return out


class _Teacher:
    """The teacher's outputs per batch: computed once and kept when they fit `TARGET_CACHE_BYTES`."""

    def __init__(self, teacher: nn.Module, batches: list[dict[str, Any]]) -> None:
        self.teacher, self.batches = teacher.eval(), batches
        first = self._run(0)
        self.cache: list[torch.Tensor] | None = None
        if first.numel() * first.element_size() * len(batches) <= TARGET_CACHE_BYTES:
            self.cache = [first] + [self._run(i) for i in range(1, len(batches))]

    def _run(self, index: int) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return primary_output(self.teacher(**self.batches[index])).detach()

    def __call__(self, index: int) -> torch.Tensor:
        return self.cache[index] if self.cache is not None else self._run(index)


@dataclass
class _Tracker:
    """The held-out loss over training: best value and weights, evaluations without improvement."""

    best: float
    best_state: dict[str, torch.Tensor]
    curve: list[tuple[int, float]] = field(default_factory=list)
    best_step: int = 0
    stalled: int = 0
    drops: int = 0

    def update(self, step: int, value: float, model: nn.Module) -> None:
        self.curve.append((step, value))
        if value < self.best * (1 - MIN_IMPROVEMENT):
            self.best, self.best_step, self.stalled = value, step, 0
            self.best_state = _snapshot(model)
        else:
            self.stalled += 1


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _held_out_loss(student: nn.Module, held: list[dict[str, Any]], targets: _Teacher, kind: str, t: float) -> float:
    """Mean loss per held-out row, the student in eval mode (running BatchNorm statistics)."""
    was_training = student.training
    student.eval()
    total, rows = 0.0, 0
    with torch.inference_mode(False), torch.no_grad():
        for index, batch in enumerate(held):
            count = primary_rows(batch)
            total += float(distillation_loss(primary_output(student(**batch)), targets(index), kind, t)) * count
            rows += count
    if was_training:
        _train_mode_without_dropout(student)
    return total / max(rows, 1)


def _batch_order(count: int, seed: int) -> Iterator[int]:
    """Batch indices forever: a fresh seeded permutation per pass over the batches."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(count, generator=generator).tolist()[::-1]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    calib: Batches,
    *,
    budget: DistillBudget,
    lr: float = 1e-4,
    seed: int = 0,
    loss: DistillLoss = "auto",
    temperature: float = 2.0,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """AdamW (linear warm-up over the first evaluation interval, grad-norm clip 1) on the training rows of
    `calib` until `budget` says stop (its docstring); the student ends with the weights of its best held-out
    loss. Returns what ran, for the report."""
    train, held = holdout_split(calib)
    if not held.inputs:  # one row: nothing to hold out, the training rows judge themselves
        held = train
    run = _DistillRun(student, train, held, budget, lr, temperature, teacher, loss)
    started = time.perf_counter()
    reason = run.loop(seed, started, progress or no_progress)
    student.load_state_dict(run.tracker.best_state)
    student.eval()
    return run.summary(reason, time.perf_counter() - started, held is train)


class _DistillRun:
    """One distillation: the optimizer, the teachers' outputs, the held-out tracker."""

    def __init__(
        self,
        student: nn.Module,
        train: Batches,
        held: Batches,
        budget: DistillBudget,
        lr: float,
        temperature: float,
        teacher: nn.Module,
        loss: DistillLoss,
    ) -> None:
        self.student, self.budget, self.lr, self.temperature = student, budget, lr, temperature
        self.train = [plain_batch(batch) for batch in train.inputs]
        self.held = [plain_batch(batch) for batch in held.inputs]
        self.rows = (sum(primary_rows(b) for b in self.train), sum(primary_rows(b) for b in self.held))
        self.train_targets, self.held_targets = _Teacher(teacher, self.train), _Teacher(teacher, self.held)
        self.kind = _resolve_loss(loss, train, self.train_targets(0))
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.eval_every = budget.eval_every or min(100, max(10, len(self.train)))
        first = _held_out_loss(student, self.held, self.held_targets, self.kind, temperature)
        self.tracker = _Tracker(best=first, best_state=_snapshot(student), curve=[(0, first)])
        self.steps, self.train_losses = 0, []

    def loop(self, seed: int, started: float, progress: ProgressFn) -> str:
        """Train until a stop condition; returns the stop reason."""
        order = _batch_order(len(self.train), seed)
        _train_mode_without_dropout(self.student)
        with torch.inference_mode(False), torch.enable_grad():
            while True:
                elapsed = time.perf_counter() - started
                stop = "max_steps" if self.steps >= self.budget.max_steps else None
                stop = stop or ("time_budget" if elapsed >= self.budget.time_budget_s else None)
                if stop:
                    if self.steps % self.eval_every:  # the steps since the last evaluation count too
                        self._evaluate()
                    return stop
                self._step(next(order))
                if self.steps % self.eval_every == 0 and self._evaluate():
                    return "converged"
                if self.steps % self.eval_every == 0:
                    done = max(self.steps / self.budget.max_steps, elapsed / self.budget.time_budget_s)
                    held = self.tracker.curve[-1][1]
                    progress(min(done, 1.0), f"distillation step {self.steps}, held-out loss {held:.4g}")

    def _step(self, index: int) -> None:
        warmup = min(1.0, (self.steps + 1) / self.eval_every)  # linear warm-up over the first evaluation interval
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * LR_DROP**self.tracker.drops * warmup
        output = primary_output(self.student(**self.train[index]))
        value = distillation_loss(output, self.train_targets(index), self.kind, self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.steps += 1
        self.train_losses.append(float(value.detach()))

    def _evaluate(self) -> bool:
        """Measure the held-out loss; True when it stalled after every learning-rate drop (converged)."""
        value = _held_out_loss(self.student, self.held, self.held_targets, self.kind, self.temperature)
        tracker = self.tracker
        tracker.update(self.steps, value, self.student)
        if tracker.stalled < self.budget.patience:
            return False
        if tracker.drops >= self.budget.lr_drops:
            return True
        tracker.drops, tracker.stalled = tracker.drops + 1, 0  # the next steps run at lr * LR_DROP ** drops
        return False

    def summary(self, reason: str, seconds: float, self_judged: bool) -> dict[str, Any]:
        curve, window = self.tracker.curve, max(1, min(len(self.train_losses), self.eval_every) // 2)
        stride = max(1, math.ceil(len(curve) / CURVE_POINTS))
        return {
            "method": "distillation",
            "loss": self.kind,
            "lr": self.lr,
            "lr_drops": self.tracker.drops,
            "steps": self.steps,
            "max_steps": self.budget.max_steps,
            "time_budget_s": self.budget.time_budget_s,
            "seconds": round(seconds, 2),
            "stop_reason": reason,
            "samples": {"train": self.rows[0], "held_out": 0 if self_judged else self.rows[1]},
            "eval_every": self.eval_every,
            "held_out_loss": {
                "first": curve[0][1],
                "best": self.tracker.best,
                "best_step": self.tracker.best_step,
                "last": curve[-1][1],
                "curve": [list(point) for point in curve[::stride]],
            },
            "train_loss": {
                "first": statistics.fmean(self.train_losses[:window]) if self.train_losses else None,
                "last": statistics.fmean(self.train_losses[-window:]) if self.train_losses else None,
            },
        }
