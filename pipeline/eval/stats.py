"""Confidence intervals over seeds for `fedmoe compare`, with no scipy.

A method's accuracy over n seeds gets the t interval mean ± t(0.975, n-1) * s / sqrt(n), s the
sample standard deviation. Its difference to a reference method is paired by seed (the same
seed gives both runs the same data split, clients and evaluation prompts), so the interval is
the t interval of the n per-seed differences; it excludes zero when |mean| > half-width.

Student's t quantile is found by bisection on its CDF, which is a regularized incomplete
beta function evaluated by its continued fraction (Numerical Recipes, 6.4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

__all__ = ["t_cdf", "t_quantile", "Interval", "mean_interval", "paired_interval", "binomial_se"]


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection to ~1e-12 relative)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    """mean ± half (the `level` t interval); half is NaN with fewer than two values."""

    mean: float
    half: float
    n: int
    level: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and abs(self.mean) > self.half

    def to_json(self) -> dict:
        return {**asdict(self), "low": self.low, "high": self.high, "excludes_zero": self.excludes_zero}


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and t confidence interval of independent values (one per seed)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, math.nan, n, level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n), n, level)


def paired_interval(values: Sequence[float], reference: Sequence[float], level: float = 0.95) -> Interval:
    """Interval of the per-seed differences values[i] - reference[i] (same seeds, same order)."""
    if len(values) != len(reference):
        raise ValueError(f"paired_interval: {len(values)} values against {len(reference)} reference values")
    return mean_interval([v - r for v, r in zip(values, reference)], level)


def binomial_se(p: float, n: int) -> float:
    """Standard error of one accuracy measured on n prompts: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1.0 - p) / n)
