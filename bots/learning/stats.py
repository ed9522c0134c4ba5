"""The statistics of feedback: Wilson intervals and the canary's non-inferiority test.

Pure functions of counts (no I/O, no scipy), so every number in /status, `mynah feedback`
and a canary verdict can be recomputed by hand.

The canary test: is the candidate's positive rate p_c not worse than the active model's
p_a by more than a margin δ?  H0: p_c - p_a <= -δ  against  H1: p_c - p_a > -δ, a one-sided
Wald z-test with the unpooled standard error

    z = (p_c - p_a + δ) / sqrt(p_c(1-p_c)/n_c + p_a(1-p_a)/n_a),   p = 1 - Φ(z),

rejected (candidate promoted) when p < α. Equivalently: the lower bound of the one-sided
(1-α) confidence interval of p_c - p_a lies above -δ. The normal approximation wants both
samples reasonably large, hence [learning] canary_min_replies per side (and a 0/1 rate gets
the Agresti–Caffo "+1 success, +1 failure" adjustment so its standard error is never 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def norm_ppf(p: float) -> float:
    """Inverse of norm_cdf by bisection (only used for a handful of α values)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if norm_cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% by default); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class NonInferiority:
    """The result of `non_inferiority` (rates, difference, z, one-sided p, lower bound)."""

    n_candidate: int
    k_candidate: int
    n_active: int
    k_active: int
    margin: float
    alpha: float
    p_candidate: float
    p_active: float
    diff: float           # p_c - p_a
    se: float
    z: float
    p_value: float        # one-sided, H0: diff <= -margin
    lower: float          # lower bound of the one-sided (1 - alpha) interval of diff

    @property
    def not_worse(self) -> bool:
        return self.p_value < self.alpha

    def text(self) -> str:
        return (f"positive rate candidate {self.k_candidate}/{self.n_candidate} = {self.p_candidate:.1%}, "
                f"active {self.k_active}/{self.n_active} = {self.p_active:.1%}; difference {self.diff:+.1%} "
                f"(one-sided {1 - self.alpha:.0%} lower bound {self.lower:+.1%}, margin -{self.margin:.1%}); "
                f"z = {self.z:.2f}, p = {self.p_value:.4f}")


def non_inferiority(k_c: int, n_c: int, k_a: int, n_a: int, *, margin: float, alpha: float) -> NonInferiority:
    """One-sided non-inferiority z-test of two proportions (see the module docstring)."""
    if n_c <= 0 or n_a <= 0:
        raise ValueError("both samples need at least one reply")
    p_c, p_a = k_c / n_c, k_a / n_a
    # Agresti–Caffo adjustment for the standard error only: a 0% or 100% rate still has spread.
    q_c, q_a = (k_c + 1) / (n_c + 2), (k_a + 1) / (n_a + 2)
    se = math.sqrt(q_c * (1 - q_c) / n_c + q_a * (1 - q_a) / n_a)
    diff = p_c - p_a
    z = (diff + margin) / se
    return NonInferiority(n_c, k_c, n_a, k_a, margin, alpha, p_c, p_a, diff, se, z, 1 - norm_cdf(z),
                          diff - norm_ppf(1 - alpha) * se)


def sample_size(p: float, margin: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Replies per side for the test to show non-inferiority with this power when both rates are p."""
    za, zb = norm_ppf(1 - alpha), norm_ppf(power)
    return math.ceil((za + zb) ** 2 * 2 * p * (1 - p) / margin ** 2)
