"""The plain script one would write instead of peftsweep: the same trainings, in a pool of processes.

    .venv/bin/python -m benchmarks.plain_sweep SWEEP.yaml [--processes 2]

It reads the sweep file only for the trainings' configurations (every point of its grid, as
peftsweep's grid makes them), has the base model answer the judged prompts once, then calls
`trainers.worker.train` on every configuration, `--processes` at a time, in a
`multiprocessing` pool (spawned processes, each reused for the next training). No Ray, no results
store, no checkpoints, no report. It prints one JSON line of timings (time.time() seconds), which
`benchmarks/overhead.py` reads.
"""

from __future__ import annotations

import time

LAUNCHED = time.time()  # before the heavy imports

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):  # run as a file: python benchmarks/plain_sweep.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def grid_configs(spec: Any) -> list[Any]:
    """Every grid point's trial configuration."""
    names = list(spec.search.space)
    values = [spec.search.space[n].values for n in names]
    return [spec.trial_config(dict(zip(names, combo))) for combo in itertools.product(*values)] * spec.search.num_samples


def base_answers(config: Any) -> dict[str, Any]:
    from trainers.worker import baseline_answers

    started = time.time()
    answers = baseline_answers(config).answers
    return {"answers": answers, "started": started, "ended": time.time()}


def train_one(config: Any, baseline: list[str]) -> dict[str, Any]:
    """One training, its per-epoch reports dropped (nothing is stored or checkpointed)."""
    from trainers.worker import train

    started = time.time()
    reports: list[dict[str, Any]] = []
    result = train(config, baseline, lambda metrics, save: reports.append(metrics))
    last = reports[-1] if reports else {}
    return {
        "status": result.status.value, "started": started, "ended": time.time(),
        "train_seconds": last.get("train_seconds", 0.0), "eval_seconds": last.get("eval_seconds", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a sweep file with a grid")
    parser.add_argument("--processes", type=int, default=2, help="trainings at a time (default 2)")
    args = parser.parse_args()

    from hpo.spec import load_sweep

    spec = load_sweep(args.sweep).spec
    configs = grid_configs(spec)
    ready = time.time()
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        baseline = pool.apply(base_answers, (spec.trial_config({}),))
        trainings = pool.starmap(train_one, [(c, baseline["answers"]) for c in configs], chunksize=1)
    print(json.dumps({"launched": LAUNCHED, "ready": ready, "baseline": baseline | {"answers": None}, "trainings": trainings, "ended": time.time()}))


if __name__ == "__main__":
    main()
