"""Reliability: failed trials end alone with a status, a worker process runs trial after trial,
a trial resumed from its checkpoint trains as if never stopped, and a finished or stopped training
leaves nothing behind in a reused worker.

All real: the tiny model, a local Ray runtime, the SQLite store. (A lost worker process, a killed
driver, Ctrl-C, SIGTERM and a full disk, in one sweep: tests/test_trust.py.)
"""

from __future__ import annotations

import gc
import json
import math
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, query
from trainers.config import ConstraintConfig, DataConfig, EvalConfig, ModelConfig, ResourceConfig, TrainConfig, TrialConfig
from trainers.data import DataError
from trainers.vocabulary import TrialStatus
from trainers.worker import (
    STATE_FILE,
    baseline_answers,
    load_state,
    release_memory,
    restore_rng_state,
    rng_state,
    train,
)


def _config(data: DataConfig, **train: object) -> TrialConfig:
    return TrialConfig(
        data=data,
        train=TrainConfig(**{"epochs": 2, "learning_rate": 3e-3, "lora_r": 4, **train}),
        eval=EvalConfig(num_prompts=4, max_new_tokens=8),
    )


@pytest.fixture(scope="module")
def baseline(data, tiny_model_dir) -> list[str]:
    return baseline_answers(_config(data)).answers


def test_a_resumed_training_matches_an_uninterrupted_one(data, baseline, tmp_path):
    """The checkpoint the worker saves after an epoch is enough to continue exactly where it stopped."""
    straight = []

    def keep(metrics, save):
        straight.append(metrics)
        save(tmp_path / f"epoch-{metrics['epoch']}")  # as the Tune adapter does, during the report call

    assert train(_config(data), baseline, keep).status is TrialStatus.COMPLETED
    resumed = []
    result = train(_config(data), baseline, lambda m, save: resumed.append(m), resume_from=tmp_path / "epoch-1")
    assert result.status is TrialStatus.COMPLETED
    assert [m["epoch"] for m in resumed] == [2]
    again, first = resumed[0], straight[1]
    assert again["resumed_from_epoch"] == 1 and first["resumed_from_epoch"] == 0
    for key in ("train_loss", "eval_ppl"):
        assert again[key] == pytest.approx(first[key], rel=1e-6), key
    assert again["answers"] == first["answers"]
    assert again["tokens_trained"] == first["tokens_trained"]
    state = torch.load(tmp_path / "epoch-1" / STATE_FILE, weights_only=True)  # tensors and plain containers only
    assert state["epoch"] == 1 and state["cuda_rng"] is None  # no GPU here


class _Planted:
    """What a tampered state.pt could hold: unpickling it with weights_only=False runs `touch`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_checkpoint_state_cannot_run_code(data, baseline, tmp_path):
    """Resume state is loaded with weights_only=True: a state.pt that would run code on unpickling is refused."""
    marker = tmp_path / "code-ran"
    (tmp_path / "epoch-1").mkdir()
    torch.save({"epoch": 1, "payload": _Planted(marker)}, tmp_path / "epoch-1" / STATE_FILE)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(_config(data), baseline, lambda m, s: None, resume_from=tmp_path / "epoch-1")
    assert not marker.exists()


def test_the_cuda_random_state_is_saved_and_restored(monkeypatch, tmp_path):
    """There is no GPU here, so torch.cuda's availability and RNG calls are stand-ins (monkeypatched);
    what is real is the state dict, its round trip through torch.save and a weights_only load, and the restore."""
    cuda_states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed where fewer GPUs are visible
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in cuda_states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(list(states)))
    rng = random.Random(7)
    torch.save(rng_state(rng), tmp_path / STATE_FILE)
    expected = rng.random()
    state = load_state(tmp_path / STATE_FILE)
    restore_rng_state(state, rng)
    assert rng.random() == expected
    assert len(restored) == 1 and len(restored[0]) == 1 and torch.equal(restored[0][0], cuda_states[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine resuming a GPU trial's state
    restore_rng_state(state, rng)
    assert len(restored) == 1


def test_a_nan_loss_ends_the_trial_as_diverged(data, baseline):
    # float16 with alpha/r = 2.5e8: the first step moves LoRA's B off zero, the next forward pass
    # overflows float16 (the classic fp16 divergence) and the loss is NaN.
    fp16 = _config(data, lora_alpha=1e9).model_copy(update={"model": ModelConfig(dtype="float16")})
    result = train(fp16, baseline, lambda m, s: None)
    assert result.status is TrialStatus.DIVERGED
    assert result.epochs_completed == 0
    assert "training loss is" in result.error and "at epoch 1" in result.error


def test_a_trial_over_its_memory_cap_ends_as_oom(data, baseline):
    """On CPU the cap is checked against peak resident memory; on a GPU torch raises CUDA OOM itself."""
    capped = _config(data).model_copy(update={"resources": ResourceConfig(max_memory_gb=0.01)})
    result = train(capped, baseline, lambda m, s: None)
    assert result.status is TrialStatus.OOM
    assert "out of memory at epoch 1" in result.error
    assert "batch_size=16" in result.error and "estimated need" in result.error
    assert "resources.max_memory_gb 0.01" in result.error


def _modules() -> dict[int, str]:
    """Every torch module alive in this process: its class name, by id."""
    import torch

    return {id(o): type(o).__name__ for o in gc.get_objects() if isinstance(o, torch.nn.Module)}


def test_a_finished_training_leaves_no_model_behind(data, baseline, tmp_path):
    """A worker process runs the sweep's next trial (resources.reuse_workers): nothing of this one may stay."""
    before = _modules()
    result = train(_config(data, epochs=1), baseline, lambda m, save: save(tmp_path / f"epoch{m['epoch']}"))
    assert result.status is TrialStatus.COMPLETED
    release_memory()
    assert [name for i, name in _modules().items() if i not in before] == []


def test_a_training_stopped_inside_its_report_leaves_no_model_behind(data, baseline):
    """ASHA stops a trial of a reused worker by raising SystemExit in tune.report, in its thread:
    once that exception is dropped, nothing of the training may stay for the next trial."""

    def stopped(metrics, save):
        raise SystemExit(0)  # what Ray Tune's session raises in a stopped trial's report

    before = _modules()
    with pytest.raises(SystemExit):
        train(_config(data, epochs=2), baseline, stopped)
    release_memory()  # as the next trial's run_trial does first
    assert [name for i, name in _modules().items() if i not in before] == []


FROZEN_WORKER = """
import gc, json, sys, tempfile, weakref
from pathlib import Path
import torch
from transformers import PreTrainedModel
from hpo.trial import after_trial, before_trial
from trainers.config import TrialConfig
from trainers.worker import train

config, baseline = TrialConfig.model_validate_json(sys.argv[1]), json.loads(sys.argv[2])
gc.disable()  # only the releases collect: what they are for
cycles = []  # weak references to reference cycles the trials left

class Cycle:
    def __init__(self):
        self.me = self

def modules():
    return {id(o) for o in gc.get_objects() if isinstance(o, torch.nn.Module)}

def models():
    return sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())

def trial(report):
    with tempfile.TemporaryDirectory() as folder:
        return train(config, baseline, lambda m, save: report(m, lambda: save(Path(folder) / str(m["epoch"]))))

def ends(metrics, save):
    save()

def stopped(metrics, save):
    cycles.append(weakref.ref(Cycle()))  # garbage once the trial's frames are gone, freed by a collection only
    raise SystemExit(0)  # what Ray Tune's session raises in a stopped trial's report

for stop in (False, False, True):  # what run_trial does around its training
    before_trial(False)  # the first: what the imports made is frozen
    print("frozen", gc.get_freeze_count() > 0)
    before = modules()  # the second and third trials': after the first one's imports (activations)
    try:
        print(trial(stopped if stop else ends).status.value)
    except SystemExit:  # Ray Tune drops it: run_trial's end is not reached
        pass
    else:
        after_trial(False)
        print("left", models(), len(modules() - before))
before_trial(False)  # the next trial frees what the stopped one held
left = len(modules() - before)
gc.unfreeze()  # what was frozen is counted too: a model frozen by mistake would stay
print("left", models(), left, "cycles", sum(ref() is not None for ref in cycles))
"""


def test_a_reused_worker_freezes_its_imports_and_still_frees_every_trials_model(data, baseline):
    """hpo.trial.before_trial freezes what a worker process imported before its first trial
    (gc.freeze: each trial's garbage collection then skips it); after_trial still frees a trial's
    model, and the next before_trial what a trial stopped inside its report left, cycles too. In a
    process of its own: a frozen pytest process would keep what it holds now."""
    config = _config(data, epochs=1)
    proc = subprocess.run(
        [sys.executable, "-c", FROZEN_WORKER, config.model_dump_json(), json.dumps(baseline)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("frozen", "left", "completed"))]
    # The first trial's own imports (transformers' activation modules) stay; no model does.
    assert lines[:2] == ["frozen True", "completed"] and lines[2].startswith("left 0 "), lines
    assert lines[3:] == ["frozen True", "completed", "left 0 0", "frozen True", "left 0 0 cycles 0"], lines


def _pids(db: Path) -> list[int]:
    """The worker process of each stored epoch."""
    return [json.loads(m)["worker_pid"] for (m,) in query(db, "SELECT metrics_json FROM epochs ORDER BY trial_id, epoch")]


def test_failed_trials_end_alone_with_their_status_and_one_worker_runs_trial_after_trial(variants_run):
    """The variants sweep of tests/conftest.py, one trial at a time: LoRA at alpha 8 completes, at
    alpha 1e9 it diverges (float16), on a module the model lacks it cannot start; no training at all
    completes. Each failure ends its trial alone, with its status and a one-line error; the one worker
    process (resources.reuse_workers, the default) runs every trial, before and after the failed ones."""
    stderr = variants_run.proc.stderr
    assert "Traceback" not in stderr and "NaN or Inf" not in stderr
    assert "restarting" not in stderr  # deterministic failures are not retried
    rows = query(variants_run.db, "SELECT trial_id, params_json, status, error FROM trials")
    by_config = {
        (json.loads(p)["method"], json.loads(p).get("lora_alpha"), json.loads(p).get("target_modules")): (t, s, e)
        for t, p, s, e in rows
    }
    assert by_config[("lora", 8, "q_proj,v_proj")][1:] == ("completed", None)
    _, status, error = by_config[("lora", 1e9, "q_proj,v_proj")]
    assert status == "diverged" and "training loss is" in error
    for alpha in (8, 1e9):
        _, status, error = by_config[("lora", alpha, "no_such_module")]
        assert status == "error" and "no_such_module" in error and "\n" not in error
    [none] = [v for k, v in by_config.items() if k[0] == "none"]
    assert none[1:] == ("completed", None)
    assert query(variants_run.db, "SELECT count(*) FROM epochs")[0][0] == 2  # failed trials add no epochs
    assert query(variants_run.db, "SELECT status, note FROM sweep") == [("completed", "3 of 5 trials failed (2 error, 1 diverged)")]
    report = (variants_run.run_dir / "report.html").read_text()
    assert "diverged" in report and 'href="errors/' in report  # each error trial's traceback, a link away
    for key in (("lora", 8, "no_such_module"), ("lora", 1e9, "no_such_module")):
        trial_id, _, error = by_config[key]
        text = (variants_run.run_dir / "errors" / f"{trial_id}.txt").read_text()
        assert text.startswith("Traceback (most recent call last)") and error in text
    pids = _pids(variants_run.db)
    assert len(pids) == 2 and len(set(pids)) == 1  # trial after trial in one process


def test_a_configuration_over_the_memory_constraints_is_skipped_as_infeasible(data, baseline):
    from trainers.config import ConstraintConfig

    tight = _config(data).model_copy(update={"constraints": ConstraintConfig(train_memory_gb=0.001)})
    reported = []
    result = train(tight, baseline, lambda m, save: reported.append(m))
    assert result.status is TrialStatus.INFEASIBLE and result.epochs_completed == 0 and not reported  # never trained
    assert result.error.startswith("estimated training memory ") and "> constraints.train_memory_gb 0.001" in result.error
    serving = _config(data).model_copy(update={"constraints": ConstraintConfig(inference_memory_gb=0.001)})
    result = train(serving, baseline, lambda m, save: None)
    assert result.status is TrialStatus.INFEASIBLE and "inference memory" in result.error


def test_examples_whose_response_is_cut_off_are_skipped_not_a_divergence(data, baseline, tmp_path):
    """With response-only loss, an example whose prompt fills data.max_length has no label token; a batch of
    only such examples has a loss of 0/0 = NaN, which is no divergence. They are skipped, and counted."""
    long_prompt = "Tell me about the forest. " * 20  # about 185 tokens: over 64
    records = [{"instruction": long_prompt if i % 2 else f"Question {i}?", "output": f"Answer {i}."} for i in range(16)]
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps(r) + "\n" for r in records))
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n" for i in range(4)))
    config = _config(data, batch_size=1, epochs=1).model_copy(
        update={"data": DataConfig(source=str(training), eval_source=str(held_out), max_length=64)}
    )
    reported = []
    result = train(config, baseline, lambda m, s: reported.append(m))
    assert result.status is TrialStatus.COMPLETED, result.error
    assert reported[0]["train_examples_skipped"] == 8
    assert math.isfinite(reported[0]["train_loss"])


def test_no_training_example_with_a_response_token_is_one_clear_error(data, baseline, tmp_path):
    training = tmp_path / "train.jsonl"
    training.write_text("".join(json.dumps({"instruction": "Tell me about the forest. " * 20, "output": "x"}) + "\n" for _ in range(4)))
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text(json.dumps({"instruction": "Question?", "output": "Answer."}) + "\n")
    config = _config(data, epochs=1).model_copy(update={"data": DataConfig(source=str(training), eval_source=str(held_out), max_length=32)})
    with pytest.raises(DataError, match=r"data.max_length 32: no training example has a response token that fits"):
        train(config, baseline, lambda m, s: None)


def _resident_gb(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024**2


def test_a_failed_peak_reset_is_said_and_no_earlier_peak_fails_the_trial(data, baseline, monkeypatch):
    """As in a reused worker: this process held 0.6 GB more before the trial than the trial needs. When the
    peak cannot be reset (fault injected: writing /proc/self/clear_refs raises, as where it is not allowed),
    that earlier peak must not end the trial as oom or infeasible, and the metrics say the peak's scope."""
    headroom = _resident_gb("VmRSS") + 0.3  # the trial's own peak stays below this
    earlier = torch.ones(150_000_000)  # 0.6 GB, resident, then freed: the lifetime peak goes over the headroom
    del earlier
    assert _resident_gb("VmHWM") > headroom + 0.2
    write_text = Path.write_text

    def refused(self, *args, **kwargs):
        if str(self) == "/proc/self/clear_refs":
            raise PermissionError(13, "Permission denied", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", refused)
    capped = _config(data, epochs=1).model_copy(
        update={
            "resources": ResourceConfig(max_memory_gb=headroom),
            "constraints": ConstraintConfig(train_memory_gb=headroom, inference_memory_gb=headroom),
        }
    )
    reported = []
    result = train(capped, baseline, lambda m, s: reported.append(m))
    assert result.status is TrialStatus.COMPLETED, result.error
    assert reported[0]["peak_memory_scope"] == "process_lifetime"
    assert "peak-memory reset failed" in reported[0]["memory_checks_skipped"]
    assert reported[0]["peak_memory_gb"] > headroom  # the lifetime peak, reported as what it is

    monkeypatch.setattr(Path, "write_text", write_text)  # the reset works again: the epoch's own peak, checked
    reported.clear()
    assert train(capped, baseline, lambda m, s: reported.append(m)).status is TrialStatus.COMPLETED
    assert reported[0]["peak_memory_scope"] == "epoch" and "memory_checks_skipped" not in reported[0]
    assert reported[0]["peak_memory_gb"] < headroom




# A local Ray (1 CPU) in a process of its own. A task: it fails, then one answers. The first trial's
# answers: one trial claims them and loses its process before posting them; the driver releases its
# claim, the next trial to ask computes them (here with a model folder that does not exist: they
# fail), and the third gets the second's error, as does the driver.
BASELINE_TASKS = """
import types
import ray
from hpo.callbacks import BaselineCallback
from hpo.errors import SweepError
from hpo.trial import FirstTrialBaseline, PendingBaseline
from trainers.config import ModelConfig, TrialConfig

def fails():
    raise OSError("model.safetensors: not a safetensors file")

def answers():
    return "the answers"

def trial(trial_id):
    return types.SimpleNamespace(trial_id=trial_id)

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
try:
    BaselineCallback(PendingBaseline(ray.remote(fails).options(max_retries=0).remote()), print).wait()
except SweepError as exc:
    print(exc)
recorded = []
callback = BaselineCallback(PendingBaseline(ray.remote(answers).remote()), recorded.append)
callback.on_trial_result(0, [], None, {})  # an epoch came: the answers are recorded first, once
callback.on_experiment_end([])
print(recorded)

no_model = types.SimpleNamespace(trial_config=lambda params: TrialConfig(model=ModelConfig(name="/no/such/model")))
first = FirstTrialBaseline.new()
callback = BaselineCallback(first, print)
print(first.claim("t_00000"), first.claim("t_00001"), first.claim("t_00000"), first.claimant(), first.ready())
callback.on_trial_result(0, [], None, {})  # nothing posted yet: the driver does not wait
callback.on_trial_complete(0, [], trial("t_00001"))  # not the trial computing them: nothing released
print(first.claimant())
callback.on_trial_recover(0, [], trial("t_00000"))  # lost its process, to be restarted behind the others
print(first.claimant())
try:
    first.answers("t_00001", no_model)
except Exception as exc:
    print("the second trial:", type(exc).__name__, first.claimant())
try:
    first.answers("t_00002", no_model)
except SweepError as exc:
    print("the third trial:", exc)
callback.on_trial_error(0, [], trial("t_00001"))  # it posted (an error): nothing released
try:
    callback.on_step_begin(0, [])
except SweepError as exc:
    print("the driver:", exc)
callback.on_experiment_end([])
print(first.claimant(), first.ready())  # forgotten at the end

old = BaselineCallback.__new__(BaselineCallback)
old.__dict__.update({"task": None, "record": None})  # restored from an older version's experiment state
old.on_step_begin(0, [])
old.on_trial_complete(0, [], trial("t_00000"))
old.on_experiment_end([])
print("restored: nothing to do")
ray.shutdown()
"""


def test_the_base_models_answers_are_recorded_once_and_their_failure_is_one_line():
    """hpo.callbacks.BaselineCallback and hpo.trial's two ways of computing the base model's answers
    (the first trial to start, or a Ray task): the answers are recorded once, before the first epoch;
    the trials wait for them, never the driver for a trial; a trial that lost its process before
    posting them leaves them to the next trial that asks; a failure becomes the sweep's one-line
    SweepError (the CLI prints it and exits 2)."""
    proc = subprocess.run([sys.executable, "-c", BASELINE_TASKS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = "the base model could not answer the judged prompts: "
    lines = proc.stdout.splitlines()
    assert lines[:6] == [
        failed + "model.safetensors: not a safetensors file",
        "['the answers']",
        "True False True t_00000 False",
        "t_00000",
        "None",
        "the second trial: ModelError t_00001",
    ], lines
    assert lines[6].startswith("the third trial: " + failed) and "/no/such/model" in lines[6], lines
    assert lines[7:] == [
        "the driver: " + lines[6].removeprefix("the third trial: "),
        "None False",
        "restored: nothing to do",
    ], lines
