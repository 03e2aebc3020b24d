"""The sweep driver: a spec in, Ray Tune runs the trials, the store and the report come out.

Ray Tune does the scheduling and searching (grid, random, Optuna TPE; FIFO or ASHA); this module
only translates the spec, connects the worker to Tune, and records what Tune reports.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import logging
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ray.tune import Callback, Stopper
from ray.tune.result import AUTO_RESULT_KEYS

from hpo.checks import check_inputs
from hpo.errors import SweepError, SweepFailed, SweepInterrupted
from hpo.progress import ProgressCallback
from hpo.spec import VARIANT, Dimension, Sweep, SweepSpec, coerce_value, flatten_params
from hpo.store import COMPLETED, EARLY_STOPPED, ERROR, SCORE_KEY, STATUS_KEY, Store, epoch_score

_RAY_KEYS = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", SCORE_KEY}  # not stored
SPENT_KEY = "spent_gpu_hours"  # GPU-hours a trial has held so far, in every report (the budget's input)
ADDRESS_TIMEOUT_S = 10  # seconds a Ray head node gets to accept a connection
VERSIONED_PACKAGES = ("peftsweep", "torch", "transformers", "peft", "ray", "optuna", "pydantic")


def runs_root(runs_dir: str | None = None) -> Path:
    return Path(runs_dir or os.environ.get("PEFTSWEEP_RUNS", "runs"))


def run_sweep(
    sweep: Sweep,
    *,
    name: str | None = None,
    runs_dir: str | None = None,
    overwrite: bool = False,
    address: str | None = None,
    overrides: list[str] = (),
    checked: bool = False,
) -> Path:
    """Run a validated sweep to the end; returns the run folder (store + report).

    `checked`: the caller made hpo.checks.check_inputs already (the CLI, before its first line).
    """
    name = name or sweep.name
    run_dir = runs_root(runs_dir) / name
    _check_address(address)
    if not checked:
        check_inputs(sweep.spec)  # builds the tiny model (or converts a GGUF) first, with progress lines
    spec = _absolute_paths(sweep.spec)
    created = _make_run_dir(run_dir)
    with _driver_lock(run_dir):  # before anything is removed: --overwrite must not wipe a live sweep
        try:
            _clear_run_dir(run_dir, overwrite)
            _prepare_storage(spec, run_dir, overwrite)
        except SweepError:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        store = Store.create(
            run_dir / "results.db",
            name=name,
            sweep_file=str(sweep.path),
            spec={**spec.model_dump(mode="json"), "overrides": list(overrides)},
            searched=spec.searched,
            objectives=[o.model_dump() for o in spec.objectives],
            versions=_versions(),
            git_commit=_git_commit(),
        )
        progress = ProgressCallback(spec, name)

        def tuner() -> Any:
            progress.say(_baseline_message(spec))
            base = _baseline(spec)
            store.set_baseline(
                zip(range(len(base.prompts)), base.prompts, base.references, base.answers),
                {"eval_ppl": base.eval_ppl, "retention_ppl": base.retention_ppl},
            )
            retention = f", retention_ppl {base.retention_ppl:.3f}" if base.retention_ppl else ""
            progress.say(f"Base model: eval_ppl {base.eval_ppl:.3f}{retention}")
            return _tuner(spec, base.answers, run_dir, [StoreCallback(store, spec), progress])

        return _drive(tuner, store, spec, progress, run_dir, address)


def resume_sweep(name: str, *, runs_dir: str | None = None, address: str | None = None) -> Path:
    """Continue a sweep whose driver died, from Ray Tune's saved experiment state.

    Finished trials are not run again; unfinished ones restart from their last epoch checkpoint.
    """
    from ray import tune

    run_dir = runs_root(runs_dir) / name
    _check_address(address)
    with _driver_lock(run_dir):
        store = Store.open(run_dir / "results.db")
        sweep = store.sweep()
        if sweep["status"] == "completed":
            store.close()
            raise SweepError(f"sweep {name} has completed; nothing to resume (its report: peftsweep report {name})")
        try:
            spec = SweepSpec.model_validate({k: v for k, v in sweep["spec"].items() if k != "overrides"})
        except ValueError as exc:  # pydantic's ValidationError: a damaged store, or one of another version
            store.close()
            first = str(exc).strip().splitlines()[0]
            raise SweepError(f"{store.path}: damaged results store: its sweep spec does not validate ({first}); "
                             f"start the sweep over with peftsweep run SWEEP --name {name} --overwrite") from None
        experiment = experiment_path(spec, run_dir)
        if not tune.Tuner.can_restore(experiment):
            store.close()
            raise SweepError(
                f"sweep {name} stopped before its first trial started, so there is nothing to resume; "
                f"run it again with --overwrite"
            )
        baseline = [row["answer"] for row in store.baseline()]
        if not baseline:
            store.close()
            raise SweepError(f"sweep {name} stopped before the base model answered; run it again with --overwrite")
        store.reopen()
        progress = ProgressCallback(spec, name)
        progress.say(f"Resuming sweep {name} ({len(store.trials())} trials so far) from {experiment}")

        def tuner() -> Any:
            # Tune restores the searcher, the scheduler and the callbacks (they reopen the store) with the trials.
            return tune.Tuner.restore(
                experiment, trainable=_trainable(spec, baseline), resume_unfinished=True, resume_errored=True
            )

        return _drive(tuner, store, spec, progress, run_dir, address)


def _drive(make_tuner: Any, store: Store, spec: SweepSpec, progress: ProgressCallback, run_dir: Path, address: str | None) -> Path:
    """Start Ray, run the tuner to the end, close the store's sweep record and write the report.

    Raises SweepInterrupted on SIGINT/SIGTERM (the store says `interrupted`; `resume` continues),
    SweepFailed when every trial failed (after the report) or the store can no longer be written.
    """
    import ray

    signals = _Signals()
    try:
        with signals:
            _init_ray(address)
            signals.install()  # again: Ray's core worker puts its own SIGTERM handler (exit 1) in place
            if not address:
                start_reaper()
            progress.say(f"Ray {'cluster ' + address if address else 'started locally'}; resources: {_resources()}")
            tuner = make_tuner()
            progress.start()
            started = time.monotonic()
            try:
                with signals.tuning():
                    tuner.fit()
            finally:
                progress.stop()
        if signals.received:
            raise SweepInterrupted(signals.received)
        store.end_unfinished(EARLY_STOPPED)  # trials a budget cut off mid-epoch
        statuses = [t["status"] for t in store.trials()]
        errors = sum(s not in (COMPLETED, EARLY_STOPPED) for s in statuses)
        failed = f"{errors} of {len(statuses)} trials failed ({_census(statuses)})" if errors else None
        notes = [failed, _budget_note(spec, store, time.monotonic() - started)]
        note = "; ".join(n for n in notes if n) or None
        if note:
            progress.say(f"Note: {note}")
        status = "completed" if errors < len(statuses) else "failed"
        store.finish(status, note=note)
    except SweepInterrupted:
        _finish_quietly(store, "interrupted", None)
        raise
    except KeyboardInterrupt:
        _finish_quietly(store, "interrupted", None)
        raise SweepInterrupted(signals.received or signal.SIGINT) from None
    except BaseException as exc:
        fault = _write_fault(exc)
        reason = f"cannot write {fault.filename or store.path}: {fault.strerror}" if isinstance(fault, OSError) else (
            f"cannot write the results store {store.path}: {fault}" if fault is not None else None
        )
        _finish_quietly(store, "failed", reason or _last_line(f"{type(exc).__name__}: {exc}"))
        if reason:
            raise SweepFailed(f"{reason}; free space or fix the folder's permissions, then `peftsweep resume {run_dir.name}` continues") from None
        raise
    finally:
        if ray.is_initialized() and not address:
            ray.shutdown()

    report = _write_report(store, run_dir)
    store.close()
    progress.say(f"Report: {report}")
    if status == "failed":
        raise SweepFailed(f"sweep {run_dir.name} failed: {note} (peftsweep export {run_dir.name} has each trial's error; report: {report})")
    return run_dir


def _write_report(store: Store, run_dir: Path) -> Path:
    from analysis.report import write_report

    try:
        return write_report(store, run_dir / "report.html")
    except OSError as exc:
        raise SweepFailed(
            f"cannot write the report {run_dir / 'report.html'}: {exc.strerror}; the results are in the store: "
            f"free space, then `peftsweep report {run_dir.name}`"
        ) from None


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


def _finish_quietly(store: Store, status: str, note: str | None) -> None:
    """Record how the sweep ended if the store can still be written (it may be the disk that failed)."""
    import sqlite3

    try:
        store.finish(status, note=note)
    except (sqlite3.Error, OSError):
        pass


class _Signals:
    """SIGINT and SIGTERM stop a sweep so that it can be resumed: while Ray Tune runs the trials, they
    ask Tune for its own graceful stop (it saves the experiment state, then returns), and the sweep
    is recorded `interrupted`; before and after, they interrupt at once. A second signal stops at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._tuning = False

    def __enter__(self) -> "_Signals":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune's would hide a Ctrl-C from us (the sweep looked completed)
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.install()
        return self

    def install(self) -> None:
        for signum in self._previous:
            signal.signal(signum, self._handle)

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def tuning(self):
        self._tuning = True
        try:
            yield
        finally:
            self._tuning = False

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = self.received or signum
        # Tune stops gracefully on SIGUSR1 (its handler is installed once fit() has started).
        if first and self._tuning and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        raise KeyboardInterrupt


def start_reaper() -> None:
    """A watchdog process that ends this driver's local Ray processes if the driver dies without
    shutting Ray down (kill -9): Ray's agents otherwise outlive it for minutes (hpo/reaper.py)."""
    subprocess.Popen(
        [sys.executable, "-m", "hpo.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives the driver, and a Ctrl-C at the terminal
        cwd=Path(__file__).resolve().parent.parent,  # finds hpo from any working directory
    )


class _driver_lock:
    """One driver per run folder: `resume` must not start a second driver on a live sweep.

    An OS file lock, so a killed driver (even kill -9) releases it.
    """

    FILE = "driver.lock"

    def __init__(self, run_dir: Path):
        self.path = run_dir / self.FILE

    def __enter__(self) -> None:
        import fcntl

        if not self.path.parent.is_dir():
            raise SweepError(f"no sweep at {self.path.parent} (peftsweep ls lists the runs)")
        self.file = self.path.open("w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise SweepError(f"{self.path.parent}: a driver is still running this sweep; wait for it or stop it first") from None

    def __exit__(self, *exc_info) -> None:
        self.file.close()


def _absolute_paths(spec: SweepSpec) -> SweepSpec:
    """Local data and model paths made absolute: Ray Tune runs each trial in its own working directory."""

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
    return spec.model_copy(update={"data": data, "model": model, "eval": evaluation, "storage": storage})


def _check_address(address: str | None) -> None:
    """Refuse Ray Client (ray://), where Tune runs on the head node away from this driver's store,
    and an address that does not answer (Ray itself would wait minutes for it)."""
    if not address:
        return
    if address.startswith("ray://"):
        raise SweepError(
            f"--address {address}: Ray Client addresses are not supported (Ray Tune would run on the head node, "
            "where this machine's results store cannot be written); run peftsweep on the head node with "
            "--address auto, see docs/CLUSTER.md"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # 'auto', 'local': Ray finds the cluster itself, and says so quickly when there is none
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as exc:
        raise SweepError(
            f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); check the head node's "
            "address and port (ray start --head prints it) or RAY_ADDRESS"
        ) from None


def _prepare_storage(spec: SweepSpec, run_dir: Path, overwrite: bool) -> None:
    """A local `storage` must not hold an earlier sweep of this name, unless --overwrite replaces it."""
    if not spec.storage or "://" in spec.storage:
        return  # object stores: Ray Tune writes there; an earlier experiment of the name is the user's to remove
    shared = Path(experiment_path(spec, run_dir))
    if shared.exists():
        if not overwrite:
            raise SweepError(f"storage {shared} already holds a sweep named {run_dir.name}: --overwrite replaces it, --name NAME keeps both")
        shutil.rmtree(shared)


def _make_run_dir(run_dir: Path) -> bool:
    """The run folder, made if needed; whether this call made it."""
    try:
        if run_dir.is_dir():
            return False
        run_dir.mkdir(parents=True)
        return True
    except FileExistsError:
        return False  # another driver made it just now: the driver lock decides
    except OSError as exc:
        raise SweepError(f"cannot create {run_dir}: {exc.strerror}; choose a writable --runs-dir") from None


def _clear_run_dir(run_dir: Path, overwrite: bool) -> None:
    """An earlier run of this name is refused, or with --overwrite removed (the caller holds its driver lock)."""
    earlier = [p for p in run_dir.iterdir() if p.name != _driver_lock.FILE]
    if not earlier:
        return
    if not overwrite:
        raise SweepError(f"{run_dir} already exists: {_what_to_do_with(run_dir)}")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _what_to_do_with(run_dir: Path) -> str:
    """The advice for a run name that is taken: resume only what can be resumed."""
    import sqlite3

    name = run_dir.name
    keep = f"--overwrite replaces it, --name NAME keeps both"
    try:
        conn = sqlite3.connect(f"file:{run_dir / 'results.db'}?mode=ro", uri=True)
        try:
            status = conn.execute("SELECT status FROM sweep").fetchone()[0]
        finally:
            conn.close()
    except (sqlite3.Error, TypeError):
        return keep
    if status == "completed":
        return f"that sweep has completed (its report: peftsweep report {name}); {keep}"
    return f"`peftsweep resume {name}` continues it ({status}), {keep}"


def _init_ray(address: str | None) -> None:
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray says at every local start that it enabled token authentication, its default: not news to our users.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A reused worker waits this long for a stopped trial's thread to end before its next trial
    # (Ray Tune's default, 2 s, errors that next trial when a loaded machine is slower). Workers of
    # a local Ray inherit it; on a cluster, set it on the nodes.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    # Tune's default result loggers (JSON, CSV, TensorBoard) duplicate the store, and tensorboardX
    # prints "NaN or Inf found in input tensor." for a failed trial's worst values.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=True,
        )
    except ConnectionError as exc:
        raise SweepError(f"Ray cluster at {address} does not answer ({exc}); check --address / RAY_ADDRESS") from None
    logging.getLogger("ray.tune").setLevel(logging.ERROR)


def _resources() -> str:
    import ray

    res = ray.cluster_resources()
    return f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"


def _baseline_message(spec: SweepSpec) -> str:
    # the tiny model was built before Ray started (hpo.checks.check_inputs), with its own progress lines
    return f"Answering {spec.eval.num_prompts} judged prompts with the untouched base model ({spec.model.name}) ..."


def _baseline(spec: SweepSpec) -> Any:
    """The base model's answers, generated once per sweep on a worker (the driver never loads a model)."""
    import ray

    from trainers.worker import baseline_answers

    task = ray.remote(baseline_answers).options(
        num_cpus=spec.resources.cpus_per_trial, num_gpus=spec.resources.gpus_per_trial, max_retries=0
    )
    try:
        return ray.get(task.remote(spec.trial_config({})))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if exc.cause is not None else exc
        raise SweepError(f"the base model could not answer the judged prompts: {_last_line(str(cause))}") from None


def _tune_dimension(dim: Dimension, name: str, algorithm: str) -> Any:
    from ray import tune

    if dim.kind == "grid":
        values = [coerce_value(name, v) for v in dim.values]
        return tune.grid_search(values) if algorithm in ("grid", "random") else tune.choice(values)
    if dim.kind == "choice":
        return tune.choice([coerce_value(name, v) for v in dim.values])
    low, high = dim.values
    return {"uniform": tune.uniform, "loguniform": tune.loguniform}[dim.kind](low, high) if dim.kind != "int" else tune.randint(low, high + 1)


def _define_by_run(spec: SweepSpec) -> bool:
    """Optuna samples the space itself (define-by-run) when some parameters exist only for some methods."""
    return bool(spec.search.conditional) and spec.search.algorithm != "grid"


def _search_alg(spec: SweepSpec) -> Any:
    """Ray Tune's searcher for the spec: its basic generator (grid, random) or Optuna's samplers."""
    search = spec.search
    if search.algorithm in ("tpe", "nsga2") or _define_by_run(spec):
        import optuna

        from hpo.searchers import OptunaSearchOnce

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = {
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=search.seed),
            "tpe": lambda: optuna.samplers.TPESampler(seed=search.seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=search.seed),
        }[search.algorithm]()
        space = _optuna_space(spec) if _define_by_run(spec) else None
        if spec.multi_objective:
            metric, mode = [o.metric for o in spec.objectives], [o.mode for o in spec.objectives]
        else:
            metric, mode = spec.tune_objective.metric, spec.tune_objective.mode
        return OptunaSearchOnce(space=space, metric=metric, mode=mode, sampler=sampler, space_size=_space_size(spec))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune applies TuneConfig.max_concurrent_trials only to a Searcher; this generator takes its own limit.
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=search.max_concurrent_trials or 0)


def _space_size(spec: SweepSpec) -> int | None:
    """How many configurations a space of grids and choices holds; None when it is not finite."""
    if _define_by_run(spec) or any(dim.kind not in ("grid", "choice") for dim in spec.search.space.values()):
        return None
    return math.prod(len(dim.values) for dim in spec.search.space.values())


def _optuna_space(spec: SweepSpec) -> Any:
    """A define-by-run space: the method first, then the space, then that method's own parameters."""

    def suggest(trial: Any, name: str, dim: Dimension) -> Any:
        if dim.kind in ("grid", "choice"):
            return trial.suggest_categorical(name, list(dim.values))
        low, high = dim.values
        if dim.kind == "int":
            return trial.suggest_int(name, int(low), int(high))
        return trial.suggest_float(name, low, high, log=dim.kind == "loguniform")

    def space(trial: Any) -> None:
        method = spec.train.method
        for name, dim in spec.search.space.items():
            value = suggest(trial, name, dim)
            if name == "method":
                method = value
        for name, dim in spec.search.conditional.get(method, {}).items():
            suggest(trial, name, dim)

    return space


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The searched values in Ray Tune's terms; folded epochs are not searched (one training answers them all).

    With conditional parameters, a grid searches one parameter of method variants (each method with
    each combination of its own values), and Optuna samples the space itself (define-by-run).
    """
    from ray import tune

    if _define_by_run(spec):
        return {}
    folded = spec.folded_epochs is not None
    space = {
        name: _tune_dimension(dim, name, spec.search.algorithm)
        for name, dim in spec.search.space.items()
        if not (folded and name == "epochs") and not (name == "method" and spec.search.conditional)
    }
    if spec.search.conditional:
        space[VARIANT] = tune.grid_search(spec.method_variants())
    return space


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


def _experiment_name(spec: SweepSpec, run_dir: Path) -> str:
    return run_dir.name if spec.storage else "tune"


def experiment_path(spec: SweepSpec, run_dir: Path) -> str:
    """Where Ray Tune keeps the sweep's experiment state and checkpoints: runs/<name>/tune, or
    <storage>/<name> (a shared filesystem path or an object-store URI)."""
    if not spec.storage:
        return str((run_dir / "tune").resolve())
    return f"{spec.storage.rstrip('/')}/{run_dir.name}"


def _trainable(spec: SweepSpec, baseline: list[str]) -> Any:
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(run_trial, spec=spec, baseline=baseline),
        {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial},
    )


def _tuner(spec: SweepSpec, baseline: list[str], run_dir: Path, callbacks: list[Any]) -> Any:
    from ray import tune

    objective = spec.tune_objective
    scheduler = None
    if spec.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="epoch",
            metric=objective.metric,
            mode=objective.mode,
            max_t=max_epochs(spec),
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    trainable = _trainable(spec, baseline)
    budget = spec.search.gpu_hours_budget
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            search_alg=_search_alg(spec),
            scheduler=scheduler,
            num_samples=spec.search.num_samples,
            max_concurrent_trials=spec.search.max_concurrent_trials,
            time_budget_s=spec.search.time_budget_s,
            reuse_actors=spec.resources.reuse_workers,  # run_trial releases its memory as it ends
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=_experiment_name(spec, run_dir),
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


def max_epochs(spec: SweepSpec) -> int:
    dim = spec.search.space.get("epochs")
    if dim is None:
        return spec.train.epochs
    return int(max(dim.values)) if dim.kind in ("grid", "choice") else int(dim.values[1])


def run_trial(params: dict[str, Any], spec: SweepSpec, baseline: list[str]) -> None:
    """The Ray Tune trainable: a thin adapter from Tune to the worker.

    Every epoch is checkpointed, so a trial whose process or node is lost restarts from its last
    epoch (`search.max_retries`). A failure in training itself (divergence, out of memory, an
    exception) is deterministic: it ends the trial with a closing report instead of an error, so
    Tune does not retry it, and the searcher sees the trial's last (or worst) objective values.
    """
    import tempfile

    import ray
    from ray import tune

    from trainers.worker import TrainResult, TrainStatus, release_memory, train

    config = spec.trial_config(params)
    placement = {
        "node": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),  # tells nodes apart where several share one IP
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "worker_pid": os.getpid(),
    }

    objective = spec.tune_objective
    gpus = spec.resources.gpus_per_trial
    last: dict[str, Any] = {}  # the latest epoch's report, for a closing report
    held_since = time.monotonic()

    def report(metrics: dict[str, Any], save: Any) -> None:
        nonlocal held_since
        gpu_hours = (metrics["train_seconds"] + metrics["eval_seconds"]) * gpus / 3600
        score = epoch_score(metrics.get(objective.metric), metrics["epoch"], objective.mode)
        last.clear()
        last.update(metrics, gpu_hours=gpu_hours, cost_usd=gpu_hours * spec.cost.usd_per_gpu_hour)
        with tempfile.TemporaryDirectory() as folder:
            save(Path(folder))
            tune.report(
                {**last, **placement, **_unjudged_objectives(spec, metrics), SPENT_KEY: gpu_hours, SCORE_KEY: score},
                checkpoint=tune.Checkpoint.from_directory(folder),
            )
        held_since = time.monotonic()

    # The process may have run an earlier trial (resources.reuse_workers). One that ASHA stopped
    # ended by an exception raised in tune.report, unwound only now: free what it held first.
    release_memory()
    checkpoint = tune.get_checkpoint()  # set when Tune restarts a lost trial, or on `peftsweep resume`
    trace = None
    try:
        # as_directory reads a local checkpoint in place; a copy (from an object store) is removed
        # once the training has read it, so no checkpoint_tmp_* folder outlives the trial.
        with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as folder:
            result = train(config, baseline, report, Path(folder) if folder else None)
    except Exception as exc:
        result = TrainResult(TrainStatus.ERROR, 0, {}, _last_line(f"{type(exc).__name__}: {exc}"))
        trace = traceback.format_exc()
    release_memory()  # an idle worker holds no memory (on a GPU, no cached blocks) between trials
    if result.status is not TrainStatus.SUCCESS:
        spent = last.get("gpu_hours", 0.0) + (time.monotonic() - held_since) * gpus / 3600  # the failed epoch's too
        tune.report({**_closing_report(spec, result, last), SPENT_KEY: spent, "traceback": trace})


def _unjudged_objectives(spec: SweepSpec, metrics: dict[str, Any]) -> dict[str, float]:
    """NaN for each objective an epoch left unknown (win_rate when the judge was unavailable).

    The rule for an epoch without verdicts: Tune must get a number (None breaks ASHA's and
    Optuna's arithmetic; a missing key fails Tune's strict metric check), and NaN is the one
    that ranks it nowhere: ASHA lets it pass its rung and leaves it out of the cutoffs, Tune's
    checkpoint keeping ranks it below every score (so it is never the kept best epoch, only the
    latest), and OptunaSearchOnce tells Optuna the trial's last judged value instead. The store
    keeps NULL, and its best epoch is chosen among judged epochs.
    """
    return {o.metric: math.nan for o in spec.objectives if o.metric in metrics and metrics[o.metric] is None}


def _closing_report(spec: SweepSpec, result: Any, last: dict[str, Any]) -> dict[str, Any]:
    """The last report of a failed trial: its status and error, and for the searcher and scheduler
    each objective's value at the last reported epoch (`last`, which carries the costs), or the
    worst value if none was reported (or it was not judged)."""
    closing = {STATUS_KEY: result.status.value, "error": result.error, "epoch": result.epochs_completed}
    for objective in spec.objectives:
        worst = float("inf") if objective.mode == "min" else 0.0
        value = last.get(objective.metric, result.last_metrics.get(objective.metric))
        closing[objective.metric] = worst if value is None or math.isnan(value) else value
    return closing


def _census(statuses: list[str]) -> str:
    counts: dict[str, int] = {}
    for status in statuses:
        if status not in (COMPLETED, EARLY_STOPPED):
            counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


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
            self.store.set_trial_status(trial.trial_id, result[STATUS_KEY], result["error"])
            return
        epoch = int(result["epoch"])
        if epoch == 1:
            self.store.set_trial_placement(trial.trial_id, result.get("node"), result.get("devices"))
        self.store.add_epoch(trial.trial_id, epoch, {k: v for k, v in result.items() if k not in _RAY_KEYS})
        self.store.add_answers(
            trial.trial_id, epoch, ((i, a, v) for i, (a, v) in enumerate(zip(result["answers"], result["verdicts"])))
        )

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
        self.store.set_trial_status(trial.trial_id, COMPLETED if done >= planned else EARLY_STOPPED)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.forget_removed_checkpoints(trial.trial_id)
        error = str(trial.get_error() or "unknown error")  # a lost process: Ray's full traceback
        self.store.write_traceback(trial.trial_id, error)
        self.store.set_trial_status(trial.trial_id, ERROR, _last_line(error))


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
