"""Read a sweep's results store into DataFrames: one row per trial, per epoch, or per judged answer.

`load_results` reads the store once, in one transaction (a consistent picture of a sweep that is
still writing); the DataFrame functions take its Results (or a Store, read on the spot).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hpo.errors import SweepError
from hpo.spec import COST_AXES, SweepSpec
from hpo.store import Store, epoch_score
from trainers.vocabulary import (
    BEST_EPOCH_METRICS,
    EPOCH_COLUMNS,
    FINISHED,
    PEAK_METRICS,
    QUALITY_METRICS,
    TRIAL_METRICS,
    TrialStatus,
)


def open_sweep(name: str, runs_dir: str | Path | None = None) -> Store:
    """The store of run NAME under runs_dir (default: $PEFTSWEEP_RUNS, else ./runs), as `peftsweep report` finds it."""
    root = Path(runs_dir or os.environ.get("PEFTSWEEP_RUNS", "runs"))
    path = root / name / "results.db"
    if not path.exists():  # a folder in its place is Store.open's to explain
        known = sorted(p.parent.name for p in root.glob("*/results.db"))
        raise SweepError(f"no run '{name}' in {root}/ (runs: {', '.join(known) or 'none'})")
    return Store.open(path)


@dataclass(frozen=True)
class Results:
    """Everything a results store holds, read in one transaction."""

    path: Path  # the store's file
    sweep: dict[str, Any]
    spec: SweepSpec  # the stored spec, validated again: it decides epoch folding
    trials: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    answers: list[dict[str, Any]]
    baseline: list[dict[str, Any]]
    baseline_metrics: dict[str, Any]

    def traceback_path(self, trial_id: str) -> Path:
        return Store.traceback_path_beside(self.path, trial_id)


def load_results(store: Store) -> Results:
    """The one read of a store that everything in analysis starts from."""
    with store.snapshot():
        sweep = store.sweep()
        return Results(
            path=store.path,
            sweep=sweep,
            spec=SweepSpec.from_store(sweep["spec"], store.path),
            trials=store.trials(),
            epochs=store.epochs(),
            answers=store.answers(),
            baseline=store.baseline(),
            baseline_metrics=store.baseline_metrics(),
        )


def _results(source: Results | Store) -> Results:
    return source if isinstance(source, Results) else load_results(source)


def param_columns(source: Results | Store) -> list[str]:
    """The searched parameter names, then `epochs` when trials carry it and it is not searched."""
    results = _results(source)
    columns = list(results.sweep["searched"])
    if "epochs" not in columns and any("epochs" in t["params"] for t in results.trials):
        columns.append("epochs")
    return columns


def selection_objective(objectives: list[dict[str, str]], epochs: pd.DataFrame) -> tuple[str, str]:
    """(metric, mode) that picks a trial's best epoch and the best trial.

    The sweep's first objective among QUALITY_METRICS that some epoch reported (a sweep without a
    judge has no win_rate); else the lowest eval_ppl.
    """
    for objective in objectives:
        if objective["metric"] in QUALITY_METRICS and epochs[objective["metric"]].notna().any():
            return objective["metric"], objective["mode"]
    return "eval_ppl", "min"


def cost_metric(spec: SweepSpec, trials: pd.DataFrame) -> str:
    """The report's cost axis: `report.cost_axis`, else GPU-hours when trials held GPUs, else the training FLOPs;
    train_seconds for a store written before FLOPs were counted."""
    if spec.report.cost_axis is not None:
        return COST_AXES[spec.report.cost_axis]
    if (trials["gpu_hours"] > 0).any():
        return "gpu_hours"
    if (trials["train_flops"] > 0).any():
        return "train_flops"
    return "train_seconds"


def load_trials(source: Results | Store) -> pd.DataFrame:
    """One row per trial: status, searched params, best-epoch metrics, totals; trials without epochs keep NaNs."""
    results = _results(source)
    params = param_columns(results)
    columns = [  # TrialSummary's fields, with the searched parameters and the metrics in the middle
        "trial_id", "status", *params, "epochs_completed", "best_epoch",
        *BEST_EPOCH_METRICS, *TRIAL_METRICS, "error", "error_log", "judge", "epochs_not_judged",
    ]  # fmt: skip
    trials = results.trials
    epochs = _epoch_frame(results)
    metric, mode = selection_objective(results.sweep["objectives"], epochs)
    folded = results.spec.folded_epochs
    rows = []
    for trial in trials:
        own = epochs[epochs["trial_id"] == trial["trial_id"]].sort_values("epoch")
        if folded is None:
            rows.append(_trial_row(trial, own, params, metric, mode))
            continue
        # One training answered every epochs value: each (configuration, epochs) point is its own
        # result, read off the first `value` epochs, with the cost paid up to there.
        for value in folded:
            reached = own[own["epoch"] <= value]
            row = _trial_row(trial, reached, params, metric, mode)
            row |= {"trial_id": f"{trial['trial_id']}@{value}", "epochs": value}
            if len(reached) >= value:
                row["status"] = TrialStatus.COMPLETED
            rows.append(row)

    df = pd.DataFrame(rows, columns=columns)
    df["error_log"] = [_error_log(results, trial_id) for trial_id in df["trial_id"]]
    numeric = ["best_epoch", *BEST_EPOCH_METRICS, *TRIAL_METRICS]
    df[numeric] = df[numeric].astype("float64")
    df["epochs_completed"] = df["epochs_completed"].astype("int64")
    for p in params:  # an integer parameter that some trials lack (a method's own) stays an integer
        present = [t["params"][p] for t in trials if p in t["params"]]
        if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            df[p] = df[p].astype("Int64")
    return df


def training_id(trial_id: str) -> str:
    """The Ray Tune trial that trained a row: folded rows are named `<trial_id>@<epochs>`."""
    return trial_id.split("@", 1)[0]


def _trial_row(trial: dict, own: pd.DataFrame, params: list[str], metric: str, mode: str) -> dict:
    row = {"trial_id": trial["trial_id"], "status": trial["status"]}
    row |= {p: trial["params"].get(p, np.nan) for p in params}
    row["epochs_completed"] = len(own)
    best = best_epoch_of(own, metric, mode)
    row["best_epoch"] = np.nan if best is None else best["epoch"]
    row |= {m: np.nan if best is None else best.get(m, np.nan) for m in BEST_EPOCH_METRICS}
    last = own.iloc[-1] if len(own) else None
    row |= {m: np.nan if last is None else last.get(m, np.nan) for m in TRIAL_METRICS if m not in PEAK_METRICS}
    row |= {m: own[m].max() if len(own) and m in own else np.nan for m in PEAK_METRICS}
    row["error"] = trial["error"]
    row["judge"] = None if best is None else best.get("judge")  # which judge gave the win rate (None: before schema 3)
    row["epochs_not_judged"] = int(own["judge_error"].notna().sum()) if "judge_error" in own else 0
    return row


def _error_log(results: Results, trial_id: str) -> str | None:
    """The file with a failed trial's full traceback, if it has one."""
    path = results.traceback_path(training_id(trial_id))
    return str(path) if path.is_file() else None


def load_epochs(source: Results | Store) -> pd.DataFrame:
    """One row per trial and epoch: trial_id, status, params, epoch, then every metric reported."""
    results = _results(source)
    params = param_columns(results)
    trials = pd.DataFrame(
        [{"trial_id": t["trial_id"], "status": t["status"]} | {p: t["params"].get(p, np.nan) for p in params}
         for t in results.trials],
        columns=["trial_id", "status", *params],
    )  # fmt: skip
    epochs = _epoch_frame(results)
    return trials.merge(epochs, on="trial_id", how="inner")[
        ["trial_id", "status", *params, *epochs.columns.drop("trial_id")]
    ]


def load_judgments(source: Results | Store, trials: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per trial and judged prompt at the trial's best epoch: trial_id, epoch, prompt_id, verdict.

    `trials` is load_trials(source) (made when not given); folded rows (id@epochs) get the
    verdicts of their training at their own best epoch.
    """
    columns = ["trial_id", "epoch", "prompt_id", "verdict"]
    results = _results(source)
    trials = load_trials(results) if trials is None else trials
    answers = pd.DataFrame(results.answers, columns=["trial_id", "epoch", "prompt_id", "answer", "verdict"])
    scored = trials[trials["best_epoch"].notna()]
    keys = pd.DataFrame(
        {
            "trial_id": scored["trial_id"],
            "training": scored["trial_id"].map(training_id),
            "epoch": scored["best_epoch"].astype("int64"),
        }
    )
    answers = answers[answers["verdict"].notna()]  # prompts the judge did not judge are no judgments
    answers = answers.rename(columns={"trial_id": "training"}).astype({"epoch": "int64"})
    return keys.merge(answers, on=["training", "epoch"])[columns].reset_index(drop=True)


def load_answers(source: Results | Store, trial_id: str | None = None) -> pd.DataFrame:
    """One row per judged answer (all trials, or one), with the prompt, reference and base model's answer."""
    columns = ["trial_id", "epoch", "prompt_id", "prompt", "reference", "base_answer", "answer", "verdict"]
    trial_id = None if trial_id is None else training_id(trial_id)
    results = _results(source)
    rows = [a for a in results.answers if trial_id is None or a["trial_id"] == trial_id]
    answers = pd.DataFrame(rows, columns=["trial_id", "epoch", "prompt_id", "answer", "verdict"])
    baseline = pd.DataFrame(results.baseline, columns=["prompt_id", "prompt", "reference", "answer"])
    baseline = baseline.rename(columns={"answer": "base_answer"})
    return answers.merge(baseline, on="prompt_id", how="left")[columns]


def _epoch_frame(results: Results) -> pd.DataFrame:
    frame = pd.DataFrame(results.epochs)
    if frame.empty:
        return pd.DataFrame(columns=["trial_id", "epoch", *EPOCH_COLUMNS])
    return frame


def best_epoch_of(own: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The trial's epoch with the best `metric`, by hpo.store.epoch_score (the earliest among ties,
    being the cheapest): the rule Ray Tune's checkpoint keeping follows too.

    A trial that never reported the metric keeps its last epoch: what it ended with.
    """
    if own.empty:
        return None
    scored = own[own[metric].notna()]
    if scored.empty:
        return own.iloc[-1]
    scores = [epoch_score(value, int(epoch), mode) for value, epoch in zip(scored[metric], scored["epoch"])]
    return scored.iloc[int(np.argmax(scores))]


def rank_trials(trials: pd.DataFrame, metric: str, mode: str, cost: str) -> pd.DataFrame:
    """Finished trials first, each group by `metric` best first (cheaper by `cost` first among ties),
    NaNs last: the one ranking of the report, `peftsweep best` and the export's order of merit."""
    keys = trials.assign(
        _unfinished=~trials["status"].isin(FINISHED),
        _key=trials[metric] if mode == "min" else -trials[metric],
    )
    ranked = keys.sort_values(["_unfinished", "_key", cost], na_position="last", kind="stable")
    return ranked.drop(columns=["_unfinished", "_key"]).reset_index(drop=True)
