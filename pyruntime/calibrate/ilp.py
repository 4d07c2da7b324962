"""Multiple-choice knapsack by integer linear programming: one option per layer, a cost
budget, the least total error.

This is the allocator of LampQ [stated: "bits assigned by integer linear programming"] and
the inner step of the exit-aware methods (APQ/MAQEE reuse it with ``weights`` = r_l, the
fraction of images that reach layer l). It knows nothing about layers or bits: a problem is
a list, one entry per layer, of ``(cost, error)`` options.

Formulation [ours, after papers.md]::

    minimise    sum_i sum_j  w_i * error[i][j] * x[i, j]
    subject to  sum_i sum_j  w_i * cost[i][j]  * x[i, j]  <=  budget - fixed_cost
                sum_j x[i, j] = 1          for every layer i
                x[i, j] in {0, 1}

solved by ``scipy.optimize.milp`` (HiGHS branch and bound, relative gap 0). The returned
choice is checked in exact float arithmetic (``math.fsum``) against the budget; should the
solver's feasibility tolerance (~1e-7 of the normalised cost range) admit a choice that is a
hair over budget, the budget handed to the solver is tightened by the excess and the problem
re-solved, so the answer always respects the budget. A budget below the cheapest choice
raises :class:`InfeasibleBudget` naming the smallest feasible budget.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["InfeasibleBudget", "format_amount", "solve", "min_cost", "max_cost", "total_cost", "total_error"]

Option = Tuple[float, float]  # (cost, error)
MAX_TIGHTENINGS = 8


class InfeasibleBudget(ValueError):
    """The budget is below the cheapest choice; ``minimum`` is the smallest feasible budget."""

    def __init__(self, budget: float, minimum: float, unit: str = ""):
        self.budget, self.minimum, self.unit = budget, minimum, unit
        u = f" {unit}" if unit else ""
        super().__init__(f"budget {format_amount(budget)}{u} cannot be met: the smallest feasible budget is "
                         f"{format_amount(minimum)}{u} (every layer at its cheapest option)")


def format_amount(v: float) -> str:
    """An integral amount in full (``11042816``), others to 10 significant digits."""
    if math.isfinite(v) and v == int(v) and abs(v) < 1e18:
        return str(int(v))
    return f"{v:.10g}"


def _weights(choices: Sequence[Sequence[Option]], weights: Optional[Sequence[float]]) -> List[float]:
    if weights is None:
        return [1.0] * len(choices)
    w = [float(v) for v in weights]
    if len(w) != len(choices):
        raise ValueError(f"weights has {len(w)} values for {len(choices)} layers")
    if any(not math.isfinite(v) or v < 0 for v in w):
        raise ValueError("weights must be finite and >= 0")
    return w


def _check_choices(choices: Sequence[Sequence[Option]]) -> None:
    if len(choices) == 0:
        raise ValueError("no layers to allocate")
    for i, opts in enumerate(choices):
        if len(opts) == 0:
            raise ValueError(f"layer {i} has no options")
        for c, e in opts:
            if not (math.isfinite(c) and math.isfinite(e)) or c < 0:
                raise ValueError(f"layer {i}: option (cost {c}, error {e}) must be finite with cost >= 0")


def total_cost(choices: Sequence[Sequence[Option]], pick: Sequence[int], weights: Optional[Sequence[float]] = None,
               fixed_cost: float = 0.0) -> float:
    """fixed_cost + sum_i w_i * cost of the picked option, summed exactly (fsum)."""
    w = _weights(choices, weights)
    return math.fsum([fixed_cost] + [w[i] * choices[i][j][0] for i, j in enumerate(pick)])


def total_error(choices: Sequence[Sequence[Option]], pick: Sequence[int], weights: Optional[Sequence[float]] = None) -> float:
    w = _weights(choices, weights)
    return math.fsum(w[i] * choices[i][j][1] for i, j in enumerate(pick))


def min_cost(choices: Sequence[Sequence[Option]], weights: Optional[Sequence[float]] = None,
             fixed_cost: float = 0.0) -> float:
    """The smallest budget any choice meets (each layer at its cheapest option)."""
    pick = [int(np.argmin([c for c, _ in opts])) for opts in choices]
    return total_cost(choices, pick, weights, fixed_cost)


def max_cost(choices: Sequence[Sequence[Option]], weights: Optional[Sequence[float]] = None,
             fixed_cost: float = 0.0) -> float:
    """The cost with every layer at its most expensive option (a budget above it is slack)."""
    pick = [int(np.argmax([c for c, _ in opts])) for opts in choices]
    return total_cost(choices, pick, weights, fixed_cost)


def _milp(choices, w, limit: float, scale_c: float, scale_e: float) -> List[int]:
    """One HiGHS solve of the normalised problem; the picked option index per layer."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(o) for o in choices]
    n = sum(sizes)
    cost = np.array([w[i] * c / scale_c for i, opts in enumerate(choices) for c, _ in opts])
    err = np.array([w[i] * e / scale_e for i, opts in enumerate(choices) for _, e in opts])
    one_per_layer = np.zeros((len(choices), n))
    start = np.cumsum([0] + sizes[:-1])
    for i, (s, k) in enumerate(zip(start, sizes)):
        one_per_layer[i, s:s + k] = 1.0
    cons = [LinearConstraint(one_per_layer, 1.0, 1.0), LinearConstraint(cost[None], -np.inf, limit / scale_c)]
    res = milp(err, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=cons,
               options={"mip_rel_gap": 0.0, "presolve": True})
    if res.x is None:
        raise RuntimeError(f"MILP solver failed: {res.message}")
    return [int(np.argmax(res.x[s:s + k])) for s, k in zip(start, sizes)]


def solve(choices: Sequence[Sequence[Option]], budget: float, weights: Optional[Sequence[float]] = None,
          fixed_cost: float = 0.0, unit: str = "") -> List[int]:
    """The option index per layer minimising ``sum w_i * error`` with
    ``fixed_cost + sum w_i * cost <= budget`` (exact; see the module docstring).

    choices: per layer, a list of ``(cost, error)`` options (costs >= 0).
    weights: per-layer factor on both cost and error (default 1; r_l for exit-aware costs).
    fixed_cost: cost outside the allocation (fp32 layers, attention matmuls, ...).
    unit: named in the error message of an infeasible budget ("BOPs", "bytes").
    """
    _check_choices(choices)
    w = _weights(choices, weights)
    budget = float(budget)
    lo = min_cost(choices, w, fixed_cost)
    if not budget >= lo:
        raise InfeasibleBudget(budget, lo, unit)
    hi = max_cost(choices, w, fixed_cost)
    scale_c = max(hi - lo, abs(budget), 1e-300)
    scale_e = max(max(abs(w[i] * e) for i, opts in enumerate(choices) for _, e in opts), 1e-300)
    limit = budget - fixed_cost
    for _ in range(MAX_TIGHTENINGS):
        pick = _milp(choices, w, limit, scale_c, scale_e)
        excess = total_cost(choices, pick, w, fixed_cost) - budget
        if excess <= 0:
            return pick
        limit -= excess * (1 + 1e-9) + 1e-12 * scale_c
    # The cheapest choice always fits; reaching this means the solver kept rounding over.
    raise RuntimeError("MILP solver could not return a choice within the budget")
