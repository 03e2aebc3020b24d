"""The walking skeleton, end to end: `peftsweep run smoke` through a real local Ray runtime,
the real tiny model, a real SQLite store, then export and report from the store."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import peftsweep


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, object]:
    runs = tmp_path_factory.mktemp("runs")
    proc = peftsweep("run", "smoke", "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return runs, proc


def test_run_prints_the_report_path_and_progress(smoke_run):
    runs, proc = smoke_run
    assert proc.stdout.strip() == str(runs / "smoke" / "report.html")
    assert "epoch 2/2" in proc.stderr  # one progress line per trial and epoch
    assert "Traceback" not in proc.stderr


def test_store_holds_sweep_trials_epochs_and_answers(smoke_run):
    runs, _ = smoke_run
    conn = sqlite3.connect(runs / "smoke" / "results.db")
    sweep = conn.execute("SELECT name, status, versions_json, spec_json FROM sweep").fetchone()
    assert sweep[0] == "smoke" and sweep[1] == "completed"
    assert {"torch", "ray", "transformers", "peft"} <= set(json.loads(sweep[2]))
    assert json.loads(sweep[3])["train"]["epochs"] == 2
    trials = conn.execute("SELECT trial_id, status, params_json FROM trials").fetchall()
    assert sorted(json.loads(p)["learning_rate"] for _, _, p in trials) == [3e-4, 3e-3]
    assert {s for _, s, _ in trials} == {"completed"}
    epochs = conn.execute("SELECT trial_id, epoch, eval_ppl, win_rate, train_seconds FROM epochs").fetchall()
    assert len(epochs) == 4
    for _, _, ppl, win, seconds in epochs:
        assert math.isfinite(ppl) and ppl > 1
        assert 0 <= win <= 1
        assert seconds > 0
    assert conn.execute("SELECT count(*) FROM baseline").fetchone()[0] == 8
    assert conn.execute("SELECT count(*) FROM answers").fetchone()[0] == 2 * 2 * 8


def test_trials_differ_and_training_helps(smoke_run):
    runs, _ = smoke_run
    conn = sqlite3.connect(runs / "smoke" / "results.db")
    rows = conn.execute(
        "SELECT t.params_json, e.eval_ppl FROM epochs e JOIN trials t USING (trial_id) WHERE e.epoch = 2"
    ).fetchall()
    ppl = {json.loads(p)["learning_rate"]: v for p, v in rows}
    assert ppl[3e-3] < ppl[3e-4]  # the higher learning rate learns the task faster in 2 epochs


def test_export_csv_has_one_row_per_trial(smoke_run):
    runs, _ = smoke_run
    proc = peftsweep("export", "smoke", "--format", "csv", "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert len(rows) == 2
    for column in ("trial_id", "status", "learning_rate", "epochs_completed", "best_epoch", "eval_ppl",
                   "win_rate", "train_seconds", "peak_memory_gb", "error"):
        assert column in rows[0], column
    assert {r["epochs_completed"] for r in rows} == {"2"}
    assert all(float(r["peak_memory_gb"]) > 0 for r in rows)


def test_export_json_to_a_file(smoke_run, tmp_path):
    runs, _ = smoke_run
    out = tmp_path / "trials.json"
    proc = peftsweep("export", "smoke", "--format", "json", "-o", str(out), "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stderr
    trials = json.loads(out.read_text())
    assert len(trials) == 2 and all(t["status"] == "completed" for t in trials)


def test_report_is_written_and_rebuilt_from_the_store(smoke_run):
    runs, _ = smoke_run
    report = runs / "smoke" / "report.html"
    html = report.read_text()
    assert "Plotly" in html and "<script src=" not in html  # plotly inlined: opens offline
    report.unlink()
    proc = peftsweep("report", "smoke", "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stderr
    assert report.read_text().count("class=\"plotly-graph-div\"") >= 2


def test_a_second_run_with_the_same_name_is_refused(smoke_run):
    runs, _ = smoke_run
    before = (runs / "smoke" / "results.db").stat().st_mtime_ns
    proc = peftsweep("run", "smoke", "--runs-dir", str(runs))
    assert proc.returncode == 2
    # A completed run is not resumable: the advice is to replace it or keep both, never `resume`.
    assert "already exists: that sweep has completed (its report: peftsweep report smoke); --overwrite replaces it" in proc.stderr
    assert "resume" not in proc.stderr.replace("peftsweep report", "")
    assert (runs / "smoke" / "results.db").stat().st_mtime_ns == before


def test_best_names_the_best_trial_and_its_adapter(smoke_run):
    runs, _ = smoke_run
    proc = peftsweep("best", "smoke", "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stderr
    conn = sqlite3.connect(runs / "smoke" / "results.db")
    top = conn.execute("SELECT max(win_rate) FROM epochs").fetchone()[0]
    first = proc.stdout.splitlines()[0].split()  # best trial <id> (completed) by win_rate, at epoch <n> of 2
    best_id, best_epoch = first[2], int(first[-3])
    assert conn.execute("SELECT win_rate FROM epochs WHERE trial_id = ? AND epoch = ?", (best_id, best_epoch)).fetchone()[0] == top
    adapter = Path(proc.stdout.split("adapter: ")[1].split()[0])
    assert (adapter / "adapter_config.json").is_file() and adapter.is_relative_to(runs / "smoke" / "tune" / best_id)


def test_checkpoints_go_to_the_sweeps_storage(tmp_path, tiny_model_dir):
    """`storage` (a path every node sees, or an object-store URI) holds Tune's checkpoints and
    experiment state; the store and the report stay with the driver."""
    runs, shared = tmp_path / "runs", tmp_path / "shared"
    args = ("run", "smoke", "--runs-dir", str(runs), "--set", f"storage={shared}", "--set", "train.epochs=1")
    proc = peftsweep(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (runs / "smoke" / "results.db").is_file() and not (runs / "smoke" / "tune").exists()
    adapters = sorted(shared.glob("smoke/*/checkpoint_*/adapter/adapter_config.json"))
    assert len(adapters) == 2  # one per trial
    best = peftsweep("best", "smoke", "--runs-dir", str(runs))
    assert f"adapter: {shared / 'smoke'}" in best.stdout
    again = peftsweep(*args, "--name", "smoke")
    assert again.returncode == 2 and "that sweep has completed" in again.stderr
