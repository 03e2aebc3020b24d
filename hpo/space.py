"""The sweep's search in Ray Tune's terms: the parameter space, the searcher and the scheduler.

Ray Tune and Optuna do the searching and scheduling; this module only translates the spec.
"""

from __future__ import annotations

import math
from typing import Any

from hpo.spec import VARIANT, Dimension, SweepSpec, coerce_value


def tune_dimension(dim: Dimension, name: str, algorithm: str) -> Any:
    from ray import tune

    if dim.kind == "grid":
        values = [coerce_value(name, v) for v in dim.values]
        return tune.grid_search(values) if algorithm in ("grid", "random") else tune.choice(values)
    if dim.kind == "choice":
        return tune.choice([coerce_value(name, v) for v in dim.values])
    low, high = dim.values
    return {"uniform": tune.uniform, "loguniform": tune.loguniform}[dim.kind](low, high) if dim.kind != "int" else tune.randint(low, high + 1)


def _define_by_run(spec: SweepSpec) -> bool:
    """Optuna samples the space itself (define-by-run) when some parameters exist only for some methods."""
    return bool(spec.search.conditional) and spec.search.algorithm != "grid"


def search_alg(spec: SweepSpec, max_concurrent: int | None = None) -> Any:
    """Ray Tune's searcher for the spec: its basic generator (grid, random) or Optuna's samplers.
    `max_concurrent`: trials at once (default search.max_concurrent_trials; hpo.packs.concurrent_trials with packing)."""
    search = spec.search
    if search.algorithm in ("tpe", "nsga2") or _define_by_run(spec):
        import optuna

        from hpo.searchers import OptunaSearchOnce

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = {
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=search.seed),
            "tpe": lambda: optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.startup_trials or 10),
            "random": lambda: optuna.samplers.RandomSampler(seed=search.seed),
        }[search.algorithm]()
        space = _optuna_space(spec) if _define_by_run(spec) else None
        if spec.multi_objective:
            metric, mode = [o.metric for o in spec.objectives], [o.mode for o in spec.objectives]
        else:
            metric, mode = spec.tune_objective.metric, spec.tune_objective.mode
        return OptunaSearchOnce(space=space, metric=metric, mode=mode, sampler=sampler, space_size=space_size(spec))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune applies TuneConfig.max_concurrent_trials only to a Searcher; this generator takes its own limit.
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=(max_concurrent or search.max_concurrent_trials) or 0)


def space_size(spec: SweepSpec) -> int | None:
    """How many configurations a space of grids and choices holds; None when it is not finite."""
    if _define_by_run(spec) or any(dim.kind not in ("grid", "choice") for dim in spec.search.space.values()):
        return None
    return math.prod(len(dim.values) for dim in spec.search.space.values())


def _optuna_space(spec: SweepSpec) -> Any:
    """A define-by-run space: the method first, then the space, then that method's own parameters."""

    def suggest(trial: Any, name: str, dim: Dimension) -> Any:
        if dim.kind in ("grid", "choice"):
            return trial.suggest_categorical(name, list(dim.values))
        low, high = dim.values
        if dim.kind == "int":
            return trial.suggest_int(name, int(low), int(high))
        return trial.suggest_float(name, low, high, log=dim.kind == "loguniform")

    def space(trial: Any) -> None:
        method = spec.train.method
        for name, dim in spec.search.space.items():
            value = suggest(trial, name, dim)
            if name == "method":
                method = value
        for name, dim in spec.search.conditional.get(method, {}).items():
            suggest(trial, name, dim)

    return space


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The searched values in Ray Tune's terms; folded epochs are not searched (one training answers them all).

    With conditional parameters, a grid searches one parameter of method variants (each method with
    each combination of its own values), and Optuna samples the space itself (define-by-run).
    """
    from ray import tune

    if _define_by_run(spec):
        return {}
    folded = spec.folded_epochs is not None
    space = {
        name: tune_dimension(dim, name, spec.search.algorithm)
        for name, dim in spec.search.space.items()
        if not (folded and name == "epochs") and not (name == "method" and spec.search.conditional)
    }
    if spec.search.conditional:
        space[VARIANT] = tune.grid_search(spec.method_variants())
    return space


def scheduler(spec: SweepSpec) -> Any:
    """ASHA at the sweep's rungs (by epoch), or None for FIFO: every trial runs all its epochs."""
    if spec.scheduler.name != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    objective = spec.tune_objective
    return ASHAScheduler(
        time_attr="epoch",
        metric=objective.metric,
        mode=objective.mode,
        max_t=max_epochs(spec),
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def max_epochs(spec: SweepSpec) -> int:
    dim = spec.search.space.get("epochs")
    if dim is None:
        return spec.train.epochs
    return int(max(dim.values)) if dim.kind in ("grid", "choice") else int(dim.values[1])


# Train fields that must be equal within a pack (trainers.methods.pack_key); the others may differ.
PACK_SPLITTING = ("target_modules", "precision", "gradient_checkpointing", "qlora_compute_dtype", "packing")


def packing_plan(spec: SweepSpec) -> str | None:
    """How the sweep's trials will be packed (resources.pack), in one line for `validate` and `run`; None unpacked."""
    from trainers.methods import METHODS

    size = spec.resources.pack
    if size == 1:
        return None
    if spec.train.packing and "packing" not in spec.searched:
        return f"resources.pack {size}: every trial runs alone, as train.packing (several examples in one row) does not combine with packed trials yet"
    methods = spec.methods_tried()
    packable = [m for m in methods if METHODS[m].packable]
    says = [f"packed trials: up to {size} configurations train together in one worker, on one shared base model"]
    alone = [m for m in methods if m not in packable]
    if alone:
        says.append(f"{', '.join(alone)} trials run alone (only {', '.join(m for m in METHODS if METHODS[m].packable)} configurations pack)")
    split = [name for name in spec.searched if name in PACK_SPLITTING]
    if len(packable) > 1:
        split.append("method (lora and qlora load different bases)")
    if split:
        says.append(f"configurations that differ in {', '.join(split)} go to different packs")
    return "; ".join(says)
