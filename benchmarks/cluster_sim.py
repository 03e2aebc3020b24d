"""Cluster scale in simulation: how much of a GPU cluster the sweep driver keeps busy, and its memory.

`ray.cluster_utils.Cluster` starts NODES real Ray nodes on this machine, each declaring
GPUS_PER_NODE GPUs it does not have (no GPU exists here). About two hundred short trials go through
the driver's own Ray Tune setup, `hpo.driver.make_tuner` (same searcher, resources, run config, and
the StoreCallback writing a real results store), with one stand-in in place of the training
worker: `standin_trial` holds 1 GPU and ~0 CPU, sleeps EPOCH_SECONDS per epoch and reports an
epoch's metrics and judged answers, as the worker would. Everything but the training is real.

    .venv/bin/python benchmarks/cluster_sim.py [--trials 192] [--epochs 2] [--epoch-seconds 1.0] [--quick]

Slot utilization = busy GPU-slot-seconds / (GPU slots x makespan): busy is the time trials spend
inside the trainable, makespan is the wall time of `Tuner.fit()`. What it does not count (worker
process start, placement groups, result handling in the driver) is the scheduling overhead.
Target (issue 9): utilization >= 0.95.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/cluster_sim.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common

NODES = 4
GPUS_PER_NODE = 8
NUM_PROMPTS = 50  # judged answers per epoch, as the default eval section reports them
EPOCH_SECONDS = 1.0  # set from --epoch-seconds before the Tuner pickles standin_trial (by value: it lives in __main__)


def standin_trial(params, spec, baseline):
    """Stands in for hpo.trial.run_trial: holds its GPU, sleeps each epoch, reports what the worker reports."""
    import ray
    from ray import tune

    started_at = time.time()
    placement = {"node": ray.util.get_node_ip_address(), "devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    epochs = spec.trial_config(params).train.epochs
    for epoch in range(1, epochs + 1):
        time.sleep(EPOCH_SECONDS)
        seconds = epoch * EPOCH_SECONDS
        tune.report({
            "epoch": epoch, "train_loss": 1.0 / epoch, "eval_ppl": 10.0 / epoch, "win_rate": 0.5, "wins": 25,
            "losses": 25, "ties": 0, "train_seconds": seconds, "eval_seconds": 0.0, "tokens_trained": 1000 * epoch,
            "peak_memory_gb": 1.0, "gpu_hours": seconds / 3600, "cost_usd": 0.0,
            "answers": [f"answer {i}" for i in range(len(baseline))], "verdicts": [0.5] * len(baseline),
            **placement, "busy_started_at": started_at, "busy_until": time.time(),
        })


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
        callbacks = [
            StoreCallback(store, spec),
            ProgressCallback(spec, "cluster_sim", console=Console(file=open(os.devnull, "w"))),
        ]
        tuner = make_tuner(spec, baseline, work, callbacks, trial=standin_trial)  # the trial is the only thing replaced
        rss_before_mib = _rss_mib()
        cpu_before = _cpu_seconds()
        started = time.monotonic()
        results = tuner.fit()
        makespan = time.monotonic() - started
        driver_cpu = _cpu_seconds() - cpu_before
        trials = [r.metrics for r in results if r.error is None and r.metrics.get("epoch") == args.epochs]
        stored = store.conn.execute("SELECT count(*) FROM trials WHERE status = 'completed'").fetchone()[0]
        store.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    slots = args.nodes * args.gpus_per_node
    busy = sum(t["busy_until"] - t["busy_started_at"] for t in trials)
    trial_seconds = args.epochs * args.epoch_seconds
    ideal = math.ceil(args.trials / slots) * trial_seconds
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    utilization = busy / (slots * makespan)
    rows = [
        ("trials completed (results / store)", f"{len(trials)} / {stored} of {args.trials}"),
        ("makespan, Tuner.fit()", f"{makespan:.1f} s"),
        ("ideal makespan", f"{ideal:.1f} s ({math.ceil(args.trials / slots)} waves x {trial_seconds:g} s)"),
        ("busy GPU-slot-seconds", f"{busy:.0f} of {slots * makespan:.0f}"),
        ("slot utilization", f"{100 * utilization:.1f} %"),
        ("idle slot-seconds per trial", f"{(slots * makespan - busy) / max(1, len(trials)):.1f} s"),
        ("most trials busy at once", f"{_peak_concurrency(trials)} of {slots} slots"),
        ("throughput", f"{len(trials) / makespan:.2f} trials/s"),
        ("driver CPU during fit (user + sys)", f"{driver_cpu:.1f} s"),
        ("driver peak RSS", f"{peak_mib:.0f} MiB ({rss_before_mib:.0f} MiB before fit)"),
    ]
    result = {
        "benchmark": "cluster_sim",
        "ratios": [common.ratio("slot utilization", utilization, ">=", 0.95, "busy GPU-slot-seconds / (GPU slots x makespan)")],
        "rows": [{"measure": name, "value": value} for name, value in rows],
        "trials_completed": len(trials),
        "trials_stored": stored,
        "driver_peak_rss_mib": peak_mib,
        "driver_rss_before_fit_mib": rss_before_mib,
        "machine": common.finish_machine(info),
        "sizes": vars(args) | {"json": None},
        "sizes_text": f"{args.nodes} nodes x {args.gpus_per_node} fake GPUs = {slots} GPU slots; {args.trials} trials x "
        f"{args.epochs} epochs x {args.epoch_seconds:g} s (stand-in trainable, 1 GPU + 0.01 CPU each)",
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


def _peak_concurrency(trials: list[dict]) -> int:
    """The most trials inside the trainable at one moment."""
    events = sorted([(t["busy_started_at"], 1) for t in trials] + [(t["busy_until"], -1) for t in trials])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


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
