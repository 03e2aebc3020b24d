"""The statistics the report states: a paired sign test, Spearman's rank correlation with an interval,
and each parameter's share of the variance of a metric.

Small closed formulas on numpy and pandas, so the report needs no scipy.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

# A numeric parameter with more distinct values than this is cut into quartiles to average over it.
MAX_LEVELS = 6


class SignTest(NamedTuple):
    better: int  # prompts where the first trial's verdict is higher
    worse: int  # prompts where the second trial's verdict is higher
    equal: int  # dropped by the test
    p_value: float

    @property
    def shared(self) -> int:
        return self.better + self.worse + self.equal


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k heads in n fair coin flips: the smaller tail, doubled, at most 1."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n (got k={k}, n={n})")
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers until this one division


def sign_test(a: Sequence[float], b: Sequence[float]) -> SignTest:
    """Paired exact sign test of two trials' verdicts on the same prompts (two-sided; equal pairs dropped)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"sign_test needs paired values (got {x.size} and {y.size})")
    better, worse = int((x > y).sum()), int((x < y).sum())
    return SignTest(better, worse, x.size - better - worse, binomial_two_sided_p(better, better + worse))


class PairedDifference(NamedTuple):
    mean: float  # mean of the second's values minus the first's, prompt by prompt
    low: float  # the mean's two-sided interval (NaN with fewer than 2 pairs)
    high: float
    n: int


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedDifference:
    """Mean paired difference b - a with a Student t interval: mean ± t(n-1) x sd / sqrt(n).

    For verdicts (1 win, 0.5 tie, 0 loss against the base model) the mean is the difference of the two
    win rates over the shared prompts. When every difference is equal the interval is that one value.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired_difference needs paired values (got {x.size} and {y.size})")
    d = y - x
    n = d.size
    if n < 2:
        mean = float(d.mean()) if n else math.nan
        return PairedDifference(mean, math.nan, math.nan, n)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n)


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile by the Cornish-Fisher expansion around the normal's (Abramowitz & Stegun
    26.7.5, four terms): at p = 0.975 within 0.03 % of the exact value from df = 4, 0.8 % low at df = 2,
    11 % low at df = 1 (two pairs: too few for any interval worth stating; the report asks for 10)."""
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


class Correlation(NamedTuple):
    rho: float
    low: float  # NaN when there is no interval (n < 4, or |rho| = 1)
    high: float
    n: int


def spearman(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> Correlation:
    """Spearman's rank correlation with a Fisher-z interval using Bonett and Wright's standard error.

    rho is Pearson's correlation of the average ranks (ties share their mean rank); NaN when n < 3
    or either variable is constant. The interval is tanh(atanh(rho) ± z·se) with
    se = sqrt((1 + rho²/2) / (n - 3)) (Bonett & Wright 2000, Psychometrika 65:23-28), which
    needs n >= 4 and |rho| < 1; it is approximate for small n.
    """
    x, y = pd.Series(x, dtype=float), pd.Series(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"spearman needs paired values (got {len(x)} and {len(y)})")
    n = len(x)
    nan = Correlation(math.nan, math.nan, math.nan, n)
    if n < 3:
        return nan
    rx, ry = x.rank().to_numpy(), y.rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return nan
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rho = max(-1.0, min(1.0, rho))
    if n < 4 or abs(rho) >= 1 - 1e-12:
        return Correlation(rho, math.nan, math.nan, n)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    se = math.sqrt((1 + rho**2 / 2) / (n - 3))
    centre = math.atanh(rho)
    return Correlation(rho, math.tanh(centre - z * se), math.tanh(centre + z * se), n)


def levels(values: pd.Series) -> pd.Series:
    """The groups to average a parameter over: its values, or quartiles when it has more than MAX_LEVELS.

    Quartiles of log10 when the values are positive and span more than a factor 10 (learning
    rates); the groups are labelled by their value ranges.
    """
    text = values.map(_text)
    if text.nunique() <= MAX_LEVELS or any(isinstance(v, (list, tuple, str)) for v in values):
        return text
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().any():
        return text
    scale = np.log10(numeric) if (numeric > 0).all() and numeric.max() > 10 * numeric.min() else numeric
    bins = pd.qcut(scale, 4, duplicates="drop", labels=False)
    ranges = numeric.groupby(bins).agg(["min", "max"])
    names = {b: f"{_text(r['min'])}–{_text(r['max'])}" for b, r in ranges.iterrows()}
    return bins.map(names)


def variance_explained(values: pd.Series, groups: pd.Series) -> float:
    """Omega squared of a one-way ANOVA: the share of the variance of `values` that `groups` explains.

    ω² = (SS_between - (k - 1)·MS_within) / (SS_total + MS_within), clipped at 0. Unlike
    eta² = SS_between / SS_total it does not reward a factor for merely having many levels
    (eta² of a useless factor with k levels over n values averages (k - 1)/(n - 1)).
    NaN when there are fewer than 2 groups, no replication (k = n), or no variance at all.
    """
    y = pd.Series(values, dtype=float).reset_index(drop=True)
    g = pd.Series(groups).reset_index(drop=True)
    n, k = len(y), g.nunique()
    total = float(((y - y.mean()) ** 2).sum())
    if k < 2 or n <= k or total == 0:
        return math.nan
    means = y.groupby(g).transform("mean")
    between = float(((means - y.mean()) ** 2).sum())
    within_ms = (total - between) / (n - k)
    return max(0.0, (between - (k - 1) * within_ms) / (total + within_ms))


def _text(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_text, value))
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
