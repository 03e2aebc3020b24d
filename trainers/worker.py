"""The training worker: one readable recipe, load -> adapt -> train -> evaluate each epoch -> report.

It knows nothing of Ray, Optuna or the results store: it is given a `report(metrics)` callable.
"""

from __future__ import annotations

import gc
import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trainers.config import TrialConfig
from trainers.data import (
    DataError,
    batches,
    carries_loss,
    first_line,
    load_retention_texts,
    load_splits,
    packed_batches,
    tokenize,
    tokenize_text,
)
from trainers.distill import Distiller
from trainers.evaluate import generate_answers, perplexity, win_rate
from trainers.flops import FlopModel
from trainers.judges import JudgeUnavailable, agreement_rate, judge_label, make_judge, parse_rate
from trainers.methods import attach_adapter, get_method
from trainers.model import load_base_model, pick_device
from trainers.vocabulary import VERDICT_METRICS, Baseline, EpochMetrics, TrialResult, TrialStatus

Report = Callable[[EpochMetrics, Callable[[Path], None]], None]
# The base model's answers to the judged prompts, or a function that waits for them (hpo.trial: a
# sweep's first trials start while the base model still answers).
BaseAnswers = list[str] | Callable[[], list[str]]
STATE_FILE = "state.pt"  # in a checkpoint folder: what training resumes from
ADAPTER_DIR = "adapter"  # in a checkpoint folder: the adapter, for peft.PeftModel.from_pretrained
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CLEAR_REFS = Path("/proc/self/clear_refs")  # Linux: writing 5 resets the process's peak resident set size
LIFETIME_PEAK_NOTE = (
    "the peak-memory reset failed, so peak memory is the process's lifetime peak (in a reused worker perhaps an earlier "
    "trial's): resources.max_memory_gb and the measured memory constraints were not checked against it"
)


class MemoryCapExceeded(MemoryError):
    """A CPU trial's resident memory went over `resources.max_memory_gb`."""


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


def baseline_answers(config: TrialConfig) -> Baseline:
    """The base model's answers to the judged prompts, and its perplexities before any training."""
    device = setup(config)
    model, tokenizer = load_base_model(config.model, device)
    splits = load_splits(config.data, config.eval.num_prompts, tokenizer=tokenizer)
    prompts = [ex.prompt for ex in splits.judged]
    answers = generate_answers(
        model, tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size, device=device,
        sampling=config.eval.sampling,
    )
    eval_set = tokenize(splits.eval, tokenizer, config.data.max_length, response_only_loss=config.data.response_only_loss)
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


@dataclass(frozen=True)
class TrialData:
    """What a training reads, tokenized once: the training examples that carry a loss, the eval and
    retention sets, and the judged prompts with their reference answers."""

    train_set: list
    skipped: int  # training examples with no response token within data.max_length
    eval_set: list
    retention_set: list | None
    prompts: list[str]
    references: list[str]


def trial_data(config: TrialConfig, tokenizer: Any) -> TrialData:
    """The trial's data (trainers.packed shares it among a pack's members); DataError if nothing can be trained."""
    splits = load_splits(config.data, config.eval.num_prompts, tokenizer=tokenizer)
    train_set = tokenize(splits.train, tokenizer, config.data.max_length, response_only_loss=config.data.response_only_loss)
    # An example cut off before its response has nothing to learn, and a batch of them a NaN loss that is no divergence.
    kept = [t for t in train_set if carries_loss(t)]
    if not kept:
        raise DataError(
            f"data.max_length {config.data.max_length}: no training example has a response token that fits; raise data.max_length"
        )
    return TrialData(
        train_set=kept,
        skipped=len(train_set) - len(kept),
        eval_set=tokenize(splits.eval, tokenizer, config.data.max_length, response_only_loss=config.data.response_only_loss),
        retention_set=_retention_set(config, tokenizer),
        prompts=[ex.prompt for ex in splits.judged],
        references=[ex.response for ex in splits.judged],
    )


def train(config: TrialConfig, baseline: BaseAnswers, report: Report, resume_from: Path | None = None) -> TrialResult:
    """Fine-tune one adapter and report metrics and a checkpoint after every epoch.

    `report(metrics, save)` gets each epoch's metrics and `save(folder)`, which writes the epoch's
    checkpoint there: the adapter (loadable with `peft.PeftModel.from_pretrained`) and the state to
    resume from (trainable weights, optimizer, schedule, data order). `resume_from` such a folder
    continues after its epoch. `baseline` is waited for at the first judging, if it is a function.
    """
    device = setup(config)
    method = get_method(config.train.method)
    model, tokenizer = load_base_model(config.model, device, method.load_options(config.train))
    data = trial_data(config, tokenizer)
    train_set, skipped, eval_set, retention_set = data.train_set, data.skipped, data.eval_set, data.retention_set
    prompts, references = data.prompts, data.references
    judge = make_judge(config.eval, device=device)

    if config.train.gradient_checkpointing and method.trains:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.train.seed)  # an adapter's first weights depend on its seed alone (as in trainers.packed)
    model = attach_adapter(model, config.train)
    # distill: the teacher, and its top-k logits cached per training example (trainers.distill)
    distiller = Distiller.for_trial(config.train, config.model, device) if config.train.method == "distill" else None
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    flops = FlopModel.of(model, gradient_checkpointing=config.train.gradient_checkpointing and method.trains)
    eval_pass_flops = eval_flops(flops, data, config, tokenizer.pad_token_id)  # the same passes every epoch
    accumulate = config.train.grad_accumulation_steps
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / config.train.batch_size) / accumulate)
    optimizer = torch.optim.AdamW(params or [torch.zeros(1)], lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.train.lr_schedule, config.train.warmup_steps, steps_per_epoch * config.train.epochs)
    )
    precision = AUTOCAST[config.train.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=config.train.precision == "fp16")
    rng = random.Random(config.train.seed)
    totals = new_totals()
    first_epoch = 1
    if resume_from is not None:
        state = load_state(Path(resume_from) / STATE_FILE)
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_state(state, rng)
        totals = resumed_totals(state)
        first_epoch = state["epoch"] + 1

    def save(folder: Path, epoch: int) -> None:
        folder = Path(folder)
        if method.trains:
            model.save_pretrained(folder / ADAPTER_DIR)  # the adapter (or, for full, the whole model)
        state = {
            "epoch": epoch,
            "trainable": {n: p.detach().cpu() for n, p in named.items()},
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            **rng_state(rng),
            "totals": dict(totals),
        }
        torch.save(state, folder / STATE_FILE)

    metrics: EpochMetrics = {}
    epochs_done = first_epoch - 1
    estimate = estimate_memory_gb(model, config) + (distiller.weights_gb if distiller else 0.0)
    inference_estimate = estimate_inference_memory_gb(model, config)
    over = _over_constraints(config, estimate, inference_estimate, "estimated")
    if over:
        return TrialResult(TrialStatus.INFEASIBLE, 0, {}, over)
    cap = config.resources.max_memory_gb if device.type == "cpu" else None
    train_peak = 0.0
    lifetime_peak = False  # a peak reset failed: peaks include what the process held before, perhaps an earlier trial
    try:
        for epoch in range(first_epoch, config.train.epochs + 1):
            model.train()
            epoch_peak = reset_peak_memory(device)
            start = time.perf_counter()
            losses = []
            if not method.trains:
                micro_batches = []
            elif config.train.packing:
                micro_batches = list(packed_batches(train_set, config.train.batch_size, rng))
            else:
                micro_batches = list(batches(train_set, config.train.batch_size, tokenizer.pad_token_id, rng))
            for i, batch in enumerate(micro_batches, 1):
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                    if distiller is None:
                        loss = model(**batch, use_cache=False).loss  # no cache: training needs none, and packing needs its absence
                    else:
                        loss = distiller.loss(model, batch)
                if not math.isfinite(loss.item()):  # the divergence guard
                    return TrialResult(TrialStatus.DIVERGED, epochs_done, metrics, f"training loss is {loss.item()} at epoch {epoch}")
                scaler.scale(loss / accumulate).backward()
                if i % accumulate == 0 or i == len(micro_batches):
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                totals["tokens_trained"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
                totals["train_flops"] += flops.train_step(*batch["input_ids"].shape) + (distiller.take_flops() if distiller else 0.0)
                if cap and epoch_peak and peak_memory_gb(device) > cap:
                    raise MemoryCapExceeded(f"peak resident memory {peak_memory_gb(device):.2f} GB > resources.max_memory_gb {cap:g}")
            totals["train_seconds"] += time.perf_counter() - start
            train_peak = max(train_peak, peak_memory_gb(device)) if micro_batches else train_peak

            model.eval()
            epoch_peak = reset_peak_memory(device) and epoch_peak
            lifetime_peak = lifetime_peak or not epoch_peak
            if callable(baseline):  # waited for before the clock starts: no epoch's cost
                baseline = baseline()
            start = time.perf_counter()
            eval_ppl = perplexity(model, batches(eval_set, config.eval.batch_size, tokenizer.pad_token_id), device)
            retention_ppl = _retention_ppl(model, retention_set, config, tokenizer.pad_token_id, device)
            passes: list = []
            answers = generate_answers(
                model, tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size, device=device,
                sampling=config.eval.sampling, passes=passes,
            )
            totals["eval_flops"] += eval_pass_flops + flops.answers(passes)
            inference_peak = peak_memory_gb(device)  # the trained model's serving peak: before an hf judge loads its own weights
            judged = time.perf_counter()
            try:
                verdicts, judge_error = judge.judge(prompts, answers, baseline, references), None
            except JudgeUnavailable as exc:  # an outage, not a training failure: the epoch is kept without verdicts
                verdicts, judge_error = None, str(exc)
            totals["judge_seconds"] += time.perf_counter() - judged
            totals["eval_seconds"] += time.perf_counter() - start  # perplexities, answers and judging

            metrics = {
                "epoch": epoch,
                "train_loss": sum(losses) / len(losses) if losses else None,
                "train_examples_skipped": skipped,  # no response token within data.max_length
                "eval_ppl": eval_ppl,
                "retention_ppl": retention_ppl,
                **judged_metrics(answers, baseline, verdicts, judge_error, config),
                **cost_metrics(totals),
                "peak_memory_gb": max(train_peak, peak_memory_gb(device)),
                "train_memory_gb": train_peak or None,
                "inference_memory_gb": inference_peak,
                "peak_memory_scope": "epoch" if epoch_peak else "process_lifetime",
                "estimated_memory_gb": estimate,
                "estimated_inference_memory_gb": inference_estimate,
                "trainable_params": sum(p.numel() for p in params),
                "total_params": sum(p.numel() for p in model.parameters()),
                "resumed_from_epoch": first_epoch - 1,
            }
            if distiller:
                metrics["teacher_cache_gb"] = distiller.cache_bytes / 1024**3
            if lifetime_peak:
                metrics["memory_checks_skipped"] = LIFETIME_PEAK_NOTE
            epochs_done = epoch
            report(metrics, lambda folder, epoch=epoch: save(folder, epoch))
    except (torch.OutOfMemoryError, MemoryError) as exc:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what this trial's tensors held is freed as it returns
        detail = first_line(exc)
        return TrialResult(
            TrialStatus.OOM,
            epochs_done,
            metrics,
            f"out of memory at epoch {epochs_done + 1} (batch_size={config.train.batch_size}, "
            f"max_length={config.data.max_length}, method={config.train.method}; estimated need {estimate:.2f} GB): {detail}",
        )
    measured = None if lifetime_peak else _over_constraints(
        config, metrics.get("train_memory_gb") or 0.0, metrics.get("inference_memory_gb") or 0.0, "measured"
    )
    if measured:
        return TrialResult(TrialStatus.INFEASIBLE, config.train.epochs, metrics, measured)
    return TrialResult(TrialStatus.COMPLETED, config.train.epochs, metrics)


def judged_metrics(answers: list[str], baseline: list[str], verdicts: list | None, judge_error: str | None, config: TrialConfig) -> EpochMetrics:
    """An epoch's answers and their verdicts against the base model's (all None when the judge was
    unavailable, with `judge_error`), as solo and packed trials report them."""
    judged = verdicts is not None
    scores = [v.score for v in verdicts] if judged else [None] * len(answers)
    return {
        **(win_rate(scores) if judged else dict.fromkeys(VERDICT_METRICS)),
        "order_agreement": agreement_rate(verdicts) if judged else None,
        "judge_parse_rate": parse_rate(verdicts) if judged else None,
        "judge_error": judge_error,
        "judge": judge_label(config.eval) if judged else None,
        "answer_length_diff": _mean_length_diff(answers, baseline),
        "answers": answers,
        "verdicts": scores,
    }


def new_totals() -> dict[str, float]:
    """A trial's cumulative costs before its first epoch."""
    return {"train_seconds": 0.0, "eval_seconds": 0.0, "judge_seconds": 0.0, "tokens_trained": 0, "train_flops": 0.0, "eval_flops": 0.0}


def resumed_totals(state: dict[str, Any]) -> dict[str, float]:
    """A checkpoint's cumulative costs. One of an older version has no FLOPs: unknown (NaN, stored as NULL),
    not counted from the resume as if they were all."""
    return {**dict.fromkeys(("train_flops", "eval_flops"), math.nan), **state["totals"]}


def cost_metrics(totals: dict[str, float]) -> EpochMetrics:
    """The cumulative costs (seconds, tokens, FLOPs) and the training throughput."""
    return {**totals, "tokens_per_second": totals["tokens_trained"] / totals["train_seconds"] if totals["train_seconds"] else None}


def eval_flops(flops: FlopModel, data: TrialData, config: TrialConfig, pad_id: int) -> float:
    """An epoch's perplexity passes (eval and retention sets); its answers' passes are counted as they run."""
    sets = [data.eval_set] + ([data.retention_set] if data.retention_set is not None else [])
    return sum(flops.over(batches(s, config.eval.batch_size, pad_id)) for s in sets)


def rng_state(rng: random.Random) -> dict[str, Any]:
    """Every random state training draws from: the data order's, torch's CPU generator and, on a GPU, CUDA's (dropout)."""
    return {
        "rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any], rng: random.Random) -> None:
    """Put back what `rng_state` saved; a CUDA state is restored only where there is a GPU to take it."""
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():  # absent in checkpoints written before it was saved
        torch.cuda.set_rng_state_all(state["cuda_rng"][: torch.cuda.device_count()])


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint's resume state, unpickled with `weights_only=True`: tensors and plain containers only,
    so a planted or damaged state.pt cannot run code (random.getstate() is a tuple of ints: allowed as is)."""
    return torch.load(path, weights_only=True)


def _over_constraints(config: TrialConfig, train_gb: float, inference_gb: float, how: str) -> str | None:
    """Why the configuration breaks the sweep's memory constraints, or None."""
    limits = config.constraints
    if limits.train_memory_gb is not None and train_gb > limits.train_memory_gb:
        return f"{how} training memory {train_gb:.2f} GB > constraints.train_memory_gb {limits.train_memory_gb:g}"
    if limits.inference_memory_gb is not None and inference_gb > limits.inference_memory_gb:
        return f"{how} inference memory {inference_gb:.2f} GB > constraints.inference_memory_gb {limits.inference_memory_gb:g}"
    return None


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier after `step` optimizer steps: linear warmup, then constant,
    linear decay or cosine decay to 0 at `total_steps`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


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


def estimate_inference_memory_gb(model: Any, config: TrialConfig) -> float:
    """A rough serving footprint: the weights, and the KV cache of one evaluation batch
    (2 x layers x batch x tokens x hidden values)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base = getattr(model, "config", None)
    hidden, layers = getattr(base, "hidden_size", 0), getattr(base, "num_hidden_layers", 0)
    element = next(model.parameters()).element_size()
    tokens = config.data.max_length + config.eval.max_new_tokens
    return (weights + 2 * layers * config.eval.batch_size * tokens * hidden * element) / 1024**3


def release_memory() -> None:
    """Free what a finished trial held, so that the same process can run the next one: its objects
    (a model and optimizer can sit in reference cycles) and, on a GPU, the allocator's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's peak allocated, or (Linux) the process's peak resident set VmHWM.

    False when it could not (not Linux, or not allowed): `peak_memory_gb` is then the process's lifetime peak.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU; peak resident memory of this process on CPU (since the last reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux
