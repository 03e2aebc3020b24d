"""Checks made before Ray starts, so bad input costs nothing: `run` and `validate` make the same ones."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from hpo.errors import SweepError
from hpo.spec import NAME_RE, SweepSpec
from hpo.teacher import distills, resolve_teacher, tokenizer_mismatch
from tracking.hooks import check_tracking
from trainers.config import ModelConfig

MAX_NAME_LENGTH = 100  # a run name is a folder name: well under any filesystem's limit, with room for Ray's paths


def check_run_name(name: str, *, from_option: bool) -> None:
    """A run name is one plain folder name; `from_option`: given with --name, else taken from the sweep file's name."""
    what = f"--name '{name}'" if from_option else f"run name '{name}' (the sweep file's name)"
    fix = "choose another --name" if from_option else "pass --name NAME"
    if not name:
        raise SweepError("--name '': empty; give a run name, or leave --name out to use the sweep's name")
    if len(name) > MAX_NAME_LENGTH:
        raise SweepError(f"{what[:40]}...: {len(name)} characters, at most {MAX_NAME_LENGTH}; {fix}")
    if not NAME_RE.match(name):
        raise SweepError(f"{what}: use letters, digits, '.', '_' and '-' only, starting with a letter or digit; {fix}")


def check_inputs(spec: SweepSpec, runs_dir: str | None = None) -> None:
    """Storage, data, model, prompt lengths, a distillation teacher, retention text and judge: each problem as one SweepError line.

    Loads the model's tokenizer (never its weights) to measure prompts; the built-in tiny model is
    built first if it is not in the cache yet.
    """
    from trainers.data import DataError, check_lengths, load_retention_texts, load_splits
    from trainers.judges import JudgeError, make_judge
    from trainers.model import ModelError, prepare_model

    check_storage(spec.storage)
    check_tracking(spec)  # MLflow's server, W&B's key: before the data and the model
    try:
        load_splits(spec.data, spec.eval.num_prompts)  # files, formats, split sizes: before any model is needed
        # The tiny model is built (a GGUF converted) here, before Ray starts: its progress lines reach
        # the terminal, which a Ray worker's output does not; the trials then load it from the cache.
        location = prepare_model(spec.model, log=_say)
        tokenizer = _tokenizer(location, spec.model)
        check_lengths(spec.data, tokenizer)  # also the chat template
        if distills(spec):
            _check_teacher(spec, runs_dir, tokenizer)
        if spec.eval.retention_data is not None:  # without a file, the tiny model's held-out text is generated: nothing to check
            load_retention_texts(spec.model.name, spec.eval.retention_data, 1)
        if spec.eval.judge == "hf":
            prepare_model(ModelConfig(name=spec.eval.judge_model), log=_say)
        if spec.eval.judge in ("reference", "openai"):  # an unreachable endpoint fails here, before any training
            make_judge(spec.eval).check()
    except (DataError, ModelError, JudgeError) as exc:
        raise SweepError(str(exc)) from None


def _check_teacher(spec: SweepSpec, runs_dir: str | None, tokenizer) -> None:
    """train.teacher names a model or finished trial that shares the student's tokenizer (hpo.teacher)."""
    from trainers.model import ModelError, prepare_model

    ref = spec.train.teacher
    teacher = resolve_teacher(ref, runs_dir)
    try:
        if not (Path(teacher.location) / "adapter_config.json").is_file():  # an adapter's base model is tokenizer_of
            prepare_model(ModelConfig(name=teacher.location), log=_say)
        theirs = _tokenizer(prepare_model(teacher.tokenizer_of, log=_say), teacher.tokenizer_of)
    except ModelError as exc:
        raise SweepError(f"train.teacher '{ref}': {str(exc).removeprefix('model.name: ')}") from None
    mismatch = tokenizer_mismatch(tokenizer, theirs)
    if mismatch:
        raise SweepError(
            f"train.teacher '{ref}': its tokenizer is not model.name '{spec.model.name}''s ({mismatch}); a teacher must share the student's tokenizer"
        )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # standard output is for results (the report's path)


def _tokenizer(location: str, model: ModelConfig):
    """The tokenizer that measures prompts: read from the folder's tokenizer.json without transformers
    (no torch: validate stays quick) where transformers would load that file as it is, else AutoTokenizer."""
    from trainers.data import first_line
    from trainers.light_tokenizer import LightTokenizer, UnsupportedTokenizer
    from trainers.model import ModelError

    try:
        if (Path(location) / "tokenizer.json").is_file():
            try:
                return LightTokenizer.from_folder(location)
            except UnsupportedTokenizer:
                pass  # a tokenizer class of the model's own: transformers builds it
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(location, revision=model.revision)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name: cannot load the tokenizer of '{model.name}': {first_line(exc)}") from None
    tokenizer.model_max_length = 2**62  # measuring a long prompt is the point: no warning that it is long
    return tokenizer


def check_storage(storage: str | None) -> None:
    """A local `storage` must be a folder this machine can create and write: Ray Tune writes it only
    after the base model ran. Object-store URIs are Ray Tune's to reach."""
    if not storage or "://" in storage:
        return
    path = Path(storage).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    fix = "give a folder this machine can write (every node, on a cluster), or an object-store URI such as s3://bucket/prefix"
    if not existing.is_dir():
        raise SweepError(f"storage {storage}: {existing} is a file, not a folder; {fix}")
    try:  # a probe, removed at once: permissions alone do not tell (root, read-only mounts, /proc)
        os.rmdir(tempfile.mkdtemp(prefix=".peftsweep-probe-", dir=existing))
    except OSError as exc:
        raise SweepError(f"storage {storage}: cannot create a folder in {existing} ({exc.strerror}); {fix}") from None
