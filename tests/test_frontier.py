import itertools

import numpy as np
import pandas as pd
import pytest

from analysis.frontier import pareto_front


def front_of(df: pd.DataFrame, objectives: dict[str, str]) -> list:
    return list(df.index[pareto_front(df, objectives)])


def test_two_objectives_both_minimised():
    df = pd.DataFrame({"seconds": [1, 2, 3, 4, 5], "ppl": [5.0, 3.0, 4.0, 1.0, 1.0]}, index=list("abcde"))
    # c is beaten by b on both; e ties d on ppl but costs more.
    assert front_of(df, {"seconds": "min", "ppl": "min"}) == ["a", "b", "d"]


def test_max_and_min_mixed():
    df = pd.DataFrame({"seconds": [10, 20, 30, 40], "win_rate": [0.4, 0.6, 0.5, 0.7]})
    assert front_of(df, {"seconds": "min", "win_rate": "max"}) == [0, 1, 3]
    # Flipping a direction changes the answer: now slow and bad is good.
    assert front_of(df, {"seconds": "max", "win_rate": "min"}) == [0, 2, 3]


def test_three_objectives_keep_points_dominated_in_two():
    df = pd.DataFrame(
        {
            "seconds": [1.0, 2.0, 2.0, 3.0],
            "win_rate": [0.5, 0.6, 0.6, 0.4],
            "memory_gb": [8.0, 8.0, 9.0, 4.0],
        }
    )
    # Row 3 is dominated on (seconds, win_rate) but needs the least memory; row 2 ties row 1 on
    # seconds and win_rate, so it survives in two objectives and falls to row 1's memory in three.
    assert front_of(df, {"seconds": "min", "win_rate": "max"}) == [0, 1, 2]
    assert front_of(df, {"seconds": "min", "win_rate": "max", "memory_gb": "min"}) == [0, 1, 3]


def test_duplicates_are_all_on_the_front_and_ties_on_one_axis_decide_by_the_other():
    df = pd.DataFrame({"x": [1, 1, 1, 2], "y": [3, 3, 5, 1]})
    # Rows 0 and 1 are identical: neither dominates the other. Row 2 ties on x and loses on y.
    assert front_of(df, {"x": "min", "y": "min"}) == [0, 1, 3]


def test_nan_rows_are_never_on_the_front_and_dominate_nothing():
    df = pd.DataFrame({"x": [0.0, 1.0, 2.0, np.nan], "y": [np.nan, 5.0, 4.0, 0.0]})
    # Rows 0 and 3 would dominate everything if their NaN were ignored.
    assert front_of(df, {"x": "min", "y": "min"}) == [1, 2]
    assert not pareto_front(df.iloc[[0, 3]], {"x": "min", "y": "min"}).any()


def test_keeps_the_index_and_handles_empty_tables():
    df = pd.DataFrame({"x": [3, 1], "y": [1, 3]}, index=["t-9", "t-2"])
    result = pareto_front(df, {"x": "min", "y": "min"})
    assert list(result.index) == ["t-9", "t-2"] and result.all()
    empty = pareto_front(df.iloc[0:0], {"x": "min", "y": "max"})
    assert empty.empty and empty.dtype == bool


def test_agrees_with_the_definition_on_random_tables_with_many_ties():
    rng = np.random.default_rng(0)
    for trial in range(30):
        k = 2 + trial % 2
        df = pd.DataFrame(rng.integers(0, 5, size=(25, k)), columns=list("abc")[:k]).astype(float)
        df.iloc[rng.integers(0, 25, size=3), 0] = np.nan
        modes = dict(zip(df.columns, itertools.cycle(["min", "max"]) if trial % 3 else ["max"] * k))
        sign = np.array([1 if m == "min" else -1 for m in modes.values()])
        rows = [None if np.isnan(r).any() else r * sign for r in df.to_numpy()]

        def dominated(r):
            return any(o is not None and (o <= r).all() and (o < r).any() for o in rows)

        expected = [r is not None and not dominated(r) for r in rows]
        assert pareto_front(df, modes).tolist() == expected


def test_rejects_bad_objectives():
    df = pd.DataFrame({"x": [1], "y": [2]})
    with pytest.raises(ValueError, match="'y'.*'min' or 'max'"):
        pareto_front(df, {"x": "min", "y": "maximize"})
    with pytest.raises(ValueError, match="'z' is not a column"):
        pareto_front(df, {"x": "min", "z": "min"})
    with pytest.raises(ValueError, match="at least one objective"):
        pareto_front(df, {})
