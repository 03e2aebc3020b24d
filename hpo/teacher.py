"""The teacher of a distillation sweep (train.teacher), found and checked before Ray starts.

`train.teacher` names a model ('tiny', a local folder, a hub id) or a finished trial of an earlier
sweep: `best:<name>` (the run's best trial by its first per-epoch objective) or `<run folder>:<trial_id>`
such as `runs/full:3f2a1_00000`. A trial resolves to the checkpoint of its best epoch that was kept
(`<checkpoint>/adapter`: a `full` trial's whole model, or a peft adapter on that sweep's base model).
The driver hands trials the resolved folder, so the store records which weights taught them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpo.errors import SweepError
from hpo.rundir import runs_root
from hpo.spec import SweepSpec
from hpo.store import Store, epoch_score
from trainers.config import ModelConfig
from trainers.vocabulary import FINISHED

ADAPTER_DIR = "adapter"  # trainers.worker.ADAPTER_DIR, without importing torch here


@dataclass(frozen=True)
class Teacher:
    location: str  # what trainers.distill.load_teacher loads: a model name or folder, or a trial's checkpoint folder
    tokenizer_of: ModelConfig  # the model whose tokenizer the teacher speaks (an earlier sweep's base model, for a trial)


def distills(spec: SweepSpec) -> bool:
    return "distill" in spec.methods_tried()


def resolve_teacher(ref: str, runs_dir: str | None = None) -> Teacher:
    """What `ref` names, or a one-line SweepError."""
    if ref.startswith("best:"):
        return _from_run(_run_folder(ref.removeprefix("best:"), runs_dir, ref), None, ref)
    run, sep, trial_id = ref.rpartition(":")
    if sep and run and not re.match(r"^[a-z]+://", ref):
        return _from_run(_run_folder(run, runs_dir, ref), trial_id, ref)
    folder = Path(ref).expanduser()
    location = str(folder.resolve()) if folder.exists() else ref  # trials run in folders of their own
    return Teacher(location, ModelConfig(name=location))


def with_teacher(spec: SweepSpec, runs_dir: str | None = None) -> SweepSpec:
    """`spec` with train.teacher resolved to what the trials load (unchanged when no trial distills)."""
    if not distills(spec) or not spec.train.teacher:
        return spec
    teacher = resolve_teacher(spec.train.teacher, runs_dir)
    return spec.model_copy(update={"train": spec.train.model_copy(update={"teacher": teacher.location})})


def tokenizer_mismatch(ours: Any, theirs: Any) -> str | None:
    """How two tokenizers' vocabularies differ ("512 tokens against 1024; 700 differ"), or None when they are the same."""
    mine, other = _vocabulary(ours), _vocabulary(theirs)
    if mine == other:
        return None
    differ = sum(mine.get(token) != i for token, i in other.items()) + len(set(mine) - set(other))
    return f"{len(other)} tokens against {len(mine)}; {differ} differ"


def _vocabulary(tokenizer: Any) -> dict[str, int]:
    backend = getattr(tokenizer, "backend", None)  # trainers.light_tokenizer.LightTokenizer
    return backend.get_vocab(with_added_tokens=True) if backend is not None else tokenizer.get_vocab()


def _run_folder(name: str, runs_dir: str | None, ref: str) -> Path:
    """A run's folder: `name` as a folder holding results.db, or a run name in the runs folder."""
    for folder in (Path(name).expanduser(), runs_root(runs_dir) / name):
        if (folder / "results.db").is_file():
            return folder
    raise SweepError(
        f"train.teacher '{ref}': no finished sweep '{name}' (no {runs_root(runs_dir) / name / 'results.db'}); run the teacher's sweep first (peftsweep run {name})"
    )


def _from_run(run: Path, trial_id: str | None, ref: str) -> Teacher:
    """The kept checkpoint of the best epoch of `trial_id` (None: of the run's best trial)."""
    store = Store.open(run / "results.db")
    try:
        stored = store.sweep()["spec"]
        trials = {t["trial_id"]: t for t in store.trials()}
        epochs = store.epochs()
    finally:
        store.close()
    spec = SweepSpec.from_store(stored, run / "results.db")
    if trial_id is not None and trial_id not in trials:
        raise SweepError(f"train.teacher '{ref}': {run} has no trial {trial_id} (peftsweep export {run.name} lists them)")
    objective = spec.tune_objective
    best, best_score = None, -math.inf
    for epoch in epochs:
        trial = trials.get(epoch["trial_id"])
        if trial is None or trial["status"] not in FINISHED or (trial_id is not None and epoch["trial_id"] != trial_id):
            continue
        if not epoch["checkpoint"]:
            continue
        folder = Path(epoch["checkpoint"]) / ADAPTER_DIR
        score = epoch_score(epoch.get(objective.metric), int(epoch["epoch"]), objective.mode)
        if folder.is_dir() and not math.isnan(score) and score > best_score:
            best, best_score = folder, score
    if best is None:
        which = f"trial {trial_id} of {run} has not finished, or kept" if trial_id else f"no finished trial of {run} kept"
        raise SweepError(f"train.teacher '{ref}': {which} no checkpoint of a trained model (an `adapter` folder) to teach from")
    return Teacher(str(best.resolve()), spec.model)
