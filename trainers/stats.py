"""The interval of a win rate: Wilson for win/loss/tie counts. (Tests between trials: analysis/stats.py.)"""

from __future__ import annotations

import math


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

