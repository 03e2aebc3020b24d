"""MLflow: the sweep as a parent run and each trial as a child run, kept equal to the results store.

A trial's run is found by its tags (the trial's id, under the sweep's parent run), never only
remembered, so that a resumed driver, a retried trial and the rebuild after the sweep update the
runs there are instead of adding more. Each epoch's metrics are logged once, at step = epoch: what
a run already holds is read back first. A value the store no longer has (answers judged again, an
epoch trained again) rebuilds the run, since MLflow cannot change a logged value. The best
adapter is referenced by its path (tag peftsweep.best_adapter), not copied.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hpo.errors import SweepError, last_line
from hpo.spec import MlflowTracking, SweepSpec
from tracking.outcomes import SweepOutcomes, TrialOutcome
from trainers.vocabulary import FAILED, SweepStatus, TrialStatus

MLFLOW = "mlflow"  # the tracker's key in Store.tracking
SWEEP_TAG = "peftsweep.sweep"  # on the parent run: the run's name
STORE_TAG = "peftsweep.store"  # on the parent run: the results store it mirrors
TRIAL_TAG = "peftsweep.trial_id"  # on a trial's run: its trial in the store
STATUS_TAG = "peftsweep.status"  # the store's status (TrialStatus, or the sweep's SweepStatus)
ERROR_TAG = "peftsweep.error"
BEST_EPOCH_TAG = "peftsweep.best_epoch"
ADAPTER_TAG = "peftsweep.best_adapter"  # the best epoch's adapter folder, while its checkpoint is kept
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: how its UI nests runs

RUN_STATUSES = {
    TrialStatus.PENDING: "SCHEDULED",
    TrialStatus.RUNNING: "RUNNING",
    TrialStatus.COMPLETED: "FINISHED",
    TrialStatus.EARLY_STOPPED: "FINISHED",  # ended as planned by the scheduler; STATUS_TAG tells it apart
    **{status: "FAILED" for status in FAILED},
}
SWEEP_STATUSES = {
    SweepStatus.RUNNING: "RUNNING",
    SweepStatus.COMPLETED: "FINISHED",
    SweepStatus.FAILED: "FAILED",
    SweepStatus.INTERRUPTED: "KILLED",
}
_NOT_METRICS = ("trial_id", "epoch", "worker_pid")  # the row's key, the step, and a process id
_ENDED = ("FINISHED", "FAILED", "KILLED")


def default_uri(run_dir: Path) -> str:
    """A local MLflow database in the run folder."""
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def tracking_uri(settings: MlflowTracking, run_dir: Path) -> str:
    """The sweep's tracking URI: `uri`, or the default."""
    return default_uri(run_dir) if settings.uri is None else absolute_uri(settings.uri)


def absolute_uri(uri: str) -> str:
    """`uri` with a relative SQLite path made absolute: `resume` may run from another folder."""
    path = _sqlite_path(uri)
    return f"sqlite:///{path.expanduser().resolve()}" if path is not None and not path.is_absolute() else uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def check_mlflow(settings: MlflowTracking) -> None:
    """Before Ray starts: MLflow is installed, and a tracking URI the sweep names answers."""
    if importlib.util.find_spec("mlflow") is None:
        raise SweepError("tracking.mlflow: MLflow is not installed; pip install 'peftsweep[mlflow]', or drop tracking.mlflow")
    uri = settings.uri
    if uri is None:
        return  # a database in the run folder, made with it
    path = _sqlite_path(uri)
    if path is not None:
        folder = path.expanduser().absolute().parent
        if not folder.is_dir():
            raise SweepError(f"tracking.mlflow.uri {uri}: no folder {folder} for the database; create it or fix the URI")
        return
    try:
        with _one_try():
            _client(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise SweepError(f"tracking.mlflow.uri {uri}: MLflow does not answer ({reason(exc)}); start the tracking server or fix the URI") from None


@contextlib.contextmanager
def _one_try() -> Iterator[None]:
    """MLflow's HTTP requests without its retries (7 by default, minutes in all): a check says at once what is wrong."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines (a new database's tables) among the sweep's
    return MlflowClient(tracking_uri=uri)


def reason(exc: BaseException) -> str:
    """An exception in one line: its last, but a pydantic error's first error (its last line is a link)."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        first = exc.errors()[0]
        return f"{'.'.join(map(str, first['loc'])) or type(exc).__name__}: {first['msg']}"[:300]
    return last_line(str(exc) or type(exc).__name__)[:300]


@dataclass
class _Run:
    """A trial's MLflow run as this process last saw it."""

    run_id: str
    status: str
    tags: dict[str, str]
    logged: dict[tuple[str, int], float] | None = None  # (metric, step) -> value; None: not read yet
    metric_keys: set[str] = field(default_factory=set)  # the metrics it holds, from the search that found it


class MlflowRuns:
    """One sweep's runs in one MLflow experiment: its parent run, and a child run per trial."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str):
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self._client: Any = None
        self._runs: dict[str, _Run] | None = None  # trial id -> its run, read from MLflow once

    def __getstate__(self) -> dict[str, Any]:
        # In Ray Tune's experiment state (the callback's): a restored copy reads the runs from MLflow again.
        return {"uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def record(self) -> dict[str, str]:
        """What the store keeps (Store.set_tracking), for `resume` to find the parent run again."""
        return {"uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    @classmethod
    def start(cls, settings: MlflowTracking, spec: SweepSpec, run_dir: Path, known: dict[str, str] | None) -> "MlflowRuns":
        """The sweep's parent run, made for a new sweep or found again (`known`: the store's record) and marked
        running; SweepError when MLflow refuses."""
        uri = tracking_uri(settings, run_dir)
        try:
            with _one_try():  # a server that does not answer stops the sweep now, not after MLflow's retries
                return cls._start(uri, settings, spec, run_dir, known)
        except SweepError:
            raise
        except Exception as exc:
            raise SweepError(f"tracking.mlflow: cannot start the sweep's run in MLflow at {uri} ({reason(exc)})") from None

    @classmethod
    def _start(cls, uri: str, settings: MlflowTracking, spec: SweepSpec, run_dir: Path, known: dict[str, str] | None) -> "MlflowRuns":
        from mlflow.exceptions import MlflowException

        if known and known.get("uri") == uri:
            runs = cls(uri, known["experiment_id"], known["parent_run_id"])
            try:
                active = runs.client.get_run(runs.parent_run_id).info.lifecycle_stage == "active"
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                active = False
            if active:  # else deleted in MLflow meanwhile: a new parent, and the trials' runs under it
                runs.client.update_run(runs.parent_run_id, status="RUNNING")
                return runs
        return cls._new(uri, settings.experiment or run_dir.name, spec, run_dir)

    @classmethod
    def _new(cls, uri: str, experiment: str, spec: SweepSpec, run_dir: Path) -> "MlflowRuns":
        from mlflow.entities import Param

        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage != "active":
            raise SweepError(f"tracking.mlflow.experiment {experiment}: deleted in MLflow; restore it there or name another")
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        tags = {SWEEP_TAG: run_dir.name, STORE_TAG: str((run_dir / "results.db").resolve()), STATUS_TAG: SweepStatus.RUNNING}
        parent = client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        params = [Param(key, value) for key, value in _flat(spec.model_dump(mode="json")).items()]
        for chunk in _chunks(params, 100):
            client.log_batch(parent.info.run_id, params=chunk)
        runs = cls(uri, experiment_id, parent.info.run_id)
        runs._client = client
        return runs

    # --- one trial ---------------------------------------------------------------------------

    def sync_trial(self, trial: TrialOutcome) -> None:
        """Make the trial's run equal to the store: made if missing, its new epochs logged, its status and tags set."""
        from mlflow.entities import Metric, RunTag

        client = self.client
        metrics = _epoch_metrics(trial.epochs)
        run = self._runs_by_trial().get(trial.trial_id)
        if run is not None and not self._agrees(run, metrics):
            client.delete_run(run.run_id)  # MLflow cannot change a logged value: the run starts over
            run = None
        if run is None:
            run = self._create(trial)
        now = int(time.time() * 1000)
        new = [Metric(key, value, now, step) for (key, step), value in metrics.items() if (key, step) not in run.logged]
        tags = {STATUS_TAG: str(trial.status), ERROR_TAG: trial.error}
        if trial.best_epoch is not None:  # known once analysis read the trial (at the sweep's end)
            tags |= {BEST_EPOCH_TAG: str(trial.best_epoch), ADAPTER_TAG: trial.adapter}
        changed = [RunTag(key, value[:8000]) for key, value in tags.items() if value is not None and run.tags.get(key) != value[:8000]]
        batches = list(_chunks(new, 1000)) or ([[]] if changed else [])
        for i, chunk in enumerate(batches):  # the tags with the first batch
            client.log_batch(run.run_id, metrics=chunk, tags=changed if i == 0 else [])
            run.logged.update({(m.key, m.step): m.value for m in chunk})
        run.tags.update({tag.key: tag.value for tag in changed})
        status = RUN_STATUSES[trial.status]
        if status != run.status:
            if status in _ENDED:
                end = int((trial.ended_at or time.time()) * 1000)
                client.set_terminated(run.run_id, status, end_time=end)
            else:
                client.update_run(run.run_id, status=status)
            run.status = status

    def _runs_by_trial(self) -> dict[str, _Run]:
        """This sweep's trial runs in MLflow, read once: the runs under the parent, by their trial tag."""
        if self._runs is None:
            self._runs = {}
            token = None
            while True:
                page = self.client.search_runs(
                    [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'", max_results=1000, page_token=token
                )
                for found in page:
                    trial_id = found.data.tags.get(TRIAL_TAG)
                    if trial_id is not None:
                        if trial_id in self._runs:  # two runs for one trial (two drivers at once): keep one
                            self.client.delete_run(found.info.run_id)
                            continue
                        self._runs[trial_id] = _Run(found.info.run_id, found.info.status, dict(found.data.tags), metric_keys=set(found.data.metrics))
                token = page.token
                if not token:
                    break
        return self._runs

    def _agrees(self, run: _Run, metrics: dict[tuple[str, int], float]) -> bool:
        """Whether every value the run holds is the store's, once per step (its histories are read once per process)."""
        if run.logged is None:
            run.logged = {}
            for key in run.metric_keys:
                history = self.client.get_metric_history(run.run_id, key)
                if len({m.step for m in history}) != len(history):
                    return False  # a step logged twice
                run.logged.update({(key, m.step): m.value for m in history})
        return all(
            (key, step) in metrics and math.isclose(value, metrics[key, step], rel_tol=1e-12) for (key, step), value in run.logged.items()
        )

    def _create(self, trial: TrialOutcome) -> _Run:
        from mlflow.entities import Param

        tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id}
        start = int(trial.started_at * 1000) if trial.started_at else None
        created = self.client.create_run(self.experiment_id, start_time=start, tags=tags, run_name=trial.trial_id)
        params = [Param(key, value) for key, value in _flat(trial.params).items()]
        for chunk in _chunks(params, 100):
            self.client.log_batch(created.info.run_id, params=chunk)
        run = _Run(created.info.run_id, created.info.status, dict(tags), logged={})
        self._runs_by_trial()[trial.trial_id] = run
        return run

    # --- the whole sweep -----------------------------------------------------------------------

    def sync_sweep(self, outcomes: SweepOutcomes) -> None:
        """Every trial's run equal to the store, with its best epoch and adapter; the parent run's status the sweep's."""
        for trial in outcomes.trials:
            self.sync_trial(trial)
        self.client.set_tag(self.parent_run_id, STATUS_TAG, outcomes.status)
        status = SWEEP_STATUSES[SweepStatus(outcomes.status)]
        if status in _ENDED:
            self.client.set_terminated(self.parent_run_id, status)
        else:
            self.client.update_run(self.parent_run_id, status=status)


def _epoch_metrics(epochs: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(metric, epoch) -> value for every finite number in the trial's epochs (MLflow keeps no NaN, and inf only as the largest float)."""
    out = {}
    for row in epochs:
        for key, value in row.items():
            if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            out[key, int(row["epoch"])] = float(value)
    return out


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow parameters: dotted keys, text values (lists as JSON), unset ones left out."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat(value, f"{name}.")
        elif value is not None:
            out[name] = (value if isinstance(value, str) else json.dumps(value))[:6000]
    return out


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
