"""One trial on a Ray worker: the trainable that connects the worker's recipe to Ray Tune.

What passes between the trial and the driver besides the metrics (trainers.vocabulary) are the
keys below: a closing report's status, the checkpoint score, and the GPU-hours spent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.errors import SweepError, last_line
from hpo.spec import SweepSpec
from hpo.store import epoch_score
from trainers.vocabulary import Baseline, EpochMetrics, TrialResult, TrialStatus

if TYPE_CHECKING:
    from trainers.config import TrialConfig
    from trainers.worker import BaseAnswers

# Key of a trial's closing report (one of the failed statuses): how it ended, not a new epoch.
STATUS_KEY = "trial_status"
# Key of every epoch report that Ray Tune ranks checkpoints by (hpo.store.epoch_score); never stored.
SCORE_KEY = "checkpoint_score"
SPENT_KEY = "spent_gpu_hours"  # GPU-hours a trial has held so far, in every report (the budget's input)


# Why the base model's answers failed, as the sweep's one line (the CLI prints it and exits 2).
BASELINE_FAILED = "the base model could not answer the judged prompts: {}"


@dataclass(frozen=True)
class PendingBaseline:
    """The Ray task computing the base model's answers, while the sweep's first trials start: a
    packed sweep's (its member trials hold no model), or a resumed sweep's that stopped before them.

    Wrapped, because tune.with_parameters would wait for a bare ObjectRef before the trial starts.
    """

    task: Any  # ray.ObjectRef of base_model_answers (a trainers.vocabulary.Baseline)
    blocks = True  # the driver may wait for it: a task ends, or fails with an error

    def ready(self) -> bool:
        import ray

        return bool(ray.wait([self.task], timeout=0)[0])

    def get(self) -> Baseline:
        """The answers, once computed; SweepError if the task failed."""
        import ray

        try:
            return ray.get(self.task)
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise SweepError(BASELINE_FAILED.format(last_line(str(cause)))) from None


@dataclass(frozen=True)
class FirstTrialBaseline:
    """The base model's answers, computed by the sweep's first trial to start, in its own process
    before it trains, and posted for the driver and the other trials in Ray's key-value store (the
    GCS, as Ray Tune keeps its registry) under `key`.

    A Ray task of their own would start one more worker process, which imports torch and
    transformers again: about 4 CPU-seconds of every sweep (docs/BENCHMARKS.md, section 1). Every
    other trial waits for the answers at its first judging and before its first report, so the
    driver never waits for them. If the trial computing them ends without posting them (its process
    lost, Tune restarting it behind the trials that wait), the driver releases its claim
    (BaselineCallback) and the next trial that waits computes them.
    """

    key: str
    blocks = False  # the driver never waits for it: the trial answering may lose its process

    @classmethod
    def new(cls) -> FirstTrialBaseline:
        return cls(f"baseline-{uuid.uuid4().hex}")

    def answers(self, trial_id: str, spec: SweepSpec, poll_seconds: float = 0.1) -> list[str]:
        """In a trial: the answers, computed here if no other trial is computing them, else once posted."""
        while (base := self._posted()) is None:
            if self.claim(trial_id):
                return self._answer(spec)
            time.sleep(poll_seconds)
        return base.answers

    def claim(self, trial_id: str) -> bool:
        """Whether this trial computes them: the first one to ask, the same trial restarted, or the
        first to ask after the driver released a lost trial's claim."""
        taken = _kv()._internal_kv_put(f"{self.key}/claim", trial_id, overwrite=False, namespace=_KV_NAMESPACE)
        return not taken or self.claimant() == trial_id

    def claimant(self) -> str | None:
        value = _kv()._internal_kv_get(f"{self.key}/claim", namespace=_KV_NAMESPACE)
        return value.decode() if value is not None else None

    def ready(self) -> bool:
        """Whether the answers, or why they failed, are posted."""
        return any(_kv()._internal_kv_exists(f"{self.key}/{kind}", namespace=_KV_NAMESPACE) for kind in ("answers", "error"))

    def get(self, poll_seconds: float = 0.1) -> Baseline:
        """The answers, once posted; SweepError if the base model failed."""
        while (base := self._posted()) is None:
            time.sleep(poll_seconds)
        return base

    def release(self, trial_id: str) -> bool:
        """In the driver, once `trial_id` ended or lost its process: if it was computing the answers
        and posted nothing, the next trial to ask computes them. Whether it released them."""
        if self.claimant() != trial_id or self.ready():
            return False
        _kv()._internal_kv_del(f"{self.key}/claim", namespace=_KV_NAMESPACE)
        return True

    def forget(self) -> None:
        """Removes them from Ray's store (a cluster's outlives the sweep); a local Ray's goes with it anyway."""
        with contextlib.suppress(Exception):  # at the sweep's end, interrupted or not: never worth an error
            _kv()._internal_kv_del(self.key, del_by_prefix=True, namespace=_KV_NAMESPACE)

    def _answer(self, spec: SweepSpec) -> list[str]:
        """Computes the answers in this process and posts them, or why they failed."""
        from trainers.worker import baseline_answers, release_memory

        try:
            base = baseline_answers(spec.trial_config({}))
            release_memory()  # the base model goes before the trial loads its own
            self._post("answers", json.dumps(dataclasses.asdict(base)).encode())
        except Exception as exc:
            self._post("error", (str(exc) or type(exc).__name__).encode())
            raise
        return base.answers

    def _posted(self) -> Baseline | None:
        """The answers if they are posted, else None; SweepError if the base model failed."""
        kv = _kv()
        if (answers := kv._internal_kv_get(f"{self.key}/answers", namespace=_KV_NAMESPACE)) is not None:
            return Baseline(**json.loads(answers))
        if (error := kv._internal_kv_get(f"{self.key}/error", namespace=_KV_NAMESPACE)) is not None:
            raise SweepError(BASELINE_FAILED.format(last_line(error.decode())))
        return None

    def _post(self, kind: str, value: bytes) -> None:
        _kv()._internal_kv_put(f"{self.key}/{kind}", value, namespace=_KV_NAMESPACE)


_KV_NAMESPACE = "peftsweep"


def _kv() -> Any:
    # Ray's own key-value API, which Ray Tune's registry uses; private, so tests/test_reliability.py checks it with the installed ray.
    from ray.experimental import internal_kv

    return internal_kv


def base_model_answers(config: TrialConfig, quantizes: bool) -> Baseline:
    """trainers.worker.baseline_answers, as a Ray task: the driver does not import the worker (torch, peft)
    itself. `quantizes`: whether the sweep has QLoRA trials (SweepSpec.quantizes), which a pack may
    start later in this same process."""
    from trainers.methods import without_bitsandbytes

    if not quantizes:
        without_bitsandbytes()
    from trainers.worker import baseline_answers

    return baseline_answers(config)


# The base model's answers as a trial gets them: computed already (a resumed sweep's, from the
# store), or still being computed.
Answers = list[str] | PendingBaseline | FirstTrialBaseline


def trainable(spec: SweepSpec, baseline: Answers, trial: Any = None) -> Any:
    """`trial` (default run_trial; a benchmark's stand-in) with the sweep's spec and the base model's
    answers bound, and each trial's resources."""
    from ray import tune

    resources = {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}
    if spec.resources.pack > 1:
        from ray.tune import PlacementGroupFactory

        from hpo.packs import MEMBER_RESOURCES

        alone = PlacementGroupFactory([{"CPU": resources["cpu"], "GPU": resources["gpu"]}])
        member = PlacementGroupFactory([MEMBER_RESOURCES])  # its pack worker holds the trial resources
        return tune.with_resources(
            tune.with_parameters(trial or run_trial, spec=spec, baseline=baseline),
            lambda params: member if packed(spec, spec.trial_config(params)) else alone,
        )
    return tune.with_resources(tune.with_parameters(trial or run_trial, spec=spec, baseline=baseline), resources)


def packed(spec: SweepSpec, config: TrialConfig) -> bool:
    """Whether this trial trains in a pack (resources.pack > 1, and a configuration that can: trainers.methods.why_alone)."""
    from trainers.methods import why_alone

    return spec.resources.pack > 1 and why_alone(config) is None


def run_trial(params: dict[str, Any], spec: SweepSpec, baseline: Answers) -> None:
    """The Ray Tune trainable: a thin adapter from Tune to the worker.

    Every epoch is checkpointed, so a trial whose process or node is lost restarts from its last
    epoch (`search.max_retries`). A failure in training itself (divergence, out of memory, an
    exception) is deterministic: it ends the trial with a closing report instead of an error, so
    Tune does not retry it, and the searcher sees the trial's last (or worst) objective values.
    """
    from ray import tune

    from hpo.packs import PackLost, placement
    from trainers.methods import without_bitsandbytes

    if not spec.quantizes:  # the whole sweep's, as this process may run several of its trials
        without_bitsandbytes()
    config = spec.trial_config(params)
    in_pack = packed(spec, config)  # its training runs in a pack worker (hpo.packs): this process imports no torch
    where = placement()

    objective = spec.tune_objective
    gpus = spec.resources.gpus_per_trial
    last: EpochMetrics = {}  # the latest epoch's report, with its costs, for a closing report
    held_since = time.monotonic()

    def report(metrics: EpochMetrics, save: Any) -> None:
        nonlocal held_since
        if callable(answers):
            answers()  # the driver stores no epoch before the base model's answers (hpo.callbacks.BaselineCallback)
        gpu_hours = (metrics["train_seconds"] + metrics["eval_seconds"]) * gpus / 3600
        score = epoch_score(metrics.get(objective.metric), metrics["epoch"], objective.mode)
        last.clear()
        last.update(metrics, gpu_hours=gpu_hours, cost_usd=gpu_hours * spec.cost.usd_per_gpu_hour)
        with tempfile.TemporaryDirectory() as folder:
            save(Path(folder))
            tune.report(  # a pack worker's metrics name its own placement
                {**where, **last, **_unjudged_objectives(spec, metrics), SPENT_KEY: gpu_hours, SCORE_KEY: score},
                checkpoint=tune.Checkpoint.from_directory(folder),
            )
        held_since = time.monotonic()

    before_trial(in_pack)
    checkpoint = tune.get_checkpoint()  # set when Tune restarts a lost trial, or on `peftsweep resume`
    trace = None
    try:
        answers = _answers(baseline, spec)  # the first trial to start computes them here, first
        held_since = time.monotonic()  # that time is no epoch's
        # as_directory reads a local checkpoint in place; a copy (from an object store) is removed
        # once the training has read it, so no checkpoint_tmp_* folder outlives the trial.
        with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as folder:
            resume_from = Path(folder) if folder else None
            if in_pack:
                from hpo.packs import train_in_pack

                result, trace = train_in_pack(config, spec, baseline, report, resume_from)
            else:
                from trainers.worker import train

                result = train(config, answers, report, resume_from)
    except Exception as exc:
        if isinstance(exc, PackLost):  # as a lost process: Tune restarts the trial from its checkpoint
            raise
        result = TrialResult(TrialStatus.ERROR, 0, {}, last_line(f"{type(exc).__name__}: {exc}"))
        trace = traceback.format_exc()
    after_trial(in_pack)  # an idle worker holds no memory (on a GPU, no cached blocks) between trials
    if result.status is not TrialStatus.COMPLETED:
        spent = last.get("gpu_hours", 0.0) + (time.monotonic() - held_since) * gpus / 3600  # the failed epoch's too
        tune.report({**_closing_report(spec, result, last), SPENT_KEY: spent, "traceback": trace})


@dataclass
class _Process:
    """What a worker process carries from one trial to the next (resources.reuse_workers)."""

    frozen: bool = False  # gc.freeze() done before the first trial: collections skip what the imports made
    unreleased: bool = False  # a trial began and did not reach after_trial (ASHA stopped it inside a report)


_process = _Process()


def before_trial(in_pack: bool) -> None:
    """Free what an earlier trial in this process left, and before the first trial freeze what the imports made."""
    if in_pack:  # a pack's member trial holds no model (its pack worker does)
        return
    if _process.unreleased or not _process.frozen:
        _release_memory()  # imports torch and the worker first
    if not _process.frozen:
        gc.freeze()  # each trial's collection then looks only at what trials made (docs/BENCHMARKS.md, section 1)
        _process.frozen = True
    _process.unreleased = True


def after_trial(in_pack: bool) -> None:
    """Free what the trial held."""
    if in_pack:
        return
    _release_memory()
    _process.unreleased = False


def _release_memory() -> None:
    from trainers.worker import release_memory

    release_memory()


def _answers(baseline: Answers, spec: SweepSpec | None = None) -> BaseAnswers:
    """The base model's answers, or while they are still being computed a function that waits for
    them (called at the first judging, and before the first report). The first trial of a sweep to
    start (FirstTrialBaseline) computes them now, in its process, from `spec`."""
    if isinstance(baseline, FirstTrialBaseline):
        from ray import tune

        trial_id = tune.get_context().get_trial_id()
        answers = functools.cache(lambda: baseline.answers(trial_id, spec))
        return answers() if baseline.claim(trial_id) else answers
    if isinstance(baseline, PendingBaseline):
        return functools.cache(lambda: baseline.get().answers)
    return baseline


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
        value = last.get(objective.metric, result.last.get(objective.metric))
        closing[objective.metric] = worst if value is None or math.isnan(value) else value
    return closing
