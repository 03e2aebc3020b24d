"""Interval statistics for win rates: Wilson for win/loss/tie counts, a bootstrap for per-prompt soft scores."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def wilson_interval(wins: int, losses: int, ties: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a win rate in which a tie counts one half.

    A tie is half a win: n = wins + losses + ties trials with wins + ties / 2 successes, and the
    usual Wilson interval of the proportion p = successes / n. Ties thereby add variance as if they
    were a coin flip each, which errs on the wide side (30 ties out of 30 give about [0.33, 0.67]).
    z = 1.96 gives 95%.
    """
    n = wins + losses + ties
    if min(wins, losses, ties) < 0 or n == 0:
        raise ValueError(f"wilson_interval needs non-negative counts, not all zero (got {wins}, {losses}, {ties})")
    p = (wins + ties / 2) / n
    z2 = z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_interval(
    scores: Sequence[float], *, seed: int, n_resamples: int = 2000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-prompt scores, resampling prompts with replacement."""
    values = np.asarray(scores, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_interval needs at least one score")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1 (got {level})")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)
