"""What the driver calls: the trackers checked before Ray starts (`check_tracking`), started with
the sweep (`start_tracking`: MLflow's parent run, the Ray Tune callbacks), and brought up to date
from the store once it ends (`finish_tracking`: optuna.db rebuilt, MLflow's runs synced).

Each tracker's package is imported only when the sweep uses it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hpo.errors import SweepError
from hpo.spec import SweepSpec, WandbTracking
from hpo.store import Store
from tracking.mlflow_runs import MLFLOW, MlflowRuns, check_mlflow, reason
from tracking.optuna_study import STUDY_FILE, write_study
from tracking.outcomes import sweep_outcomes

def check_tracking(spec: SweepSpec) -> None:
    """Each tracker the sweep names is installed, and a tracking server it names answers: one SweepError line otherwise."""
    if spec.tracking.mlflow is not None:
        check_mlflow(spec.tracking.mlflow)
    if spec.tracking.wandb is not None:
        _check_wandb()


def _check_wandb() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise SweepError("tracking.wandb: wandb is not installed; pip install 'peftsweep[wandb]', or drop tracking.wandb")
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return
    import wandb

    try:  # as Ray Tune's integration asks (`wandb login` writes the key)
        wandb.ensure_configured()
        logged_in = bool(wandb.api.api_key)
    except AttributeError:
        return  # another wandb: Ray Tune's own check decides
    if not logged_in:
        raise SweepError("tracking.wandb: no W&B API key; set WANDB_API_KEY or run `wandb login` (WANDB_MODE=offline logs locally)")


@dataclass
class Trackers:
    callbacks: list[Any] = field(default_factory=list)  # Ray Tune callbacks for a new sweep's Tuner (a resumed Tuner restores its own)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # Store.set_tracking's, by tracker


def start_tracking(spec: SweepSpec, run_dir: Path, known: dict[str, dict[str, Any]], say: Callable[[str], None]) -> Trackers:
    """Before Ray starts: MLflow's parent run made (or, `known` from the store on resume, found again and
    marked running), and the callbacks that log each trial. SweepError when a tracker refuses."""
    trackers = Trackers()
    store_path = run_dir / "results.db"
    if spec.tracking.mlflow is not None:
        from tracking.callbacks import MlflowCallback

        runs = MlflowRuns.start(spec.tracking.mlflow, spec, run_dir, known.get(MLFLOW))
        trackers.callbacks.append(MlflowCallback(store_path, say))
        trackers.records[MLFLOW] = runs.record
        say(f"MLflow: experiment {runs.experiment_id}, parent run {runs.parent_run_id} at {runs.uri}")
    if spec.tracking.wandb is not None:
        trackers.callbacks.append(_wandb_callback(spec.tracking.wandb, run_dir))
    return trackers


def _wandb_callback(settings: WandbTracking, run_dir: Path) -> Any:
    """Ray Tune's W&B logger: a run per trial, grouped by the sweep's name, its files in runs/<name>/wandb."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    extra = {"entity": settings.entity} if settings.entity else {}
    return WandbLoggerCallback(project=settings.project, group=run_dir.name, dir=str(run_dir.resolve()), **extra)


def finish_tracking(store: Store, say: Callable[[str], None]) -> None:
    """The sweep's Optuna study (runs/<name>/optuna.db) rebuilt, and its MLflow runs brought up to date, from the
    store. A tracker that fails is said in one line, never raised; the store is untouched."""
    from analysis.load import load_results

    try:
        results = load_results(store)
        outcomes = sweep_outcomes(results)
    except Exception as exc:
        say(f"Warning: cannot read {store.path} for the trackers: {reason(exc)}")
        return
    study = store.path.parent / STUDY_FILE
    try:
        write_study(outcomes, results.spec, study)
    except Exception as exc:
        say(f"Warning: cannot write the Optuna study {study}: {reason(exc)} (the store keeps every result)")
    record = store.tracking().get(MLFLOW)
    if results.spec.tracking.mlflow is not None and record is not None:
        try:
            MlflowRuns(**record).sync_sweep(outcomes)
        except Exception as exc:
            say(f"Warning: cannot bring MLflow ({record['uri']}) up to date: {reason(exc)} (the store keeps every result)")

