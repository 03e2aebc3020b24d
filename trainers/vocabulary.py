"""The words every part of peftsweep uses for a trial, named once: how it ended, and what it measured.

The worker reports an `EpochMetrics` after each epoch and ends with a `TrialResult`; the driver hands
them to Ray Tune and the store; the live table, `export`, `best` and the report read the same names.
Plain data: nothing here imports Ray, the store or analysis.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, field
from typing import Annotated, TypedDict


class TrialStatus(enum.StrEnum):
    """How far a trial got, as `trials.status` records it."""

    PENDING = "pending"  # known to Ray Tune, not started
    RUNNING = "running"
    COMPLETED = "completed"  # trained every planned epoch
    EARLY_STOPPED = "early_stopped"  # stopped by ASHA or a budget, with the epochs it finished
    ERROR = "error"  # an exception in training, or a process lost more often than search.max_retries
    DIVERGED = "diverged"  # the training loss became NaN or infinite
    OOM = "oom"  # out of memory, or over resources.max_memory_gb
    INFEASIBLE = "infeasible"  # over the sweep's memory constraints: estimated (never trained) or measured


# Trials that ran to their end: only these can be on a frontier, be the best trial or enter a statistic.
FINISHED = (TrialStatus.COMPLETED, TrialStatus.EARLY_STOPPED)
# How a trial can fail; each ends it alone, with its error, and the sweep goes on.
FAILED = (TrialStatus.ERROR, TrialStatus.DIVERGED, TrialStatus.OOM, TrialStatus.INFEASIBLE)


class SweepStatus(enum.StrEnum):
    """How a sweep stands, as `sweep.status` records it."""

    RUNNING = "running"  # a driver is running it, or died (kill -9) and `resume` continues it
    COMPLETED = "completed"  # Ray Tune ran it to the end and at least one trial finished
    FAILED = "failed"  # every trial failed, or the store could no longer be written
    INTERRUPTED = "interrupted"  # SIGINT or SIGTERM: `resume` continues it


@dataclass(frozen=True)
class Metric:
    """What a metric means (`doc`), and whether the store keeps it as a column of its epochs table
    (`column`; the others go to the row's metrics_json)."""

    doc: str
    column: bool = False


class EpochMetrics(TypedDict, total=False):
    """What a trial reports after each epoch, field by field. Costs are cumulative over the trial's
    epochs so far; quality is measured afresh. None: not measured (win rates when the judge was
    unavailable, retention_ppl without retention data)."""

    epoch: Annotated[int, Metric("the epoch just finished, from 1")]
    train_loss: Annotated[float | None, Metric("mean training loss of the epoch's micro-batches", column=True)]
    train_examples_skipped: Annotated[int, Metric("training examples with no response token within data.max_length")]
    eval_ppl: Annotated[float, Metric("perplexity on the eval split (lower is better)", column=True)]
    retention_ppl: Annotated[float | None, Metric("perplexity on text of the base model's own domain: what was forgotten", column=True)]
    win_rate: Annotated[float | None, Metric("(wins + ties / 2) / judged prompts, against the base model", column=True)]
    wins: Annotated[int | None, Metric("judged prompts the trial won", column=True)]
    losses: Annotated[int | None, Metric("judged prompts the base model won", column=True)]
    ties: Annotated[int | None, Metric("judged prompts judged equal", column=True)]
    win_rate_low: Annotated[float | None, Metric("lower end of the win rate's 95% Wilson interval", column=True)]
    win_rate_high: Annotated[float | None, Metric("upper end of the win rate's 95% Wilson interval", column=True)]
    order_agreement: Annotated[float | None, Metric("a pairwise judge: share of prompts whose verdict held with the answers swapped (of those whose two replies parsed)")]
    judge_parse_rate: Annotated[float | None, Metric("a pairwise judge: share of its replies that named A or B (the hf judge's always do)")]
    judge_error: Annotated[str | None, Metric("why the epoch has no verdicts (the judge was unavailable)")]
    judge: Annotated[str | None, Metric("which judge gave the verdicts")]
    answer_length_diff: Annotated[float, Metric("mean words per answer minus the base model's (judges favour length)")]
    train_seconds: Annotated[float, Metric("time spent training, cumulative", column=True)]
    eval_seconds: Annotated[float, Metric("time spent on perplexities, answers and judging, cumulative", column=True)]
    judge_seconds: Annotated[float, Metric("of eval_seconds, time spent judging, cumulative", column=True)]
    tokens_trained: Annotated[int, Metric("tokens the training processed, cumulative", column=True)]
    train_flops: Annotated[float, Metric("training compute in FLOPs from the batches' shapes and the method, cumulative (trainers.flops)", column=True)]
    eval_flops: Annotated[float, Metric("the trained model's compute in perplexity passes and answers, FLOPs, cumulative (not the judge's)", column=True)]
    tokens_per_second: Annotated[float | None, Metric("tokens_trained / train_seconds")]
    peak_memory_gb: Annotated[float, Metric("peak memory of the epoch (GPU allocated, or CPU resident)", column=True)]
    train_memory_gb: Annotated[float | None, Metric("peak memory while training")]
    inference_memory_gb: Annotated[float, Metric("peak memory while evaluating, before an hf judge loads its weights")]
    peak_memory_scope: Annotated[str, Metric("'epoch'; 'process_lifetime' when the peak could not be reset; 'pack': the whole pack's")]
    memory_checks_skipped: Annotated[str, Metric("why the measured memory constraints were not checked (present only then)")]
    estimated_memory_gb: Annotated[float, Metric("estimated training footprint, checked before training")]
    estimated_inference_memory_gb: Annotated[float, Metric("estimated serving footprint, checked before training")]
    trainable_params: Annotated[int, Metric("parameters the method trains")]
    total_params: Annotated[int, Metric("parameters of the adapted model")]
    resumed_from_epoch: Annotated[int, Metric("the checkpoint's epoch this run of the trial started from (0: from scratch)")]
    teacher_cache_gb: Annotated[float, Metric("distill: memory the teacher's cached top-k logits hold (present only then; in peak_memory_gb too)")]
    pack_size: Annotated[int, Metric("packed trials: configurations in the trial's pack at the epoch's end (present only then)")]
    answers: Annotated[list[str], Metric("the answers to the judged prompts (stored in the answers table)")]
    verdicts: Annotated[list[float | None], Metric("each answer's verdict: 1 win, 0.5 tie, 0 loss, None not judged")]
    # Added by the driver, which knows the resources and prices:
    gpu_hours: Annotated[float, Metric("(train_seconds + eval_seconds) x GPUs per trial / 3600, cumulative", column=True)]
    cost_usd: Annotated[float, Metric("gpu_hours x cost.usd_per_gpu_hour", column=True)]
    node: Annotated[str, Metric("IP address of the node that ran the epoch")]
    node_id: Annotated[str, Metric("Ray's id of that node (tells nodes with one IP apart)")]
    devices: Annotated[str, Metric("CUDA_VISIBLE_DEVICES of the trial's process")]
    worker_pid: Annotated[int, Metric("process id of the trial's worker")]


def metric_docs(kind: type = EpochMetrics) -> dict[str, Metric]:
    """Each field of `kind` (EpochMetrics or TrialSummary) with its Metric, in declaration order."""
    hints = typing.get_type_hints(kind, include_extras=True)
    return {name: next(m for m in hint.__metadata__ if isinstance(m, Metric)) for name, hint in hints.items()}


# The per-epoch metrics the store keeps as columns (the others go to metrics_json).
EPOCH_COLUMNS = tuple(name for name, metric in metric_docs().items() if metric.column)
# The metrics an epoch's verdicts give: all None when the judge was unavailable.
VERDICT_METRICS = ("win_rate", "wins", "losses", "ties", "win_rate_low", "win_rate_high")
# Measured afresh at each epoch, so they can pick a trial's best epoch. By the costs (cumulative)
# the best epoch would always be the first.
QUALITY_METRICS = ("win_rate", "eval_ppl")
# What a configuration costs, in the order a cost axis is chosen from the sweep's objectives.
COST_METRICS = ("train_flops", "train_seconds", "gpu_hours", "cost_usd", "peak_memory_gb")
# A trial's row (export, report, `best`) takes these from its best epoch ...
BEST_EPOCH_METRICS = (
    "eval_ppl", "win_rate", "win_rate_low", "win_rate_high", "wins", "losses", "ties",
    "retention_ppl", "order_agreement", "judge_parse_rate", "answer_length_diff",
)  # fmt: skip
# ... these from its last epoch (its totals) ...
TRIAL_METRICS = (
    "train_seconds", "eval_seconds", "judge_seconds", "gpu_hours", "cost_usd",
    "train_flops", "eval_flops", "tokens_trained", "tokens_per_second", "trainable_params", "total_params",
    "peak_memory_gb", "train_memory_gb", "inference_memory_gb",
)  # fmt: skip
# ... and these as the largest over its epochs.
PEAK_METRICS = ("peak_memory_gb", "train_memory_gb", "inference_memory_gb")


def whole_number_fields() -> tuple[str, ...]:
    """The metrics and trial fields that count things (annotated int): written as integers, never 3.0."""
    names = []
    for kind in (EpochMetrics, TrialSummary):
        for name, hint in typing.get_type_hints(kind).items():
            types = set(typing.get_args(hint)) - {type(None)} if typing.get_origin(hint) is not None else {hint}
            if types == {int}:
                names.append(name)
    return tuple(names)


class TrialSummary(TypedDict):
    """A trial's row in `export`, `best` and the report, besides its searched parameters and the
    BEST_EPOCH_METRICS and TRIAL_METRICS above."""

    trial_id: Annotated[str, Metric("Ray Tune's trial id; a folded grid's rows are <trial_id>@<epochs>")]
    status: Annotated[TrialStatus, Metric("how far the trial got (TrialStatus)")]
    epochs_completed: Annotated[int, Metric("epochs the trial finished")]
    best_epoch: Annotated[int | None, Metric("the epoch its metrics come from: the best by the sweep's objective, earliest among ties")]
    error: Annotated[str | None, Metric("a failed trial's error, in one line")]
    error_log: Annotated[str | None, Metric("the file holding a failed trial's full traceback")]
    judge: Annotated[str | None, Metric("which judge gave the best epoch's verdicts")]
    epochs_not_judged: Annotated[int, Metric("epochs whose verdicts are missing (the judge was unavailable)")]


@dataclass
class TrialResult:
    """How a training ended; its per-epoch metrics went through `report` already."""

    status: TrialStatus  # COMPLETED, or one of FAILED
    epochs_completed: int
    last: EpochMetrics = field(default_factory=dict)  # the last epoch reported (empty: none)
    error: str | None = None  # a failed training's reason, in one line


@dataclass
class Baseline:
    """The untouched base model on the judged prompts and the eval sets, measured once per sweep
    (hpo.trial: defined here, so that the driver reads it without importing the worker, torch)."""

    prompts: list[str]
    references: list[str]
    answers: list[str]
    eval_ppl: float
    retention_ppl: float | None
