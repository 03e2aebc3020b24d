"""The report's statistics on hand-made cases with known answers."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pandas as pd
import pytest

from analysis.stats import binomial_two_sided_p, levels, sign_test, spearman, variance_explained


@pytest.mark.parametrize(
    ("k", "n", "p"),
    [
        (0, 5, 2 / 32),  # the smallest p five prompts can give: above 0.05
        (0, 6, 2 / 64),  # six prompts all one way: below
        (1, 10, 2 * 11 / 1024),  # R: binom.test(1, 10)$p.value = 0.02148438
        (3, 12, 2 * (1 + 12 + 66 + 220) / 4096),
        (5, 10, 1.0),  # the centre: capped at 1, not 2 * P(X <= 5)
        (0, 0, 1.0),  # no prompt differs
    ],
)
def test_binomial_two_sided_p_by_hand(k, n, p):
    assert binomial_two_sided_p(k, n) == pytest.approx(p, rel=1e-12)
    assert binomial_two_sided_p(n - k, n) == pytest.approx(p, rel=1e-12)  # two-sided: symmetric


def test_binomial_p_is_the_total_probability_of_outcomes_no_likelier_than_k():
    # The other textbook definition of an exact two-sided p; for p = 1/2 the two agree.
    for n in range(1, 25):
        probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
        for k in range(n + 1):
            expected = min(1.0, sum(q for q in probs if q <= probs[k] * (1 + 1e-12)))
            assert binomial_two_sided_p(k, n) == pytest.approx(expected, rel=1e-9), (k, n)


def test_binomial_p_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        binomial_two_sided_p(6, 5)


def test_sign_test_drops_equal_verdicts():
    best = [1.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0]
    cheap = [1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 1.0]
    test = sign_test(best, cheap)
    assert (test.better, test.worse, test.equal, test.shared) == (2, 0, 5, 7)
    assert test.p_value == pytest.approx(0.5)  # 2 of 2 one way: 2 * (1/2)^2


def test_sign_test_a_tie_against_a_loss_counts_as_a_difference():
    # Verdicts are against the base model: 0.5 (tie) beats 0 (loss) on that prompt.
    test = sign_test([0.5] * 6, [0.0] * 6)
    assert (test.better, test.worse, test.equal) == (6, 0, 0) and test.p_value == pytest.approx(2 / 64)


def test_sign_test_identical_trials_and_mismatched_lengths():
    assert sign_test([1, 0, 0.5], [1, 0, 0.5]) == (0, 0, 3, 1.0)
    with pytest.raises(ValueError, match="paired"):
        sign_test([1, 0], [1])


def test_spearman_scipy_documentation_example():
    # scipy.stats.spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) = 0.8207826816681233 (the 7s tie).
    corr = spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
    assert corr.rho == pytest.approx(0.8207826816681233, abs=1e-12) and corr.n == 5
    # By hand: se = sqrt((1 + rho²/2)/2) = 0.81757, atanh(rho) = 1.15921, z·se = 1.60241.
    assert (corr.low, corr.high) == pytest.approx((-0.41629, 0.99205), abs=1e-5)


def test_spearman_without_ties_is_one_minus_six_sum_d_squared():
    ppl, win = [4.1, 4.8, 5.5, 3.8], [0.62, 0.45, 0.35, 0.55]
    # rank differences (-2, -2, 1, 3): 1 - 6 * 18 / (4 * 15) = -0.8
    corr = spearman(ppl, win)
    assert corr.rho == pytest.approx(-0.8)
    # se = sqrt(1 + 0.32) over n - 3 = 1: a wide interval, as four trials deserve.
    assert (corr.low, corr.high) == pytest.approx((-0.99754, 0.81882), abs=1e-5)


def test_spearman_depends_on_ranks_only():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert spearman(np.exp(x), y ** 3) == pytest.approx(spearman(x, y))
    opposite = spearman(x, -y)
    assert opposite.rho == pytest.approx(-spearman(x, y).rho)
    assert (opposite.low, opposite.high) == pytest.approx((-spearman(x, y).high, -spearman(x, y).low))


def test_spearman_degenerate_cases_give_nan_not_a_false_interval():
    too_few = spearman([1, 2, 3], [3, 1, 2])
    assert too_few.rho == pytest.approx(-0.5) and math.isnan(too_few.low) and math.isnan(too_few.high)
    perfect = spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert perfect.rho == pytest.approx(1.0) and math.isnan(perfect.low)
    for x, y in (([1, 2], [2, 1]), ([1, 2, 3, 4], [5, 5, 5, 5])):
        assert math.isnan(spearman(x, y).rho)


def test_variance_explained_by_hand():
    # Groups explain everything: omega² = 1.
    assert variance_explained([1, 1, 3, 3], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    # SS_total 5, SS_between 4, MS_within 1/2: (4 - 0.5) / (5 + 0.5).
    assert variance_explained([1, 2, 3, 4], ["a", "a", "b", "b"]) == pytest.approx(3.5 / 5.5)
    # No difference between the group means: clipped at 0, never negative.
    assert variance_explained([1, 2, 2, 1], ["a", "a", "b", "b"]) == 0.0


def test_variance_explained_does_not_reward_many_levels():
    # A factor with 4 levels and no effect, over 8 values: eta² = SS_between / SS_total averages
    # 3/7; omega² is centred on 0 (clipping at 0 leaves a small positive mean).
    rng = np.random.default_rng(0)
    groups = pd.Series(list("aabbccdd"))
    omega, eta = [], []
    for _ in range(400):
        y = pd.Series(rng.normal(size=8))
        omega.append(variance_explained(y, groups))
        eta.append(((y.groupby(groups).transform("mean") - y.mean()) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    assert np.mean(eta) == pytest.approx(3 / 7, abs=0.03)
    assert np.mean(omega) < 0.2 and np.median(omega) < 0.05


def test_variance_explained_is_nan_when_it_cannot_be_estimated():
    assert math.isnan(variance_explained([1, 2, 3], ["a", "b", "c"]))  # one value per level
    assert math.isnan(variance_explained([1, 2, 3], ["a", "a", "a"]))  # one level
    assert math.isnan(variance_explained([2, 2, 2, 2], ["a", "a", "b", "b"]))  # nothing to explain


def test_levels_keeps_grid_values_and_cuts_many_values_into_log_quartiles():
    grid = pd.Series([1e-4, 1e-3, 1e-4, 3e-3])
    assert list(levels(grid)) == ["0.0001", "0.001", "0.0001", "0.003"]
    rates = pd.Series([10.0 ** (-5 + i / 2) for i in range(8)])  # 1e-5 .. 3.2e-2, log-spaced
    groups = levels(rates)
    assert groups.nunique() == 4 and list(groups.value_counts()) == [2, 2, 2, 2]
    assert groups.iloc[0] == "1e-05–3.16e-05" and groups.iloc[-1] == "0.01–0.0316"
    assert list(levels(pd.Series([[1, 2], [1, 2], [3]]))) == ["1, 2", "1, 2", "3"]


def test_sign_test_p_values_are_uniform_enough_under_the_null():
    # Two trials judged by coin flips: p < 0.05 at most about 5% of the time (exact tests are conservative).
    rng = np.random.default_rng(3)
    rejections = sum(
        sign_test(rng.integers(0, 2, 50), rng.integers(0, 2, 50)).p_value < 0.05 for _ in range(2000)
    )
    assert rejections / 2000 < 0.06


def test_small_grid_of_all_outcomes_is_consistent():
    for a, b in product([0.0, 0.5, 1.0], repeat=2):
        test = sign_test([a], [b])
        assert test.p_value == 1.0 and test.better == int(a > b) and test.worse == int(a < b)
