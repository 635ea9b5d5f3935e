"""Distillation with early stopping: the held-out split, the stop reasons, the best weights kept."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compression.primitives.recovery import DistillBudget, distill, holdout_split
from compression.types import Batches


def _data(batches: int = 6, rows: int = 32) -> Batches:
    generator = torch.Generator().manual_seed(0)
    inputs = [{"x": torch.randn(rows, 8, generator=generator)} for _ in range(batches)]
    return Batches(inputs, [torch.randint(0, 4, (rows,), generator=generator) for _ in range(batches)])


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    class Keyword(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    student = Keyword(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4)))
    return student, Keyword(teacher).eval()


def test_holdout_split_takes_every_tenth_row_and_rejoins_the_pieces() -> None:
    data = _data(batches=5, rows=32)  # 160 rows: 16 held out
    train, held = holdout_split(data)
    assert sum(b["x"].shape[0] for b in train.inputs) == 144
    assert [b["x"].shape[0] for b in held.inputs] == [16]  # 3 + 3 + 4 + 3 + 3 rows joined into one batch
    assert torch.equal(held.inputs[0]["x"][0], data.inputs[0]["x"][9])
    assert torch.equal(held.labels[0][:3], data.labels[0][[9, 19, 29]])
    assert len(train.labels) == 5


def test_a_plateau_stops_distillation_and_the_best_weights_are_kept() -> None:
    student, teacher = _pair()
    budget = DistillBudget(max_steps=100_000, time_budget_s=120, patience=2, lr_drops=1, eval_every=5)
    report = distill(student, teacher, _data(), budget=budget, lr=3e-2)
    assert report["stop_reason"] == "converged" and report["steps"] < 100_000 and report["lr_drops"] == 1
    held = report["held_out_loss"]
    assert held["best"] < held["first"] and held["best"] <= min(point[1] for point in held["curve"])
    assert report["samples"]["held_out"] > 0 and len(held["curve"]) <= 33
    # the student ends with the best evaluation's weights: re-measuring gives the best loss back
    again = distill(copy.deepcopy(student), teacher, _data(), budget=DistillBudget(0, 10), lr=1e-9)
    assert again["held_out_loss"]["first"] == pytest.approx(held["best"], rel=1e-5)


def test_the_time_budget_and_the_step_cap_stop_distillation() -> None:
    student, teacher = _pair()
    timed = distill(student, teacher, _data(), budget=DistillBudget(max_steps=10**6, time_budget_s=0.3), lr=1e-3)
    assert timed["stop_reason"] == "time_budget" and timed["seconds"] < 5
    capped = distill(student, teacher, _data(), budget=DistillBudget(max_steps=7, time_budget_s=60), lr=1e-3)
    assert capped["stop_reason"] == "max_steps" and capped["steps"] == 7
