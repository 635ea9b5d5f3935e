"""Accuracy recovery after structured pruning, on the calibration batches only.

- `recalibrate_batchnorm`: pruning a layer's inputs shifts the statistics of every BatchNorm after it;
  the running mean/variance are re-estimated as a cumulative average over the calibration batches
  (weights untouched).
- `distill`: a bounded number of optimizer steps that pull the pruned model's outputs towards the
  original model's (KL on softened logits for classifiers with labels, relative MSE otherwise).
"""

from __future__ import annotations

import math
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


def _batch_order(count: int, steps: int, seed: int) -> list[int]:
    """Batch indices for `steps` steps: a fresh seeded permutation per pass over the batches."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(count, generator=generator).tolist()[::-1]
    return order[:steps]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    calib: Batches,
    *,
    steps: int,
    lr: float = 1e-4,
    seed: int = 0,
    loss: DistillLoss = "auto",
    temperature: float = 2.0,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """`steps` AdamW steps (cosine-decayed lr, grad-norm clip 1) on cycled calibration batches."""
    progress = progress or no_progress
    batches = [plain_batch(batch) for batch in calib.inputs]
    with torch.inference_mode(False), torch.no_grad():
        teacher.eval()
        targets = [primary_output(teacher(**batch)).detach() for batch in batches]
    kind = _resolve_loss(loss, calib, targets[0])
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses: list[float] = []
    _train_mode_without_dropout(student)
    with torch.inference_mode(False), torch.enable_grad():
        for step, index in enumerate(_batch_order(len(batches), steps, seed)):
            value = distillation_loss(primary_output(student(**batches[index])), targets[index], kind, temperature)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(value.detach()))
            if (step + 1) % max(1, steps // 10) == 0:
                progress((step + 1) / steps, f"distillation step {step + 1}/{steps}, loss {losses[-1]:.4g}")
    student.eval()
    window = max(1, steps // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    return {"method": "distillation", "steps": steps, "lr": lr, "loss": kind, "loss_first": first, "loss_last": last}
