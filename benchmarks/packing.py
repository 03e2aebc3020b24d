"""Packed trials: the same configurations as separate trials and packed (`resources.pack`), side by side.

Sweep side (default): one sweep file, a grid of learning rates x LoRA ranks with dropout 0, run by
the real `peftsweep run` twice per repeat, alternating which goes first: with `resources.pack: K`
(K = the number of configurations) and without (each configuration its own trial). Both use the
machine the same way: `--cpus` CPUs per trial, or per pack worker. Reported: the makespans (launch
to exit, medians over repeats) and their ratio, the training and evaluation seconds summed over the
trials (a packed trial's share of its pack's time), the peak memory of one process (a pack worker's
or a trial's) and the most processes at once, and how far each packed trial's eval_ppl lies from its
unpacked twin's (dropout 0: the same training).

    .venv/bin/python -m benchmarks.packing [--model tiny|smollm2] [--repeats 3] [--quick]

`--model smollm2`: SmolLM2-135M-Instruct on the shipped support task, 1 epoch of 200 examples.

GPU side (`--gpu`): one packed training step of K = 8 members against 8 steps of one member each
(trainers.packed, in this process), on a randomly initialized model with the Llama-3.2-1B
architecture (benchmarks/gpu_throughput.py builds it) at batch 8 x 512 tokens per member, bf16 base
and float32 LoRA weights: the ratio of the times, tokens per second and model FLOPs utilization
(4N FLOPs per trained token, as gpu_throughput counts them). Without a CUDA GPU it says it was
skipped (not a failure); `--gpu --quick` runs a 2-layer, narrow miniature of it on the CPU, to check
that it runs.
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/packing.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

LEARNING_RATES = [1e-4, 1e-3, 3e-3, 1e-2]
RANKS = [4, 16]


def sweep_file(folder: Path, model: str, quick: bool, cpus: int) -> Path:
    """The 8 configurations (2 with --quick), dropout 0, one pack worker's or trial's CPUs each."""
    rates, ranks = (LEARNING_RATES[1:3], RANKS[:1]) if quick else (LEARNING_RATES, RANKS)
    sweep: dict[str, Any] = {
        "description": f"packing benchmark: {len(rates) * len(ranks)} LoRA configurations",
        "train": {"target_modules": ["q_proj", "v_proj"], "lora_alpha_per_rank": 2, "lora_dropout": 0.0},
        "search": {"algorithm": "grid", "space": {"learning_rate": {"grid": rates}, "lora_r": {"grid": ranks}}},
        "objectives": [{"metric": "eval_ppl", "mode": "min"}],
        "resources": {"cpus_per_trial": cpus},
    }
    if model == "smollm2":
        records = folder / "support_200.jsonl"
        lines = (common.REPO / "data" / "support_qa.jsonl").read_text().splitlines()
        records.write_text("\n".join(lines[: 8 if quick else 222]) + "\n")  # 200 training examples at eval_fraction 0.1
        sweep |= {
            "model": {"name": "smollm2-135m-instruct"},
            "data": {"source": str(records), "max_length": 128, "eval_fraction": 0.1,
                     "system_prompt": "You are the support assistant for Lumenko Aero air purifiers. Answer in one or two sentences."},
            "eval": {"judge": "reference", "num_prompts": 4 if quick else 8, "max_new_tokens": 8 if quick else 32},
        }
        sweep["train"] |= {"epochs": 1, "batch_size": 8}
    else:
        sweep |= {
            "data": {"source": common.tinyworld_records(folder, 40 if quick else None)},
            "eval": {"judge": "reference", "num_prompts": 4 if quick else 50, "max_new_tokens": 8 if quick else 32},
        }
        sweep["train"] |= {"epochs": 1 if quick else 3, "batch_size": 16}
    return common.write_sweep(folder / "packing.yaml", sweep)


def run_side(sweep: Path, runs: Path, name: str, pack: int) -> dict[str, Any]:
    """One `peftsweep run` of the sweep file, packed (`pack` > 1) or not."""
    with common.private_ray() as env:
        cmd = common.peftsweep_cmd("run", str(sweep), "--name", name, "--runs-dir", str(runs), "--set", f"resources.pack={pack}")
        timed = common.check(common.run_timed(cmd, env), "peftsweep run")
    trials, epochs = common.read_store(runs / name / "results.db")
    last = common.last_epochs(epochs)
    if len(last) != len(trials) or any(t["status"] != "completed" for t in trials):
        sys.exit(f"peftsweep run ({name}): a trial did not complete:\n{timed.tail()}")
    processes = {e["worker_pid"] for e in epochs}
    return {
        "makespan": timed.seconds,
        "train_seconds": sum(e["train_seconds"] for e in last.values()),
        "eval_seconds": sum(e["eval_seconds"] for e in last.values()),
        "peak_memory_gb": max(e["peak_memory_gb"] for e in epochs),
        "processes": len(processes),
        "eval_ppl": {_config(t["params"]): [e["eval_ppl"] for e in epochs if e["trial_id"] == t["trial_id"]] for t in trials},
    }


def _config(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def measure_sweeps(args: Any) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"packed": [], "separate": []}
    with tempfile.TemporaryDirectory(prefix="packing-") as work:
        work = Path(work)
        sweep = sweep_file(work, args.model, args.quick, args.cpus)
        configs = len(LEARNING_RATES[1:3] if args.quick else LEARNING_RATES) * len(RANKS[:1] if args.quick else RANKS)
        for i in range(args.repeats):
            sides = [("packed", configs), ("separate", 1)]
            for side, pack in sides if i % 2 == 0 else sides[::-1]:
                common.log(f"repeat {i + 1}/{args.repeats} {side} ...")
                runs[side].append(run_side(sweep, work / "runs", f"{side}_{i}", pack))
                common.log(f"repeat {i + 1}/{args.repeats} {side}: makespan {runs[side][-1]['makespan']:.1f} s")
    med = {side: {k: common.median([r[k] for r in rs]) for k in ("makespan", "train_seconds", "eval_seconds", "peak_memory_gb", "processes")}
           for side, rs in runs.items()}
    pairs = [a["makespan"] / b["makespan"] for a, b in zip(runs["packed"], runs["separate"])]
    differences = [
        abs(p / s - 1)
        for a, b in zip(runs["packed"], runs["separate"])
        for config in b["eval_ppl"]
        for p, s in zip(a["eval_ppl"][config], b["eval_ppl"][config])
    ]
    drift = max(differences)
    target = 0.7 if args.model == "smollm2" else 0.33
    ratios = [
        common.ratio(f"makespan, packed (K = {configs}) / separate trials", med["packed"]["makespan"] / med["separate"]["makespan"], "<=",
                     target, f"medians over repeats (per-repeat ratios {common.spread(pairs)})"),
        common.ratio("eval_ppl of a packed trial vs its separate twin, largest relative difference", drift, "<=", 1e-4,
                     "every configuration, every epoch, every repeat (dropout 0: the same training)"),
    ]
    within = f"{sum(d <= 1e-4 for d in differences)} of {len(differences)}"
    return {"ratios": ratios, "medians": med, "runs": runs, "configurations": configs, "within_1e4": within}


# --- the GPU side: packed step vs solo steps, in process --------------------------------------------


def measure_steps(args: Any) -> dict[str, Any]:
    """Seconds per packed step of K members against K steps of one member (the same members, alone)."""
    import torch

    from benchmarks import gpu_throughput
    from trainers.config import TrialConfig
    from trainers.packed import Pack

    cuda = torch.cuda.is_available()
    members, batch, length, steps = (2, 2, 64, 2) if args.quick else (8, 8, 512, 10)
    with tempfile.TemporaryDirectory(prefix="packing-gpu-") as folder:
        folder = Path(folder)
        if cuda:
            n = gpu_throughput.build_model(folder, gpu_throughput.LLAMA_3_2_1B["num_hidden_layers"])
        else:  # --quick on a CPU: a narrow 2-layer miniature, to check that the measurement runs
            n = _miniature(folder)
        source = _long_records(folder, members * batch * (steps + 2), length)

        def config(i: int) -> TrialConfig:
            return TrialConfig.model_validate({
                "model": {"name": str(folder), "dtype": "bfloat16" if cuda else "float32"},
                "data": {"source": source, "max_length": length, "eval_fraction": 0.05},
                "train": {"learning_rate": 1e-4 * (i + 1), "lora_r": (8, 16)[i % 2], "lora_alpha": 16, "lora_dropout": 0.0,
                          "target_modules": ["q_proj", "v_proj"], "batch_size": batch, "precision": "bf16" if cuda else "fp32"},
                "eval": {"num_prompts": 2, "max_new_tokens": 4},
            })

        def seconds_per_step(configs: list[TrialConfig]) -> tuple[float, int]:
            pack = Pack(configs[0], len(configs))
            for i, c in enumerate(configs):
                pack.add(str(i), c, [""] * 2, lambda *_: None, lambda result: None)
            pack.step()  # warm-up: kernels, allocator
            tokens = sum(int(m.micro_batches[m.position]["attention_mask"].sum()) for m in pack.training)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                pack.step()
            if cuda:
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / steps
            del pack
            if cuda:
                torch.cuda.empty_cache()
            return seconds, tokens

        configs = [config(i) for i in range(members)]
        packed, tokens = seconds_per_step(configs)
        solo = [seconds_per_step([c]) for c in configs]
    alone = sum(s for s, _ in solo)
    peak = gpu_throughput.peak_flops(common.machine(check_gpu=cuda)["gpu"], None) if cuda else None
    rows = []
    for side, seconds, count in (("packed", packed, tokens), ("one at a time", alone, sum(t for _, t in solo))):
        rate = count / seconds
        rows.append({"side": side, "seconds_per_step": seconds, "tokens_per_second": rate,
                     "mfu": 4 * n * rate / peak if peak else None})
    ratio = common.ratio(f"step time, packed (K = {members}) / {members} steps one at a time", packed / alone, "<=", 1 / 6,
                         f"batch {batch} x {length} tokens per member, {steps} steps, {'bf16 on ' + 'CUDA' if cuda else 'fp32 miniature on CPU'}")
    return {"ratios": [ratio], "step_rows": rows, "matmul_params": n, "device": "cuda" if cuda else "cpu"}


def _miniature(folder: Path) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from benchmarks import gpu_throughput

    tokenizer = AutoTokenizer.from_pretrained(common.ensure_model())
    eos = tokenizer.eos_token_id
    shape = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 32, "vocab_size": len(tokenizer)}
    config = LlamaConfig(**{**gpu_throughput.LLAMA_3_2_1B, **shape}, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2)


def _long_records(folder: Path, count: int, length: int) -> str:
    """Records whose response fills about `length` tokens: the built-in world's documents, joined."""
    from trainers.tinyworld import pretraining_corpus

    documents = itertools.cycle(pretraining_corpus())
    path = folder / "long.jsonl"
    with path.open("w") as f:
        for i in range(count):
            text = " ".join(next(documents) for _ in range(length // 12))  # ~12+ tokens a document: cut at max_length
            f.write(json.dumps({"instruction": f"Tell me about the world ({i}).", "input": "", "output": text}) + "\n")
    return str(path)


# --- tables ------------------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    out = [common.header("Packed trials: the same configurations packed and as separate trials", result), ""]
    if result.get("skipped"):
        return "\n".join([*out, f"skipped: {result['reason']} (not a failure)"])
    out += [common.ratio_table(result["ratios"]), ""]
    if "medians" in result:
        med = result["medians"]
        rows = [
            [label, med["packed"][key], med["separate"][key]]
            for label, key in (
                ("makespan, launch to exit (s)", "makespan"),
                ("training, summed over trials (s; packed: each trial's share)", "train_seconds"),
                ("evaluation, summed over trials (s)", "eval_seconds"),
                ("peak memory of one process (GB)", "peak_memory_gb"),
                ("processes that trained", "processes"),
            )
        ]
        out.append(common.table(["medians over repeats", "packed", "separate trials"], rows))
        out.append(f"eval_ppl within 1e-4 (relative) of the separate twin's: {result['within_1e4']} (configuration, epoch, repeat)")
    if "step_rows" in result:
        rows = [[r["side"], f"{r['seconds_per_step']:.3f}", f"{r['tokens_per_second']:,.0f}",
                 "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"] for r in result["step_rows"]]
        out.append(common.table(["side", "seconds per step", "tokens/s", "MFU (4N per token)"], rows))
        out.append(f"N = {result['matmul_params'] / 1e9:.4f}B matmul parameters, on {result['device']}")
    return "\n".join(out)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--repeats", type=int, help="runs of each side, alternating (default 3; smollm2: 1)")
    p.add_argument("--cpus", type=int, default=1, help="CPUs per trial or pack worker (default 1)")
    p.add_argument("--gpu", action="store_true", help="the GPU side instead: a packed step vs steps one at a time")
    args = p.parse_args()
    args.repeats = args.repeats or (1 if args.quick or args.model == "smollm2" else 3)

    common.quiet()
    info = common.machine()
    common.ensure_model()
    if args.gpu:
        import torch

        if not torch.cuda.is_available() and not args.quick:
            result = {"benchmark": "packing", "skipped": True, "ratios": [], "reason": f"--gpu: no CUDA GPU (torch {torch.__version__} finds none)",
                      "machine": common.finish_machine(info), "sizes": vars(args) | {"json": None}, "sizes_text": "-"}
            common.emit(result, render, args.json)
            return
        measured = measure_steps(args)
        sizes = "a packed step of K members vs K steps of one member, Llama-3.2-1B architecture (random weights)"
    else:
        measured = measure_sweeps(args)
        sizes = (f"{measured['configurations']} LoRA configurations (learning rate x rank, dropout 0) on "
                 f"{'SmolLM2-135M-Instruct, 1 epoch of 200 support examples' if args.model == 'smollm2' else 'the tiny model'}"
                 f"{', quick' if args.quick else ''}, {args.cpus} CPU(s) per trial or pack worker, {args.repeats} repeat(s)")
    result = {"benchmark": "packing", "skipped": False, **measured, "machine": common.finish_machine(info),
              "sizes": vars(args) | {"json": None}, "sizes_text": sizes, "seconds": time.monotonic() - common.STARTED}
    common.emit(result, render, args.json)


if __name__ == "__main__":
    main()
