"""Trial throughput: training tokens per second of the peftsweep worker vs a plain Hugging Face
`Trainer` + peft script, on the same model, data, batch size, epochs and hyperparameters.

Three sides train the same LoRA (rank 8, alpha 16, dropout 0.05 on q_proj and v_proj; AdamW at a
constant learning rate of 1e-3, gradients clipped at 1.0) on the same tokenized examples of the
built-in task, in this one process with the same number of torch threads: the HF Trainer with
`DataCollatorForSeq2Seq` (each batch right-padded to its longest example), the peftsweep worker as
by default (padded the same way), and the worker with `train.packing: true` (a batch's examples in
one row, no padding). Each repeat uses its own seed on every side and rotates which goes first.
Tokens are the non-padding tokens of the training batches (the worker's `tokens_trained`); time is
the epochs' wall time (the worker's `train_seconds`; for the Trainer, `on_epoch_begin` to
`on_epoch_end`), so model loading and the worker's per-epoch evaluation are not counted. The final
training loss and eval perplexity (the worker's own `perplexity`, on every side's trained model)
show that all trained the same amount.

    .venv/bin/python -m benchmarks.throughput [--epochs 3] [--repeats 5] [--threads 1] [--quick]
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # first: its clock starts at import

from transformers import PrinterCallback, TrainerCallback  # noqa: E402

LEARNING_RATE = 1e-3
LORA = {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


def trial_config(data_source: str, *, model: str, dtype: str, epochs: int, batch_size: int, threads: int, seed: int) -> Any:
    """The trial every side trains: evaluation kept small (it is not timed, only the worker does it)."""
    from trainers.config import TrialConfig

    return TrialConfig.model_validate({
        "model": {"name": model, "dtype": dtype},
        "data": {"source": data_source},
        "train": {"learning_rate": LEARNING_RATE, "epochs": epochs, "batch_size": batch_size, "seed": seed, "packing": False, **LORA},
        "eval": {"num_prompts": 4, "max_new_tokens": 8},
        "resources": {"cpus_per_trial": threads},
    })


def worker_packed_run(config: Any) -> dict[str, Any]:
    """The peftsweep worker with `train.packing: true`: each batch's examples in one row, no padding."""
    return worker_run(config.model_copy(update={"train": config.train.model_copy(update={"packing": True})}))


def worker_run(config: Any) -> dict[str, Any]:
    """The peftsweep worker, called directly (no Ray): its own per-epoch metrics."""
    from trainers.vocabulary import TrialStatus
    from trainers.worker import train

    reports: list[dict[str, Any]] = []
    result = train(config, [""] * config.eval.num_prompts, lambda metrics, save: reports.append(metrics))
    if result.status is not TrialStatus.COMPLETED:
        raise RuntimeError(f"worker: {result.status.value}: {result.error}")
    last = reports[-1]
    return {"tokens": last["tokens_trained"], "seconds": last["train_seconds"], "train_loss": last["train_loss"], "eval_ppl": last["eval_ppl"]}


def hf_trainer_run(config: Any) -> dict[str, Any]:
    """A plain script, as one would write it without peftsweep: transformers' Trainer + peft's LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from trainers.data import batches, load_splits, tokenize
    from trainers.evaluate import perplexity
    from trainers.model import pick_device, resolve_model, torch_dtype

    device = pick_device()
    torch.set_num_threads(int(config.resources.cpus_per_trial))
    set_seed(config.train.seed)
    location = resolve_model(config.model)
    tokenizer = AutoTokenizer.from_pretrained(location)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype(config.model.dtype))
    train = config.train
    model = get_peft_model(model, LoraConfig(
        r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
        target_modules=list(train.target_modules), bias="none", task_type="CAUSAL_LM",
    ))
    # The very examples the worker trains on (same split, prompt rendering, truncation and loss mask).
    splits = load_splits(config.data, config.eval.num_prompts, tokenizer=tokenizer)
    train_set = tokenize(splits.train, tokenizer, config.data.max_length, response_only_loss=config.data.response_only_loss)
    eval_set = tokenize(splits.eval, tokenizer, config.data.max_length, response_only_loss=config.data.response_only_loss)
    dataset = [{"input_ids": t.input_ids, "labels": t.labels} for t in train_set]

    timer = _EpochTimer(device)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=train.batch_size, num_train_epochs=train.epochs,
            learning_rate=train.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm, optim="adamw_torch", seed=train.seed, logging_strategy="epoch",
            save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, callbacks=[timer],
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        )
        trainer.remove_callback(PrinterCallback)  # its per-epoch log lines; the loss is read from log_history
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.eval()
    eval_ppl = perplexity(model, batches(eval_set, config.eval.batch_size, tokenizer.pad_token_id), device)
    tokens = sum(len(t.input_ids) for t in train_set) * train.epochs
    return {"tokens": tokens, "seconds": timer.seconds, "train_loss": losses[-1], "eval_ppl": eval_ppl}


class _EpochTimer(TrainerCallback):
    """Wall seconds inside the Trainer's epochs (synchronized with the GPU, where there is one)."""

    def __init__(self, device: Any):
        self.device = device
        self.seconds = 0.0
        self.started = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._sync()
        self.started = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._sync()
        self.seconds += time.perf_counter() - self.started


def padding_share(config: Any) -> float:
    """Share of the training batches' positions that are padding: what padding-free packing would not compute."""
    from transformers import AutoTokenizer

    from trainers.data import batches, load_splits, tokenize
    from trainers.model import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model))
    splits = load_splits(config.data, config.eval.num_prompts, tokenizer=tokenizer)
    train_set = tokenize(splits.train, tokenizer, config.data.max_length, response_only_loss=config.data.response_only_loss)
    positions = tokens = 0
    for batch in batches(train_set, config.train.batch_size, tokenizer.pad_token_id or 0, random.Random(config.train.seed)):
        positions += batch["attention_mask"].numel()
        tokens += int(batch["attention_mask"].sum())
    return 1 - tokens / positions


SIDES = {"hf_trainer": hf_trainer_run, "peftsweep": worker_run, "peftsweep_packed": worker_packed_run}


def measure(config_of: Any, repeats: int) -> dict[str, Any]:
    """Every side `repeats` times (seed i in repeat i, the order rotating each repeat); each run's numbers."""
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    order = list(SIDES)
    for i in range(repeats):
        config = config_of(seed=i)
        for side in order[i % len(order):] + order[: i % len(order)]:
            runs[side].append(SIDES[side](config))
            common.log(f"repeat {i + 1}/{repeats} {side}: {runs[side][-1]['tokens'] / runs[side][-1]['seconds']:,.0f} tokens/s")
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]], padding: float) -> dict[str, Any]:
    """Medians, the ratios to the HF Trainer, and whether every side ended at the same loss (within the seeds' spread)."""
    med = common.median
    speed = {side: [r["tokens"] / r["seconds"] for r in rs] for side, rs in runs.items()}
    ratios = []
    for side, how in (("peftsweep_packed", "with train.packing: true"), ("peftsweep", "as by default (padded batches)")):
        pairs = [w / h for w, h in zip(speed[side], speed["hf_trainer"])]
        ratios.append(common.ratio(
            f"throughput, {side} / HF Trainer", med(speed[side]) / med(speed["hf_trainer"]), ">=", 1.3,
            f"median tokens/s, the peftsweep worker {how} / HF Trainer (per-repeat ratios {common.spread(pairs)})",
        ))
    rows = []
    for side, rs in runs.items():
        rows.append({
            "side": side,
            "tokens_per_second": med(speed[side]),
            "tokens_per_second_range": common.spread(speed[side]),
            "tokens": rs[0]["tokens"],
            "train_seconds": med([r["seconds"] for r in rs]),
            "final_train_loss": med([r["train_loss"] for r in rs]),
            "final_train_loss_range": common.spread([r["train_loss"] for r in rs]),
            "eval_ppl": med([r["eval_ppl"] for r in rs]),
            "eval_ppl_range": common.spread([r["eval_ppl"] for r in rs]),
        })
    same_loss = None
    if len(runs["hf_trainer"]) > 1:
        noise = {k: max(max(r[k] for r in rs) - min(r[k] for r in rs) for rs in runs.values()) for k in ("train_loss", "eval_ppl")}
        same_loss = all(
            abs(med([r[k] for r in runs[side]]) - med([r[k] for r in runs["hf_trainer"]])) <= noise[k] for side in runs for k in noise
        )
    return {
        "ratios": ratios,
        "rows": rows,
        "padding_share": padding,
        "same_loss_within_noise": same_loss,
        "tokens_equal": len({r["tokens"] for rs in runs.values() for r in rs}) == 1,
    }


def render(result: dict[str, Any], title: str = "Trial throughput: peftsweep worker vs a plain HF Trainer + peft script") -> str:
    rows = [
        [r["side"], f"{r['tokens_per_second']:,.0f} ({r['tokens_per_second_range']})", f"{r['tokens']:,}", f"{r['train_seconds']:.1f}",
         f"{r['final_train_loss']:.4f} ({r['final_train_loss_range']})", f"{r['eval_ppl']:.3f} ({r['eval_ppl_range']})"]
        for r in result["rows"]
    ]
    same = {True: "yes", False: "NO", None: "n/a (1 repeat)"}[result["same_loss_within_noise"]]
    return "\n".join([
        common.header(title, result),
        "",
        common.ratio_table(result["ratios"]),
        "",
        common.table(["side", "tokens/s, median (range)", "tokens trained", "train s", "final train loss", "eval ppl"], rows),
        "",
        f"same final loss and eval ppl within the seeds' spread: {same}; the same tokens on every side: "
        f"{'yes' if result['tokens_equal'] else 'NO'}",
        f"padding: {100 * result['padding_share']:.1f} % of the padded batches' positions are padding (the HF Trainer and "
        f"the worker by default pad each batch to its longest example; packing computes {1 / (1 - result['padding_share']):.2f}x "
        f"fewer positions, in one row per batch whose attention is masked block by block)",
    ])


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--epochs", type=int, default=3, help="epochs per training (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="trainings per side, seeds 0.. (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1: a trial's one CPU)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--records", type=int, help="use the first N records of the built-in task (default: all 800)")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.repeats, args.records = 1, 1, args.records or 48

    common.quiet()
    info = common.machine()
    common.ensure_model()
    with tempfile.TemporaryDirectory() as work:
        source = common.tinyworld_records(Path(work), args.records)

        def config_of(seed: int) -> Any:
            return trial_config(source, model="tiny", dtype="float32", epochs=args.epochs, batch_size=args.batch_size,
                                threads=args.threads, seed=seed)

        runs = measure(config_of, args.repeats)
        padding = padding_share(config_of(0))
    result = {
        "benchmark": "throughput",
        **summarize(runs, padding),
        "machine": common.finish_machine(info),
        "sizes": vars(args) | {"json": None},
        "sizes_text": f"built-in tiny model (1.3M parameters), {args.records or 800} records of the built-in task (80 % train), "
        f"{args.epochs} epoch(s), batch {args.batch_size}, {args.threads} torch thread(s) per side, {args.repeats} repeats",
        "seconds": time.monotonic() - common.STARTED,
    }
    common.emit(result, render, args.json)


if __name__ == "__main__":
    main()
