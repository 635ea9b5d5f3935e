"""mixed_precision, costs: what each layer costs at each candidate width (weight bits, BitOps, latency),
the integer program built from them for one budget, and the additive predictions of a choice."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from compression.configs import MixedPrecisionConfig
from compression.errors import CompressionError
from compression.primitives.allocation import AllocationProblem, BudgetRow, uniform_equivalent_limit
from compression.primitives.capture import Macs, calibrate
from compression.primitives.sensitivity import SensitivityScores, Table

FLOAT_BITS = 16


def layer_macs(model: nn.Module, layers: dict[str, nn.Module], batch: dict[str, Any]) -> dict[str, float]:
    """Multiply-accumulates per sample of each layer in one forward of `batch` (0: never called), with the
    `capture.Macs` recorder mixed precision attaches to its calibration pass."""
    recorder = Macs(layers)
    calibrate(model, [batch], [recorder])
    return recorder.per_sample()


@dataclass
class LayerCosts:
    """What each layer costs at each candidate width: weight bits, BitOps, latency (when a table is given)."""

    names: list[str]
    candidates: list[int]
    params: np.ndarray  # [layers]
    macs: np.ndarray  # [layers], per sample
    activation_bits: int
    latency: np.ndarray | None = None  # [layers, candidates]

    def weight_bits(self) -> np.ndarray:
        return self.params[:, None] * np.asarray(self.candidates, dtype=float)[None, :]

    def bitops(self) -> np.ndarray:
        widths = np.asarray(self.candidates, dtype=float)
        acts = np.where(widths >= FLOAT_BITS, float(FLOAT_BITS), float(self.activation_bits))
        return self.macs[:, None] * (widths * acts)[None, :]


def latency_matrix(names: list[str], candidates: list[int], table: dict[str, dict[int, float]]) -> np.ndarray:
    missing = [(n, b) for n in names for b in candidates if b not in table.get(n, {})]
    if missing:
        raise CompressionError("latency_table_incomplete", f"latency_table lacks (layer, bits) {missing[:5]}")
    return np.array([[table[n][b] for b in candidates] for n in names], dtype=float)


def budget_rows(costs: LayerCosts, scores: SensitivityScores, config: MixedPrecisionConfig, budget: float) -> list:
    """The budget row for `budget` (uniform-equivalent bits) plus the optional predicted-drop cap."""
    coeffs = {"bits": costs.weight_bits, "bitops": costs.bitops, "latency": lambda: costs.latency}[config.budget_kind]()
    assert coeffs is not None
    rows = [BudgetRow(config.budget_kind, coeffs, uniform_equivalent_limit(coeffs, costs.candidates, budget))]
    if config.max_predicted_drop is not None:
        rows.append(BudgetRow("predicted_drop", np.clip(scores.task_drop, 0, None), config.max_predicted_drop))
    return rows


def allocation_problem(
    costs: LayerCosts, scores: SensitivityScores, ties: list[list[str]], config: MixedPrecisionConfig, budget: float
) -> AllocationProblem:
    index = {name: i for i, name in enumerate(costs.names)}
    return AllocationProblem(
        names=costs.names,
        candidates=costs.candidates,
        cost=scores.combined,
        budgets=budget_rows(costs, scores, config, budget),
        ties=[[index[name] for name in group] for group in ties],
    )


def average_bits(costs: LayerCosts, bits: dict[str, int]) -> float:
    widths = np.array([bits[name] for name in costs.names], dtype=float)
    return float((costs.params * widths).sum() / costs.params.sum())


def predicted(scores: SensitivityScores, table: Table, names: list[str], choice: list[int]) -> dict[str, Any]:
    """Additive predictions from the one-layer measurements: noise powers, KLs and drops summed."""
    rows = np.arange(len(names))
    noise = float(scores.damage["sqnr"][rows, choice].sum())
    return {
        "sqnr_db": math.inf if noise == 0 else -10 * math.log10(noise),
        "kl": float(scores.damage["kl"][rows, choice].sum()),
        "task_drop": float(np.clip(scores.task_drop[rows, choice], 0, None).sum()),
    }
