"""What the driver hooks into Ray Tune: the callback that records every trial in the store, the one
that records the base model's answers once they come, and the GPU-hours budget."""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

from ray.tune import Callback, Stopper
from ray.tune.result import AUTO_RESULT_KEYS

from hpo.errors import last_line
from hpo.spec import SweepSpec, flatten_params
from hpo.store import Store
from hpo.trial import SCORE_KEY, SPENT_KEY, STATUS_KEY, FirstTrialBaseline, PendingBaseline
from trainers.vocabulary import TrialStatus

_RAY_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", SCORE_KEY}  # not stored
_ANSWER_KEYS = ("answers", "verdicts")  # an epoch's judged answers: in the store only


class StoreCallback(Callback):
    """Writes every trial, epoch and answer to the results store as Tune reports them."""

    def __init__(self, store: Store, spec: SweepSpec):
        self._store: Store | None = store
        self.path = store.path.resolve()
        self.spec = spec
        self._filesystem: Any = None  # the checkpoints' (pyarrow) filesystem, known from the first checkpoint

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into its experiment state; a SQLite connection does not pickle,
        # so a restored callback (peftsweep resume) reopens the store by its path.
        return {"spec": self.spec, "path": self.path, "_store": None, "_filesystem": None}

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store.open(self.path)
        return self._store

    def on_trial_start(self, iteration, trials, trial, **info):
        self.store.add_trial(trial.trial_id, flatten_params(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if STATUS_KEY in result:
            if result.get("traceback"):
                self.store.write_traceback(trial.trial_id, result["traceback"])
            self.store.set_trial_status(trial.trial_id, TrialStatus(result[STATUS_KEY]), result["error"])
            return
        epoch = int(result["epoch"])
        if epoch == 1:
            self.store.set_trial_placement(trial.trial_id, result.get("node"), result.get("devices"))
        self.store.add_epoch(trial.trial_id, epoch, {k: v for k, v in result.items() if k not in _RAY_KEYS})
        self.store.add_answers(
            trial.trial_id, epoch, ((i, a, v) for i, (a, v) in enumerate(zip(result["answers"], result["verdicts"])))
        )
        _drop_answers(result)  # Tune keeps the result as the trial's last (it lets callbacks change it)

    def on_trial_save(self, iteration, trials, trial, **info):
        # Tune keeps a copy of the epoch's report with its checkpoint, registered just now. Where it
        # is kept is no public interface of Tune: should it move, the copy stays (the sweep is unharmed).
        kept = getattr(getattr(trial.run_metadata, "checkpoint_manager", None), "latest_checkpoint_result", None)
        if kept is not None:
            _drop_answers(kept.metrics)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        epoch = (trial.last_result or {}).get("epoch")
        if epoch is not None and checkpoint is not None:
            self._filesystem = checkpoint.filesystem
            self.forget_removed_checkpoints(trial.trial_id)
            self.store.set_checkpoint(trial.trial_id, int(epoch), checkpoint.path)

    def forget_removed_checkpoints(self, trial_id: str | None = None) -> None:
        """Clear the store's pointers to checkpoints that Ray Tune removed (it keeps the best
        `search.keep_best_k` and the latest; it removes the others after this callback has run)."""
        for trial, epoch, path in self.store.checkpoints(trial_id):
            if self._filesystem is not None:
                import pyarrow.fs

                gone = self._filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound
            else:
                gone = "://" not in path and not os.path.exists(path)
            if gone:
                self.store.set_checkpoint(trial, epoch, None)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.forget_removed_checkpoints(trial.trial_id)
        if STATUS_KEY in (trial.last_result or {}):
            return  # the closing report recorded how it failed
        planned = self.spec.trial_config(trial.config).train.epochs  # trial_config flattens method variants
        done = int((trial.last_result or {}).get("epoch", 0))
        self.store.set_trial_status(trial.trial_id, TrialStatus.COMPLETED if done >= planned else TrialStatus.EARLY_STOPPED)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.forget_removed_checkpoints(trial.trial_id)
        error = str(trial.get_error() or "unknown error")  # a lost process: Ray's full traceback
        self.store.write_traceback(trial.trial_id, error)
        self.store.set_trial_status(trial.trial_id, TrialStatus.ERROR, last_line(error))


def _drop_answers(report: dict[str, Any]) -> None:
    """Remove the judged answers from Ray Tune's copy of a report, once the store has them.

    Tune writes every trial's last report and the reports kept with its checkpoints into its
    experiment state, and writes that again after each checkpoint (every epoch): with 50 answers
    per report it grew by about 60 KB a trial, 12 MB for 192 trials, written 390 times in one
    sweep (benchmarks/cluster_sim.py).
    """
    for key in _ANSWER_KEYS:
        report.pop(key, None)


class BaselineCallback(Callback):
    """Records the base model's answers (hpo.trial: computed by the first trial to start, or by a Ray
    task beside the first trials) through `record` as soon as they come, and before any epoch is
    stored, since judging an epoch needs them.

    If they failed, the sweep stops: SweepError, raised out of Tuner.fit (the trials waiting for
    the answers fail with it). A trial that was computing them and ended, or lost its process,
    without posting them, leaves them to the next trial that asks (FirstTrialBaseline.release).
    """

    LOOK_EVERY_S = 0.2  # between looks for the answers, while Tune's loop turns
    # Class defaults: a callback restored from the experiment state of an older version has none of these.
    pending: PendingBaseline | FirstTrialBaseline | None = None  # None once recorded
    posted: FirstTrialBaseline | None = None  # removed from Ray's store at the end
    _next_look = 0.0

    def __init__(self, pending: PendingBaseline | FirstTrialBaseline, record: Callable[[Any], None]):
        self.pending, self.record = pending, record
        self.posted = pending if isinstance(pending, FirstTrialBaseline) else None

    def __getstate__(self) -> dict[str, Any]:
        # In Tune's experiment state: a resumed sweep reads the answers from the store.
        return {"pending": None, "record": None, "posted": None}

    def on_step_begin(self, iteration, trials, **info):
        if self.pending is not None and time.monotonic() >= self._next_look:
            self._next_look = time.monotonic() + self.LOOK_EVERY_S
            if self.pending.ready():
                self.wait()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._record_if_due()  # a trial waits for the answers before its first report (hpo.trial.run_trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._release(trial)  # Tune restarts it behind the trials waiting for its answers: one of them computes them

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_experiment_end(self, trials, **info):
        # every trial failed before its first judging, or the sweep was interrupted (a resumed sweep computes missing answers)
        try:
            self._record_if_due()
        finally:
            if self.posted is not None:
                self.posted.forget()

    def wait(self) -> None:
        """Records the answers, waiting for them if they are not there yet; SweepError if they failed."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        self.record(pending.get())

    def _record_if_due(self) -> None:
        """Records the answers if they are there, or if they come from a task, which the driver may wait for."""
        if self.pending is not None and (self.pending.blocks or self.pending.ready()):
            self.wait()

    def _release(self, trial: Any) -> None:
        if isinstance(self.pending, FirstTrialBaseline):
            self.pending.release(trial.trial_id)


class GpuHoursBudget(Stopper):
    """Stops the sweep once the trials together have spent `budget` GPU-hours.

    Spend is read from SPENT_KEY, which every report carries, a failed trial's closing report
    too (its objective values may be worst-case stand-ins such as inf, never spend).
    """

    def __init__(self, budget: float):
        self.budget = budget
        self.spent: dict[str, float] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        spent = result.get(SPENT_KEY)
        if spent is not None and math.isfinite(spent):
            self.spent[trial_id] = max(self.spent.get(trial_id, 0.0), float(spent))
        return False

    def stop_all(self) -> bool:
        return sum(self.spent.values()) >= self.budget
