"""Read a sweep's results store into DataFrames: one row per trial, per epoch, or per judged answer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from hpo.errors import SweepError
from hpo.store import EPOCH_COLUMNS, FINISHED, Store, epoch_score

# Measured afresh at each epoch, so they can pick a trial's best epoch. The costs (train_seconds,
# gpu_hours, ...) are cumulative: by them the best epoch would always be the first.
QUALITY_METRICS = ("win_rate", "eval_ppl")

# Taken from a trial's best epoch.
BEST_EPOCH_METRICS = (
    "eval_ppl", "win_rate", "win_rate_low", "win_rate_high", "wins", "losses", "ties",
    "retention_ppl", "order_agreement", "answer_length_diff",
)  # fmt: skip

# The trial's totals (its last epoch's), and its peak memory over all epochs.
TRIAL_METRICS = (
    "train_seconds", "eval_seconds", "judge_seconds", "gpu_hours", "cost_usd",
    "tokens_trained", "tokens_per_second", "trainable_params", "total_params",
    "peak_memory_gb", "train_memory_gb", "inference_memory_gb",
)  # fmt: skip
PEAK_METRICS = ("peak_memory_gb", "train_memory_gb", "inference_memory_gb")  # the largest over the trial's epochs

# What a configuration costs, in the order a cost axis is chosen from the sweep's objectives.
COST_METRICS = ("train_seconds", "gpu_hours", "cost_usd", "peak_memory_gb")


def open_sweep(name: str, runs_dir: str | Path | None = None) -> Store:
    """The store of run NAME under runs_dir (default: $PEFTSWEEP_RUNS, else ./runs), as `peftsweep report` finds it."""
    root = Path(runs_dir or os.environ.get("PEFTSWEEP_RUNS", "runs"))
    path = root / name / "results.db"
    if not path.exists():  # a folder in its place is Store.open's to explain
        known = sorted(p.parent.name for p in root.glob("*/results.db"))
        raise SweepError(f"no run '{name}' in {root}/ (runs: {', '.join(known) or 'none'})")
    return Store.open(path)


def param_columns(store: Store) -> list[str]:
    """The searched parameter names, then `epochs` when trials carry it and it is not searched."""
    columns = list(store.sweep()["searched"])
    if "epochs" not in columns and any("epochs" in t["params"] for t in store.trials()):
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


def cost_metric(objectives: list[dict[str, str]], trials: pd.DataFrame) -> str:
    """The cost axis: the sweep's first minimised cost objective some trial measured above zero, else train_seconds.

    gpu_hours and cost_usd are zero on CPU or without a price, and then say nothing.
    """
    for objective in objectives:
        metric = objective["metric"]
        if metric in COST_METRICS and objective["mode"] == "min" and (trials[metric] > 0).any():
            return metric
    return "train_seconds"


def load_trials(store: Store) -> pd.DataFrame:
    """One row per trial: status, searched params, best-epoch metrics, totals; trials without epochs keep NaNs."""
    params = param_columns(store)
    columns = [
        "trial_id", "status", *params, "epochs_completed", "best_epoch",
        *BEST_EPOCH_METRICS, *TRIAL_METRICS, "error", "error_log", "judge", "epochs_not_judged",
    ]  # fmt: skip
    trials = store.trials()
    epochs = _epoch_frame(store)
    metric, mode = selection_objective(store.sweep()["objectives"], epochs)
    folded = folded_epochs(store.sweep()["spec"])
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
                row["status"] = "completed"
            rows.append(row)

    df = pd.DataFrame(rows, columns=columns)
    df["error_log"] = [_error_log(store, trial_id) for trial_id in df["trial_id"]]
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


def folded_epochs(spec: dict) -> list[int] | None:
    """The epochs values a folded grid answers (see hpo.spec.SweepSpec.folded_epochs), from the stored spec."""
    search = spec.get("search", {})
    grid = (search.get("space", {}).get("epochs") or {}).get("grid")
    if not grid or search.get("algorithm") != "grid" or not search.get("fold_epochs", True):
        return None
    schedules = {spec.get("train", {}).get("lr_schedule", "constant")}
    schedules |= set((search.get("space", {}).get("lr_schedule") or {}).get("grid") or [])
    schedules |= {v for space in (search.get("conditional") or {}).values() for v in ((space.get("lr_schedule") or {}).get("grid") or [])}
    if schedules - {"constant"}:
        return None  # a decaying schedule: every epochs value trained on its own
    return sorted({int(v) for v in grid})


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


def _error_log(store: Store, trial_id: str) -> str | None:
    """The file with a failed trial's full traceback, if it has one."""
    path = store.traceback_path(training_id(trial_id))
    return str(path) if path.is_file() else None


def load_epochs(store: Store) -> pd.DataFrame:
    """One row per trial and epoch: trial_id, status, params, epoch, then every metric reported."""
    params = param_columns(store)
    trials = pd.DataFrame(
        [{"trial_id": t["trial_id"], "status": t["status"]} | {p: t["params"].get(p, np.nan) for p in params}
         for t in store.trials()],
        columns=["trial_id", "status", *params],
    )  # fmt: skip
    epochs = _epoch_frame(store)
    return trials.merge(epochs, on="trial_id", how="inner")[
        ["trial_id", "status", *params, *epochs.columns.drop("trial_id")]
    ]


def load_judgments(store: Store, trials: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per trial and judged prompt at the trial's best epoch: trial_id, epoch, prompt_id, verdict.

    `trials` is load_trials(store) (read again when not given); folded rows (id@epochs) get the
    verdicts of their training at their own best epoch.
    """
    columns = ["trial_id", "epoch", "prompt_id", "verdict"]
    trials = load_trials(store) if trials is None else trials
    answers = pd.DataFrame(store.answers(), columns=["trial_id", "epoch", "prompt_id", "answer", "verdict"])
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


def load_answers(store: Store, trial_id: str | None = None) -> pd.DataFrame:
    """One row per judged answer (all trials, or one), with the prompt, reference and base model's answer."""
    columns = ["trial_id", "epoch", "prompt_id", "prompt", "reference", "base_answer", "answer", "verdict"]
    trial_id = None if trial_id is None else training_id(trial_id)
    answers = pd.DataFrame(store.answers(trial_id), columns=["trial_id", "epoch", "prompt_id", "answer", "verdict"])
    baseline = pd.DataFrame(store.baseline(), columns=["prompt_id", "prompt", "reference", "answer"])
    baseline = baseline.rename(columns={"answer": "base_answer"})
    return answers.merge(baseline, on="prompt_id", how="left")[columns]


def _epoch_frame(store: Store) -> pd.DataFrame:
    frame = pd.DataFrame(store.epochs())
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
