"""Each trial of a results store as the trackers show it: its parameters, status and per-epoch
metrics from the store, and its result as analysis decides it (the best epoch, the objectives'
values there, the adapter kept from it). Plain values: the writers only render them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hpo.spec import Objective
from trainers.vocabulary import TrialStatus

if TYPE_CHECKING:
    from analysis.load import Results


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    status: TrialStatus
    params: dict[str, Any]  # the searched values, as the store holds them
    started_at: float | None
    ended_at: float | None
    error: str | None
    epochs: list[dict[str, Any]]  # the store's rows, in epoch order
    best_epoch: int | None  # analysis's best epoch (None: no epoch)
    values: dict[str, float]  # each objective's value as the report reads it: quality at the best epoch, cost the trial's total; NaN unmeasured
    adapter: str | None  # the best epoch's adapter (a full fine-tune's model) folder, while its checkpoint is kept


@dataclass(frozen=True)
class SweepOutcomes:
    name: str
    status: str  # the sweep's SweepStatus
    objectives: list[Objective]
    selection: tuple[str, str]  # (metric, mode) that picks each trial's best epoch: the per-epoch values trackers plot
    trials: list[TrialOutcome]  # in the order they started


def sweep_outcomes(results: Results) -> SweepOutcomes:
    """The store's trials, one outcome per Ray Tune trial (a folded grid's trial is one training,
    its result read over all its epochs)."""
    from analysis.load import load_epochs, load_trials, selection_objective

    spec = results.spec
    unfolded = replace(results, spec=spec.model_copy(update={"search": spec.search.model_copy(update={"fold_epochs": False})}))
    rows = load_trials(unfolded).set_index("trial_id")
    selection = selection_objective(results.sweep["objectives"], load_epochs(results))
    epochs: dict[str, list[dict[str, Any]]] = {}
    for row in results.epochs:  # in (trial, epoch) order
        epochs.setdefault(row["trial_id"], []).append(row)
    trials = []
    for trial in results.trials:
        row = rows.loc[trial["trial_id"]]
        own = epochs.get(trial["trial_id"], [])
        best = None if math.isnan(row["best_epoch"]) else int(row["best_epoch"])
        checkpoint = next((e["checkpoint"] for e in own if e["epoch"] == best), None)
        trials.append(
            store_outcome(
                trial,
                own,
                best_epoch=best,
                values={o.metric: float(row[o.metric]) for o in spec.objectives},
                adapter=f"{checkpoint.rstrip('/')}/adapter" if checkpoint else None,
            )
        )
    return SweepOutcomes(results.sweep["name"], results.sweep["status"], list(spec.objectives), selection, trials)


def store_outcome(
    trial: dict[str, Any],
    epochs: list[dict[str, Any]],
    *,
    best_epoch: int | None = None,
    values: dict[str, float] | None = None,
    adapter: str | None = None,
) -> TrialOutcome:
    """A trial as the store holds it (Store.trials and Store.epochs rows); while the sweep runs, before
    analysis reads its result, with no best epoch or values yet."""
    return TrialOutcome(
        trial_id=trial["trial_id"],
        status=TrialStatus(trial["status"]),
        params=trial["params"],
        started_at=trial["started_at"],
        ended_at=trial["ended_at"],
        error=trial["error"],
        epochs=epochs,
        best_epoch=best_epoch,
        values=values or {},
        adapter=adapter,
    )
