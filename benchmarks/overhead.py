"""Orchestration overhead: the same short trainings as a peftsweep sweep and as a plain script.

(a) `peftsweep run` (the real command line: Ray Tune, the results store, a checkpoint per epoch,
the report) on a generated grid sweep of TRIALS LoRA trainings of the built-in tiny model,
CONCURRENCY at a time; (b) `benchmarks/plain_sweep.py` on the same sweep file: the base model
answers once, then `trainers.worker.train` on the same configurations in a `multiprocessing` pool
of CONCURRENCY processes. Both are timed from launch to exit, alternating (a) and (b) each repeat;
the ratio is the median makespan of (a) over that of (b).

    .venv/bin/python -m benchmarks.overhead [--trials 8] [--epochs 1] [--repeats 3] [--concurrency 2] [--quick]

The breakdown says where (a)'s extra time goes: start-up (imports, input checks and Ray's start),
the base model's answers (in the first trial's worker, before it trains; the plain script: in its
first pool process), the trainings, and what follows
them (Ray's shutdown, the report); per trial, the seconds a trial is held beyond its training and
evaluation (a fresh process, imports, model load, tokenizing, checkpoints) against the plain
script's reused processes.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from trainers.vocabulary import TrialStatus


def sweep_file(folder: Path, source: str, trials: int, epochs: int, concurrency: int, num_prompts: int, max_new_tokens: int) -> Path:
    """A grid of `trials` learning rates, log-spaced from 1e-4 to 1e-2: one training each."""
    rates = [float(f"{1e-4 * 100 ** (i / max(1, trials - 1)):.3g}") for i in range(trials)]
    return common.write_sweep(folder / "overhead.yaml", {
        "description": f"orchestration overhead benchmark: {trials} LoRA trainings of {epochs} epoch(s)",
        "data": {"source": source},
        "train": {"epochs": epochs, "lora_r": 8},
        "search": {"algorithm": "grid", "space": {"learning_rate": {"grid": rates}}, "max_concurrent_trials": concurrency},
        "eval": {"num_prompts": num_prompts, "max_new_tokens": max_new_tokens},
        "resources": {"cpus_per_trial": 1},
    })


def run_peftsweep(sweep: Path, runs: Path, name: str) -> dict[str, float]:
    """(a): the real command line, in a private Ray; phases from its output lines and its store."""
    with common.private_ray() as env:
        timed = common.check(common.run_timed(common.peftsweep_cmd("run", str(sweep), "--name", name, "--runs-dir", str(runs)), env), "peftsweep run")
    trials, epochs = common.read_store(runs / name / "results.db")
    last = common.last_epochs(epochs)
    starts = [t["started_at"] - timed.started_at for t in trials]
    ends = [t["ended_at"] - timed.started_at for t in trials]
    ray_up, base_done = timed.first("Ray started"), timed.first("Base model:")
    if len(last) != len(trials) or ray_up is None or base_done is None:
        sys.exit(f"peftsweep run: missing trials or progress lines:\n{timed.tail()}")
    return {
        "makespan": timed.seconds,
        "startup": ray_up,
        "baseline": base_done - ray_up,
        "to_first_training": min(starts),
        "trainings": max(ends) - min(starts),
        "after": timed.seconds - max(ends),
        "held_beyond_training": common.median(beyond := [
            (t["ended_at"] - t["started_at"]) - last[t["trial_id"]]["train_seconds"] - last[t["trial_id"]]["eval_seconds"] for t in trials
        ]),
        "held_beyond_training_cold": max(beyond),  # every trial is a fresh process
        "train_eval": common.median([e["train_seconds"] + e["eval_seconds"] for e in last.values()]),
        "trials": len(trials),
    }


def run_plain(sweep: Path, concurrency: int) -> dict[str, float]:
    """(b): the plain script on the same sweep file."""
    cmd = [sys.executable, "-m", "benchmarks.plain_sweep", str(sweep), "--processes", str(concurrency)]
    timed = common.check(common.run_timed(cmd), "plain_sweep")
    out = json.loads(next(line for _, line in reversed(timed.lines) if line.startswith("{")))
    t0 = timed.started_at
    tasks = out["trainings"]
    if any(t["status"] != TrialStatus.COMPLETED for t in tasks):
        sys.exit(f"plain_sweep: a training failed: {tasks}")
    return {
        "makespan": timed.seconds,
        "startup": out["ready"] - t0,
        "baseline": out["baseline"]["ended"] - out["ready"],
        "to_first_training": min(t["started"] for t in tasks) - t0,
        "trainings": max(t["ended"] for t in tasks) - min(t["started"] for t in tasks),
        "after": timed.seconds - (max(t["ended"] for t in tasks) - t0),
        "held_beyond_training": common.median([(t["ended"] - t["started"]) - t["train_seconds"] - t["eval_seconds"] for t in tasks]),
        # each pool process's first training pays the imports and the first model load: a fresh process's cost without Ray
        "held_beyond_training_cold": max((t["ended"] - t["started"]) - t["train_seconds"] - t["eval_seconds"] for t in tasks),
        "train_eval": common.median([t["train_seconds"] + t["eval_seconds"] for t in tasks]),
        "trials": len(tasks),
    }


PHASES = [
    ("makespan, launch to exit", "makespan"),
    ("start-up: imports, input checks, Ray start (plain: imports)", "startup"),
    ("Ray up to the base model's answers (peftsweep: the first trial's worker, before it trains)", "baseline"),
    ("launch to the first training's start", "to_first_training"),
    ("first training's start to the last one's end", "trainings"),
    ("after the last training: Ray shutdown, report, exit", "after"),
    ("per trial: seconds held beyond train + eval (median)", "held_beyond_training"),
    ("the same, most of any trial (plain: a process's first, cold)", "held_beyond_training_cold"),
    ("per trial: train + eval seconds (median)", "train_eval"),
]


def fixed_cost(a: dict[str, float], b: dict[str, float], concurrency: int) -> float:
    """Seconds peftsweep adds per sweep whatever its number of trials: the makespan difference less the
    per-trial difference (seconds held beyond training and evaluation) times the trials each slot runs.
    Start-up, the base model's answers where they do not overlap the trainings, and what follows them."""
    per_trial = (a["held_beyond_training"] - b["held_beyond_training"]) * a["trials"] / concurrency
    return a["makespan"] - b["makespan"] - per_trial


def summarize(runs: dict[str, list[dict[str, float]]], concurrency: int) -> dict[str, Any]:
    med = {side: {k: common.median([r[k] for r in rs]) for k in rs[0]} for side, rs in runs.items()}
    value = med["peftsweep"]["makespan"] / med["plain"]["makespan"]
    pairs = [a["makespan"] / b["makespan"] for a, b in zip(runs["peftsweep"], runs["plain"])]
    fixed = [fixed_cost(a, b, concurrency) for a, b in zip(runs["peftsweep"], runs["plain"])]
    rows = [
        {"phase": label, "key": key, "peftsweep": med["peftsweep"][key], "plain": med["plain"][key],
         "difference": med["peftsweep"][key] - med["plain"][key]}
        for label, key in PHASES
    ]
    detail = f"median makespan, peftsweep run / plain script (per-repeat ratios {common.spread(pairs)})"
    fixed_detail = (
        "seconds: makespan difference less the per-trial difference x trials per slot, median "
        f"(per repeat {common.spread(fixed)})"
    )
    ratios = [
        common.ratio("orchestration overhead, makespan", value, "<=", 1.05, detail),
        common.ratio("fixed cost per sweep, seconds", common.median(fixed), "<=", 6, fixed_detail),
    ]
    return {"ratios": ratios, "rows": rows, "runs": runs}


def render(result: dict[str, Any]) -> str:
    rows = [[r["phase"], f"{r['peftsweep']:.1f}", f"{r['plain']:.1f}", f"{r['difference']:+.1f}"] for r in result["rows"]]
    return "\n".join([
        common.header("Orchestration overhead: peftsweep run vs a plain script, the same trainings", result),
        "",
        common.ratio_table(result["ratios"]),
        "",
        common.table(["seconds (medians over repeats)", "peftsweep run", "plain script", "difference"], rows),
    ])


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--trials", type=int, default=8, help="trainings (grid points), default 8")
    p.add_argument("--epochs", type=int, default=1, help="epochs per training, default 1")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating, default 3")
    p.add_argument("--concurrency", type=int, default=2, help="trainings at a time on both sides, default 2")
    p.add_argument("--records", type=int, help="use the first N records of the built-in task (default: all 800)")
    args = p.parse_args()
    prompts, new_tokens = 50, 32  # the eval section's defaults
    if args.quick:
        args.trials, args.epochs, args.repeats, args.records = 2, 1, 1, args.records or 40
        prompts, new_tokens = 4, 8

    common.quiet()
    info = common.machine()
    common.ensure_model()
    runs: dict[str, list[dict[str, float]]] = {"peftsweep": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="overhead-") as work:
        work = Path(work)
        source = common.tinyworld_records(work, args.records)
        sweep = sweep_file(work, source, args.trials, args.epochs, args.concurrency, prompts, new_tokens)
        for i in range(args.repeats):
            sides = [("peftsweep", lambda: run_peftsweep(sweep, work / "runs", f"overhead_{i}")), ("plain", lambda: run_plain(sweep, args.concurrency))]
            for side, run in sides if i % 2 == 0 else sides[::-1]:
                common.log(f"repeat {i + 1}/{args.repeats} {side} ...")
                runs[side].append(run())
                common.log(f"repeat {i + 1}/{args.repeats} {side}: makespan {runs[side][-1]['makespan']:.1f} s")
    result = {
        "benchmark": "overhead",
        **summarize(runs, args.concurrency),
        "machine": common.finish_machine(info),
        "sizes": vars(args) | {"json": None},
        "sizes_text": f"{args.trials} LoRA trainings (rank 8, learning rates 1e-4..1e-2) of {args.epochs} epoch(s) on "
        f"{args.records or 800} records of the built-in task, {args.concurrency} at a time (1 CPU and 1 torch thread each), "
        f"{prompts} judged prompts per epoch, {args.repeats} repeats",
        "seconds": time.monotonic() - common.STARTED,
    }
    common.emit(result, render, args.json)


if __name__ == "__main__":
    main()
