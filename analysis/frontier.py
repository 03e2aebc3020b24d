"""Pareto frontier of a table of trials over a few objectives."""

from __future__ import annotations

import numpy as np
import pandas as pd


def pareto_front(df: pd.DataFrame, objectives: dict[str, str]) -> pd.Series:
    """True for the rows no other row dominates on `objectives` ({column: "min" | "max"}).

    A row dominates another when it is at least as good on every objective and better on one,
    so exact duplicates of a frontier point are all on the front. Rows with NaN in an objective
    are never on the front and dominate nothing.
    """
    if not objectives:
        raise ValueError("pareto_front needs at least one objective")
    for column, mode in objectives.items():
        if mode not in ("min", "max"):
            raise ValueError(f"objective {column!r}: mode must be 'min' or 'max', not {mode!r}")
        if column not in df.columns:
            raise ValueError(f"objective {column!r} is not a column (columns: {', '.join(map(str, df.columns))})")

    # Turn every objective into a cost: lower is better.
    costs = np.column_stack(
        [df[c].to_numpy(dtype=float) * (1.0 if mode == "min" else -1.0) for c, mode in objectives.items()]
    )
    valid = ~np.isnan(costs).any(axis=1)
    candidates = costs[valid]

    # O(n²) comparisons, one row at a time: a sweep has at most a few thousand trials.
    dominated = np.array(
        [((candidates <= c).all(axis=1) & (candidates < c).any(axis=1)).any() for c in candidates], dtype=bool
    )
    on_front = np.zeros(len(df), dtype=bool)
    on_front[valid] = ~dominated
    return pd.Series(on_front, index=df.index, name="on_front")
