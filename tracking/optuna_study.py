"""runs/<name>/optuna.db: the sweep as an Optuna study, whatever its search algorithm, for
`optuna-dashboard sqlite:///runs/<name>/optuna.db` and `optuna.visualization`.

Rebuilt from the store as a whole each time (into a file beside, then renamed over the old one), so
that it never holds a trial twice or a state the store no longer has. Early-stopped trials are
PRUNED, failed ones FAIL, running ones RUNNING; a finished trial is COMPLETE with its objectives'
values as the report reads them, or FAIL when one of them was never measured (Optuna keeps no NaN
in a complete trial). Each epoch's value of the metric that picks the best epoch is an
intermediate value, at step = epoch.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from hpo.spec import Dimension, SweepSpec, coerce_value
from tracking.outcomes import SweepOutcomes, TrialOutcome
from trainers.vocabulary import FAILED, TrialStatus

STUDY_FILE = "optuna.db"
TRIAL_ID_ATTR = "peftsweep_trial_id"  # each Optuna trial's user attribute naming its trial in the store


def write_study(outcomes: SweepOutcomes, spec: SweepSpec, path: Path) -> None:
    """Write the sweep's study to `path` (an SQLite file), replacing what was there."""
    import optuna

    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)  # left by a rebuild that was stopped
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line on the sweep's output
    storage = optuna.storages.RDBStorage(f"sqlite:///{partial}")
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=outcomes.name,
            directions=["maximize" if o.mode == "max" else "minimize" for o in outcomes.objectives],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable in use since Optuna 3.2
            study.set_metric_names([o.metric for o in outcomes.objectives])
        study.set_user_attr("peftsweep_sweep_status", outcomes.status)
        study.set_user_attr("peftsweep_intermediate_metric", outcomes.selection[0])
        distributions = _distributions(spec, outcomes.trials)
        study.add_trials([_frozen_trial(trial, outcomes, distributions) for trial in outcomes.trials])
    except BaseException:
        storage.engine.dispose()
        partial.unlink(missing_ok=True)  # a study that failed halfway is no study: nothing left beside the store
        raise
    finally:
        storage.engine.dispose()
        optuna.logging.set_verbosity(verbosity)
    os.replace(partial, path)


def _frozen_trial(trial: TrialOutcome, outcomes: SweepOutcomes, distributions: dict[str, Any]) -> Any:
    import optuna
    from optuna.trial import TrialState

    values = [trial.values[o.metric] for o in outcomes.objectives]
    measured = all(math.isfinite(v) for v in values)
    attrs: dict[str, Any] = {TRIAL_ID_ATTR: trial.trial_id, "peftsweep_status": str(trial.status), "best_epoch": trial.best_epoch}
    if trial.status == TrialStatus.COMPLETED:
        state = TrialState.COMPLETE if measured else TrialState.FAIL
        if not measured:
            attrs["note"] = f"no value for {', '.join(o.metric for o, v in zip(outcomes.objectives, values) if not math.isfinite(v))}"
    elif trial.status == TrialStatus.EARLY_STOPPED:
        state = TrialState.PRUNED
    elif trial.status in FAILED:
        state = TrialState.FAIL
    elif trial.status == TrialStatus.RUNNING:
        state = TrialState.RUNNING
    else:
        state = TrialState.WAITING
    if trial.error:
        attrs["error"] = trial.error
    if trial.adapter:
        attrs["adapter"] = trial.adapter
    metric = outcomes.selection[0]
    intermediate = {
        int(e["epoch"]): float(e[metric]) for e in trial.epochs if isinstance(e.get(metric), (int, float)) and math.isfinite(e[metric])
    }
    params = {name: _choice(value) for name, value in trial.params.items()}
    frozen = optuna.trial.create_trial(
        state=state,
        values=values if state in (TrialState.COMPLETE, TrialState.PRUNED) and measured else None,
        params=params,
        distributions={name: distributions[name] for name in params},
        user_attrs={k: v for k, v in attrs.items() if v is not None},
        intermediate_values=intermediate,
    )
    if frozen.datetime_start is not None and trial.started_at is not None:  # when it ran, not when the study was written
        frozen.datetime_start = datetime.fromtimestamp(trial.started_at)
        if state.is_finished():
            frozen.datetime_complete = datetime.fromtimestamp(trial.ended_at or trial.started_at)
    return frozen


def _choice(value: Any) -> Any:
    """A parameter value as an Optuna choice: None, a bool, a number or a string (a list as its JSON)."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _distributions(spec: SweepSpec, trials: list[TrialOutcome]) -> dict[str, Any]:
    """One distribution per parameter, as the sweep declared it, widened to every value the trials hold
    (a parameter searched for two methods, or a value coerced on its way in)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    declared: dict[str, list[Dimension]] = {}
    for space in (spec.search.space, *spec.search.conditional.values()):
        for name, dim in space.items():
            declared.setdefault(name, []).append(dim)
    seen: dict[str, list[Any]] = {}
    for trial in trials:
        for name, value in trial.params.items():
            seen.setdefault(name, []).append(_choice(value))
    out: dict[str, Any] = {}
    for name, values in seen.items():
        dims = declared.get(name, [])
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        ranged = dims and all(d.kind in ("uniform", "loguniform", "int") for d in dims) and len(numbers) == len(values)
        if ranged:
            low = min([d.values[0] for d in dims] + numbers)
            high = max([d.values[1] for d in dims] + numbers)
            if all(d.kind == "int" for d in dims) and all(isinstance(v, int) for v in numbers):
                out[name] = IntDistribution(int(low), int(high))
            else:
                out[name] = FloatDistribution(float(low), float(high), log=all(d.kind == "loguniform" for d in dims) and low > 0)
            continue
        choices = [_choice(coerce_value(name, v)) for d in dims if d.kind in ("grid", "choice") for v in d.values]
        choices = list(dict.fromkeys([*choices, *values]))  # declared order first, then any other value seen
        out[name] = CategoricalDistribution(choices)
    return out
