"""The walking skeleton, end to end: `peftsweep run smoke` through a real local Ray runtime, the
real tiny model, a real SQLite store and a `storage` folder for Tune's checkpoints, then export,
report and best from the store. The run is the session's one smoke run (tests/conftest.py); the
commands that read it run in-process (`invoke`)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import sqlite3
from pathlib import Path

import pytest
from tests.conftest import SMOKE_EPOCHS, SMOKE_LEARNING_RATES, invoke

TRIALS = len(SMOKE_LEARNING_RATES)
PROMPTS = 8  # sweeps/smoke.yaml: eval.num_prompts


def test_run_prints_the_report_path_and_progress(smoke_run):
    assert smoke_run.proc.stdout.strip() == str(smoke_run.run_dir / "report.html")
    assert f"epoch {SMOKE_EPOCHS}/{SMOKE_EPOCHS}" in smoke_run.proc.stderr  # one progress line per trial and epoch
    assert "Traceback" not in smoke_run.proc.stderr


def test_store_holds_sweep_trials_epochs_and_answers(smoke_run):
    conn = sqlite3.connect(smoke_run.db)
    sweep = conn.execute("SELECT name, status, versions_json, spec_json FROM sweep").fetchone()
    assert sweep[0] == "smoke" and sweep[1] == "completed"
    assert {"torch", "ray", "transformers", "peft"} <= set(json.loads(sweep[2]))
    assert json.loads(sweep[3])["train"]["epochs"] == SMOKE_EPOCHS
    trials = conn.execute("SELECT trial_id, status, params_json FROM trials").fetchall()
    assert sorted(json.loads(p)["learning_rate"] for _, _, p in trials) == sorted(SMOKE_LEARNING_RATES)
    assert {s for _, s, _ in trials} == {"completed"}
    epochs = conn.execute("SELECT trial_id, epoch, eval_ppl, win_rate, wins, losses, ties, train_seconds FROM epochs").fetchall()
    assert len(epochs) == TRIALS * SMOKE_EPOCHS
    for trial_id, epoch, ppl, win, wins, losses, ties, seconds in epochs:
        assert math.isfinite(ppl) and ppl > 1
        assert seconds > 0
        # The win rate is the mean of the epoch's stored verdicts (a tie counts half), and the counts are theirs.
        verdicts = [v for (v,) in conn.execute("SELECT verdict FROM answers WHERE trial_id = ? AND epoch = ?", (trial_id, epoch))]
        assert len(verdicts) == PROMPTS and win == pytest.approx(sum(verdicts) / PROMPTS)
        assert (wins, losses, ties) == (verdicts.count(1.0), verdicts.count(0.0), verdicts.count(0.5))
    assert conn.execute("SELECT count(*) FROM baseline").fetchone()[0] == PROMPTS
    assert conn.execute("SELECT count(*) FROM answers").fetchone()[0] == TRIALS * SMOKE_EPOCHS * PROMPTS


def test_trials_differ_and_training_helps(smoke_run):
    conn = sqlite3.connect(smoke_run.db)
    rows = conn.execute(
        "SELECT t.params_json, e.eval_ppl FROM epochs e JOIN trials t USING (trial_id) WHERE e.epoch = ?", (SMOKE_EPOCHS,)
    ).fetchall()
    ppl = {json.loads(p)["learning_rate"]: v for p, v in rows}
    assert ppl[3e-3] < ppl[1e-9]  # learning rate 3e-3 learns the task; 1e-9 leaves the base model as it was


def test_trials_that_differ_only_in_learning_rate_cost_exactly_the_same_flops(smoke_run):
    conn = sqlite3.connect(smoke_run.db)
    rows = conn.execute("SELECT trial_id, epoch, train_flops, eval_flops, train_seconds FROM epochs ORDER BY trial_id, epoch").fetchall()
    by_epoch: dict[int, set] = {}
    for _, epoch, train_flops, eval_flops, _ in rows:
        assert train_flops > 0 and eval_flops > 0
        by_epoch.setdefault(epoch, set()).add(train_flops)
    assert all(len(values) == 1 for values in by_epoch.values())  # the same batches, so exactly equal
    cumulative = [next(iter(by_epoch[e])) for e in sorted(by_epoch)]
    assert cumulative == sorted(cumulative) and len(set(cumulative)) == SMOKE_EPOCHS
    assert len({seconds for *_, seconds in rows}) == len(rows)  # measured time differs from trial to trial


def test_the_base_model_answers_once_per_sweep(smoke_run):
    """Generation is counted in every process of the sweep, Ray's workers included (conftest's
    COUNT_GENERATIONS, a `sitecustomize` module on the sweep's PYTHONPATH)."""
    assert smoke_run.generations.count("base") == 1  # once, by the first trial
    assert smoke_run.generations.count("trial") == TRIALS * SMOKE_EPOCHS  # each trial after each epoch (8 prompts: one batch)


def test_the_base_model_answers_in_the_first_trials_process(smoke_run):
    """hpo.trial.FirstTrialBaseline: no process of its own (about 4 CPU-seconds of imports per sweep);
    the first trial's process answers before it trains, and the store has the answers."""
    base = smoke_run.generation_pids[smoke_run.generations.index("base")]
    first_trial = smoke_run.generation_pids[smoke_run.generations.index("trial")]
    assert base == first_trial
    conn = sqlite3.connect(smoke_run.db)
    assert conn.execute("SELECT count(*) FROM baseline WHERE answer IS NOT NULL").fetchone()[0] == PROMPTS
    assert "Base model: eval_ppl" in smoke_run.proc.stderr + smoke_run.proc.stdout


def test_the_driver_never_imports_torch(smoke_run):
    """The driver only schedules: the trials (and the first of them, the base model) import torch,
    transformers and peft in Ray's workers. (Each costs the driver seconds to import and again at exit.) Nor mlflow,
    which this sweep does not track to: Ray Tune's census of callbacks would (hpo.runtime.skip_callback_census)."""
    assert smoke_run.driver_imports == []
    assert smoke_run.generations  # the hook ran: the same sitecustomize wrote both logs


def test_a_sweep_without_qlora_never_imports_bitsandbytes(smoke_run):
    """peft would import it in every worker (about 1.5 s of CPU each): trainers.methods.without_bitsandbytes.
    (tests/test_methods.py trains QLoRA, in a process where it stays importable.)"""
    assert importlib.util.find_spec("bitsandbytes") is not None  # installed (a dependency), so it could have been imported
    assert smoke_run.generations and sorted(smoke_run.bitsandbytes) == sorted(f"{g}:absent" for g in smoke_run.generations)


def test_export_csv_has_one_row_per_trial(smoke_run):
    proc = invoke("export", "smoke", "--format", "csv", "--runs-dir", str(smoke_run.runs))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == TRIALS
    for column in ("trial_id", "status", "learning_rate", "epochs_completed", "best_epoch", "eval_ppl",
                   "win_rate", "train_seconds", "train_flops", "eval_flops", "peak_memory_gb", "error"):
        assert column in rows[0], column
    assert {r["epochs_completed"] for r in rows} == {str(SMOKE_EPOCHS)}
    assert all(float(r["peak_memory_gb"]) > 0 for r in rows)
    assert len({r["train_flops"] for r in rows}) == 1 and float(rows[0]["train_flops"]) > 0  # they differ only in learning rate


def test_export_json_to_a_file(smoke_run, tmp_path):
    out = tmp_path / "trials.json"
    proc = invoke("export", "smoke", "--format", "json", "-o", str(out), "--runs-dir", str(smoke_run.runs))
    assert proc.returncode == 0, proc.stderr
    trials = json.loads(out.read_text())
    assert len(trials) == TRIALS and all(t["status"] == "completed" for t in trials)


def test_report_is_written_and_rebuilt_from_the_store(smoke_run):
    report = smoke_run.run_dir / "report.html"
    html = report.read_text()
    assert "Plotly" in html and "<script src=" not in html  # plotly inlined: opens offline
    report.unlink()
    proc = invoke("report", "smoke", "--runs-dir", str(smoke_run.runs))
    assert proc.returncode == 0, proc.stderr
    assert report.read_text().count("class=\"plotly-graph-div\"") >= 2


def test_a_second_run_with_the_same_name_is_refused(smoke_run):
    before = smoke_run.db.stat().st_mtime_ns
    proc = invoke("run", "smoke", "--runs-dir", str(smoke_run.runs), "--set", f"storage={smoke_run.storage}")
    assert proc.returncode == 2
    # A completed run is not resumable: the advice is to replace it or keep both, never `resume`.
    assert "already exists: that sweep has completed (its report: peftsweep report smoke); --overwrite replaces it" in proc.stderr
    assert "resume" not in proc.stderr.replace("peftsweep report", "")
    assert smoke_run.db.stat().st_mtime_ns == before


def test_best_names_the_best_trial_and_its_adapter_in_the_storage(smoke_run):
    proc = invoke("best", "smoke", "--runs-dir", str(smoke_run.runs))
    assert proc.returncode == 0, proc.stderr
    conn = sqlite3.connect(smoke_run.db)
    top = conn.execute("SELECT max(win_rate) FROM epochs").fetchone()[0]
    first = proc.stdout.splitlines()[0].split()  # best trial <id> (completed) by win_rate, at epoch <n> of 3
    best_id, best_epoch = first[2], int(first[-3])
    assert conn.execute("SELECT win_rate FROM epochs WHERE trial_id = ? AND epoch = ?", (best_id, best_epoch)).fetchone()[0] == top
    adapter = Path(proc.stdout.split("adapter: ")[1].split()[0])
    assert (adapter / "adapter_config.json").is_file() and adapter.is_relative_to(smoke_run.storage / "smoke" / best_id)


def test_tunes_experiment_state_leaves_the_answers_to_the_store(smoke_run):
    """Ray Tune keeps a copy of every trial's last report and of the reports kept with its
    checkpoints, and writes them into its experiment state after every checkpoint; the judged
    answers are in the store alone (with them, the state grew by about 60 KB a trial)."""
    from ray import tune

    grid = tune.ResultGrid(tune.ExperimentAnalysis(str(smoke_run.storage / "smoke")))
    assert len(grid) == TRIALS
    for result in grid:
        kept = [metrics for _, metrics in result.best_checkpoints]
        assert result.metrics["epoch"] == SMOKE_EPOCHS and kept  # the reports are there, with their metrics
        for report in (result.metrics, *kept):
            assert "eval_ppl" in report and "answers" not in report and "verdicts" not in report


def test_checkpoints_go_to_the_sweeps_storage(smoke_run):
    """`storage` (a path every node sees, or an object-store URI) holds Tune's checkpoints and
    experiment state; the store and the report stay with the driver."""
    assert smoke_run.db.is_file() and not (smoke_run.run_dir / "tune").exists()
    trials = {t for (t,) in sqlite3.connect(smoke_run.db).execute("SELECT trial_id FROM trials")}
    adapters = smoke_run.storage.glob("smoke/*/checkpoint_*/adapter/adapter_config.json")
    assert {p.parts[-4] for p in adapters} == trials  # every trial's adapters, in its own folder
    assert list(smoke_run.storage.glob("smoke/experiment_state-*.json"))
    # Another runs folder, the same storage: the sweep of that name there is not overwritten unasked.
    other = smoke_run.runs.parent / "other-runs"
    again = invoke("run", "smoke", "--runs-dir", str(other), "--set", f"storage={smoke_run.storage}")
    assert again.returncode == 2, again.stderr
    assert f"storage {smoke_run.storage / 'smoke'} already holds a sweep named smoke" in again.stderr
    assert not (other / "smoke").exists()
