"""Nothing a sweep hands over is lost or mislabelled: the best epoch's adapter survives ties, one
ranking names the best trial, a live sweep cannot be overwritten, Ctrl-C and SIGTERM leave a sweep
that resumes, a failed sweep says so, a full disk is named, and a killed driver leaves no process.

All real: a local Ray runtime, the tiny model, SQLite, real signals, a real tmpfs for the full disk.
"""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis.load import best_epoch_of, load_trials
from analysis.report_data import report_data
from hpo.callbacks import GpuHoursBudget
from hpo.trial import SPENT_KEY, STATUS_KEY, _closing_report
from hpo.reaper import descendants
from hpo.store import epoch_score
from tests.conftest import REPO, peftsweep
from tests.test_report import make_store
from tests.test_reliability import _query, _start, _sweep_file, _wait_for


def test_equal_values_rank_the_earliest_epoch_first_and_distinct_values_by_value():
    for mode, values in (("max", [0.5, 0.7, 0.7, 0.5]), ("min", [3.0, 2.0, 2.0, 3.0])):
        scores = [epoch_score(v, epoch, mode) for epoch, v in enumerate(values, start=1)]
        assert max(range(4), key=scores.__getitem__) == 1  # epoch 2: the best value, before its tie at epoch 3
        assert scores[1] > scores[2] > scores[0] > scores[3]
    assert math.isnan(epoch_score(None, 1, "max")) and math.isnan(epoch_score(float("nan"), 2, "min"))
    assert epoch_score(0.51, 30, "max") > epoch_score(0.5, 1, "max")  # the tie-break never outweighs a real difference


@pytest.mark.parametrize("values", [[0.5, 0.5, 0.5, 0.5], [0.25, 1.0, 1.0, 0.75], [0.75, 0.25, 0.75, 0.75]])
def test_ray_tunes_checkpoint_keeping_keeps_the_epoch_the_store_calls_best(tmp_path, values):
    """Ray Tune's own checkpoint manager, fed the scores the trainable reports, keeps the best epoch
    the report and `best` name (the earliest of tied epochs), and the latest."""
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint, CheckpointConfig

    manager = _CheckpointManager(CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="score", checkpoint_score_order="max"))
    for epoch, value in enumerate(values, start=1):
        folder = tmp_path / f"checkpoint_{epoch}"
        folder.mkdir()
        manager.register_checkpoint(
            _TrainingResult(Checkpoint.from_directory(str(folder)), {"score": epoch_score(value, epoch, "max")})
        )
    epochs = pd.DataFrame({"epoch": range(1, len(values) + 1), "win_rate": values})
    best = int(best_epoch_of(epochs, "win_rate", "max")["epoch"])
    kept = sorted(int(p.name.split("_")[1]) for p in tmp_path.iterdir())
    assert kept == sorted({best, len(values)})


TIED = {  # equal win rates; t-mid costs fewer seconds, t-late fewer GPU-hours (t-good failed)
    "t-good": ("error", {"learning_rate": 2e-4, "lora_r": 16}, [(0.4, 5.0, 14.0, 6.0)], "boom"),
    "t-mid": ("completed", {"learning_rate": 1e-3, "lora_r": 8}, [(0.8, 3.0, 10.0, 1.0)], None),
    "t-late": ("completed", {"learning_rate": 3e-3, "lora_r": 8}, [(0.8, 3.0, 20.0, 1.0)], None),
}


def test_best_names_the_reports_best_trial_when_trials_tie(tmp_path):
    """The report ranks ties by its cost axis (here the sweep's gpu_hours objective); `best` too."""
    runs = tmp_path / "runs"
    (runs / "demo").mkdir(parents=True)
    store = make_store(
        runs / "demo" / "results.db",
        [{"metric": "win_rate", "mode": "max"}, {"metric": "gpu_hours", "mode": "min"}],
        trials=TIED,
    )
    with sqlite3.connect(store.path) as conn:  # t-late held fewer GPU-hours for its longer run
        conn.execute("UPDATE epochs SET gpu_hours = 0.001 WHERE trial_id = 't-late'")
    data = report_data(store)
    assert data.cost == "gpu_hours" and data.best_trial == "t-late"
    proc = peftsweep("best", "demo", "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("best trial t-late ")


def test_the_gpu_hours_budget_counts_a_failed_trials_spend_and_not_its_worst_values():
    budget = GpuHoursBudget(1.0)
    budget("a", {"epoch": 1, "gpu_hours": 0.4, SPENT_KEY: 0.4})
    closing = {STATUS_KEY: "oom", "epoch": 1, "gpu_hours": math.inf, SPENT_KEY: 0.5}  # gpu_hours: an objective's worst value
    budget("a", closing)
    budget("b", {STATUS_KEY: "error", "epoch": 0, "gpu_hours": math.inf, SPENT_KEY: 0.3})
    assert budget.spent == {"a": 0.5, "b": 0.3} and not budget.stop_all()
    budget("c", {"epoch": 1, SPENT_KEY: 0.2})
    assert budget.stop_all()


def test_a_failed_trials_closing_report_keeps_its_last_reported_cost(tmp_path):
    from hpo.spec import load_sweep
    from trainers.vocabulary import TrialResult, TrialStatus

    spec = load_sweep("smoke", ["objectives=[{metric: win_rate, mode: max}, {metric: gpu_hours, mode: min}]"]).spec
    failed = TrialResult(TrialStatus.OOM, 1, {"win_rate": 0.6}, "out of memory")
    closing = _closing_report(spec, failed, {"win_rate": 0.6, "gpu_hours": 0.25})
    assert closing["gpu_hours"] == 0.25 and closing["win_rate"] == 0.6
    assert _closing_report(spec, failed, {})["gpu_hours"] == math.inf  # nothing reported: the worst, for the searcher


def _tree(pid: int) -> dict[int, str]:
    return descendants({pid})


def _alive(processes: dict[int, str]) -> list[int]:
    from hpo.reaper import _stat

    return [pid for pid, started in processes.items() if (_stat(pid) or (0, None))[1] == started]


def test_the_reaper_ends_a_killed_drivers_processes(tmp_path):
    """A stand-in driver (a real process) starts children and grandchildren, then is killed with -9."""
    script = (
        "import subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, \"-c\", \"import time; time.sleep(300)\"]); time.sleep(300)']) for _ in range(2)]\n"
        "subprocess.Popen([sys.executable, '-m', 'hpo.reaper', str(__import__('os').getpid())], start_new_session=True)\n"
        "time.sleep(300)\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 30
    while len(_tree(driver.pid)) < 5 and time.monotonic() < deadline:  # 2 children, 2 grandchildren, the reaper
        time.sleep(0.2)
    time.sleep(1.5)  # the reaper notes the tree every half second
    tree = {pid: started for pid, started in _tree(driver.pid).items()}
    workers = {pid: s for pid, s in tree.items() if b"hpo.reaper" not in Path(f"/proc/{pid}/cmdline").read_bytes()}
    assert len(workers) == 4, tree
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 15
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(workers) == []


def test_a_sweep_in_which_every_trial_fails_exits_non_zero_and_keeps_tracebacks(tmp_path, tiny_model_dir):
    sweep = _sweep_file(tmp_path, "train: {epochs: 1, lora_r: 4, target_modules: [no_such_module]}\n")
    runs = tmp_path / "runs"
    proc = peftsweep("run", str(sweep), "--runs-dir", str(runs))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("peftsweep: failed: sweep sweep failed: 1 of 1 trials failed (1 error)"), last
    assert "Traceback" not in proc.stderr and "NaN or Inf" not in proc.stderr
    db = runs / "sweep" / "results.db"
    assert _query(db, "SELECT status FROM sweep") == [("failed",)]
    [(trial_id, error)] = _query(db, "SELECT trial_id, error FROM trials")
    log = runs / "sweep" / "errors" / f"{trial_id}.txt"
    text = log.read_text()
    assert text.startswith("Traceback (most recent call last)") and "no_such_module" in text and error in text
    exported = json.loads(peftsweep("export", "sweep", "-f", "json", "--runs-dir", str(runs)).stdout)
    assert exported[0]["error_log"] == str(log)
    assert 'href="errors/' in (runs / "sweep" / "report.html").read_text()


def test_tied_epochs_keep_the_best_epochs_adapter(tmp_path, tiny_model_dir):
    """At learning rate 1e-9 every verdict is a tie, so every epoch's win rate is 0.5: the best epoch
    is the first, and its adapter must be the one kept (with the latest, to resume from)."""
    runs = tmp_path / "runs"
    proc = peftsweep(
        "run", "smoke", "--runs-dir", str(runs), "--set", "search.space.learning_rate.grid=[1e-9]", "--set", "train.epochs=3"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = runs / "smoke" / "results.db"
    rows = _query(db, "SELECT epoch, win_rate, checkpoint FROM epochs ORDER BY epoch")
    assert [w for _, w, _ in rows] == [0.5, 0.5, 0.5]
    kept = {e: c for e, _, c in rows}
    assert kept[2] is None  # removed by Ray Tune, and cleared in the store
    assert Path(kept[1]).is_dir() and Path(kept[3]).is_dir()
    best = peftsweep("best", "smoke", "--runs-dir", str(runs))
    assert "at epoch 1 of 3" in best.stdout
    adapter = Path(best.stdout.split("adapter: ")[1].split()[0])
    assert (adapter / "adapter_config.json").is_file() and adapter.parent == Path(kept[1])
    assert load_trials_best_epoch(db) == 1


def load_trials_best_epoch(db: Path) -> int:
    from hpo.store import Store

    with Store.open(db) as store:
        return int(load_trials(store)["best_epoch"].iloc[0])


def test_ctrl_c_and_sigterm_interrupt_a_sweep_that_resume_continues(tmp_path, tiny_model_dir):
    """SIGINT to a running driver, then SIGTERM to the resumed one: each time the sweep is recorded
    `interrupted` with exit 128 + the signal, a line says how to resume, and the last resume finishes
    every epoch once. While the first driver runs, `run --overwrite` of the same name is refused."""
    sweep = _sweep_file(
        tmp_path,
        "train: {epochs: 3, lora_r: 4}\n"
        "search: {algorithm: grid, max_concurrent_trials: 1, space: {learning_rate: {grid: [1e-3, 3e-3]}}}\n",
    )
    runs = tmp_path / "runs"
    db = runs / "sweep" / "results.db"
    first = _start("run", str(sweep), "--runs-dir", str(runs))
    _wait_for(lambda: _query(db, "SELECT count(*) FROM epochs")[0][0] >= 1, 300, first)

    overwrite = peftsweep("run", str(sweep), "--runs-dir", str(runs), "--overwrite")
    assert overwrite.returncode == 2 and "a driver is still running this sweep" in overwrite.stderr
    assert db.is_file() and _query(db, "SELECT count(*) FROM epochs")[0][0] >= 1  # the live sweep is untouched

    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "peftsweep: interrupted (SIGINT); finished epochs are in the store, and `peftsweep resume sweep` continues the sweep"
    )
    assert "Traceback" not in err
    assert _query(db, "SELECT status FROM sweep") == [("interrupted",)]
    assert "early_stopped" not in {s for (s,) in _query(db, "SELECT status FROM trials")}

    second = _start("resume", "sweep", "--runs-dir", str(runs))
    seen = _query(db, "SELECT count(*) FROM epochs")[0][0]
    _wait_for(lambda: _query(db, "SELECT count(*) FROM epochs")[0][0] > seen, 300, second)
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted (SIGTERM)" in err.strip().splitlines()[-1]
    assert _query(db, "SELECT status FROM sweep") == [("interrupted",)]

    last = peftsweep("resume", "sweep", "--runs-dir", str(runs))
    assert last.returncode == 0, last.stderr[-3000:]
    assert _query(db, "SELECT status FROM sweep") == [("completed",)]
    epochs = _query(db, "SELECT trial_id, epoch FROM epochs ORDER BY trial_id, epoch")
    trials = sorted({t for t, _ in epochs})
    assert len(trials) == 2 and epochs == [(t, e) for t in trials for e in (1, 2, 3)]


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MB tmpfs, room for a store and a report (the tests run as root, as CI does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_sweep_with_one_line_and_resume_continues(tmp_path, small_disk, tiny_model_dir):
    """The store's disk fills up after the first epoch: the driver says so in one line, and once
    space is freed `resume` finishes the sweep (checkpoints go to `storage` on another disk)."""
    sweep = _sweep_file(tmp_path, "train: {epochs: 3, lora_r: 4}\n")
    runs, filler = small_disk / "runs", small_disk / "filler"
    db = runs / "sweep" / "results.db"
    proc = _start("run", str(sweep), "--runs-dir", str(runs), "--set", f"storage={tmp_path / 'shared'}")
    _wait_for(lambda: _query(db, "SELECT count(*) FROM epochs")[0][0] >= 1, 300, proc)
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until the disk is full
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("peftsweep: failed: cannot write") and ("full" in line or "No space left" in line), line
    assert "`peftsweep resume sweep` continues" in line and "Traceback" not in err
    filler.unlink()
    resumed = peftsweep("resume", "sweep", "--runs-dir", str(runs))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _query(db, "SELECT status FROM sweep") == [("completed",)]
    assert [e for (e,) in _query(db, "SELECT epoch FROM epochs ORDER BY epoch")] == [1, 2, 3]
