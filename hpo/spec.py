"""Sweep files: YAML + `--set` overrides -> a validated `SweepSpec`.

Every problem is raised as one `SweepError` line that names the file, the key and the fix.
"""

from __future__ import annotations

import builtins
import difflib
import itertools
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpo.errors import SweepError
from trainers.config import (
    ConstraintConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    ResourceConfig,
    TrainConfig,
    TrialConfig,
    numbers_not_booleans,
)
from trainers.methods import METHOD_PARAMS, METHODS
from trainers.vocabulary import COST_METRICS, QUALITY_METRICS

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    _numbers_not_booleans = field_validator("*", mode="before")(numbers_not_booleans)


class Dimension(_Strict):
    """One searched parameter: exactly one of the keys below."""

    grid: list[Any] | None = Field(None, description="every value is tried (Cartesian product with other grids)")
    choice: list[Any] | None = Field(None, description="one value sampled per trial")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], sampled uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], sampled on a log scale")
    int: tuple[builtins.int, builtins.int] | None = Field(None, description="[low, high], an integer sampled uniformly, both ends included")

    @model_validator(mode="after")
    def _one_kind(self) -> "Dimension":
        kinds = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of {', '.join(type(self).model_fields)} (got {', '.join(kinds) or 'none'})")
        values = getattr(self, kinds[0])
        if kinds[0] in ("grid", "choice") and not values:
            raise ValueError(f"empty {kinds[0]}: list at least one value")
        if kinds[0] in ("uniform", "loguniform", "int") and not values[0] < values[1]:
            raise ValueError(f"{kinds[0]} range [{values[0]}, {values[1]}] is empty: low must be below high")
        if kinds[0] == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform needs a positive low end")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)


class SearchSpec(_Strict):
    algorithm: Literal["grid", "random", "tpe", "nsga2"] = Field(
        "grid",
        description="grid: every grid point; random: Ray Tune's sampler; tpe: Optuna's TPE (multi-objective with "
        "several per-trial objectives); nsga2: Optuna's NSGA-II, multi-objective",
    )
    space: dict[str, Dimension] = Field(default_factory=dict, description="searched fields of `train`, each a Dimension")
    conditional: dict[str, dict[str, Dimension]] = Field(
        default_factory=dict,
        description="per method: fields of `train` searched only in trials of that method (e.g. lora: {lora_r: ...}, prefix: {num_virtual_tokens: ...})",
    )
    num_samples: int = Field(1, ge=1, description="trials for random/tpe; repeats of the whole grid for grid")
    max_concurrent_trials: int | None = Field(None, ge=1, description="cap on trials running at once (default: as resources allow)")
    seed: int = Field(0, description="seed of the search algorithm")
    startup_trials: int | None = Field(
        None, ge=1,
        description="tpe: trials proposed at random before TPE models the results (Optuna's n_startup_trials, default 10)",
    )
    time_budget_s: float | None = Field(None, gt=0, description="wall-clock budget of the sweep; when spent, running trials stop and no new one starts")
    gpu_hours_budget: float | None = Field(None, gt=0, description="GPU-hours budget over all trials; when spent, running trials stop and no new one starts")
    fold_epochs: bool = Field(True, description="grid over epochs: train each configuration once, to the largest value, and read every smaller one off its epochs")
    max_retries: int = Field(1, ge=0, description="restarts of a trial whose process or node was lost, from its last epoch; errors in training itself are not retried")
    keep_best_k: int = Field(1, ge=1, description="checkpoints (adapters) each trial keeps: its best epochs by the first per-epoch objective, plus its latest")
    max_trials: int = Field(1000, ge=1, description="refuse a sweep of more trials than this (a guard against a mistyped grid); raise it to run more")


class SchedulerSpec(_Strict):
    name: Literal["fifo", "asha"] = Field("fifo", description="fifo: run every trial to the end; asha: stop weak trials early")
    grace_period: int = Field(1, ge=1, description="asha: epochs every trial gets before it can be stopped")
    reduction_factor: float = Field(4, gt=1, description="asha: keep 1/reduction_factor of trials at each rung")


OBJECTIVE_METRICS = (*QUALITY_METRICS, *COST_METRICS)  # what a sweep can optimize: a quality or a cost


class Objective(_Strict):
    metric: Literal[OBJECTIVE_METRICS]
    mode: Literal["min", "max"]


class CostSpec(_Strict):
    usd_per_gpu_hour: float = Field(0.0, ge=0, description="price of one GPU-hour, for cost_usd")


# The report's cost axes, and the metric each reads.
COST_AXES = {"flops": "train_flops", "gpu_hours": "gpu_hours", "cost_usd": "cost_usd", "train_seconds": "train_seconds"}


class ReportSpec(_Strict):
    cost_axis: Literal[tuple(COST_AXES)] | None = Field(
        None,
        description="what a configuration costs in the report: flops (training compute, the same on any machine), "
        "gpu_hours, cost_usd or train_seconds (time measured on that machine); default gpu_hours when trials held GPUs, else flops",
    )
    min_saving: float = Field(
        0.2, gt=0, lt=1, description="a cheaper trial is recommended only if it saves at least this share of the best trial's cost"
    )
    margin: float | None = Field(
        None,
        gt=0,
        lt=0.5,
        description="win rate: call a cheaper trial 'as good as' the best only if the 95% interval of their paired difference "
        "lies above -margin (at least 10 shared prompts); default: recommend it when it is not significantly worse (sign test)",
    )


class MlflowTracking(_Strict):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI: a server (http://host:5000), a database (sqlite:///path/mlflow.db) or databricks; "
        "default sqlite:///runs/<name>/mlflow.db in the run folder",
    )
    experiment: str | None = Field(None, min_length=1, description="the MLflow experiment, created when missing; default the run's name")


class WandbTracking(_Strict):
    project: str = Field(min_length=1, description="the Weights & Biases project; WANDB_MODE=offline keeps the runs in runs/<name>/wandb")
    entity: str | None = Field(None, min_length=1, description="the W&B team or user; default the API key's own")


class TrackingSpec(_Strict):
    mlflow: MlflowTracking | None = Field(
        None,
        description="mirror the sweep into MLflow: a parent run, and a child run per trial with its parameters, per-epoch metrics, "
        "status and best adapter's path (`mlflow: {}` for the defaults); off when absent",
    )
    wandb: WandbTracking | None = Field(
        None, description="log every trial to Weights & Biases through Ray Tune's integration (pip install 'peftsweep[wandb]'); off when absent"
    )


class SweepSpec(_Strict):
    description: str = Field("", description="one line on what the sweep asks")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = Field(TrainConfig(), description="fixed training values; searched ones are overridden per trial")
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="win_rate", mode="max"), Objective(metric="train_flops", mode="min")],
        min_length=1,
        description="what is optimized; the first per-epoch metric (win_rate or eval_ppl) drives search and early stopping",
    )
    eval: EvalConfig = EvalConfig()
    resources: ResourceConfig = ResourceConfig()
    constraints: ConstraintConfig = ConstraintConfig()
    cost: CostSpec = CostSpec()
    report: ReportSpec = ReportSpec()
    tracking: TrackingSpec = Field(
        TrackingSpec(), description="experiment trackers the sweep also writes to (an Optuna study, runs/<name>/optuna.db, is always kept)"
    )
    storage: str | None = Field(
        None,
        description="where Ray Tune keeps checkpoints (adapters) and experiment state: a path every node sees, or an "
        "object-store URI such as s3://bucket/prefix; default runs/<name>/tune next to the store",
    )

    @classmethod
    def from_store(cls, stored: dict[str, Any], path: Path) -> "SweepSpec":
        """The spec a results store at `path` recorded (Store.sweep()["spec"]), validated again."""
        try:
            return cls.model_validate({k: v for k, v in stored.items() if k != "overrides"})
        except ValidationError as exc:  # a damaged store, or one of another version
            error = exc.errors()[0]
            first = f"{'.'.join(str(p) for p in error['loc']) or '(top level)'}: {error['msg']}"
            raise SweepError(f"{path}: damaged results store: its sweep spec does not validate ({first}); "
                             f"start the sweep over with peftsweep run SWEEP --name {path.parent.name} --overwrite") from None

    @property
    def multi_objective(self) -> bool:
        """Optuna searches several objectives at once (tpe or nsga2 with more than one objective)."""
        return self.search.algorithm in ("tpe", "nsga2") and len(self.objectives) > 1

    @property
    def folded_epochs(self) -> list[int] | None:
        """The epochs values one training answers, when epochs are folded (see README: epochs as a budget)."""
        dim = self.search.space.get("epochs")
        if dim is None or dim.kind != "grid" or not self.search.fold_epochs or self.search.algorithm != "grid":
            return None
        if self.decaying_schedule:
            return None  # the learning rate at epoch k depends on the total: each epochs value trains on its own
        return sorted({int(v) for v in dim.values})

    @property
    def decaying_schedule(self) -> bool:
        """Some trial's learning rate decays over its total steps (linear or cosine), so its epochs cannot be folded."""
        dim = self.search.space.get("lr_schedule")
        schedules = [str(v) for v in dim.values] if dim is not None and dim.kind in ("grid", "choice") else [self.train.lr_schedule]
        schedules += [str(v) for space in self.search.conditional.values() for n, d in space.items() if n == "lr_schedule" for v in d.values]
        return any(s != "constant" for s in schedules)

    @property
    def num_trainings(self) -> int:
        """Trials the sweep runs: grid points (folded epochs count once) x num_samples, or num_samples."""
        if self.search.algorithm != "grid":
            return self.search.num_samples
        sizes = [
            len(d.values)
            for name, d in self.search.space.items()
            if not (name == "epochs" and self.folded_epochs) and not (name == "method" and self.search.conditional)
        ]
        return math.prod(sizes) * len(self.method_variants()) * self.search.num_samples

    @property
    def searched(self) -> list[str]:
        """Every searched train field: the space's, then the conditional ones."""
        names = list(self.search.space)
        for space in self.search.conditional.values():
            names += [n for n in space if n not in names]
        return names

    def methods_tried(self) -> list[str]:
        dim = self.search.space.get("method")
        return [str(v) for v in dim.values] if dim is not None and dim.kind in ("grid", "choice") else [self.train.method]

    @property
    def quantizes(self) -> bool:
        """Whether some trial of this sweep loads its base model quantized (qlora): its workers need bitsandbytes."""
        return any(METHODS[method].quantized for method in self.methods_tried())

    def method_variants(self) -> list[dict[str, Any]]:
        """Grid search with conditional parameters: every method with every combination of its own grids."""
        if not self.search.conditional:
            return [{}]
        variants = []
        for method in self.methods_tried():
            space = self.search.conditional.get(method, {})
            names = list(space)
            for combo in itertools.product(*(space[n].values for n in names)):
                variants.append({"method": method, **dict(zip(names, combo))})
        return variants

    @property
    def tune_objective(self) -> Objective:
        """The objective Ray Tune's searcher and scheduler optimize: the first per-epoch one."""
        return next(o for o in self.objectives if o.metric in QUALITY_METRICS)

    def trial_config(self, params: dict[str, Any]) -> TrialConfig:
        """The full configuration of one trial with searched `params`."""
        params = flatten_params(params)
        if self.folded_epochs and "epochs" not in params:
            params = {**params, "epochs": max(self.folded_epochs)}
        return TrialConfig(
            model=self.model,
            data=self.data,
            train=TrainConfig(**{**self.train.model_dump(), **params}),
            eval=self.eval,
            resources=self.resources,
            constraints=self.constraints,
        )


@dataclass(frozen=True)
class Sweep:
    """A loaded sweep: its name, where it came from, and its validated spec."""

    name: str
    path: Path
    spec: SweepSpec
    raw: dict[str, Any]  # the YAML after overrides, as written by the user


# --- loading ----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that reads 1e-3 as a float (YAML 1.1 insists on a dot: 1.0e-3)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def sweeps_dir() -> Path:
    return Path(os.environ.get("PEFTSWEEP_SWEEPS", "sweeps"))


def available_sweeps() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))


def resolve_sweep(ref: str) -> Path:
    """A sweep named by path, or by its file's stem in `sweeps/`."""
    path = Path(ref)
    if path.is_file():
        return path
    candidate = sweeps_dir() / f"{ref}.yaml"
    if candidate.is_file():
        return candidate
    names = available_sweeps()
    close = difflib.get_close_matches(ref, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise SweepError(
        f"unknown sweep '{ref}': no file {ref} nor {candidate}; {hint}available: {', '.join(names) or 'none'}"
    )


def load_sweep(ref: str, overrides: list[str] = ()) -> Sweep:
    """Read, override and validate a sweep file; raise one SweepError line on any problem."""
    path = resolve_sweep(ref)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SweepError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SweepError(f"{where}: YAML syntax error: {problem}; fix the file's syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping of sections (model, train, search, ...), got {type(raw).__name__}")
    from_cli: set[str] = set()
    for item in overrides:
        key = apply_override(raw, item)
        from_cli.add(key)
    spec = _validate(raw, path, from_cli)
    return Sweep(name=path.stem, path=path, spec=spec, raw=raw)


def apply_override(raw: dict[str, Any], item: str) -> str:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SweepError(f"--set '{item}': expected KEY=VALUE with a dotted key, e.g. --set train.epochs=2")
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise SweepError(f"--set '{item}': '{prefix}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.load(value, Loader=_Loader) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value
    return key


def _validate(raw: dict[str, Any], path: Path, from_cli: set[str]) -> SweepSpec:
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise SweepError(describe_error(exc.errors()[0], path, from_cli, SweepSpec)) from None
    _check_space(spec, path)
    if not any(o.metric in QUALITY_METRICS for o in spec.objectives):
        raise SweepError(
            f"{path}: objectives: name at least one per-epoch metric ({' or '.join(QUALITY_METRICS)}) for the search to optimize"
        )
    greedy_only = sorted({"prefix", "prompt"} & set(spec.methods_tried()))
    if spec.eval.do_sample and greedy_only:
        raise SweepError(f"{path}: eval.do_sample: {', '.join(greedy_only)} tuning answers greedily only; drop do_sample or the method")
    if spec.search.algorithm == "nsga2" and len(spec.objectives) < 2:
        raise SweepError(f"{path}: search.algorithm 'nsga2' is multi-objective: list at least two objectives")
    axis = spec.report.cost_axis
    if axis in ("gpu_hours", "cost_usd") and not spec.resources.gpus_per_trial:
        raise SweepError(f"{path}: report.cost_axis: {axis} is 0 for trials that hold no GPU; set resources.gpus_per_trial or use flops")
    if axis == "cost_usd" and not spec.cost.usd_per_gpu_hour:
        raise SweepError(f"{path}: report.cost_axis: cost_usd needs a price; set cost.usd_per_gpu_hour or use gpu_hours")
    trials = spec.num_trainings
    if trials > spec.search.max_trials:
        raise SweepError(
            f"{path}: search: {trials} trials is more than search.max_trials ({spec.search.max_trials}); "
            f"shrink the grid or num_samples, or raise search.max_trials"
        )
    return spec


def describe_error(error: dict[str, Any], path: Path, from_cli: set[str], root: type[BaseModel]) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "(top level)"
    unknown = error["type"] == "extra_forbidden"  # --set trainer.epochs=2 is refused at 'trainer'
    origin = " (from --set)" if any(key == k or key.startswith(k + ".") or (unknown and k.startswith(key + ".")) for k in from_cli) else ""
    if unknown:
        valid = _fields_at(root, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"{path}: {key}{origin}: unknown key; {hint}"
    got = error.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{path}: {key}{origin}: {msg[0].lower() + msg[1:]}{shown}"


def _fields_at(model: Any, loc: list[str]) -> list[str]:
    """Valid keys of the section at `loc` (for 'did you mean')."""
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = model.model_fields[part].annotation
        elif typing.get_origin(model) is dict:
            model = typing.get_args(model)[1]
        elif typing.get_origin(model) is list:
            model = typing.get_args(model)[0]
        else:
            return []
        model = next((a for a in typing.get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)), model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _check_space(spec: SweepSpec, path: Path) -> None:
    """Every searched name is a train field and every value it can take is a valid one."""
    _check_dimensions(spec, spec.search.space, f"{path}: search.space", spec.train.model_dump())
    tried = spec.methods_tried()
    for name in spec.search.space:
        if name in METHOD_PARAMS and not any(METHODS[m].uses(name) for m in tried if m in METHODS):
            users = ", ".join(m for m, method in METHODS.items() if method.uses(name))
            verb = "does" if len(tried) == 1 else "do"
            raise SweepError(f"{path}: search.space.{name}: {' and '.join(tried)} {verb} not use {name} (it belongs to {users}); search it with a method that does")
    if "teacher" in spec.searched:
        raise SweepError(f"{path}: search: train.teacher is one per sweep (checked and resolved before Ray starts); set it in train")
    for method, space in spec.search.conditional.items():
        where = f"{path}: search.conditional.{method}"
        if method not in METHODS:
            close = difflib.get_close_matches(method, METHODS, n=1)
            raise SweepError(f"{where}: not a method; {f'did you mean {close[0]!r}?' if close else 'methods: ' + ', '.join(METHODS)}")
        if method not in tried:
            raise SweepError(f"{where}: method {method} is never tried; add it to search.space.method or set train.method")
        for name in space:
            if name in spec.search.space or name == "method":
                raise SweepError(f"{where}.{name}: already searched for every method in search.space; keep it in one place")
            if name in TrainConfig.model_fields and not METHODS[method].uses(name):
                own = ", ".join(METHODS[method].params) or "none"
                raise SweepError(f"{where}.{name}: {method} does not use {name} (its own parameters: {own}); search it under a method that does")
        _check_dimensions(spec, space, where, {**spec.train.model_dump(), "method": method})


def _check_dimensions(spec: SweepSpec, space: dict[str, Dimension], prefix: str, base: dict[str, Any]) -> None:
    fields = list(TrainConfig.model_fields)
    for name, dim in space.items():
        where = f"{prefix}.{name}"
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"searchable: {', '.join(fields)}"
            raise SweepError(f"{where}: not a field of train; {hint}")
        if spec.search.algorithm == "grid" and dim.kind != "grid":
            raise SweepError(
                f"{where}: search.algorithm 'grid' takes only grid values, not {dim.kind}; use 'grid: [...]' or algorithm random/tpe"
            )
        values = dim.values if dim.kind in ("grid", "choice") else list(dim.values)
        for i, value in enumerate(values):
            try:
                TrainConfig(**{**base, name: value})
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
                idx = f"{dim.kind}[{i}]"
                raise SweepError(f"{where}.{idx}: {msg[0].lower() + msg[1:]} (got {value!r})") from None


VARIANT = "method_variant"  # grid with conditional parameters: one Tune parameter holding a method and its values


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched values as train fields (a grid's method variant spread out)."""
    if VARIANT not in params:
        return params
    return {**{k: v for k, v in params.items() if k != VARIANT}, **params[VARIANT]}


def coerce_value(name: str, value: Any) -> Any:
    """A searched value as the train field holds it (e.g. '1e-3' -> 0.001). A method stays its name: what
    it needs besides (distill: a teacher) is checked with the whole configuration, not the value alone."""
    if name == "method":
        return str(value)
    return getattr(TrainConfig(**{name: value}), name)
