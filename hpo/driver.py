"""The sweep driver: a spec in, Ray Tune runs the trials, the store records them.

`run_sweep` and `resume_sweep` read top to bottom: the run folder (hpo.rundir), the store, Ray
(hpo.runtime), the base model's answers, then Ray Tune with the sweep's space, searcher and
scheduler (hpo.space), its trials (hpo.trial) and callbacks (hpo.callbacks). The CLI writes the
report from the store afterwards.
"""

from __future__ import annotations

import errno
import gc
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpo.callbacks import BaselineCallback, GpuHoursBudget, StoreCallback
from hpo.checks import check_inputs
from hpo.errors import NOT_STARTED, SweepError, SweepFailed, SweepInterrupted, last_line
from hpo.packs import concurrent_trials, start_registry
from hpo.progress import ProgressCallback
from hpo.rundir import DriverLock, clear_run_dir, experiment_name, experiment_path, make_run_dir, prepare_storage, runs_root
from hpo.runtime import Signals, check_address, git_commit, init_ray, resources, skip_callback_census, start_reaper, stop_ray_later, versions
from hpo.space import param_space, scheduler, search_alg
from hpo.spec import Sweep, SweepSpec
from hpo.store import Store
from hpo.teacher import with_teacher
from hpo.trial import SCORE_KEY, Answers, FirstTrialBaseline, PendingBaseline, base_model_answers, trainable
from tracking.hooks import finish_tracking, start_tracking
from tracking.mlflow_runs import absolute_uri
from trainers.vocabulary import FINISHED, SweepStatus, TrialStatus


@dataclass(frozen=True)
class SweepOutcome:
    """How a sweep that ran to its end ended: `completed` (some trial finished) or `failed` (none did)."""

    run_dir: Path
    status: SweepStatus
    note: str | None  # failed trials, a budget that ended the sweep


def run_sweep(
    sweep: Sweep,
    *,
    name: str | None = None,
    runs_dir: str | None = None,
    overwrite: bool = False,
    address: str | None = None,
    overrides: list[str] = (),
    checked: bool = False,
) -> SweepOutcome:
    """Run a validated sweep to the end, recording it in runs/<name>/results.db.

    `checked`: the caller made hpo.checks.check_inputs already (the CLI, before its first line).
    Raises SweepError for input or a run folder it cannot use, SweepInterrupted on SIGINT/SIGTERM,
    SweepFailed when the store can no longer be written.
    """
    name = name or sweep.name
    run_dir = runs_root(runs_dir) / name
    check_address(address)
    if not checked:
        check_inputs(sweep.spec, runs_dir)  # builds the tiny model (or converts a GGUF) first, with progress lines
    spec = with_teacher(_absolute_paths(sweep.spec), runs_dir)  # the teacher's folder, as the trials load it
    created = make_run_dir(run_dir)
    progress = ProgressCallback(spec, name)
    with DriverLock(run_dir):  # before anything is removed: --overwrite must not wipe a live sweep
        try:
            clear_run_dir(run_dir, overwrite)
            prepare_storage(spec, run_dir, overwrite)
        except SweepError:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        try:  # before the store: a tracker that refuses leaves no run behind
            trackers = start_tracking(spec, run_dir, {}, progress.say)
        except SweepError:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                clear_run_dir(run_dir, overwrite=True)  # what the tracker left (the folder held nothing else)
            raise
        store = Store.create(
            run_dir / "results.db",
            name=name,
            sweep_file=str(sweep.path),
            spec={**spec.model_dump(mode="json"), "overrides": list(overrides)},
            searched=spec.searched,
            objectives=[o.model_dump() for o in spec.objectives],
            versions=versions(),
            git_commit=git_commit(),
        )
        for tracker, record in trackers.records.items():
            store.set_tracking(tracker, record)

        def tuner() -> Any:
            # The base model answers as the first trials start; they wait for its answers at their first judging.
            pending = _pending_baseline(spec, progress)
            recorder = BaselineCallback(pending, lambda base: _record_baseline(store, progress, base))
            callbacks = [recorder, StoreCallback(store, spec), progress, *trackers.callbacks]  # the trackers read what the store wrote
            return make_tuner(spec, pending, run_dir, callbacks)

        return _drive(tuner, store, spec, progress, run_dir, address)


def resume_sweep(name: str, *, runs_dir: str | None = None, address: str | None = None) -> SweepOutcome:
    """Continue a sweep whose driver stopped, from Ray Tune's saved experiment state.

    Finished trials are not run again; unfinished ones restart from their last epoch checkpoint.
    """
    from ray import tune

    run_dir = runs_root(runs_dir) / name
    check_address(address)
    with DriverLock(run_dir):
        store = Store.open(run_dir / "results.db")
        try:
            spec, baseline = _resumable(store, run_dir)
            experiment = experiment_path(spec, run_dir)
            progress = ProgressCallback(spec, name)
            progress.say(f"Resuming sweep {name} ({len(store.trials())} trials so far) from {experiment}")
            trackers = start_tracking(spec, run_dir, store.tracking(), progress.say)  # Tune restores their callbacks
        except SweepError:
            store.close()
            raise
        for tracker, record in trackers.records.items():
            store.set_tracking(tracker, record)
        store.reopen()

        def tuner() -> Any:
            # Tune restores the searcher, the scheduler and the callbacks (they reopen the store) with the trials.
            answers = baseline or _answer_now(spec, store, progress)
            return tune.Tuner.restore(experiment, trainable=trainable(spec, answers), resume_unfinished=True, resume_errored=True)

        return _drive(tuner, store, spec, progress, run_dir, address)


def _resumable(store: Store, run_dir: Path) -> tuple[SweepSpec, list[str]]:
    """The stored sweep's spec and the base model's answers (if it recorded them), or why it cannot be resumed."""
    name, sweep = run_dir.name, store.sweep()
    if sweep["status"] == SweepStatus.COMPLETED:
        raise SweepError(f"sweep {name} has completed; nothing to resume (its report: peftsweep report {name})")
    spec = SweepSpec.from_store(sweep["spec"], store.path)
    if not _tune_state_saved(spec, run_dir):
        raise SweepError(f"sweep {name} {NOT_STARTED}")
    return spec, [row["answer"] for row in store.baseline()]  # none if it stopped before the base model answered


def _drive(make_tuner: Any, store: Store, spec: SweepSpec, progress: ProgressCallback, run_dir: Path, address: str | None) -> SweepOutcome:
    """Start Ray, run the tuner to the end, and record in the store how the sweep ended.

    Raises SweepInterrupted on SIGINT/SIGTERM (the store says `interrupted`; `resume` continues),
    SweepFailed when the store can no longer be written.
    """
    import ray

    signals = Signals()
    tuner = None
    try:
        with signals:
            init_ray(address)
            signals.install()  # again: Ray's core worker puts its own SIGTERM handler (exit 1) in place
            if not address:
                start_reaper()
            progress.say(f"Ray {'cluster ' + address if address else 'started locally'}; resources: {resources()}")
            tuner = make_tuner()
            progress.start()
            started = time.monotonic()
            try:
                with signals.tuning():
                    tuner.fit()
            finally:
                progress.stop()
        if signals.received:
            raise _interrupted(signals.received, spec, run_dir)
        outcome = _record_end(store, spec, run_dir, time.monotonic() - started)
        if outcome.note:
            progress.say(f"Note: {outcome.note}")
        finish_tracking(store, progress.say)  # optuna.db and MLflow from the store as it ended
    except SweepInterrupted:
        _finish_quietly(store, SweepStatus.INTERRUPTED, None)
        raise
    except KeyboardInterrupt:
        _finish_quietly(store, SweepStatus.INTERRUPTED, None)
        raise _interrupted(signals.received or signal.SIGINT, spec, run_dir) from None
    except BaseException as exc:
        fault = _write_fault(exc)
        reason = f"cannot write {fault.filename or store.path}: {fault.strerror}" if isinstance(fault, OSError) else (
            f"cannot write the results store {store.path}: {fault}" if fault is not None else None
        )
        said = str(exc) if isinstance(exc, SweepError) else last_line(f"{type(exc).__name__}: {exc}")
        _finish_quietly(store, SweepStatus.FAILED, reason or said)
        if reason:
            raise SweepFailed(f"{reason}; free space or fix the folder's permissions, then `peftsweep resume {run_dir.name}` continues") from None
        raise
    finally:
        store.close()
        if ray.is_initialized() and not address:
            # What holds Ray objects (the tuner's trials and callbacks, the baseline's ObjectRef) goes
            # while Ray is up: freed later, on this thread during the shutdown, such an object's release
            # reaches a core worker already shut down, which ends the process with exit 1.
            tuner = None
            gc.collect()
            stop_ray_later()  # while the CLI writes the report
    return outcome


def _interrupted(signum: int, spec: SweepSpec, run_dir: Path) -> SweepInterrupted:
    """How a signal stopped the sweep: resumable once Ray Tune has saved its state, as `resume` requires."""
    try:
        resumable = _tune_state_saved(spec, run_dir)
    except Exception:  # storage that does not answer now: `resume` says so itself
        resumable = True
    return SweepInterrupted(signum, resumable)


def _tune_state_saved(spec: SweepSpec, run_dir: Path) -> bool:
    """Whether Ray Tune has saved the sweep's experiment state, which `resume` restores."""
    from ray import tune

    return tune.Tuner.can_restore(experiment_path(spec, run_dir))


def _record_end(store: Store, spec: SweepSpec, run_dir: Path, seconds: float) -> SweepOutcome:
    """Close the sweep's record: completed if some trial finished, else failed; the note says why trials failed or a budget ended it."""
    store.end_unfinished(TrialStatus.EARLY_STOPPED)  # trials a budget cut off mid-epoch
    statuses = [t["status"] for t in store.trials()]
    errors = sum(s not in FINISHED for s in statuses)
    failed = f"{errors} of {len(statuses)} trials failed ({_census(statuses)})" if errors else None
    note = "; ".join(n for n in (failed, _budget_note(spec, store, seconds)) if n) or None
    status = SweepStatus.COMPLETED if errors < len(statuses) else SweepStatus.FAILED
    store.finish(status, note=note)
    return SweepOutcome(run_dir, status, note)


def _pending_baseline(spec: SweepSpec, progress: ProgressCallback) -> PendingBaseline | FirstTrialBaseline:
    """The untouched base model answers the judged prompts once per sweep, while the first trials
    start (the driver never loads a model): in the process of the first trial to start, before it
    trains (hpo.trial.FirstTrialBaseline), or in a packed sweep in a Ray task of their own.
    """
    # the tiny model was built before Ray started (hpo.checks.check_inputs), with its own progress lines
    progress.say(f"{_answering(spec)} ...")
    if spec.resources.pack > 1:  # a pack's member trials hold no model (their pack worker does)
        return _baseline_task(spec)
    return FirstTrialBaseline.new()


def _answer_now(spec: SweepSpec, store: Store, progress: ProgressCallback) -> list[str]:
    """The answers of a resumed sweep that stopped before its base model answered, before its trials go on."""
    progress.say(f"{_answering(spec)}, first ...")
    base = _baseline_task(spec).get()
    _record_baseline(store, progress, base)
    return base.answers


def _answering(spec: SweepSpec) -> str:
    return f"Answering {spec.eval.num_prompts} judged prompts with the untouched base model ({spec.model.name})"


def _baseline_task(spec: SweepSpec) -> PendingBaseline:
    """The base model's answers in a Ray task. On GPUs it holds a trial's GPUs. On CPUs it holds no
    CPU slot, so that every first trial starts beside it: the CPUs are briefly shared by one process
    more than there are slots, instead of a slot waiting for it."""
    import ray

    task = ray.remote(base_model_answers).options(
        num_cpus=spec.resources.cpus_per_trial if spec.resources.gpus_per_trial else 0,
        num_gpus=spec.resources.gpus_per_trial,
        max_retries=0,
    )
    return PendingBaseline(task.remote(spec.trial_config({}), spec.quantizes))


def _record_baseline(store: Store, progress: ProgressCallback, base: Any) -> None:
    """The base model's answers and perplexities, into the store (hpo.callbacks.BaselineCallback, once they come)."""
    store.set_baseline(
        zip(range(len(base.prompts)), base.prompts, base.references, base.answers),
        {"eval_ppl": base.eval_ppl, "retention_ppl": base.retention_ppl},
    )
    retention = f", retention_ppl {base.retention_ppl:.3f}" if base.retention_ppl else ""
    progress.say(f"Base model: eval_ppl {base.eval_ppl:.3f}{retention}")


def make_tuner(spec: SweepSpec, baseline: Answers, run_dir: Path, callbacks: list[Any], trial: Any = None) -> Any:
    """Ray Tune's Tuner for the sweep: its space, searcher, scheduler, budgets, retries and checkpoint keeping.

    `trial` replaces hpo.trial.run_trial (the benchmarks' stand-ins that report without training).
    """
    import ray
    from ray import tune

    skip_callback_census()
    budget = spec.search.gpu_hours_budget
    at_once = concurrent_trials(spec, ray.cluster_resources())  # with packing, K members per pack that can run
    if spec.resources.pack > 1:
        start_registry()  # the pack workers' owner (hpo.packs)
    return tune.Tuner(
        trainable(spec, baseline, trial),
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            search_alg=search_alg(spec, at_once),
            scheduler=scheduler(spec),
            num_samples=spec.search.num_samples,
            max_concurrent_trials=at_once,
            time_budget_s=spec.search.time_budget_s,
            reuse_actors=spec.resources.reuse_workers,  # run_trial releases its memory as it ends
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment_name(spec, run_dir),
            storage_path=spec.storage or str(run_dir.resolve()),
            callbacks=callbacks,
            stop=GpuHoursBudget(budget) if budget else None,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.search.max_retries),
            checkpoint_config=tune.CheckpointConfig(  # the best epochs' adapters, and the latest epoch to resume from
                num_to_keep=spec.search.keep_best_k,
                checkpoint_score_attribute=SCORE_KEY,  # the store's rule for the best epoch (hpo.store.epoch_score)
                checkpoint_score_order="max",
            ),
        ),
    )


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id  # runs/<name>/tune/<trial_id>/: checkpoints, error.txt


def _write_fault(exc: BaseException) -> OSError | Exception | None:
    """The file-system or SQLite write error behind `exc` (Ray Tune wraps a callback's errors), or None."""
    import sqlite3

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno is not None and exc.errno in _WRITE_ERRNOS:
            return exc
        if isinstance(exc, sqlite3.OperationalError) and any(w in str(exc) for w in ("full", "readonly", "disk I/O", "unable to open")):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}


def _finish_quietly(store: Store, status: SweepStatus, note: str | None) -> None:
    """Record how the sweep ended if the store can still be written (it may be the disk that failed)."""
    import sqlite3

    try:
        store.finish(status, note=note)
    except (sqlite3.Error, OSError):
        pass


def _absolute_paths(spec: SweepSpec) -> SweepSpec:
    """Local data and model paths made absolute: Ray Tune runs each trial in its own working directory
    (and an MLflow database's path: `resume` may run from another folder)."""

    def absolute(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value

    data = spec.data.model_copy(update={"source": absolute(spec.data.source), "eval_source": absolute(spec.data.eval_source)})
    model = spec.model.model_copy(update={"name": absolute(spec.model.name)})
    evaluation = spec.eval.model_copy(
        update={"retention_data": absolute(spec.eval.retention_data), "judge_model": absolute(spec.eval.judge_model)}
    )
    storage = spec.storage
    if storage and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    tracking = spec.tracking
    if tracking.mlflow is not None and tracking.mlflow.uri:
        mlflow = tracking.mlflow.model_copy(update={"uri": absolute_uri(tracking.mlflow.uri)})
        tracking = tracking.model_copy(update={"mlflow": mlflow})
    return spec.model_copy(update={"data": data, "model": model, "eval": evaluation, "storage": storage, "tracking": tracking})


def _budget_note(spec: SweepSpec, store: Store, seconds: float) -> str | None:
    """Which budget, if any, ended the sweep."""
    if spec.search.time_budget_s and seconds >= spec.search.time_budget_s:
        return f"the wall-clock budget ({spec.search.time_budget_s:g} s) ended the sweep"
    if spec.search.gpu_hours_budget:
        last: dict[str, float] = {}
        for epoch in store.epochs():
            last[epoch["trial_id"]] = epoch["gpu_hours"] or 0.0
        if sum(last.values()) >= spec.search.gpu_hours_budget:
            return f"the GPU-hours budget ({spec.search.gpu_hours_budget:g}) ended the sweep"
    return None


def _census(statuses: list[str]) -> str:
    counts: dict[str, int] = {}
    for status in statuses:
        if status not in FINISHED:
            counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())
