"""The Ray Tune callback that mirrors each trial into MLflow while the sweep runs (tracking.mlflow_runs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from hpo.store import Store
from tracking.mlflow_runs import MLFLOW, MlflowRuns, reason
from tracking.outcomes import store_outcome


class MlflowCallback(Callback):
    """Mirrors each trial into MLflow as Ray Tune reports it, after StoreCallback has stored it.

    MLflow failing is said once and the sweep goes on without it (the store keeps every result;
    the mirror after the sweep brings MLflow up to date).
    """

    def __init__(self, store_path: Path, say: Callable[[str], None] | None = None):
        self.path, self.say = store_path.resolve(), say
        self._store: Store | None = None
        self._runs: MlflowRuns | None = None
        self.failed = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into its experiment state: a restored one (resume) reopens the store, and
        # finds the runs by the store's record, which `resume` brought up to date.
        return {"path": self.path, "say": None, "_store": None, "_runs": None, "failed": False}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._mirror(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._mirror(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._mirror(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._mirror(trial.trial_id)

    def _mirror(self, trial_id: str) -> None:
        if self.failed:
            return
        try:
            if self._store is None:
                self._store = Store.open(self.path)
                self._runs = MlflowRuns(**self._store.tracking()[MLFLOW])
            [trial] = self._store.trials(trial_id)
            self._runs.sync_trial(store_outcome(trial, self._store.epochs(trial_id)))
        except Exception as exc:  # MLflow down or refusing: the sweep must not end for it
            self.failed = True
            line = (f"Warning: MLflow: {reason(exc)}; the sweep goes on without it "
                    f"(its store keeps every result, and MLflow is brought up to date when the sweep ends)")  # fmt: skip
            (self.say or (lambda text: print(text, file=sys.stderr, flush=True)))(line)
