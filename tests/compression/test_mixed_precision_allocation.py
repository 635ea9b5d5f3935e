"""The bit-allocation integer program: exact against brute force, budgets, ties, determinism."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from compression.errors import CompressionError
from compression.primitives.allocation import (
    AllocationProblem,
    BudgetRow,
    fixed_allocation,
    solve_allocation,
    uniform_equivalent_limit,
)

CANDIDATES = [2, 4, 8]


def random_problem(
    layers: int, seed: int, budget_bits: float, ties: list[list[int]] | None = None
) -> AllocationProblem:
    """Sensitivities that fall with bits (as measured ones do) and uneven layer sizes."""
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(0, 1.5, size=(layers, 1))
    cost = scale * np.array([[1.0, 0.2, 0.01]]) * rng.uniform(0.5, 1.5, size=(layers, len(CANDIDATES)))
    params = rng.integers(100, 5000, size=layers).astype(float)
    size = params[:, None] * np.array(CANDIDATES, dtype=float)[None, :]
    drop = rng.uniform(0, 0.02, size=(layers, 1)) * np.array([[1.0, 0.3, 0.0]])
    budgets = [
        BudgetRow("bits", size, budget_bits * params.sum()),
        BudgetRow("predicted_drop", drop, float(drop[:, 0].sum() * 0.75)),
    ]
    return AllocationProblem([f"l{i}" for i in range(layers)], CANDIDATES, cost, budgets, ties or [])


def brute_force(problem: AllocationProblem) -> float | None:
    """Best objective over every feasible combination (None when nothing is feasible)."""
    layers, width = problem.cost.shape
    rows, best = np.arange(layers), None
    for choice in itertools.product(range(width), repeat=layers):
        picked = list(choice)
        if any(len({picked[i] for i in group}) > 1 for group in problem.ties):
            continue
        if any(row.coeffs[rows, picked].sum() > row.limit + 1e-9 for row in problem.budgets):
            continue
        value = float(problem.cost[rows, picked].sum())
        best = value if best is None or value < best else best
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget_bits", [2.5, 3.0, 4.5])
def test_ilp_matches_brute_force(seed: int, budget_bits: float) -> None:
    problem = random_problem(7, seed, budget_bits, ties=[[1, 4]])
    expected = brute_force(problem)
    if expected is None:
        with pytest.raises(CompressionError) as error:
            solve_allocation(problem)
        assert error.value.code == "allocation_infeasible"
        return
    allocation = solve_allocation(problem)
    assert allocation.objective == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for row in problem.budgets:
        assert allocation.usage[row.name] <= row.limit + 1e-6
    assert allocation.choice[1] == allocation.choice[4]


def test_budget_respected_and_more_budget_never_hurts() -> None:
    objectives = []
    for budget_bits in (2.0, 2.5, 3.0, 4.0, 6.0, 8.0):
        problem = random_problem(40, 3, budget_bits)
        problem.budgets = problem.budgets[:1]
        allocation = solve_allocation(problem)
        params = problem.budgets[0].coeffs[:, 0] / CANDIDATES[0]
        widths = np.array([allocation.bits[name] for name in problem.names])
        assert (params * widths).sum() / params.sum() <= budget_bits + 1e-9
        objectives.append(allocation.objective)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(objectives))
    assert objectives[-1] == pytest.approx(problem.cost[:, -1].sum())  # 8 bits everywhere fits


def test_ties_and_disallowed_candidates_respected() -> None:
    problem = random_problem(12, 5, 3.0, ties=[[0, 3, 7], [2, 9], [3, 11]])  # overlapping groups merge
    problem.allowed = np.ones_like(problem.cost, dtype=bool)
    problem.allowed[5, 2] = False  # layer 5 may not take 8 bits
    allocation = solve_allocation(problem)
    assert len({allocation.choice[i] for i in (0, 3, 7, 11)}) == 1
    assert allocation.choice[2] == allocation.choice[9]
    assert allocation.choice[5] != 2


def test_deterministic() -> None:
    first = solve_allocation(random_problem(60, 11, 3.0))
    for _ in range(2):
        again = solve_allocation(random_problem(60, 11, 3.0))
        assert again.choice == first.choice and again.objective == first.objective


def test_uniform_equivalent_limit_and_fixed_allocation() -> None:
    problem = random_problem(10, 2, 3.0)
    size = problem.budgets[0].coeffs
    params = size[:, 0] / 2
    assert uniform_equivalent_limit(size, CANDIDATES, 3.0) == pytest.approx(3.0 * params.sum())
    assert uniform_equivalent_limit(size, CANDIDATES, 16.0) == pytest.approx(8.0 * params.sum())  # clamped
    uniform = fixed_allocation(problem, 4)
    assert set(uniform.bits.values()) == {4}
    assert uniform.usage["bits"] == pytest.approx(4 * params.sum())
    ours = solve_allocation(AllocationProblem(problem.names, CANDIDATES, problem.cost, problem.budgets[:1]))
    limited = AllocationProblem(problem.names, CANDIDATES, problem.cost, [BudgetRow("bits", size, 4 * params.sum())])
    assert solve_allocation(limited).objective <= uniform.objective + 1e-12
    assert ours.usage["bits"] <= 3.0 * params.sum() + 1e-6


def test_large_instance_solves_quickly() -> None:
    problem = random_problem(800, 7, 3.0)
    problem.budgets = problem.budgets[:1]
    allocation = solve_allocation(problem)
    assert allocation.usage["bits"] <= problem.budgets[0].limit + 1e-6
    assert allocation.solve_time_s < 30
