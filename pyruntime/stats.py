"""Statistics for comparing two models on the same test images, and for risk bounds.

Every comparison in ``results/`` is *paired*: both policies answer the same images, so the
question is whether their per-image correctness differs, not whether two independent
accuracies do. Two views of it:

* :func:`paired_bootstrap` -- a percentile interval of acc(a) - acc(b), resampling images
  (both policies' outcomes on an image move together);
* :func:`mcnemar` -- the exact (binomial) McNemar test on the discordant images.

:func:`verdict` turns the interval into the word the results tables print. For risk control
(MAQEE's threshold choice) :func:`clopper_pearson` gives the exact binomial bounds of an
error rate and :func:`learn_then_test` the fixed-sequence Learn-then-Test selection over a
grid of candidates (Angelopoulos et al., 2021): every candidate it returns has risk <= the
target with probability >= 1 - delta, jointly.

Numpy only (the beta quantiles come from scipy when it is installed, else from a bisection on
the regularised incomplete beta computed by continued fraction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["PairedComparison", "paired_bootstrap", "mcnemar", "verdict", "compare", "clopper_pearson",
           "binomial_tail_p", "learn_then_test"]


def _correct(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name}: a non-empty 1-d array of per-image correctness, got shape {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name}: per-image correctness must be 0/1 or bool")
        a = a.astype(bool)
    return a


def _pair(a, b) -> Tuple[np.ndarray, np.ndarray]:
    a, b = _correct(a, "a"), _correct(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same images: {a.size} vs {b.size} outcomes")
    return a, b


def paired_bootstrap(a, b, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> Tuple[float, float, float]:
    """(acc(a) - acc(b), low, high): the percentile interval at ``level`` of the accuracy
    difference over ``n_boot`` resamples of the images (with replacement, fixed seed)."""
    a, b = _pair(a, b)
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("level must be in (0, 1) and n_boot >= 1")
    d = a.astype(np.int8) - b.astype(np.int8)
    n = d.size
    rng = np.random.default_rng(seed)
    # Only the discordant images move the difference; resampling counts of the three outcome
    # kinds (a only, b only, both/neither) is the same bootstrap in O(n_boot) memory.
    p = np.array([(d == 1).sum(), (d == -1).sum(), (d == 0).sum()], dtype=np.float64) / n
    counts = rng.multinomial(n, p, size=n_boot)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return float(d.mean()), float(lo), float(hi)


def binomial_tail_p(k: int, n: int, p: float = 0.5) -> float:
    """P[X <= k] for X ~ Binomial(n, p), summed in log space (exact for the sizes here)."""
    if n < 0 or not 0 <= k or not 0 <= p <= 1:
        raise ValueError("binomial_tail_p: n >= 0, k >= 0, 0 <= p <= 1")
    if k >= n:
        return 1.0
    if p == 0:
        return 1.0
    if p == 1:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    m = max(terms)
    return float(min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms)))


def mcnemar(a, b) -> float:
    """Two-sided exact McNemar p-value: under H0 the images only one of the two gets right
    are equally likely to favour either."""
    a, b = _pair(a, b)
    n01, n10 = int((~a & b).sum()), int((a & ~b).sum())
    n = n01 + n10
    if n == 0:
        return 1.0
    return min(1.0, 2 * binomial_tail_p(min(n01, n10), n, 0.5))


def verdict(lo: float, hi: float) -> str:
    """'beats' when the whole interval of acc(method) - acc(baseline) is above zero, 'loses'
    when below, else 'ties' (the data cannot tell them apart)."""
    if lo > 0:
        return "beats"
    if hi < 0:
        return "loses"
    return "ties"


@dataclass(frozen=True)
class PairedComparison:
    """acc(a) - acc(b) on the same images, its bootstrap interval, McNemar's p and the verdict."""

    diff: float
    low: float
    high: float
    p_value: float
    verdict: str
    images: int

    def text(self) -> str:
        return (f"{100 * self.diff:+.2f} pp [{100 * self.low:+.2f}, {100 * self.high:+.2f}], "
                f"McNemar p={self.p_value:.3g}")


def compare(a, b, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> PairedComparison:
    """:func:`paired_bootstrap` + :func:`mcnemar` + :func:`verdict` of method ``a`` against
    baseline ``b``."""
    diff, lo, hi = paired_bootstrap(a, b, n_boot, level, seed)
    return PairedComparison(diff, lo, hi, mcnemar(a, b), verdict(lo, hi), int(np.asarray(a).size))


# --- exact binomial bounds and Learn-then-Test --------------------------------------------------

def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by Lentz's continued fraction (Numerical Recipes)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f / a


def _beta_ppf(q: float, a: float, b: float) -> float:
    try:
        from scipy.stats import beta

        return float(beta.ppf(q, a, b))
    except ImportError:  # pragma: no cover - exercised where scipy is absent
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = (lo + hi) / 2
            if _betainc(a, b, mid) < q:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2


def clopper_pearson(k: int, n: int, alpha: float = 0.05, side: str = "two") -> Tuple[float, float]:
    """Exact binomial confidence bounds of a rate from ``k`` events in ``n`` trials: the
    two-sided interval at 1 - alpha, or with ``side='upper'`` the one-sided upper bound
    (lower = 0) that risk control needs."""
    if not (0 <= k <= n and n >= 1 and 0 < alpha < 1 and side in ("two", "upper")):
        raise ValueError("clopper_pearson: 0 <= k <= n, n >= 1, 0 < alpha < 1, side 'two' or 'upper'")
    a = alpha / 2 if side == "two" else alpha
    lo = 0.0 if (k == 0 or side == "upper") else _beta_ppf(a, k, n - k + 1)
    hi = 1.0 if k == n else _beta_ppf(1 - a, k + 1, n - k)
    return lo, hi


def learn_then_test(errors: Sequence[int], n: int, target: float, delta: float = 0.05) -> List[int]:
    """Learn-then-Test with fixed-sequence testing: ``errors[j]`` events in ``n`` validation
    trials for candidate j, the candidates ordered from safest to boldest. Tests H_j: risk_j >
    target with the exact binomial p-value P[Bin(n, target) <= errors[j]], each at level
    ``delta``, in order, stopping at the first that fails. Returns the indices certified
    (a prefix of the sequence); their risks are all <= target with probability >= 1 - delta."""
    if not (0 < target < 1 and 0 < delta < 1 and n >= 1):
        raise ValueError("learn_then_test: 0 < target < 1, 0 < delta < 1, n >= 1")
    certified: List[int] = []
    for j, k in enumerate(errors):
        if not 0 <= int(k) <= n:
            raise ValueError(f"learn_then_test: candidate {j} has {k} errors out of {n}")
        if binomial_tail_p(int(k), n, target) > delta:
            break
        certified.append(j)
    return certified
