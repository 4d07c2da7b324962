"""The multiple-choice ILP allocator: exact budget, optimal (checked by brute force), clear
errors for impossible budgets. No torch."""
import itertools
import math

import numpy as np
import pytest

pytest.importorskip("scipy.optimize")

from pyruntime.calibrate import ilp


def brute_force(choices, budget, weights=None, fixed=0.0):
    """The least total error of any choice within the budget (None if none fits)."""
    best = None
    for pick in itertools.product(*[range(len(o)) for o in choices]):
        if ilp.total_cost(choices, pick, weights, fixed) <= budget:
            e = ilp.total_error(choices, pick, weights)
            best = e if best is None else min(best, e)
    return best


def random_instance(rng, integer_costs=True):
    layers = int(rng.integers(2, 7))
    choices = []
    for _ in range(layers):
        k = int(rng.integers(2, 5))
        costs = rng.integers(1, 50, k) if integer_costs else rng.uniform(0.1, 5.0, k) * 1e9
        choices.append([(float(c), float(e)) for c, e in zip(costs, rng.uniform(0, 1, k))])
    return choices


@pytest.mark.parametrize("integer_costs", [True, False])
def test_optimal_and_within_budget_on_random_instances(integer_costs):
    rng = np.random.default_rng(0)
    for _ in range(60):
        choices = random_instance(rng, integer_costs)
        weights = rng.uniform(0.1, 1.0, len(choices)) if rng.random() < 0.5 else None
        fixed = float(rng.integers(0, 100))
        lo, hi = ilp.min_cost(choices, weights, fixed), ilp.max_cost(choices, weights, fixed)
        budget = float(rng.uniform(lo, hi))
        pick = ilp.solve(choices, budget, weights, fixed)
        assert ilp.total_cost(choices, pick, weights, fixed) <= budget
        best = brute_force(choices, budget, weights, fixed)
        got = ilp.total_error(choices, pick, weights)
        assert got == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_budget_exactly_at_a_choice_cost_is_reachable():
    rng = np.random.default_rng(1)
    for _ in range(30):
        choices = random_instance(rng)
        pick0 = [int(rng.integers(0, len(o))) for o in choices]
        budget = ilp.total_cost(choices, pick0)  # some choice sits exactly on the budget
        pick = ilp.solve(choices, budget)
        assert ilp.total_cost(choices, pick) <= budget
        assert ilp.total_error(choices, pick) <= ilp.total_error(choices, pick0) + 1e-12
        assert ilp.total_error(choices, pick) == pytest.approx(brute_force(choices, budget), abs=1e-9)


def test_large_budget_takes_the_least_error_everywhere_and_minimum_budget_the_cheapest():
    choices = [[(1.0, 5.0), (4.0, 1.0)], [(2.0, 3.0), (8.0, 0.5), (3.0, 0.7)]]
    assert ilp.solve(choices, 1e6) == [1, 1]
    assert ilp.solve(choices, ilp.min_cost(choices)) == [0, 0]
    assert ilp.solve(choices, 6.0) == [1, 0]  # cost 6, error 4.0: the budget exactly
    assert ilp.solve(choices, 5.99) == [0, 2]  # cost 4, error 5.7 (cost 3, error 8 is worse)


def test_impossible_budget_names_the_smallest_feasible():
    choices = [[(10.0, 1.0), (20.0, 0.0)], [(5.0, 1.0), (7.0, 0.5)]]
    with pytest.raises(ValueError, match=r"smallest feasible budget is 115 BOPs") as e:
        ilp.solve(choices, 114.0, fixed_cost=100.0, unit="BOPs")
    assert isinstance(e.value, ilp.InfeasibleBudget)
    assert e.value.minimum == 115.0
    assert ilp.solve(choices, 115.0, fixed_cost=100.0) == [0, 0]


def test_weights_scale_cost_and_error():
    # Layer 1 is rarely reached (weight 0.1): its expensive option is cheap in expectation.
    choices = [[(10.0, 1.0), (20.0, 0.0)], [(10.0, 1.0), (20.0, 0.0)]]
    pick = ilp.solve(choices, 31.0, weights=[1.0, 0.1])
    assert pick == [1, 1]  # 20 + 0.1 * 20 = 22 <= 31
    assert ilp.solve(choices, 21.5, weights=[1.0, 0.1]) == [1, 0]  # 20 + 1 = 21: error 0.1 beats 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="no layers"):
        ilp.solve([], 1.0)
    with pytest.raises(ValueError, match="no options"):
        ilp.solve([[]], 1.0)
    with pytest.raises(ValueError, match="weights has"):
        ilp.solve([[(1.0, 1.0)]], 1.0, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        ilp.solve([[(math.nan, 1.0)]], 1.0)
    with pytest.raises(ValueError, match="smallest feasible"):
        ilp.solve([[(1.0, 1.0)]], math.nan)
