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
from trainers.data import batches, load_splits, tokenize
from trainers.evaluate import generate_answers, judge_against_reference, perplexity, win_rate
from trainers.methods import attach_adapter
from trainers.model import load_base_model, pick_device

Report = Callable[[dict[str, Any]], None]


class TrainStatus(str, enum.Enum):
    SUCCESS = "success"
    FAILED = "failed"


@dataclass
class TrainResult:
    """What a trial ended with; per-epoch metrics went through `report` already."""

    status: TrainStatus
    epochs_completed: int
    last_metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def setup(config: TrialConfig) -> torch.device:
    """Seed everything and size torch's thread pool to the CPUs the trial holds."""
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    torch.set_num_threads(max(1, int(config.resources.cpus_per_trial)))
    device = pick_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return device


def baseline_answers(config: TrialConfig) -> tuple[list[str], list[str], list[str]]:
    """The untouched base model's answers to the judged prompts: (prompts, references, answers)."""
    device = setup(config)
    model, tokenizer = load_base_model(config.model, device)
    judged = load_splits(config.data, config.eval.num_prompts).judged
    prompts = [ex.prompt for ex in judged]
    answers = generate_answers(
        model, tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size, device=device
    )
    return prompts, [ex.response for ex in judged], answers


def train(config: TrialConfig, baseline: list[str], report: Report) -> TrainResult:
    """Fine-tune one adapter and report metrics after every epoch."""
    device = setup(config)
    model, tokenizer = load_base_model(config.model, device)
    splits = load_splits(config.data, config.eval.num_prompts)
    train_set = tokenize(splits.train, tokenizer, config.data.max_length)
    eval_set = tokenize(splits.eval, tokenizer, config.data.max_length)
    references = [ex.response for ex in splits.judged]
    prompts = [ex.prompt for ex in splits.judged]

    model = attach_adapter(model, config.train)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    warmup = config.train.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    rng = random.Random(config.train.seed)

    train_seconds = eval_seconds = 0.0
    tokens_trained = 0
    metrics: dict[str, Any] = {}
    for epoch in range(1, config.train.epochs + 1):
        model.train()
        start = time.perf_counter()
        losses = []
        for batch in batches(train_set, config.train.batch_size, tokenizer.pad_token_id, rng):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            if not math.isfinite(loss.item()):
                return TrainResult(TrainStatus.FAILED, epoch - 1, metrics, f"training loss is {loss.item()} at epoch {epoch}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens_trained += int(batch["attention_mask"].sum())
        train_seconds += time.perf_counter() - start

        model.eval()
        start = time.perf_counter()
        eval_ppl = perplexity(model, batches(eval_set, config.eval.batch_size, tokenizer.pad_token_id), device)
        answers = generate_answers(
            model, tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size, device=device
        )
        verdicts = judge_against_reference(
            answers, baseline, references, metric=config.eval.metric, tie_margin=config.eval.tie_margin
        )
        eval_seconds += time.perf_counter() - start

        metrics = {
            "epoch": epoch,
            "train_loss": sum(losses) / len(losses),
            "eval_ppl": eval_ppl,
            **win_rate(verdicts),
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "tokens_trained": tokens_trained,
            "peak_memory_gb": peak_memory_gb(device),
            "trainable_params": sum(p.numel() for p in params),
            "answers": answers,
            "verdicts": verdicts,
        }
        report(metrics)
    return TrainResult(TrainStatus.SUCCESS, config.train.epochs, metrics)


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux
