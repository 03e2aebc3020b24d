"""Search efficiency: the compute TPE + ASHA spends to come within reach of the full grid's best,
as a share of the grid's compute, over several seeds.

1. The grid: a generated sweep file (learning rate x LoRA rank x alpha per rank on the built-in
   tiny model, every configuration trained EPOCHS epochs) runs through the real `peftsweep run`.
   Its results store holds every configuration's win rate, eval perplexity and cumulative train +
   eval seconds after each epoch: the grid's compute, and the best win rate and perplexity it found.
2. The search: for each seed and each objective (win rate, then eval perplexity), peftsweep's own
   Tune setup (`hpo.driver.make_tuner`: Optuna's TPE through Ray Tune's OptunaSearch, Ray Tune's ASHA
   with grace period 1 and the sweep's default reduction factor, 2 trials at a time) searches the same space, with
   one stand-in in place of the training worker: `replay_trial` reports, epoch by epoch, what the
   grid measured for the configuration TPE proposed, and waits a hundredth of that epoch's seconds
   (so results arrive in about the order real trainings would report them). Everything but the
   training is real; the grid's per-epoch results are reused instead of training again per seed.

The compute a search needed is the train + eval seconds of every epoch reported until the first one
within 2 points of the grid's best win rate (or within 1 % of its best perplexity); the ratio is its
median over seeds divided by the grid's total. A seed that never gets there counts as infinite. The
same in FLOPs (train + eval FLOPs, trainers.flops): the compute itself, which no machine's load moves.

    .venv/bin/python -m benchmarks.search_efficiency [--seeds 5] [--samples 12] [--epochs 4] [--keep-grid DIR] [--quick]
    .venv/bin/python -m benchmarks.search_efficiency --grid-store DIR/grid/results.db --seeds 10   # replay a kept grid
    .venv/bin/python -m benchmarks.search_efficiency --grid-store ... --reduction-factor 2 --startup-trials 3   # other settings
"""

from __future__ import annotations

import heapq
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/search_efficiency.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # first: its clock starts at import

from ray.tune import Callback  # noqa: E402  (Ray reads RAY_TMPDIR when it starts, not at import)

SPACE = {"learning_rate": [1e-4, 1e-3, 1e-2], "lora_r": [4, 16], "lora_alpha_per_rank": [1, 4]}  # 12 configurations
QUICK_SPACE = {"learning_rate": [1e-3, 1e-2], "lora_r": [4]}
WIN_RATE_POINTS = 0.02  # "within 2 points of win rate": win rates are fractions
PPL_FRACTION = 0.01
TIME_SCALE = 0.01  # replay_trial waits this fraction of each epoch's measured seconds
TABLE: dict[tuple, list[dict[str, float]]] = {}  # set before the Tuner pickles replay_trial (by value: it lives in __main__)


def key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((name, float(value)) for name, value in params.items()))


def replay_trial(params, spec, baseline):
    """Stands in for hpo.trial.run_trial: reports the grid's measured epochs of this configuration."""
    from ray import tune

    for row in TABLE[key(params)]:
        time.sleep(row["epoch_compute"] * TIME_SCALE)
        tune.report({k: row[k] for k in ("epoch", "win_rate", "eval_ppl", "compute", "flops")})


def grid_sweep(folder: Path, source: str, space: dict[str, list], epochs: int, num_prompts: int, max_new_tokens: int) -> Path:
    return common.write_sweep(folder / "search_grid.yaml", {
        "description": f"search efficiency benchmark: the full grid, {epochs} epochs each",
        "data": {"source": source},
        "train": {"epochs": epochs},
        "search": {"algorithm": "grid", "space": {n: {"grid": v} for n, v in space.items()}, "max_concurrent_trials": 2},
        "objectives": [{"metric": "win_rate", "mode": "max"}],
        "eval": {"num_prompts": num_prompts, "max_new_tokens": max_new_tokens},
        "resources": {"cpus_per_trial": 1},
    })


def grid_table(db: Path) -> tuple[dict[tuple, list[dict[str, float]]], dict[str, Any]]:
    """Per configuration, its epochs (win rate, perplexity, cumulative compute), and the grid's totals."""
    trials, epochs = common.read_store(db)
    params = {t["trial_id"]: t["params"] for t in trials}
    table: dict[tuple, list[dict[str, float]]] = {}
    for e in epochs:
        rows = table.setdefault(key(params[e["trial_id"]]), [])
        compute = e["train_seconds"] + e["eval_seconds"]
        flops = (e["train_flops"] or 0.0) + (e["eval_flops"] or 0.0)  # 0: a grid stored before FLOPs were counted
        rows.append({"epoch": e["epoch"], "win_rate": e["win_rate"], "eval_ppl": e["eval_ppl"], "compute": compute,
                     "flops": flops, "epoch_compute": compute - (rows[-1]["compute"] if rows else 0.0)})
    rows = [r for rs in table.values() for r in rs]
    grid = {
        "configurations": len(table),
        "epochs": max(r["epoch"] for r in rows),
        "compute": sum(rs[-1]["compute"] for rs in table.values()),
        "flops": sum(rs[-1]["flops"] for rs in table.values()),
        "best_win_rate": max(r["win_rate"] for r in rows),
        "best_eval_ppl": min(r["eval_ppl"] for r in rows),
        "space": {n: sorted({p[n] for p in params.values()}) for n in next(iter(params.values()))},
    }
    return table, grid


class Trace(Callback):
    """Every reported epoch, in the order the driver received them."""

    def __init__(self):
        self.results: list[dict[str, Any]] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results.append({"trial_id": trial.trial_id, **{k: result[k] for k in ("epoch", "win_rate", "eval_ppl", "compute", "flops")}})


def search(
    grid: dict[str, Any], objective: str, seed: int, samples: int, work: Path, startup: int | None = None,
    reduction_factor: float | None = None,
) -> list[dict[str, Any]]:
    """One TPE + ASHA search of the grid's space through peftsweep's Tune setup; the trace of its results."""
    from hpo.driver import make_tuner
    from hpo.spec import SweepSpec

    spec = SweepSpec.model_validate({
        "train": {"epochs": grid["epochs"]},
        "search": {"algorithm": "tpe", "space": {n: {"grid": v} for n, v in grid["space"].items()}, "num_samples": samples,
                   "max_concurrent_trials": 2, "seed": seed, "startup_trials": startup},
        "scheduler": {"name": "asha", "grace_period": 1, **({"reduction_factor": reduction_factor} if reduction_factor else {})},
        "objectives": [{"metric": objective, "mode": "max" if objective == "win_rate" else "min"}],
    })
    trace = Trace()
    run_dir = work / f"{objective}_{seed}"
    run_dir.mkdir()
    results = make_tuner(spec, [], run_dir, [trace], trial=replay_trial).fit()  # the trial is the only thing replaced
    if results.errors:
        sys.exit(f"search {objective} seed {seed}: {len(results.errors)} trials failed: {results.errors[0]}")
    return trace.results


def compute_to_reach(trace: list[dict[str, Any]], reached: Any, unit: str = "compute") -> tuple[float, float]:
    """Compute spent (each trial's epochs as reported, in arrival order) until the first result that
    `reached` accepts (infinite if none did), and the search's whole compute; `unit`: "compute"
    (train + eval seconds) or "flops"."""
    spent, so_far, until = 0.0, {}, math.inf
    for r in trace:
        spent += r[unit] - so_far.get(r["trial_id"], 0.0)
        so_far[r["trial_id"]] = r[unit]
        if until == math.inf and reached(r):
            until = spent
    return until, spent


LABELS = {"win_rate": "win rate", "eval_ppl": "perplexity"}  # each objective, as the tables name it
REFERENCE_ORDERS = 2000  # random orders the reference takes the median of
REFERENCE_SLOTS = 2  # trials at a time, as the searches run


def random_order_trace(
    table: dict[tuple, list[dict[str, float]]], order: list[tuple], objective: str, reduction_factor: float | None = None,
    keep: frozenset[tuple] = frozenset(), slots: int = REFERENCE_SLOTS,
) -> list[dict[str, Any]]:
    """The results a search would report that proposes `order` (distinct configurations), `slots` at a time.

    Simulated from the grid's table without a Ray runtime: each epoch takes its measured seconds.
    Early stopping is Ray Tune's own ASHA rule on `objective` (its `_Bracket`, with the sweep's
    grace period of 1), or, without a `reduction_factor`, a perfect one: every configuration not in
    `keep` stops after its first epoch.
    """
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    epochs = len(next(iter(table.values())))
    bracket = _Bracket(min_t=1, max_t=epochs, reduction_factor=reduction_factor, s=0) if reduction_factor else None
    sign = -1.0 if objective == "eval_ppl" else 1.0  # as ASHAScheduler's mode "min" / "max"
    queue, running, trace = list(order), [], []  # running: (time its next epoch ends, slot, config, epoch index)

    def start(now: float, slot: int) -> None:
        if queue:
            config = queue.pop(0)
            heapq.heappush(running, (now + table[config][0]["epoch_compute"], slot, config, 0))

    for slot in range(slots):
        start(0.0, slot)
    while running:
        now, slot, config, i = heapq.heappop(running)
        row = table[config][i]
        trace.append({"trial_id": str(config), **row})
        if bracket is None:
            stopped = i == 0 and config not in keep
        else:
            trial = SimpleNamespace(trial_id=str(config))  # what _Bracket reads of a trial
            stopped = bracket.on_result(trial, row["epoch"], sign * row[objective]) == TrialScheduler.STOP
        if i + 1 < len(table[config]) and not stopped:
            heapq.heappush(running, (now + table[config][i + 1]["epoch_compute"], slot, config, i + 1))
        else:
            start(now, slot)
    return trace


def random_orders(
    table: dict[tuple, list[dict[str, float]]], grid: dict[str, Any], objective: str, reached: Any, reduction_factor: float,
) -> dict[str, float]:
    """What a search that proposes the grid's configurations in a random order, each once, would need:
    the median share of the grid's compute (seconds) until it comes within reach, with Ray Tune's
    ASHA rule and with a perfect one (every configuration that never comes within reach stops after
    its first epoch). A reference for the searches' figures: not a Ray Tune run."""
    good = frozenset(config for config, rows in table.items() if any(reached(r) for r in rows))
    rng = random.Random(0)
    shares: dict[str, list[float]] = {"asha": [], "perfect": []}
    configs = list(table)
    for _ in range(REFERENCE_ORDERS):
        order = rng.sample(configs, len(configs))
        for rule, trace in (("asha", random_order_trace(table, order, objective, reduction_factor)),
                            ("perfect", random_order_trace(table, order, objective, keep=good))):
            shares[rule].append(compute_to_reach(trace, reached)[0] / grid["compute"])
    return {rule: common.median(values) for rule, values in shares.items()}


def summarize(
    grid: dict[str, Any], traces: dict[str, dict[int, list[dict[str, Any]]]],
    table: dict[tuple, list[dict[str, float]]] | None = None, reduction_factor: float | None = None,
) -> dict[str, Any]:
    """The ratios and each seed's figures; with `table` and ASHA's `reduction_factor`, the random-order reference too."""
    targets = {
        "win_rate": (lambda r: r["win_rate"] >= grid["best_win_rate"] - WIN_RATE_POINTS - 1e-9,
                     f"within 2 points of the grid's best win rate ({grid['best_win_rate']:.2f})"),
        "eval_ppl": (lambda r: r["eval_ppl"] <= grid["best_eval_ppl"] * (1 + PPL_FRACTION),
                     f"within 1 % of the grid's best eval perplexity ({grid['best_eval_ppl']:.3f})"),
    }
    seeds, ratios, references = [], [], {}
    for objective, by_seed in traces.items():
        reached, describe = targets[objective]
        if table is not None and reduction_factor:
            references[objective] = random_orders(table, grid, objective, reached, reduction_factor)
        shares, flop_shares = [], []
        for seed, trace in by_seed.items():
            until, total = compute_to_reach(trace, reached)
            until_flops, _ = compute_to_reach(trace, reached, "flops")
            shares.append(until / grid["compute"])
            flop_shares.append(until_flops / grid["flops"] if grid["flops"] else math.nan)
            seeds.append({
                "objective": objective, "seed": seed, "trials": len({r["trial_id"] for r in trace}), "epochs": len(trace),
                "compute_to_target": until, "search_compute": total, "share_of_grid": until / grid["compute"],
                "search_share_of_grid": total / grid["compute"], "flops_share_of_grid": flop_shares[-1],
            })
        label = LABELS[objective]
        ratios.append(common.ratio(
            f"search efficiency, {label}", common.median(shares), "<=", 0.25,
            f"median over {len(shares)} seeds of the compute TPE + ASHA spent to come {describe}, / the grid's compute (seconds)",
        ))
        ratios.append(common.ratio(
            f"search efficiency, {label}, FLOPs", common.median(flop_shares), "<=", 0.25,
            "the same in train + eval FLOPs",
        ))
    return {"ratios": ratios, "grid": grid, "seeds": seeds, "random_order": references}


def render(result: dict[str, Any]) -> str:
    g = result["grid"]
    rows = [
        [s["objective"], s["seed"], s["trials"], s["epochs"],
         "never" if math.isinf(s["compute_to_target"]) else f"{s['compute_to_target']:.1f}", f"{s['search_compute']:.1f}",
         "never" if math.isinf(s["share_of_grid"]) else f"{s['share_of_grid']:.3f}", f"{s['search_share_of_grid']:.3f}",
         "never" if math.isinf(s["flops_share_of_grid"]) else f"{s['flops_share_of_grid']:.3f}"]
        for s in result["seeds"]
    ]
    space = " x ".join(f"{n} {v}" for n, v in g["space"].items())
    return "\n".join([
        common.header("Search efficiency: TPE + ASHA vs the full grid, on the same space", result),
        "",
        common.ratio_table(result["ratios"]),
        "",
        *_random_order_lines(result),
        f"grid: {g['configurations']} configurations ({space}) x {g['epochs']} epochs, {g['compute']:.0f} train + eval seconds, {g['flops']:.3g} FLOPs; "
        f"best win rate {g['best_win_rate']:.2f}, best eval perplexity {g['best_eval_ppl']:.3f} (over every epoch)",
        "",
        common.table(["objective", "seed", "trials", "epochs reported", "compute to target, s", "search's compute, s",
                      "to target / grid", "search / grid", "to target / grid, FLOPs"], rows),
    ])


def _random_order_lines(result: dict[str, Any]) -> list[str]:
    references = result.get("random_order") or {}
    if not references:
        return []
    shares = "; ".join(
        f"{LABELS[objective]} {r['asha']:.3f} with ASHA's rule, {r['perfect']:.3f} with perfect early stopping"
        for objective, r in references.items()
    )
    return [f"for reference, a search that proposes every configuration once in a random order, {REFERENCE_SLOTS} at a time "
            f"(simulated from the grid's results, median of {REFERENCE_ORDERS} orders, seconds / the grid's): {shares}", ""]


def main() -> None:
    global TABLE
    p = common.parser(__doc__)
    p.add_argument("--seeds", type=int, default=5, help="search seeds per objective, default 5")
    p.add_argument("--samples", type=int, help="trials TPE proposes per search (default: as many as the grid has)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of every grid configuration and ASHA's max_t, default 4")
    p.add_argument("--records", type=int, help="use the first N records of the built-in task (default: all 800)")
    p.add_argument("--keep-grid", type=Path, metavar="DIR", help="run the grid in DIR (a --runs-dir) and keep it there (default: deleted)")
    p.add_argument("--grid-store", type=Path, help="reuse a kept grid run's results.db instead of running the grid")
    p.add_argument("--startup-trials", type=int, help="TPE's random trials before it models results (default: the sweep's default)")
    p.add_argument("--reduction-factor", type=float, help="ASHA's reduction factor (default: the sweep's default)")
    args = p.parse_args()
    from hpo.spec import SchedulerSpec

    space, prompts, new_tokens = SPACE, 50, 32
    if args.quick:
        args.seeds, args.samples, args.epochs, args.records = 2, 3, 2, args.records or 40
        space, prompts, new_tokens = QUICK_SPACE, 4, 8

    common.quiet()
    info = common.machine()
    common.ensure_model()
    work = Path(tempfile.mkdtemp(prefix="search_efficiency-"))
    try:
        grid_seconds = None
        if args.grid_store is None:
            sweep = grid_sweep(work, common.tinyworld_records(work, args.records), space, args.epochs, prompts, new_tokens)
            runs = args.keep_grid or work / "runs"
            common.log(f"grid: peftsweep run (in {runs}) ...")
            with common.private_ray() as env:
                cmd = common.peftsweep_cmd("run", str(sweep), "--name", "grid", "--runs-dir", str(runs), "--overwrite")
                timed = common.check(common.run_timed(cmd, env), "peftsweep run")
            grid_seconds = timed.seconds
            args.grid_store = runs / "grid" / "results.db"
            common.log(f"grid: done in {timed.seconds:.0f} s")
        TABLE, grid = grid_table(args.grid_store)
        grid["makespan"] = grid_seconds
        samples = args.samples or grid["configurations"]

        # One private Ray for every search: no other `ray.init()` on this machine finds and joins it.
        with common.private_ray() as env:
            os.environ["RAY_TMPDIR"] = env["RAY_TMPDIR"]
            import ray

            from hpo.runtime import init_ray

            init_ray(None)
            traces: dict[str, dict[int, list[dict[str, Any]]]] = {"win_rate": {}, "eval_ppl": {}}
            try:
                for objective in traces:
                    for seed in range(args.seeds):
                        common.log(f"search {objective} seed {seed} ...")
                        traces[objective][seed] = search(grid, objective, seed, samples, work, args.startup_trials, args.reduction_factor)
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "search_efficiency",
        **summarize(grid, traces, TABLE, args.reduction_factor or SchedulerSpec().reduction_factor),
        "machine": common.finish_machine(info),
        "sizes": vars(args) | {"json": None, "grid_store": str(args.grid_store)},
        "sizes_text": f"grid of {grid['configurations']} LoRA configurations x {grid['epochs']} epochs on {args.records or 800} "
        f"records of the built-in task ({prompts} judged prompts; "
        f"{f'the grid run took {grid_seconds:.0f} s' if grid_seconds else 'from --grid-store'}); TPE + ASHA: {samples} trials per search, "
        f"ASHA's reduction factor {args.reduction_factor or SchedulerSpec().reduction_factor:g}, "
        f"{args.seeds} seeds per objective, replayed from the grid's results",
        "seconds": time.monotonic() - common.STARTED,
    }
    common.emit(result, render, args.json)


if __name__ == "__main__":
    main()
