"""Mirrors of a sweep's results store in the tools users already know: an Optuna study
(runs/<name>/optuna.db, for optuna-dashboard and optuna.visualization), MLflow runs, and Weights &
Biases through Ray Tune's integration.

The store stays the source of truth. Each mirror is rebuilt or updated from it, so that resume,
retries and rejudging leave the mirrors equal to the store, and a tracker that fails costs the
sweep nothing but a warning. The driver calls `tracking.hooks`; what a trial's result is (its best
epoch, its objectives' values) is analysis's decision, read through `tracking.outcomes`.
"""
