"""Interval statistics on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from trainers.evaluate import win_rate
from trainers.stats import wilson_interval


def test_wilson_31_wins_of_50():
    low, high = wilson_interval(31, 19, 0)
    assert (round(low, 3), round(high, 3)) == (0.482, 0.741)


def test_wilson_counts_a_tie_as_half_a_win():
    # 30 wins + 2 ties + 18 losses is 31 successes of 50, the case above
    assert wilson_interval(30, 18, 2) == pytest.approx(wilson_interval(31, 19, 0))


def test_wilson_all_wins_reaches_one_and_stays_below_it_at_the_low_end():
    low, high = wilson_interval(50, 0, 0)
    # by hand: n/(n + z^2) = 50 / 53.8416
    assert low == pytest.approx(50 / (50 + 1.96**2))
    assert high == pytest.approx(1.0)


def test_wilson_no_wins_mirrors_all_wins():
    low, high = wilson_interval(0, 50, 0)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(1.96**2 / (50 + 1.96**2))


def test_wilson_all_ties_is_centred_on_one_half():
    low, high = wilson_interval(0, 0, 30)
    # p = 0.5: half-width = z / (1 + z^2/n) * sqrt(1/(4n) + z^2/(4n^2))
    n, z = 30, 1.96
    half = z / (1 + z * z / n) * math.sqrt(0.25 / n + z * z / (4 * n * n))
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))
    assert round(low, 2) == 0.33


def test_wilson_needs_some_counts():
    with pytest.raises(ValueError):
        wilson_interval(0, 0, 0)


def test_win_rate_carries_its_interval():
    verdicts = [1.0] * 31 + [0.0] * 19
    result = win_rate(verdicts)
    assert (result["wins"], result["losses"], result["ties"]) == (31, 19, 0)
    assert result["win_rate"] == pytest.approx(0.62)
    assert (round(result["win_rate_low"], 3), round(result["win_rate_high"], 3)) == (0.482, 0.741)
