"""Optuna's samplers through Ray Tune, without training a configuration twice.

On a discrete space (grids and choices), TPE and NSGA-II propose configurations that already ran.
A trial's training is seeded (`train.seed`), so running one again costs its compute and
answers nothing new. `OptunaSearchOnce` gives Optuna the earlier result of a repeated proposal
at once and asks again; only new configurations become trials, and once every configuration of a
finite space has run, the search ends. A configuration that ASHA stopped early answers with the
value it stopped at (run again, it would most likely be stopped again).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict

from hpo.trial import STATUS_KEY
from trainers.vocabulary import TrialStatus

MAX_REPEATS = 20  # proposals in a row that all ran before: then the last one runs after all


def config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


class OptunaSearchOnce(OptunaSearch):
    """Ray Tune's OptunaSearch that answers a repeated configuration from its earlier result.

    `space_size` is the number of configurations of a finite space (None: infinite), after
    which the search is finished.
    """

    def __init__(self, *args: Any, space_size: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.space_size = space_size
        self.results: dict[str, Any] = {}  # config key -> the objective value(s) it ended with
        self.repeats_answered = 0
        self.last_judged: dict[str, list[float]] = {}  # trial id -> its latest objective values that are numbers

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.space_size is not None and len(self.results) >= self.space_size:
            return Searcher.FINISHED
        for _ in range(MAX_REPEATS - 1):
            config = super().suggest(trial_id)
            known = self.results.get(config_key(config)) if config is not None else None
            if known is None:
                return config
            self._ot_study.tell(self._ot_trials.pop(trial_id), known)  # as if it had run again
            self.repeats_answered += 1
        return super().suggest(trial_id)  # repeats only (a space nearly used up): this one runs after all

    def _metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        values = [result.get(m) for m in self._metrics()]
        if all(isinstance(v, (int, float)) and not math.isnan(v) for v in values):
            self.__dict__.setdefault("last_judged", {})[trial_id] = values  # (a searcher restored from an older state lacks it)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # A last epoch the judge missed reports NaN (hpo.trial._unjudged_objectives), which Optuna
        # would record as a failed trial: it learns the trial's last judged values instead.
        known = getattr(self, "last_judged", {}).pop(trial_id, None)
        unjudged = result and any(isinstance(result.get(m), float) and math.isnan(result[m]) for m in self._metrics())
        if unjudged and known is not None:
            result = {**result, **dict(zip(self._metrics(), known))}
        trial = self._ot_trials.get(trial_id)
        if trial is not None and result and not error and result.get(STATUS_KEY) != TrialStatus.ERROR:
            values = [result.get(m) for m in self._metrics()]
            # A trial that diverged, ran out of memory or was infeasible would again: its worst values
            # (inf for a minimized objective) are remembered too. An error may not recur: it is not.
            if all(isinstance(v, (int, float)) and not math.isnan(v) for v in values):
                key = config_key(unflatten_dict(trial.params))  # as `suggest` returned it
                self.results[key] = values if isinstance(self.metric, list) else values[0]
        super().on_trial_complete(trial_id, result, error)
