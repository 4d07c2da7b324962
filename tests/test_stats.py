"""pyruntime.stats: paired comparisons, exact binomial bounds, Learn-then-Test."""
import math

import numpy as np
import pytest

from pyruntime import stats


def test_paired_bootstrap_interval_covers_the_difference_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    b = rng.random(2000) < 0.8
    a = b.copy()
    flip = rng.choice(2000, 60, replace=False)
    a[flip[:50]] = True   # a right where b may be wrong ...
    a[flip[50:]] = False  # ... and wrong on a few
    d, lo, hi = stats.paired_bootstrap(a, b, seed=1)
    assert d == pytest.approx(a.mean() - b.mean())
    assert lo <= d <= hi
    d2, lo2, hi2 = stats.paired_bootstrap(np.tile(a, 4), np.tile(b, 4), seed=1)
    assert hi2 - lo2 < hi - lo


def test_identical_outcomes_tie_with_a_zero_width_interval():
    a = np.array([1, 0, 1, 1, 0], bool)
    c = stats.compare(a, a)
    assert (c.diff, c.low, c.high, c.p_value, c.verdict) == (0.0, 0.0, 0.0, 1.0, "ties")


def test_verdicts():
    assert stats.verdict(0.001, 0.02) == "beats"
    assert stats.verdict(-0.02, -0.001) == "loses"
    assert stats.verdict(-0.01, 0.01) == "ties"
    b = np.zeros(400, bool)
    a = np.zeros(400, bool)
    a[:40] = True
    assert stats.compare(a, b).verdict == "beats" and stats.compare(b, a).verdict == "loses"


def test_mcnemar_matches_the_binomial_by_hand():
    # 2 images favour a, 8 favour b: p = 2 * P[Bin(10, .5) <= 2] = 2 * 56 / 1024
    a = np.array([1, 1] + [0] * 8 + [1] * 5, bool)
    b = np.array([0, 0] + [1] * 8 + [1] * 5, bool)
    assert stats.mcnemar(a, b) == pytest.approx(2 * 56 / 1024)


def test_clopper_pearson_known_values():
    lo, hi = stats.clopper_pearson(0, 10)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = stats.clopper_pearson(10, 10)
    assert hi == 1 and lo == pytest.approx(0.025 ** (1 / 10))
    _, up = stats.clopper_pearson(0, 100, alpha=0.05, side="upper")
    assert up == pytest.approx(1 - 0.05 ** (1 / 100))
    lo, hi = stats.clopper_pearson(30, 100)
    assert 0.21 < lo < 0.22 and 0.39 < hi < 0.41


def test_betainc_fallback_agrees_with_closed_forms():
    assert stats._betainc(1, 1, 0.3) == pytest.approx(0.3)
    assert stats._betainc(2, 1, 0.3) == pytest.approx(0.09)
    assert stats._betainc(1, 3, 0.2) == pytest.approx(1 - 0.8 ** 3)


def test_learn_then_test_certifies_a_prefix_and_stops_at_the_first_failure():
    n = 1000
    # target 5%: 20 and 30 errors are certainly below, 80 is not, 10 after it is never tested
    assert stats.learn_then_test([20, 30, 80, 10], n, target=0.05, delta=0.05) == [0, 1]
    assert stats.learn_then_test([60], n, target=0.05) == []
    p = stats.binomial_tail_p(30, n, 0.05)
    assert 0 < p < 0.01


@pytest.mark.parametrize("bad", [np.zeros((2, 2)), np.array([]), np.array([0, 2])])
def test_bad_outcomes_are_refused(bad):
    with pytest.raises(ValueError):
        stats.compare(bad, bad)
    with pytest.raises(ValueError, match="same images"):
        stats.compare(np.ones(3, bool), np.ones(4, bool))


def test_binomial_tail_edges():
    assert stats.binomial_tail_p(5, 5, 0.3) == 1.0
    assert stats.binomial_tail_p(0, 4, 0.5) == pytest.approx(1 / 16)
    assert math.isclose(stats.binomial_tail_p(3, 10, 0.2), sum(math.comb(10, i) * .2 ** i * .8 ** (10 - i) for i in range(4)))
