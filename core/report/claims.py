"""The one claim rule of every report: paired difference across seeds, its standard error, a
stated minimum effect, and the minimal detectable effect (MDE) printed beside the verdict.

For a claim "A beats B by at least ``min_effect``" with paired per-seed differences d (S,)
oriented so that positive favours A: mean d, SE = sd(d) / sqrt(S), a two-sided
(1 - alpha) t interval [lo, hi], and the MDE: the smallest true effect the design detects
with probability ``power`` (noncentral t with S - 1 degrees of freedom, :func:`mde`).

- ``holds``: lo > 0 and mean >= min_effect (an effect, and at least the one claimed);
- ``does not hold``: hi < min_effect (the data exclude an effect as large as the claimed one);
- ``inconclusive``: anything else, e.g. an effect smaller than the MDE; one seed is always
  inconclusive.

So "inconclusive (MDE 0.9)" reads "no effect larger than about 0.9 could be seen here".
Cumming 2014, "The New Statistics" (estimation with CIs); Cohen 1988 for power/MDE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from core.report.stats import t_quantile

__all__ = ["VERDICTS", "Claim", "mde", "paired_claim"]

VERDICTS = ("holds", "does not hold", "inconclusive")


def mde(se: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimal detectable effect of a paired design with standard error ``se`` over ``n``
    seeds: the true mean difference that a two-sided one-sample t-test at level ``alpha``
    detects with probability ``power`` (noncentral t with n - 1 degrees of freedom); inf for
    n < 2. Close to (t_{1-alpha/2} + t_{power}) se, which undershoots for few seeds."""
    if n < 2 or not math.isfinite(se):
        return math.inf
    from scipy.optimize import brentq
    from scipy.stats import nct

    df, crit = n - 1, t_quantile(1 - alpha / 2, n - 1)

    def shortfall(delta: float) -> float:
        lower = nct.cdf(-crit, df, delta)  # the wrong-sign rejections; NaN-prone, ~0 here
        return float(nct.sf(crit, df, delta) + np.nan_to_num(lower)) - power

    hi = crit + t_quantile(power, df)  # the normal-style approximation undershoots: grow it
    while shortfall(hi) < 0:
        hi *= 2
    return brentq(shortfall, 0.0, hi, xtol=1e-12) * se


@dataclass(frozen=True)
class Claim:
    """A verdict with its evidence (all in the claim's units, positive = claim's direction)."""

    verdict: str
    mean: float
    se: float
    n: int
    ci_low: float
    ci_high: float
    min_effect: float
    mde: float

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self, unit: str = "", digits: int = 2) -> str:
        """``holds: +1.23 ± 0.31 pts (95 % CI 0.60 to 1.86, n 5; min 0.50, MDE 0.90)``."""
        u = f" {unit}" if unit else ""
        f = f"{{:+.{digits}f}}".format
        g = f"{{:.{digits}f}}".format
        if self.n < 2:
            return f"{self.verdict}: {f(self.mean)}{u} (n 1: no standard error)"
        return (
            f"{self.verdict}: {f(self.mean)} ± {g(self.se)}{u} "
            f"(95 % CI {g(self.ci_low)} to {g(self.ci_high)}, n {self.n}; "
            f"min {g(self.min_effect)}, MDE {g(self.mde)})"
        )


def paired_claim(
    diffs: Iterable[float],
    *,
    min_effect: float,
    alpha: float = 0.05,
    power: float = 0.8,
) -> Claim:
    """The verdict on paired differences ``diffs`` (S,) (A - B per seed, positive = claim's
    direction) for a claimed effect of at least ``min_effect`` (see the module docstring)."""
    d = np.asarray(list(diffs), dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.isfinite(d).all():
        raise ValueError(f"diffs must be a non-empty 1-D sequence of finite numbers, got {d}")
    if not (math.isfinite(min_effect) and min_effect >= 0):
        raise ValueError(f"min_effect must be a finite number >= 0, got {min_effect!r}")
    if not (0 < alpha < 1 and 0 < power < 1):
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha!r}, {power!r}")
    n, mean = int(d.size), float(d.mean())
    if n < 2:
        return Claim("inconclusive", mean, math.nan, 1, -math.inf, math.inf, min_effect, math.inf)
    se = float(d.std(ddof=1) / math.sqrt(n))
    half = t_quantile(1 - alpha / 2, n - 1) * se
    lo, hi = mean - half, mean + half
    if lo > 0 and mean >= min_effect:
        verdict = "holds"
    elif hi < min_effect:
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    return Claim(verdict, mean, se, n, lo, hi, min_effect, mde(se, n, alpha=alpha, power=power))
