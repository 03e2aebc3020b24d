"""GPU trial throughput: the throughput benchmark (benchmarks/throughput.py) on a randomly
initialized model with the Llama-3.2-1B architecture, with tokens per second and model FLOPs
utilization (MFU). Throughput does not depend on the weights, so nothing is downloaded.

The model (16 layers, hidden 2048, 32 query and 8 key/value heads, vocabulary 128,256, tied
embeddings; about 1.24B parameters) is built with random weights in bfloat16 and saved to a temp
folder with the built-in tiny model's tokenizer (its token ids are a subset of the vocabulary).
Both sides (the peftsweep worker and a plain HF Trainer + peft script) then train the same LoRA on
the built-in task, the base weights in bfloat16 and the LoRA weights in float32, as in
benchmarks/throughput.py.

MFU = model FLOPs per second / the GPU's peak dense bf16 FLOPs. Model FLOPs per trained token are
4 x N (N: the parameters of every matrix multiplication, the output layer included): the forward
pass (2N) and the gradients of the activations (2N); the frozen base weights get no gradients, and
the LoRA matrices and attention scores are left out (small at these ranks and lengths). Padding
positions are computed but not counted.

    .venv/bin/python -m benchmarks.gpu_throughput [--epochs 5] [--repeats 3] [--batch-size 16] [--quick]

Without a CUDA GPU it prints that it was skipped for lack of one (not a failure) and exits 0.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/gpu_throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

LLAMA_3_2_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
        "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
    },
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def build_model(folder: Path, layers: int) -> int:
    """Random Llama-3.2-1B-architecture weights in bfloat16 (built on the GPU: fast) and the tiny
    model's tokenizer, saved to `folder`; returns the matmul parameter count N."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(common.ensure_model())
    eos = tokenizer.eos_token_id
    config = LlamaConfig(**{**LLAMA_3_2_1B, "num_hidden_layers": layers}, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Every weight matrix multiplies: the layers' projections and the (tied) output layer; not the norms.
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2)


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for gpu, tflops in PEAK_BF16_TFLOPS.items():  # longest names first where they overlap (H100 PCIe before H100)
        if gpu in name:
            return tflops * 1e12
    return None


def render(result: dict[str, Any]) -> str:
    from benchmarks.throughput import render as throughput_render

    title = "GPU trial throughput: Llama-3.2-1B architecture (random weights), peftsweep worker vs HF Trainer + peft"
    if result.get("skipped"):
        return f"{title}\n{common.describe(result['machine'])}\nskipped: {result['reason']} (not a failure)"
    rows = [[r["side"], f"{r['tokens_per_second']:,.0f}", f"{r['model_tflops_per_second']:.1f}",
             "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"] for r in result["rows"]]
    peak = "unknown: pass --peak-tflops" if result["peak_flops"] is None else f"{result['peak_flops'] / 1e12:g} TFLOP/s dense bf16"
    return "\n".join([
        throughput_render(result, title),
        "",
        common.table(["side", "tokens/s", "model TFLOP/s (4N per token)", "MFU"], rows),
        f"N = {result['matmul_params'] / 1e9:.3f}B matmul parameters; peak: {peak}",
    ])


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--epochs", type=int, default=5, help="epochs per training (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="trainings per side, seeds 0.. (default 3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s, when its name is not in the table")
    args = p.parse_args()
    layers = LLAMA_3_2_1B["num_hidden_layers"]
    if args.quick:
        args.epochs, args.repeats, layers = 1, 1, 2

    common.quiet()
    import torch

    info = common.machine()
    if not torch.cuda.is_available():
        result = {
            "benchmark": "gpu_throughput", "skipped": True, "ratios": [],
            "reason": f"no CUDA GPU (torch {torch.__version__} finds none)",
            "machine": common.finish_machine(info), "sizes": vars(args) | {"json": None},
        }
        common.emit(result, render, args.json)
        return

    from benchmarks import throughput

    with tempfile.TemporaryDirectory(prefix="llama-1b-") as folder:
        n = build_model(Path(folder), layers)
        common.log(f"built a random Llama-3.2-1B-architecture model ({layers} layers, {n / 1e9:.3f}B matmul parameters)")

        def config_of(seed: int) -> Any:
            return throughput.trial_config("tinyworld", model=folder, dtype="bfloat16", epochs=args.epochs,
                                           batch_size=args.batch_size, threads=1, seed=seed)

        runs = throughput.measure(config_of, args.repeats)
        padding = throughput.padding_share(config_of(0))
    result = {"benchmark": "gpu_throughput", "skipped": False, **throughput.summarize(runs, padding)}
    peak = peak_flops(info["gpu"], args.peak_tflops)
    for row in result["rows"]:
        row["model_tflops_per_second"] = 4 * n * row["tokens_per_second"] / 1e12
        row["mfu"] = 4 * n * row["tokens_per_second"] / peak if peak else None
    result |= {
        "matmul_params": n,
        "peak_flops": peak,
        "machine": common.finish_machine(info),
        "sizes": vars(args) | {"json": None, "layers": layers},
        "sizes_text": f"Llama-3.2-1B architecture with {layers} layers, random weights, bfloat16; LoRA rank 8 on q_proj and v_proj; "
        f"800 records of the built-in task (80 % train), {args.epochs} epoch(s), batch {args.batch_size}, {args.repeats} repeats",
        "seconds": time.monotonic() - common.STARTED,
    }
    common.emit(result, render, args.json)


if __name__ == "__main__":
    main()
