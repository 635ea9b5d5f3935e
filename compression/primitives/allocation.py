"""Per-layer bit widths as a small integer program (MixDQ / HAWQ-V3 style), solved by HiGHS via scipy.

One binary x[l, j] per (layer l, candidate j):
- one choice per layer:      Σ_j x[l, j] = 1
- budget rows:               Σ_l Σ_j coeff[l, j] · x[l, j] <= limit   (memory, BitOps, latency, predicted drop)
- ties:                      x[l, j] = x[l', j] for every j, for l, l' in one tie group
- disallowed candidates:     x[l, j] = 0
- objective:                 minimize Σ cost[l, j] · x[l, j]   (summed per-layer sensitivity: additivity assumed)
`scipy.optimize.milp` (HiGHS) is exact (relative gap 0) and deterministic for the same input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from compression.errors import CompressionError


@dataclass(frozen=True)
class BudgetRow:
    """One `≤` constraint: Σ coeffs[l, j]·x[l, j] <= limit."""

    name: str
    coeffs: np.ndarray  # [layers, candidates]
    limit: float


@dataclass
class AllocationProblem:
    names: list[str]
    candidates: list[int]
    cost: np.ndarray  # [layers, candidates], minimized
    budgets: list[BudgetRow] = field(default_factory=list)
    ties: list[list[int]] = field(default_factory=list)  # groups of layer indices sharing one choice
    allowed: np.ndarray | None = None  # [layers, candidates] bool; None: everything allowed


@dataclass
class Allocation:
    choice: list[int]  # candidate index per layer
    bits: dict[str, int]
    objective: float
    usage: dict[str, float]  # budget row name -> Σ coeffs·x at the solution
    status: str
    solve_time_s: float


def _one_hot_rows(layers: int, width: int) -> sparse.csr_matrix:
    rows = np.repeat(np.arange(layers), width)
    return sparse.csr_matrix((np.ones(layers * width), (rows, np.arange(layers * width))), (layers, layers * width))


def _tie_rows(ties: list[list[int]], layers: int, width: int) -> sparse.csr_matrix | None:
    entries: list[tuple[int, int, float]] = []
    row = 0
    for group in ties:
        first, *others = sorted(set(group))
        for other in others:
            for j in range(width):
                entries += [(row, first * width + j, 1.0), (row, other * width + j, -1.0)]
                row += 1
    if not entries:
        return None
    rows, cols, vals = zip(*entries, strict=True)
    return sparse.csr_matrix((vals, (rows, cols)), (row, layers * width))


def _constraints(problem: AllocationProblem) -> list[LinearConstraint]:
    layers, width = problem.cost.shape
    constraints = [LinearConstraint(_one_hot_rows(layers, width), 1, 1)]
    ties = _tie_rows(problem.ties, layers, width)
    if ties is not None:
        constraints.append(LinearConstraint(ties, 0, 0))
    if problem.budgets:
        matrix = np.stack([row.coeffs.reshape(-1) for row in problem.budgets])
        limits = np.array([row.limit for row in problem.budgets], dtype=float)
        constraints.append(LinearConstraint(matrix, -np.inf, limits))
    return constraints


def _check_shapes(problem: AllocationProblem) -> None:
    shape = (len(problem.names), len(problem.candidates))
    arrays = [problem.cost, *(row.coeffs for row in problem.budgets)]
    if problem.allowed is not None:
        arrays.append(problem.allowed)
    for array in arrays:
        if array.shape != shape:
            raise ValueError(f"expected a {shape} array, got {array.shape}")


def solve_allocation(problem: AllocationProblem, time_limit_s: float = 60.0) -> Allocation:
    """The cheapest feasible choice per layer; CompressionError('allocation_infeasible') when none exists."""
    _check_shapes(problem)
    layers, width = problem.cost.shape
    upper = np.ones(layers * width) if problem.allowed is None else problem.allowed.reshape(-1).astype(float)
    began = time.perf_counter()
    result = milp(
        problem.cost.reshape(-1).astype(float),
        integrality=np.ones(layers * width),
        bounds=Bounds(np.zeros(layers * width), upper),
        constraints=_constraints(problem),
        options={"time_limit": time_limit_s, "mip_rel_gap": 0.0, "presolve": True},
    )
    seconds = time.perf_counter() - began
    if result.x is None:
        limits = ", ".join(f"{row.name} <= {row.limit:.6g}" for row in problem.budgets)
        raise CompressionError("allocation_infeasible", f"no bit allocation satisfies {limits} ({result.message})")
    chosen = np.rint(result.x).reshape(layers, width).argmax(axis=1)
    return _allocation(problem, [int(j) for j in chosen], result.message, seconds)


def _allocation(problem: AllocationProblem, choice: list[int], status: str, seconds: float) -> Allocation:
    rows = np.arange(len(choice))
    usage = {row.name: float(row.coeffs[rows, choice].sum()) for row in problem.budgets}
    bits = {name: problem.candidates[j] for name, j in zip(problem.names, choice, strict=True)}
    objective = float(problem.cost[rows, choice].sum())
    return Allocation(choice, bits, objective, usage, status, seconds)


def fixed_allocation(problem: AllocationProblem, bits: int) -> Allocation:
    """Every layer at `bits` (the uniform baseline), evaluated on the problem's cost and budget rows."""
    index = problem.candidates.index(bits)
    return _allocation(problem, [index] * len(problem.names), "fixed", 0.0)


def uniform_equivalent_limit(coeffs: np.ndarray, candidates: list[int], bits: float) -> float:
    """Σ_l of each layer's coefficient at `bits` (linear between candidates, clamped at the ends): the
    budget a uniform model at `bits` would use, so 2.5 'bits' means halfway between all-2 and all-3."""
    order = np.argsort(candidates)
    widths = np.asarray(candidates, dtype=float)[order]
    return float(sum(np.interp(bits, widths, row[order]) for row in coeffs))
