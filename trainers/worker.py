"""The training worker: one readable recipe, load -> adapt -> train -> evaluate each epoch -> report.

It knows nothing of Ray, Optuna or the results store: it is given a `report(metrics)` callable.
"""

from __future__ import annotations

import enum
import math
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trainers.config import TrialConfig
from trainers.data import batches, load_retention_texts, load_splits, tokenize, tokenize_text
from trainers.evaluate import generate_answers, perplexity, win_rate
from trainers.judges import agreement_rate, make_judge
from trainers.methods import attach_adapter
from trainers.model import load_base_model, pick_device

Report = Callable[[dict[str, Any]], None]


class TrainStatus(str, enum.Enum):
    SUCCESS = "success"
    DIVERGED = "diverged"  # the training loss became NaN or infinite
    OOM = "oom"  # out of memory, or over the trial's memory cap
    ERROR = "error"  # an exception; the orchestrator records its last line


class MemoryCapExceeded(MemoryError):
    """A CPU trial's resident memory went over `resources.max_memory_gb`."""


@dataclass
class TrainResult:
    """What a trial ended with; per-epoch metrics went through `report` already."""

    status: TrainStatus
    epochs_completed: int
    last_metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def setup(config: TrialConfig) -> torch.device:
    """Seed everything, size torch's thread pool to the trial's CPUs, and cap its GPU memory if asked."""
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    torch.set_num_threads(max(1, int(config.resources.cpus_per_trial)))
    device = pick_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cap = config.resources.max_memory_gb
        if cap:
            total_gb = torch.cuda.get_device_properties(device).total_memory / 1024**3
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total_gb), device)
    return device


@dataclass
class Baseline:
    """The untouched base model on the judged prompts and the eval sets, measured once per sweep."""

    prompts: list[str]
    references: list[str]
    answers: list[str]
    eval_ppl: float
    retention_ppl: float | None


def baseline_answers(config: TrialConfig) -> Baseline:
    """The base model's answers to the judged prompts, and its perplexities before any training."""
    device = setup(config)
    model, tokenizer = load_base_model(config.model, device)
    splits = load_splits(config.data, config.eval.num_prompts)
    prompts = [ex.prompt for ex in splits.judged]
    answers = generate_answers(
        model, tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size, device=device
    )
    eval_set = tokenize(splits.eval, tokenizer, config.data.max_length)
    retention_set = _retention_set(config, tokenizer)
    return Baseline(
        prompts=prompts,
        references=[ex.response for ex in splits.judged],
        answers=answers,
        eval_ppl=perplexity(model, batches(eval_set, config.eval.batch_size, tokenizer.pad_token_id), device),
        retention_ppl=_retention_ppl(model, retention_set, config, tokenizer.pad_token_id, device),
    )


def _retention_set(config: TrialConfig, tokenizer: Any) -> list | None:
    texts = load_retention_texts(config.model.name, config.eval.retention_data, config.eval.retention_docs)
    return None if texts is None else tokenize_text(texts, tokenizer, config.data.max_length)


def _retention_ppl(model: Any, retention_set: list | None, config: TrialConfig, pad_id: int, device: torch.device) -> float | None:
    if retention_set is None:
        return None
    return perplexity(model, batches(retention_set, config.eval.batch_size, pad_id), device)


def train(config: TrialConfig, baseline: list[str], report: Report, state: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune one adapter and report metrics and a resumable state after every epoch.

    `report(metrics, state)` gets each epoch's metrics and the state to continue from (trainable
    weights, optimizer, schedule, data order); pass such a `state` back to resume after its epoch.
    """
    device = setup(config)
    model, tokenizer = load_base_model(config.model, device)
    splits = load_splits(config.data, config.eval.num_prompts)
    train_set = tokenize(splits.train, tokenizer, config.data.max_length)
    eval_set = tokenize(splits.eval, tokenizer, config.data.max_length)
    retention_set = _retention_set(config, tokenizer)
    references = [ex.response for ex in splits.judged]
    prompts = [ex.prompt for ex in splits.judged]
    judge = make_judge(config.eval, device=device)

    model = attach_adapter(model, config.train)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    warmup = config.train.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    rng = random.Random(config.train.seed)
    totals = {"train_seconds": 0.0, "eval_seconds": 0.0, "judge_seconds": 0.0, "tokens_trained": 0}
    first_epoch = 1
    if state is not None:
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        totals = dict(state["totals"])
        first_epoch = state["epoch"] + 1

    metrics: dict[str, Any] = {}
    epochs_done = first_epoch - 1
    estimate = estimate_memory_gb(model, config)
    cap = config.resources.max_memory_gb if device.type == "cpu" else None
    try:
        for epoch in range(first_epoch, config.train.epochs + 1):
            model.train()
            start = time.perf_counter()
            losses = []
            for batch in batches(train_set, config.train.batch_size, tokenizer.pad_token_id, rng):
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = model(**batch).loss
                if not math.isfinite(loss.item()):  # the divergence guard
                    return TrainResult(TrainStatus.DIVERGED, epochs_done, metrics, f"training loss is {loss.item()} at epoch {epoch}")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                totals["tokens_trained"] += int(batch["attention_mask"].sum())
                if cap and peak_memory_gb(device) > cap:
                    raise MemoryCapExceeded(f"peak resident memory {peak_memory_gb(device):.2f} GB > resources.max_memory_gb {cap:g}")
            totals["train_seconds"] += time.perf_counter() - start

            model.eval()
            start = time.perf_counter()
            eval_ppl = perplexity(model, batches(eval_set, config.eval.batch_size, tokenizer.pad_token_id), device)
            retention_ppl = _retention_ppl(model, retention_set, config, tokenizer.pad_token_id, device)
            answers = generate_answers(
                model, tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size, device=device
            )
            judged = time.perf_counter()
            verdicts = judge.judge(prompts, answers, baseline, references)
            totals["judge_seconds"] += time.perf_counter() - judged
            totals["eval_seconds"] += time.perf_counter() - start  # perplexities, answers and judging

            scores = [v.score for v in verdicts]
            metrics = {
                "epoch": epoch,
                "train_loss": sum(losses) / len(losses),
                "eval_ppl": eval_ppl,
                "retention_ppl": retention_ppl,
                **win_rate(scores),
                "order_agreement": agreement_rate(verdicts),
                "answer_length_diff": _mean_length_diff(answers, baseline),
                **totals,
                "peak_memory_gb": peak_memory_gb(device),
                "trainable_params": sum(p.numel() for p in params),
                "resumed_from_epoch": first_epoch - 1,
                "answers": answers,
                "verdicts": scores,
            }
            epochs_done = epoch
            report(metrics, {
                "epoch": epoch,
                "trainable": {n: p.detach().cpu() for n, p in named.items()},
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "totals": dict(totals),
            })
    except (torch.OutOfMemoryError, MemoryError) as exc:
        del model, optimizer, params, named
        if device.type == "cuda":
            torch.cuda.empty_cache()
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return TrainResult(
            TrainStatus.OOM,
            epochs_done,
            metrics,
            f"out of memory at epoch {epochs_done + 1} (batch_size={config.train.batch_size}, "
            f"max_length={config.data.max_length}, method={config.train.method}; estimated need {estimate:.2f} GB): {detail}",
        )
    return TrainResult(TrainStatus.SUCCESS, config.train.epochs, metrics)


def _mean_length_diff(answers: list[str], baseline: list[str]) -> float:
    """Mean words per answer minus the base model's: judges are known to favour longer answers."""
    return sum(len(a.split()) - len(b.split()) for a, b in zip(answers, baseline, strict=True)) / len(answers)


def estimate_memory_gb(model: Any, config: TrialConfig) -> float:
    """A rough training footprint: weights, gradients and AdamW moments of the trainable
    weights, and activations (Korthikanti et al. 2022: about 34 x batch x length x hidden
    bytes per layer in 16-bit precision, ignoring the attention-score term)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4 * 3
    base = getattr(model, "config", None)
    hidden, layers = getattr(base, "hidden_size", 0), getattr(base, "num_hidden_layers", 0)
    element = next(model.parameters()).element_size()
    activations = 34 * config.train.batch_size * config.data.max_length * hidden * layers * element / 2
    return (weights + trainable + activations) / 1024**3


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux
