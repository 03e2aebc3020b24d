"""Packed trials (`resources.pack: K`): up to K LoRA configurations train together on one frozen base.

Not `train.packing`, which puts several *examples* in one row of a batch. Here several *configurations*
(trials) share one worker: the base model is loaded once, and every step runs its matmuls once for the
rows of all members, while each member keeps its own adapter (a peft adapter of its own name), its
own rows of each batch, data order, optimizer, schedule, gradient clipping, loss and checkpoints.
The pack's loss is the sum of the members' mean losses, so no member's gradient depends on another.
peft's LoRA layers route each row to its own adapter (`adapter_names`, peft's mixed-batch forward):
the hooks below pass that routing to every LoRA layer, in training too (peft's own entry point
refuses it there), and keep it for the recomputation of gradient checkpointing.

Members come and go between steps: a member whose epoch ends is evaluated (with the others whose epoch
ended at the same step: perplexities and greedy answers in shared passes) and reported; one that
finishes, diverges, runs out of memory or is removed (stopped by the scheduler) leaves alone, and its
rows leave the batch. Like `trainers.worker`, this knows nothing of Ray or the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from trainers.config import TrialConfig
from trainers.data import IGNORE_INDEX, batches, first_line
from trainers.evaluate import generate_answers
from trainers.flops import FlopModel
from trainers.judges import JudgeUnavailable, make_judge
from trainers.methods import get_method, lora_config, pack_key, why_alone
from trainers.model import load_base_model
from trainers.vocabulary import EpochMetrics, TrialResult, TrialStatus
from trainers.worker import (
    ADAPTER_DIR,
    AUTOCAST,
    STATE_FILE,
    BaseAnswers,
    Report,
    _over_constraints,
    cost_metrics,
    estimate_inference_memory_gb,
    estimate_memory_gb,
    eval_flops,
    judged_metrics,
    load_state,
    lr_lambda,
    new_totals,
    peak_memory_gb,
    reset_peak_memory,
    resumed_totals,
    setup,
    trial_data,
)
SOLO_ADAPTER = "default"  # the adapter's name in a solo trial: checkpoints store parameters under it


@contextlib.contextmanager
def routed(model: Any, adapters: list[str] | str) -> Iterator[None]:
    """Every LoRA layer of `model` applies to row i of its input only the adapter `adapters[i]` (or
    to every row the one adapter `adapters`), through peft's mixed-batch forward, for forwards inside
    this block and their recomputation in backward."""
    from peft.tuners.lora import LoraLayer

    def route(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        rows = args[0].shape[0] if args else kwargs["x"].shape[0]
        kwargs["adapter_names"] = [adapters] * rows if isinstance(adapters, str) else adapters
        return args, kwargs

    handles = [m.register_forward_pre_hook(route, with_kwargs=True) for m in model.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Member:
    """One configuration of the pack: its adapter, training state and callbacks."""

    id: str
    config: TrialConfig
    adapter: str
    report: Report
    finish: Callable[[TrialResult], None]
    baseline: BaseAnswers
    named: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # parameter names as a solo trial's
    optimizer: Any = None
    schedule: Any = None
    scaler: Any = None
    rng: random.Random = field(default_factory=random.Random)
    totals: dict[str, float] = field(default_factory=dict)
    epoch: int = 0  # the epoch in progress
    micro_batches: list = field(default_factory=list)
    position: int = 0  # micro-batches of the epoch done
    losses: list[float] = field(default_factory=list)
    metrics: EpochMetrics = field(default_factory=dict)
    first_epoch: int = 1
    paused: bool = False  # reported an epoch; trains on when `proceed` says so
    reported: int = 0  # the last epoch reported
    estimate: float = 0.0
    inference_estimate: float = 0.0
    train_peak: float = 0.0
    flops: FlopModel | None = None  # what the member's batches cost, as alone
    eval_pass_flops: float = 0.0  # its perplexity passes of an epoch


class Pack:
    """The shared base model and its members. Single-threaded: call `add`, `remove`, `proceed` and
    `step` from one thread (hpo.packs runs it in a Ray actor's training thread)."""

    def __init__(self, config: TrialConfig, pack_size: int):
        self.key = pack_key(config)
        self.pack_size = pack_size
        self.config = config
        self.device = setup(config)
        method = get_method(config.train.method)
        self.model, self.tokenizer = load_base_model(config.model, self.device, method.load_options(config.train))
        if config.train.method == "qlora":
            from peft import prepare_model_for_kbit_training

            self.model = prepare_model_for_kbit_training(self.model, use_gradient_checkpointing=config.train.gradient_checkpointing)
        elif config.train.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        data = trial_data(config, self.tokenizer)  # the same for every member: their configurations share a pack_key
        self.data = data
        self.train_set, self.skipped, self.eval_set, self.retention_set = data.train_set, data.skipped, data.eval_set, data.retention_set
        self.prompts, self.references = data.prompts, data.references
        self.judge = make_judge(config.eval, device=self.device)
        self.base_params = sum(p.numel() for p in self.model.parameters())  # before any adapter
        # Each member is charged the FLOPs of its own batches, as alone (its rows padded to its own width).
        self.base_flops = FlopModel.of(self.model, gradient_checkpointing=config.train.gradient_checkpointing)
        self.peft_model: Any = None
        self.members: dict[str, Member] = {}
        self.stale: list[str] = []  # adapters of members gone, deleted once another adapter exists
        self.precision = AUTOCAST[config.train.precision]
        self.adapters_made = 0
        self.split_head = _head_gives_the_logits(self.model, self.device)

    # --- members come and go ------------------------------------------------------------------

    def add(
        self,
        member_id: str,
        config: TrialConfig,
        baseline: BaseAnswers,
        report: Report,
        finish: Callable[[TrialResult], None],
        resume_from: Path | None = None,
    ) -> None:
        """Give the member its adapter, initialised as a solo trial's with the same seed, and its
        training state (from `resume_from`, a checkpoint folder, when given)."""
        if pack_key(config) != self.key or why_alone(config):
            raise ValueError(f"configuration {member_id} cannot join this pack")
        self.adapters_made += 1
        adapter = f"member{self.adapters_made}"
        torch.manual_seed(config.train.seed)  # as trainers.worker.train does right before attach_adapter
        if self.peft_model is None:
            from peft import get_peft_model

            self.peft_model = get_peft_model(self.model, lora_config(config.train), adapter_name=adapter)
        else:
            self.peft_model.add_adapter(adapter, lora_config(config.train))
        for name in self.stale:
            self.peft_model.delete_adapter(name)
        self.stale.clear()
        tag = f".{adapter}."
        named = {name.replace(tag, f".{SOLO_ADAPTER}."): p for name, p in self.peft_model.named_parameters() if tag in name}
        member = Member(member_id, config, adapter, report, finish, baseline, named=named, rng=random.Random(config.train.seed))
        self.members[member_id] = member
        self._keep_trainable()
        train = config.train
        steps_per_epoch = math.ceil(math.ceil(len(self.train_set) / train.batch_size) / train.grad_accumulation_steps)
        member.optimizer = torch.optim.AdamW(list(named.values()), lr=train.learning_rate, weight_decay=train.weight_decay)
        member.schedule = torch.optim.lr_scheduler.LambdaLR(
            member.optimizer, lr_lambda(train.lr_schedule, train.warmup_steps, steps_per_epoch * train.epochs)
        )
        member.scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        member.totals = new_totals()
        member.flops = dataclasses.replace(  # the base was read before peft froze it: LoRA trains only the adapter
            self.base_flops, adapter_params=sum(p.numel() for n, p in named.items() if ".lora_" in n), base_trains=False
        )
        member.eval_pass_flops = eval_flops(member.flops, self.data, config, self.tokenizer.pad_token_id)
        if resume_from is not None:
            state = load_state(Path(resume_from) / STATE_FILE)
            with torch.no_grad():
                for name, value in state["trainable"].items():
                    named[name].copy_(value)
            member.optimizer.load_state_dict(state["optimizer"])
            member.schedule.load_state_dict(state["schedule"])
            member.scaler.load_state_dict(state["scaler"])
            member.rng.setstate(state["rng"])  # torch's generator is the pack's: dropout masks are not restored
            member.totals = resumed_totals(state)
            member.first_epoch = state["epoch"] + 1
        member.epoch = member.first_epoch - 1
        # Training memory grows with the pack: the base once, each member's adapter state and activations.
        alone = estimate_memory_gb(self.peft_model, config)
        member.estimate = alone + (self.pack_size - 1) * (alone - _weights_gb(self.peft_model))
        member.inference_estimate = estimate_inference_memory_gb(self.peft_model, config)
        over = _over_constraints(config, member.estimate, member.inference_estimate, "estimated (with the pack)")
        if over:
            self._end(member, TrialResult(TrialStatus.INFEASIBLE, 0, {}, over))
        elif member.first_epoch > config.train.epochs:
            self._end(member, TrialResult(TrialStatus.COMPLETED, config.train.epochs, {}))
        else:
            self._start_epoch(member)

    def remove(self, member_id: str) -> None:
        """The member leaves (stopped by the scheduler, or its trial went away): its rows leave the batch."""
        member = self.members.pop(member_id, None)
        if member is not None:
            self._drop_adapter(member)

    def proceed(self, member_id: str, epoch: int) -> None:
        """The member's report of `epoch` was taken: it trains on (an older epoch's acknowledgement does nothing)."""
        member = self.members.get(member_id)
        if member is not None and epoch >= member.reported:
            member.paused = False

    @property
    def training(self) -> list[Member]:
        return [m for m in self.members.values() if not m.paused]

    # --- one packed step ----------------------------------------------------------------------

    def step(self) -> None:
        """One micro-batch of every member that is training, in one forward and one backward of the
        base model (the pack's loss is the sum of the members' mean losses); then the optimizer steps
        of those at an accumulation boundary, and the evaluation of those whose epoch ended."""
        members = self.training
        if not members:
            return
        self.peft_model.train()
        start = time.perf_counter()
        parts = [m.micro_batches[m.position] for m in members]
        batch, rows = _concatenate(parts, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        routing = [m.adapter for m, n in zip(members, rows) for _ in range(n)]
        kept: list[tuple[Member, float]] = []
        diverged: list[tuple[Member, float]] = []
        try:
            with routed(self.peft_model, routing), self._autocast():
                outputs = self._outputs(batch)
            offset = 0
            for member, n in zip(members, rows):
                loss = outputs.loss(member, slice(offset, offset + n), batch["labels"][offset : offset + n], self._autocast)
                offset += n
                if not math.isfinite(loss.item()):  # the divergence guard, for this member alone
                    diverged.append((member, loss.item()))
                    continue
                outputs.backward(member.scaler.scale(loss / member.config.train.grad_accumulation_steps))
                kept.append((member, loss.item()))
            if kept:
                with routed(self.peft_model, routing):  # gradient checkpointing recomputes the forward here
                    outputs.finish()
            del outputs
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self._out_of_memory([m for m in members if m.id in self.members], parts, exc, rewind=True)
            return
        for member, loss in diverged:  # after the backward: its recomputation saw every adapter of the forward
            self._end(member, TrialResult(
                TrialStatus.DIVERGED, member.epoch - 1, member.metrics, f"training loss is {loss} at epoch {member.epoch}"
            ))  # fmt: skip
        for member, loss in kept:
            member.position += 1
            accumulate = member.config.train.grad_accumulation_steps
            if member.position % accumulate == 0 or member.position == len(member.micro_batches):
                params = list(member.named.values())
                member.scaler.unscale_(member.optimizer)
                torch.nn.utils.clip_grad_norm_(params, member.config.train.max_grad_norm)
                member.scaler.step(member.optimizer)
                member.scaler.update()
                member.schedule.step()
                member.optimizer.zero_grad(set_to_none=True)
            member.losses.append(loss)
        # Each member's share of the step's time is its share of the step's tokens.
        seconds = time.perf_counter() - start
        tokens = {m.id: int(p["attention_mask"].sum()) for m, p in zip(members, parts)}
        for member, _ in kept:
            member.totals["tokens_trained"] += tokens[member.id]
            member.totals["train_flops"] += member.flops.train_step(*parts[members.index(member)]["input_ids"].shape)
            member.totals["train_seconds"] += seconds * tokens[member.id] / max(1, sum(tokens.values()))
        peak = peak_memory_gb(self.device)
        for member, _ in kept:
            member.train_peak = max(member.train_peak, peak)
        cap = self.config.resources.max_memory_gb if self.device.type == "cpu" else None
        if cap and peak > cap:  # this step is done for every member; the largest leaves, the others go on
            over = MemoryError(f"peak resident memory {peak:.2f} GB > resources.max_memory_gb {cap:g}")
            self._out_of_memory([m for m, _ in kept], [parts[members.index(m)] for m, _ in kept], over, rewind=False)
            reset_peak_memory(self.device)
        ended = sorted((m for m, _ in kept if m.id in self.members and m.position == len(m.micro_batches)), key=lambda m: m.id)
        if ended:
            self._evaluate(ended)  # in trial order: each rung's reports reach the scheduler in trial order

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.precision, enabled=self.precision is not None)

    def _outputs(self, batch: dict[str, torch.Tensor]) -> "_Logits | _SplitHead":
        """The base model's forward over the whole packed batch."""
        if self.split_head:
            model = self.peft_model.get_base_model()
            hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)[0]
            return _SplitHead(hidden, model.get_output_embeddings())
        logits = self.peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return _Logits(logits)

    def _start_epoch(self, member: Member) -> None:
        member.epoch += 1
        member.position = 0
        member.losses = []
        train = member.config.train
        member.micro_batches = list(batches(self.train_set, train.batch_size, self.tokenizer.pad_token_id, member.rng))

    def _out_of_memory(self, members: list[Member], parts: list[dict], exc: BaseException, rewind: bool) -> None:
        """The member with the most tokens in the step ends as out of memory. `rewind`: the step failed
        midway, so the others go back to the start of their accumulation window (their gradients of
        the window are dropped) and train it again."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if rewind:
            for member in members:
                member.optimizer.zero_grad(set_to_none=True)
                done = member.position % member.config.train.grad_accumulation_steps
                member.position -= done
                del member.losses[len(member.losses) - done :]
        sizes = [int(p["attention_mask"].sum()) for p in parts]
        member = members[max(range(len(members)), key=sizes.__getitem__)]
        detail = first_line(exc)
        self._end(member, self._oom_result(member, f"in a pack of {len(members)}", detail))

    def _oom_result(self, member: Member, where: str, detail: str) -> TrialResult:
        train = member.config.train
        return TrialResult(
            TrialStatus.OOM, member.epoch - 1, member.metrics,
            f"out of memory at epoch {member.epoch} {where} (batch_size={train.batch_size}, "
            f"max_length={member.config.data.max_length}, method={train.method}; estimated need {member.estimate:.2f} GB): {detail}",
        )  # fmt: skip

    # --- evaluation, packed -------------------------------------------------------------------

    def _evaluate(self, members: list[Member]) -> None:
        """Perplexities and answers of the members whose epoch ended, in shared passes; out of memory,
        one member at a time (K times less memory), and a member that runs out alone ends as oom."""
        try:
            self._evaluate_together(members)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(members) == 1:
                detail = first_line(exc)
                self._end(members[0], self._oom_result(members[0], "while evaluating", detail))
                return
            for member in members:
                self._evaluate([member])
        finally:
            reset_peak_memory(self.device)  # the next steps' training peak starts here

    def _evaluate_together(self, members: list[Member]) -> None:
        self.peft_model.eval()
        reset_peak_memory(self.device)
        start = time.perf_counter()
        adapters = [m.adapter for m in members]
        eval_batches = batches(self.eval_set, self.config.eval.batch_size, self.tokenizer.pad_token_id)
        eval_ppl = packed_perplexities(self.peft_model, eval_batches, adapters, self.device)
        if self.retention_set is not None:
            retention = batches(self.retention_set, self.config.eval.batch_size, self.tokenizer.pad_token_id)
            retention_ppl: list[float | None] = packed_perplexities(self.peft_model, retention, adapters, self.device)
        else:
            retention_ppl = [None] * len(members)
        answers, passes = self._answers(adapters)
        inference_peak = peak_memory_gb(self.device)
        share = (time.perf_counter() - start) / len(members)
        for member, ppl, kept, said, own in zip(members, eval_ppl, retention_ppl, answers, passes):
            member.totals["eval_flops"] += member.eval_pass_flops + member.flops.answers(own)
            if callable(member.baseline):
                member.baseline = member.baseline()
            judged = time.perf_counter()
            try:
                verdicts, judge_error = self.judge.judge(self.prompts, said, member.baseline, self.references), None
            except JudgeUnavailable as exc:
                verdicts, judge_error = None, str(exc)
            judging = time.perf_counter() - judged
            member.totals["judge_seconds"] += judging
            member.totals["eval_seconds"] += share + judging
            self._report(member, ppl, kept, said, verdicts, judge_error, inference_peak)

    def _answers(self, adapters: list[str]) -> tuple[list[list[str]], list[list[tuple]]]:
        """Each adapter's answers, and its share of the generation passes (trainers.evaluate.generate_answers):
        greedy answers in shared batches (each prompt batch repeated once per adapter, so every row is
        padded as in a solo trial; a shared batch runs until its longest answer ends); sampled ones one
        adapter at a time, each seeded as a solo trial's."""
        config = self.config.eval
        options = {"max_new_tokens": config.max_new_tokens, "device": self.device, "sampling": config.sampling}
        answers: list[list[str]] = [[] for _ in adapters]
        passes: list[list[tuple]] = [[] for _ in adapters]
        if config.sampling is not None:
            for i, adapter in enumerate(adapters):
                with routed(self.peft_model, adapter):
                    answers[i] = generate_answers(
                        self.peft_model, self.tokenizer, self.prompts, batch_size=config.batch_size, passes=passes[i], **options
                    )
            return answers, passes
        for start in range(0, len(self.prompts), config.batch_size):
            prompts = self.prompts[start : start + config.batch_size]
            routing = [a for a in adapters for _ in prompts]
            shared: list[tuple] = []
            with routed(self.peft_model, routing):
                said = generate_answers(
                    self.peft_model, self.tokenizer, prompts * len(adapters), batch_size=len(routing), passes=shared, **options
                )  # the tokenizer pads the repeated batch exactly as the single one
            for i in range(len(adapters)):
                answers[i] += said[i * len(prompts) : (i + 1) * len(prompts)]
                passes[i] += [(len(prompts), *rest) for _, *rest in shared]
        return answers, passes

    def _report(self, member, eval_ppl, retention_ppl, answers, verdicts, judge_error, inference_peak) -> None:
        epoch = member.epoch
        metrics: EpochMetrics = {
            "epoch": epoch,
            "train_loss": sum(member.losses) / len(member.losses) if member.losses else None,
            "train_examples_skipped": self.skipped,
            "eval_ppl": eval_ppl,
            "retention_ppl": retention_ppl,
            **judged_metrics(answers, member.baseline, verdicts, judge_error, member.config),
            **cost_metrics(member.totals),
            "peak_memory_gb": max(member.train_peak, inference_peak),
            "train_memory_gb": member.train_peak or None,
            "inference_memory_gb": inference_peak,
            "peak_memory_scope": "pack",
            "estimated_memory_gb": member.estimate,
            "estimated_inference_memory_gb": member.inference_estimate,
            "trainable_params": sum(p.numel() for p in member.named.values()),
            "total_params": self.base_params + sum(p.numel() for p in member.named.values()),
            "resumed_from_epoch": member.first_epoch - 1,
            "pack_size": len(self.members),
        }
        member.metrics = metrics
        member.paused, member.reported = True, epoch  # until `proceed`; in-process callers proceed at once
        member.report(metrics, lambda folder, member=member, epoch=epoch: self._save(member, Path(folder), epoch))
        if member.id not in self.members:  # the report removed it (the scheduler stopped it)
            return
        if epoch == member.config.train.epochs:
            measured = _over_constraints(member.config, member.train_peak, inference_peak, "measured (with the pack)")
            status = TrialStatus.INFEASIBLE if measured else TrialStatus.COMPLETED
            self._end(member, TrialResult(status, epoch, metrics, measured))
        else:
            self._start_epoch(member)

    def _save(self, member: Member, folder: Path, epoch: int) -> None:
        """The member's checkpoint, in a solo trial's layout: `adapter/` for peft.PeftModel.from_pretrained,
        and the state to resume from (parameters named as in a solo trial, so either can resume it)."""
        import shutil

        staging = folder / ".adapters"
        self.peft_model.save_pretrained(staging, selected_adapters=[member.adapter])
        shutil.move(str(staging / member.adapter), str(folder / ADAPTER_DIR))
        shutil.rmtree(staging, ignore_errors=True)
        state = {
            "epoch": epoch,
            "trainable": {n: p.detach().cpu() for n, p in member.named.items()},
            "optimizer": member.optimizer.state_dict(),
            "schedule": member.schedule.state_dict(),
            "scaler": member.scaler.state_dict(),
            "rng": member.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": None,
            "totals": dict(member.totals),
        }
        torch.save(state, folder / STATE_FILE)

    def _end(self, member: Member, result: TrialResult) -> None:
        self.members.pop(member.id, None)
        self._drop_adapter(member)
        member.finish(result)

    def _drop_adapter(self, member: Member) -> None:
        member.optimizer = member.schedule = None
        member.named.clear()
        if self.peft_model is None:
            return
        if len(self.peft_model.peft_config) > 1:
            self.peft_model.delete_adapter(member.adapter)
            self._keep_trainable()
        else:  # peft keeps at least one adapter: the next member's arrival deletes it
            self.stale.append(member.adapter)

    def _keep_trainable(self) -> None:
        """Every member's adapter trains: peft leaves only its one active adapter trainable whenever
        an adapter is added or deleted."""
        for member in self.members.values():
            for param in member.named.values():
                param.requires_grad_(True)


class _Logits:
    """The whole batch's logits from the model's own forward (a model whose forward changes its logits
    after the output layer: soft-capping, scaling); each member's loss is taken from its rows."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.total = logits, None

    def loss(self, member: Member, rows: slice, labels: torch.Tensor, autocast: Callable) -> torch.Tensor:
        return _mean_loss(self.logits[rows], labels)

    def backward(self, loss: torch.Tensor) -> None:
        self.total = loss if self.total is None else self.total + loss

    def finish(self) -> None:
        self.total.backward()


class _SplitHead:
    """The decoder's hidden states for the whole batch; the output layer and the loss one member at a
    time, each backward into the hidden states as it is computed, so that only one member's logits
    exist at once (with a large vocabulary, K members' logits would be most of a step's memory)."""

    def __init__(self, hidden: torch.Tensor, head: Any):
        self.hidden, self.head = hidden, head
        self.shared = hidden.detach().requires_grad_()

    def loss(self, member: Member, rows: slice, labels: torch.Tensor, autocast: Callable) -> torch.Tensor:
        with routed(self.head, member.adapter), autocast():  # the output layer may carry LoRA too
            return _mean_loss(self.head(self.shared[rows]), labels)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def finish(self) -> None:
        self.hidden.backward(self.shared.grad)


@torch.no_grad()
def _head_gives_the_logits(model: Any, device: torch.device) -> bool:
    """Whether the output layer applied to the decoder's hidden states gives the model's logits (it
    does not where the forward soft-caps or scales them after the output layer)."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()  # transformers: the model itself / None where it has none
    if head is None or decoder is model:
        return False
    ids = torch.tensor([[1, 2, 3]], device=device)
    logits = model(input_ids=ids, use_cache=False).logits
    return bool(torch.allclose(head(decoder(input_ids=ids, use_cache=False)[0]).float(), logits.float(), rtol=1e-4, atol=1e-5))


def _concatenate(parts: list[dict[str, torch.Tensor]], pad_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The members' micro-batches as one batch, each padded on the right to the widest (causal attention:
    padding after a row's tokens changes nothing before them; its labels are ignored)."""
    width = max(p["input_ids"].shape[1] for p in parts)

    def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    batch = {
        "input_ids": torch.cat([pad(p["input_ids"], pad_id) for p in parts]),
        "attention_mask": torch.cat([pad(p["attention_mask"], 0) for p in parts]),
        "labels": torch.cat([pad(p["labels"], IGNORE_INDEX) for p in parts]),
    }
    return batch, [p["input_ids"].shape[0] for p in parts]


def _mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A causal LM's mean loss over labelled tokens, as transformers computes it for one model."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def packed_perplexities(model: Any, eval_batches: Any, adapters: list[str], device: torch.device) -> list[float]:
    """Each adapter's perplexity (as trainers.evaluate.perplexity), every batch repeated once per adapter in one pass."""
    nll, tokens = [0.0] * len(adapters), [0] * len(adapters)
    for batch in eval_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = batch["input_ids"].shape[0]
        with routed(model, [a for a in adapters for _ in range(rows)]):
            logits = model(
                input_ids=batch["input_ids"].repeat(len(adapters), 1), attention_mask=batch["attention_mask"].repeat(len(adapters), 1)
            ).logits
        labels = batch["labels"][:, 1:]
        for i in range(len(adapters)):
            part = logits[i * rows : (i + 1) * rows, :-1].float()
            nll[i] += torch.nn.functional.cross_entropy(
                part.reshape(-1, part.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            tokens[i] += int((labels != IGNORE_INDEX).sum())
    if not tokens or tokens[0] == 0:
        raise ValueError("perplexity: no response token fits in max_length; raise data.max_length")
    return [math.exp(n / t) for n, t in zip(nll, tokens)]


def _weights_gb(model: Any) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1024**3


def train_packed(
    configs: dict[str, TrialConfig],
    baseline: BaseAnswers,
    report: Callable[[str, EpochMetrics, Callable[[Path], None]], None],
    resume_from: dict[str, Path] | None = None,
) -> dict[str, TrialResult]:
    """Train `configs` (member id -> configuration, all with one pack_key) together to their ends,
    in this process: `report(member_id, metrics, save)` after each member's epoch."""
    first = next(iter(configs.values()))
    pack = Pack(first, len(configs))
    results: dict[str, TrialResult] = {}
    for member_id, config in configs.items():
        pack.add(
            member_id, config, baseline,
            lambda metrics, save, member_id=member_id: (report(member_id, metrics, save), pack.proceed(member_id, metrics["epoch"])),
            lambda result, member_id=member_id: results.__setitem__(member_id, result),
            (resume_from or {}).get(member_id),
        )  # fmt: skip
    while pack.training:
        pack.step()
    return results
