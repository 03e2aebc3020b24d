"""Cluster scale in simulation: how much of a GPU cluster the sweep driver keeps busy, and its memory.

`ray.cluster_utils.Cluster` starts NODES real Ray nodes on this machine, each declaring
GPUS_PER_NODE GPUs it does not have (no GPU exists here). About two hundred short trials go through
the driver's own Ray Tune setup, `hpo.driver.make_tuner` (same searcher, resources, run config,
the StoreCallback writing a real results store, and the live progress table drawn as on a
terminal), with one stand-in in place of the training worker: `standin_trial` holds 1 GPU and
~0 CPU, sleeps EPOCH_SECONDS per epoch and reports an epoch's metrics, judged answers and
checkpoint, as hpo.trial.run_trial does. Everything but the training is real.

    .venv/bin/python benchmarks/cluster_sim.py [--trials 192] [--epochs 2] [--epoch-seconds 1.0] [--quick]

Slot utilization = busy GPU-slot-seconds / (GPU slots x makespan): busy is the time trials spend
in their epochs (the sleeps, read back from the store), makespan is the wall time of
`Tuner.fit()`. The rest is idle, and the table says where it went: before each worker process's
first trial (the process starting), between epochs of a trial (its report and checkpoint, and the
wait for the driver to take them), between trials on one worker, after each worker's last trial,
and in slots that never ran a trial. Target (issue 9): utilization >= 0.95.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/cluster_sim.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

NODES = 4
GPUS_PER_NODE = 8
NUM_PROMPTS = 50  # judged answers per epoch, as the default eval section reports them
ANSWER_CHARS = 128  # an answer of the default eval.max_new_tokens, 32 tokens
CHECKPOINT_BYTES = 64 * 1024  # a small adapter: copying checkpoints is the worker's cost, not the driver's
EPOCH_SECONDS = 1.0  # set from --epoch-seconds before the Tuner pickles standin_trial (by value: it lives in __main__)


def standin_trial(params, spec, baseline):
    """Stands in for hpo.trial.run_trial: holds its GPU, sleeps each epoch, reports what run_trial reports, its checkpoint too."""
    import ray
    from ray import tune

    from hpo.store import epoch_score
    from hpo.trial import SCORE_KEY, SPENT_KEY

    usage = resource.getrusage(resource.RUSAGE_SELF)
    worker_cpu = usage.ru_utime + usage.ru_stime  # the process's CPU so far; on its first trial, what starting it cost
    placement = {
        "node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "worker_pid": os.getpid(),
    }
    epochs = spec.trial_config(params).train.epochs
    for epoch in range(1, epochs + 1):
        epoch_started_at = time.time()
        time.sleep(EPOCH_SECONDS)
        busy_until = time.time()
        seconds = epoch * EPOCH_SECONDS
        metrics = {
            "epoch": epoch, "train_loss": 1.0 / epoch, "eval_ppl": 10.0 / epoch, "win_rate": 0.5, "wins": 25,
            "losses": 25, "ties": 0, "train_seconds": seconds, "eval_seconds": 0.0, "tokens_trained": 1000 * epoch,
            "peak_memory_gb": 1.0, "gpu_hours": seconds / 3600, "cost_usd": 0.0,
            "answers": [f"answer {i} ".ljust(ANSWER_CHARS, "x") for i in range(len(baseline))], "verdicts": [0.5] * len(baseline),
            **placement, "epoch_started_at": epoch_started_at, "busy_until": busy_until, "worker_cpu_at_start": worker_cpu,
        }
        with tempfile.TemporaryDirectory() as folder:  # the adapter and resumable state, as run_trial saves them
            (Path(folder) / "adapter_model.safetensors").write_bytes(bytes(CHECKPOINT_BYTES))
            score = epoch_score(metrics[spec.tune_objective.metric], epoch, spec.tune_objective.mode)
            tune.report({**metrics, SPENT_KEY: metrics["gpu_hours"], SCORE_KEY: score}, checkpoint=tune.Checkpoint.from_directory(folder))


def main() -> None:
    global EPOCH_SECONDS
    parser = common.parser(__doc__)
    parser.add_argument("--trials", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--epoch-seconds", type=float, default=1.0)
    parser.add_argument("--nodes", type=int, default=NODES, help=f"simulated nodes, default {NODES}")
    parser.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE, help=f"fake GPUs per node, default {GPUS_PER_NODE}")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs, args.epoch_seconds, args.nodes, args.gpus_per_node = 8, 1, 0.5, 1, 4
    EPOCH_SECONDS = args.epoch_seconds
    info = common.machine(check_gpu=False)  # torch stays unimported: driver memory comparable with earlier runs

    # A private Ray temp dir: no other `ray.init()` on this machine finds (and joins) this cluster.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    work = Path(tempfile.mkdtemp(prefix="cluster_sim-"))

    import ray
    from ray.cluster_utils import Cluster

    from hpo.callbacks import StoreCallback
    from hpo.driver import make_tuner
    from hpo.progress import ProgressCallback
    from hpo.runtime import git_commit, init_ray, versions
    from hpo.spec import SweepSpec
    from hpo.store import Store
    from rich.console import Console

    spec = SweepSpec.model_validate({
        "train": {"epochs": args.epochs},
        "search": {"algorithm": "grid", "space": {"seed": {"grid": list(range(args.trials))}}},
        "eval": {"num_prompts": NUM_PROMPTS},
        "resources": {"gpus_per_trial": 1, "cpus_per_trial": 0.01},
    })
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "num_gpus": 0})
    try:
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=1, num_gpus=args.gpus_per_node)
        cluster.wait_for_nodes()
        init_ray(cluster.address)
        store = Store.create(
            work / "results.db", name="cluster_sim", sweep_file="(benchmarks/cluster_sim.py)",
            spec=spec.model_dump(mode="json"), searched=["seed"], objectives=[o.model_dump() for o in spec.objectives],
            versions=versions(), git_commit=git_commit(),
        )
        baseline = [f"base answer {i}" for i in range(NUM_PROMPTS)]
        store.set_baseline((i, f"prompt {i}", f"reference {i}", a) for i, a in enumerate(baseline))
        # The live table, as on a terminal of 120 x 40 (hpo.driver._drive starts and stops it around fit), drawn to nowhere.
        terminal = Console(file=open(os.devnull, "w"), force_terminal=True, width=120, height=40)
        progress = ProgressCallback(spec, "cluster_sim", console=terminal)
        callbacks = [StoreCallback(store, spec), progress]
        tuner = make_tuner(spec, baseline, work, callbacks, trial=standin_trial)  # the trial is the only thing replaced
        rss_before_mib = _rss_mib()
        cpu_before, machine_before = _cpu_seconds(), _machine_cpu()
        started, started_at = time.monotonic(), time.time()
        progress.start()
        try:
            results = tuner.fit()
        finally:
            progress.stop()
        makespan, ended_at = time.monotonic() - started, time.time()
        driver_cpu, machine_busy = _cpu_seconds() - cpu_before, _machine_busy(machine_before, _machine_cpu())
        trials = [r.metrics for r in results if r.error is None and r.metrics.get("epoch") == args.epochs]
        stored = store.conn.execute("SELECT count(*) FROM trials WHERE status = 'completed'").fetchone()[0]
        epochs = store.epochs()
        store.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    slots = args.nodes * args.gpus_per_node
    idle = _idle(epochs, slots, started_at, ended_at)
    busy = idle.pop("busy")
    trial_seconds = args.epochs * args.epoch_seconds
    ideal = math.ceil(args.trials / slots) * trial_seconds
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    utilization = busy / (slots * makespan)
    per_trial = max(1, len(trials))
    rows = [
        ("trials completed (results / store)", f"{len(trials)} / {stored} of {args.trials}"),
        ("makespan, Tuner.fit()", f"{makespan:.1f} s"),
        ("ideal makespan", f"{ideal:.1f} s ({math.ceil(args.trials / slots)} waves x {trial_seconds:g} s)"),
        ("busy GPU-slot-seconds (in epochs)", f"{busy:.0f} of {slots * makespan:.0f}"),
        ("slot utilization", f"{100 * utilization:.1f} %"),
        ("idle slot-seconds per trial", f"{(slots * makespan - busy) / per_trial:.1f} s"),
        *((_IDLE_ROWS[k], f"{v:.0f} s ({v / per_trial:.2f} per trial)") for k, v in idle.items()),
        ("most trials busy at once", f"{_peak_concurrency(epochs)} of {slots} slots"),
        ("throughput", f"{len(trials) / makespan:.2f} trials/s"),
        ("worker CPU before its first trial (median)", f"{_first_trial_cpu(epochs):.1f} s"),
        ("machine CPU busy during fit (all processes)", f"{100 * machine_busy:.0f} % of {os.cpu_count()} cores"),
        ("driver CPU during fit (user + sys)", f"{driver_cpu:.1f} s"),
        ("driver peak RSS", f"{peak_mib:.0f} MiB ({rss_before_mib:.0f} MiB before fit)"),
    ]
    result = {
        "benchmark": "cluster_sim",
        "ratios": [common.ratio("slot utilization", utilization, ">=", 0.95, "busy GPU-slot-seconds / (GPU slots x makespan)")],
        "rows": [{"measure": name, "value": value} for name, value in rows],
        "trials_completed": len(trials),
        "trials_stored": stored,
        "slot_seconds": slots * makespan,
        "busy_slot_seconds": busy,
        "idle_slot_seconds": idle,
        "machine_cpu_busy": machine_busy,
        "driver_peak_rss_mib": peak_mib,
        "driver_rss_before_fit_mib": rss_before_mib,
        "machine": common.finish_machine(info),
        "sizes": vars(args) | {"json": None},
        "sizes_text": f"{args.nodes} nodes x {args.gpus_per_node} fake GPUs = {slots} GPU slots; {args.trials} trials x "
        f"{args.epochs} epochs x {args.epoch_seconds:g} s (stand-in trainable, 1 GPU + 0.01 CPU each, a {CHECKPOINT_BYTES // 1024} KiB "
        "checkpoint per epoch)",
        "seconds": time.monotonic() - common.STARTED,
    }
    common.emit(result, render, args.json)
    if len(trials) != args.trials:
        sys.exit(f"cluster_sim: only {len(trials)} of {args.trials} trials completed")


def render(result: dict[str, Any]) -> str:
    return "\n".join([
        common.header("Scale in simulation: the sweep driver on a simulated GPU cluster", result),
        "",
        common.ratio_table(result["ratios"]),
        "",
        common.table(["measure", "value"], [[r["measure"], r["value"]] for r in result["rows"]]),
    ])


_IDLE_ROWS = {
    "before_first_trial": "idle before each worker's first trial (the process starting)",
    "between_epochs": "idle between epochs of a trial (report, checkpoint, the driver's answer)",
    "between_trials": "idle between trials on one worker",
    "after_last_trial": "idle after each worker's last trial",
    "unused_slots": "idle in slots that never ran a trial",
}


def _idle(epochs: list[dict], slots: int, started_at: float, ended_at: float) -> dict[str, float]:
    """Busy slot-seconds (inside epochs) and where the idle ones went, from the stored epochs.

    A slot is a worker process (node, pid): a worker that has run a trial keeps its GPU to the end
    (resources.reuse_workers). Per worker, the fit's wall time is exactly busy + idle before its first
    trial + between epochs + between trials + after its last trial.
    """
    spans = defaultdict(list)  # worker -> its epochs' (trial_id, epoch, start, end)
    for e in epochs:
        spans[(e["node_id"], e["worker_pid"])].append((e["epoch_started_at"], e["busy_until"], e["trial_id"]))
    out = dict.fromkeys(["busy", *_IDLE_ROWS], 0.0)
    for worker in spans.values():
        worker.sort()
        out["before_first_trial"] += worker[0][0] - started_at
        out["after_last_trial"] += ended_at - worker[-1][1]
        for (start, end, trial), (next_start, _, next_trial) in zip(worker, worker[1:]):
            out["between_epochs" if next_trial == trial else "between_trials"] += next_start - end
        out["busy"] += sum(end - start for start, end, _ in worker)
    out["unused_slots"] = max(0, slots - len(spans)) * (ended_at - started_at)
    return out


def _peak_concurrency(epochs: list[dict]) -> int:
    """The most trials inside the trainable at one moment (from each trial's first epoch start to its last epoch end)."""
    spans: dict[str, list[float]] = {}
    for e in epochs:
        span = spans.setdefault(e["trial_id"], [e["epoch_started_at"], e["busy_until"]])
        span[0], span[1] = min(span[0], e["epoch_started_at"]), max(span[1], e["busy_until"])
    events = sorted([(start, 1) for start, _ in spans.values()] + [(end, -1) for _, end in spans.values()])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def _first_trial_cpu(epochs: list[dict]) -> float:
    """Median CPU-seconds a worker process had used when its first trial began: what starting it cost."""
    first: dict[tuple, tuple[float, float]] = {}
    for e in epochs:
        worker = (e["node_id"], e["worker_pid"])
        first[worker] = min(first.get(worker, (math.inf, 0.0)), (e["epoch_started_at"], e["worker_cpu_at_start"]))
    return common.median([cpu for _, cpu in first.values()]) if first else math.nan


def _machine_cpu() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return sum(ticks) - idle, sum(ticks)


def _machine_busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def _cpu_seconds() -> float:
    """CPU time of this process, the driver (not of Ray's processes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    main()
