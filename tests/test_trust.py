"""Nothing a sweep hands over is lost or mislabelled: the best epoch's adapter survives ties, one
ranking names the best trial, a live sweep cannot be overwritten, Ctrl-C, SIGTERM and kill -9 leave
a sweep that resumes, a failed sweep says so, and a killed driver leaves no process.

All real: a local Ray runtime, the tiny model, SQLite, real signals. (A full disk: tests/test_reliability.py.)
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis.load import best_epoch_of, load_trials
from analysis.report_data import report_data
from hpo.callbacks import GpuHoursBudget
from hpo.trial import SPENT_KEY, STATUS_KEY, _closing_report
from hpo.reaper import descendants
from hpo.store import Store, epoch_score
from tests.conftest import JUDGE_KEY_ENV, REPO, JudgeGate, invoke, peftsweep, query, start, sweep_file, wait_for
from tests.test_judges import KEY, chat_server, prefers_good
from tests.test_report import make_store
from tests.test_tracking import assert_mlflow_is_the_store, assert_study_is_the_store


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
    """The report ranks ties by its cost axis (here gpu_hours: its trials held GPUs); `best` too."""
    runs = tmp_path / "runs"
    (runs / "demo").mkdir(parents=True)
    store = make_store(
        runs / "demo" / "results.db",
        [{"metric": "win_rate", "mode": "max"}, {"metric": "gpu_hours", "mode": "min"}],
        trials=TIED,
        report={},  # the default axis
    )
    with sqlite3.connect(store.path) as conn:  # t-late held fewer GPU-hours for its longer run
        conn.execute("UPDATE epochs SET gpu_hours = 0.001 WHERE trial_id = 't-late'")
    data = report_data(store)
    assert data.cost == "gpu_hours" and data.best_trial == "t-late"
    proc = invoke("best", "demo", "--runs-dir", str(runs))
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


def test_a_failed_copy_of_tunes_experiment_state_is_one_line():
    """Seen once in the five-stop sweep below, at Ctrl-C: Ray Tune's copy of its experiment state to
    `storage` raced a file Tune was replacing and logged the error with a traceback. Not fatal (the
    next save copies again), so hpo.runtime gives it one line."""
    import io
    import logging

    from ray.tune.execution import experiment_state

    from hpo.runtime import _state_copy_in_one_line

    assert experiment_state.logger.name == "ray.tune.execution.experiment_state"  # where hpo.runtime.init_ray filters
    logger, out = logging.getLogger("ray.tune.execution.experiment_state.test"), io.StringIO()
    logger.addHandler(logging.StreamHandler(out))
    logger.addFilter(_state_copy_in_one_line)
    logger.propagate = False
    try:
        raise FileNotFoundError(2, "Failed to open local file '/tmp/ray/x/.0c-tmp-basic-variant-state-y.json'")
    except FileNotFoundError:
        logger.error("Saving experiment state to storage at '/s/sweep' failed with exception: ", exc_info=True)
        logger.error("another error", exc_info=True)  # not this one: its traceback stays
    first, *rest = out.getvalue().splitlines()
    assert first == (
        "Saving experiment state to storage at '/s/sweep' failed with exception: FileNotFoundError: [Errno 2] "
        "Failed to open local file '/tmp/ray/x/.0c-tmp-basic-variant-state-y.json' (not fatal: Ray Tune tries again at its next save, if any)"
    )
    assert rest[0] == "another error" and rest[1] == "Traceback (most recent call last):"


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


STOP_RAY = """
import json, os, ray
from ray._private import services
from ray._private.node import Node
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
from hpo.reaper import descendants
from hpo.runtime import init_ray, ray_stopped, stop_ray_later

get_node, start_log_monitor, registered_at_get_node = services.get_node, Node.start_log_monitor, []

def recording_get_node(gcs_address, node_id):  # Ray's own call, which waits in steps of a second for a raylet not yet registered
    nodes = GcsClient(address=gcs_address).get_all_node_info(timeout=5).items()
    registered_at_get_node.append(node_id in [n.hex() for n, info in nodes if info.state == GcsNodeInfo.GcsNodeState.ALIVE])
    return get_node(gcs_address, node_id)

services.get_node = recording_get_node
init_ray(None)
assert services.get_node is recording_get_node and Node.start_log_monitor is start_log_monitor  # put back once Ray has started
node = ray._private.worker._global_node
assert "log_monitor" not in node.all_processes, node.all_processes  # forwards output nobody asked for
assert ray.get(ray.remote(lambda: "a task runs").remote()) == "a task runs"
started = descendants({os.getpid()})
monitor = node.all_processes["monitor"][0].process.pid
shutdown, monitor_at_shutdown = ray.shutdown, []

def recording_shutdown():
    monitor_at_shutdown.append("monitor" in node.all_processes)
    shutdown()

ray.shutdown = recording_shutdown
stop_ray_later()
ray_stopped()
print(json.dumps({"started": started, "monitor": monitor, "monitor_at_shutdown": monitor_at_shutdown, "registered_at_get_node": registered_at_get_node}))
"""


def test_a_local_rays_monitor_is_killed_before_its_shutdown_and_no_process_is_left():
    """hpo.runtime starts a local Ray without its log monitor, asks for its node only once the raylet
    has registered (Ray's call would wait a second for it), and stops it with its autoscaler's monitor
    killed first (ray.shutdown would wait a second for it); every process Ray started ends."""
    proc = subprocess.run([sys.executable, "-c", STOP_RAY], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["registered_at_get_node"] == [True], out
    assert out["monitor_at_shutdown"] == [False], out
    started = {int(pid): t for pid, t in out["started"].items()}
    assert out["monitor"] in started and len(started) >= 5, started  # GCS, raylet, monitor, agents, ...
    deadline = time.monotonic() + 15  # the raylet's agents may still be exiting
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(started) == [], {pid: _cmdline(pid)[:80] for pid in _alive(started)}


def test_a_sweep_in_which_every_trial_fails_exits_non_zero_and_keeps_tracebacks(failing_run):
    proc = failing_run.proc
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("peftsweep: failed: sweep sweep failed: 1 of 1 trials failed (1 error)"), last
    assert "Traceback" not in proc.stderr and "NaN or Inf" not in proc.stderr
    assert query(failing_run.db, "SELECT status FROM sweep") == [("failed",)]
    [(trial_id, error)] = query(failing_run.db, "SELECT trial_id, error FROM trials")
    log = failing_run.run_dir / "errors" / f"{trial_id}.txt"
    text = log.read_text()
    assert text.startswith("Traceback (most recent call last)") and "no_such_module" in text and error in text
    exported = invoke("export", "sweep", "-f", "json", "--runs-dir", str(failing_run.runs))
    assert json.loads(exported.stdout)[0]["error_log"] == str(log)
    assert 'href="errors/' in (failing_run.run_dir / "report.html").read_text()


def test_a_first_trial_lost_while_it_measures_the_base_model_leaves_that_to_the_next(lost_baseline_run):
    """The first trial's process dies as it measures the base model (hpo.trial.FirstTrialBaseline);
    Tune restarts it behind the third trial, so that both slots hold trials waiting for the answers.
    The driver releases the lost trial's claim and one of the waiting trials measures the base model:
    the sweep finishes, each trial once, with the answers, and says it in one line."""
    proc = lost_baseline_run.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lost_baseline_run.generations.count("base") == 2  # lost, then again
    first, second = [pid for kind, pid in zip(lost_baseline_run.generations, lost_baseline_run.generation_pids) if kind == "base"]
    assert first != second
    assert " lost its process; restarting from epoch 0 (retry 1 of 1)" in proc.stderr and "Traceback" not in proc.stderr
    db = lost_baseline_run.db
    assert query(db, "SELECT status, count(*) FROM trials GROUP BY status") == [("completed", 3)]
    assert query(db, "SELECT count(*) FROM baseline")[0][0] == 8  # sweeps/smoke.yaml: eval.num_prompts
    assert query(db, "SELECT count(*) FROM epochs WHERE win_rate IS NOT NULL")[0][0] == 3


def test_tied_epochs_keep_the_best_epochs_adapter(smoke_run):
    """At learning rate 1e-9 no answer changes, so every verdict is a tie and every epoch's win rate
    is 0.5: the best epoch is the first, and its adapter must be the one kept (with the latest, to
    resume from). Ray Tune removes the others, and the store forgets them."""
    rows = [
        (t, e, w, c)
        for t, e, w, c, params in query(
            smoke_run.db, "SELECT trial_id, epoch, win_rate, checkpoint, params_json FROM epochs JOIN trials USING (trial_id) ORDER BY epoch"
        )
        if json.loads(params)["learning_rate"] == 1e-9
    ]
    assert [(e, w) for _, e, w, _ in rows] == [(1, 0.5), (2, 0.5), (3, 0.5)]
    kept = {e: c for _, e, _, c in rows}
    assert kept[2] is None  # removed by Ray Tune, and cleared in the store
    assert Path(kept[1]).is_dir() and Path(kept[3]).is_dir()
    assert sorted(Path(kept[1]).parent.glob("checkpoint_*")) == [Path(kept[1]), Path(kept[3])]  # epoch 2's is gone
    assert (Path(kept[1]) / "adapter" / "adapter_config.json").is_file()
    with Store.open(smoke_run.db) as store:
        trials = load_trials(store).set_index("trial_id")
    assert trials.loc[rows[0][0], "best_epoch"] == 1  # what `best` and the report name, and whose checkpoint they read


def tune_recorded_as_finished(tune_dir: Path) -> set[str]:
    """The trials that Ray Tune's saved experiment state, what `resume` restores, holds as finished."""
    states = sorted(tune_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        trial_data = json.loads(states[-1].read_text())["trial_data"] if states else []
    except json.JSONDecodeError:
        return set()  # being written
    return {trial["trial_id"] for trial in (json.loads(state) for state, _ in trial_data) if trial["status"] == "TERMINATED"}


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MB tmpfs, room for a store and a report (the tests run as root, as CI does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_sweep_stopped_every_way_resumes_and_finishes_every_epoch_once(tmp_path, small_disk, small_task, tiny_model_dir):
    """One sweep (3 trials of 3 epochs, one at a time; its store on a 16 MB disk, its checkpoints on
    another, `storage`), stopped five ways and resumed each time:

    1. SIGINT to the running driver: exit 130, the sweep `interrupted`, a line on how to resume.
       Meanwhile `run --overwrite` of the same name is refused, and readers work.
    2. kill -9 to the driver, once a trial has finished and the next is midway: the sweep stays
       `running`, and the reaper ends the Ray processes the driver left.
    3. kill -9 to a trial's worker process (as on a preempted node): Ray Tune restarts the trial from
       its last checkpoint in a new process; then SIGTERM to the driver: exit 143, `interrupted`.
    4. The store's disk fills up: exit 1, one line naming the file and saying resume continues.
    5. Space freed, the last resume finishes: every epoch once, the trial finished before kill -9
       never run again, the trial it interrupted continued from its checkpoint; resume again is refused.
       Its MLflow runs, written by each driver as the trials reported, are the store's: one run per
       trial, every epoch's metrics once (tests/test_tracking.py reads them back).

    The trials are judged by a test server the test can hold (JudgeGate): each kill and the full disk
    come while a trial is held inside an epoch's judging, so it cannot move on first.
    TUNE_GLOBAL_CHECKPOINT_S=0: Tune saves its experiment state after every event instead of at most
    every 10 s; before kill -9 the test waits until that state holds the finished trial."""
    gate = JudgeGate(prefers_good)
    runs, filler = small_disk / "runs", small_disk / "filler"
    db = runs / "sweep" / "results.db"
    env = {JUDGE_KEY_ENV: KEY, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    storage = ["--set", f"storage={tmp_path / 'shared'}", "--set", f"tracking.mlflow.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    epochs = lambda: query(db, "SELECT count(*) FROM epochs")[0][0]  # noqa: E731
    copies = lambda: set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*"))  # noqa: E731
    copies_before = copies()
    with chat_server(reply=gate) as server:
        sweep = sweep_file(
            tmp_path, small_task,
            "train: {epochs: 3, lora_r: 4}\n"
            "search: {algorithm: grid, max_concurrent_trials: 1, space: {learning_rate: {grid: [1e-3, 3e-3, 1e-2]}}}\n",
            judge_url=server.base_url,
        )  # fmt: skip

        # 1. Ctrl-C.
        first = start("run", str(sweep), "--runs-dir", str(runs), *storage, env=env)
        wait_for(lambda: epochs() >= 1, first)
        overwrite = invoke("run", str(sweep), "--runs-dir", str(runs), "--overwrite", *storage, env=env)
        assert overwrite.returncode == 2 and "a driver is still running this sweep" in overwrite.stderr, overwrite.stderr
        assert db.is_file() and epochs() >= 1  # the live sweep is untouched
        reading = invoke("export", "sweep", "--runs-dir", str(runs))  # readers work while the sweep writes
        assert reading.returncode == 0 and "running" in reading.stdout, reading.stderr
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            "peftsweep: interrupted (SIGINT); finished epochs are in the store, and `peftsweep resume sweep` continues the sweep"
        )
        assert "Traceback" not in err, err[-3000:]
        assert query(db, "SELECT status FROM sweep") == [("interrupted",)]
        assert "early_stopped" not in {s for (s,) in query(db, "SELECT status FROM trials")}

        # 2. kill -9 to the driver, once one trial has finished and the next is midway.
        second = start("resume", "sweep", "--runs-dir", str(runs), env=env)
        done = lambda: {t for (t,) in query(db, "SELECT trial_id FROM trials WHERE status = 'completed'")}  # noqa: E731
        midway = lambda: query(db, "SELECT trial_id FROM trials JOIN epochs USING (trial_id) WHERE status = 'running'")  # noqa: E731
        wait_for(lambda: done() and midway(), second)
        gate.close()
        gate.wait_until_held(second)  # the running trial is inside its next epoch's judging, held there
        wait_for(lambda: done() <= tune_recorded_as_finished(tmp_path / "shared" / "sweep"), second)
        ray_processes = {p: t for p, t in descendants({second.pid}).items() if b"hpo.reaper" not in _cmdline(p)}
        assert any(b"ray::" in _cmdline(p) for p in ray_processes)  # Ray's agents and workers, among others
        second.send_signal(signal.SIGKILL)  # the driver dies without a word
        second.wait(timeout=30)
        gate.open()
        deadline = time.monotonic() + 30  # the reaper ends what the driver left (SIGTERM, SIGKILL after 5 s)
        while (left := _alive(ray_processes)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == [], [_cmdline(p) for p in left]
        before = {t: (started, status, n) for t, started, status, n in query(
            db, "SELECT trial_id, started_at, status, (SELECT count(*) FROM epochs e WHERE e.trial_id = t.trial_id) FROM trials t"
        )}  # fmt: skip
        finished = [t for t, (_, status, _) in before.items() if status == "completed"]
        [interrupted] = [t for t, (_, status, n) in before.items() if status == "running" and 1 <= n < 3]
        assert finished, before
        assert query(db, "SELECT status FROM sweep") == [("running",)]

        # 3. kill -9 to the interrupted trial's worker, held in its first judging after resume; then SIGTERM.
        gate.close()
        third = start("resume", "sweep", "--runs-dir", str(runs), env=env)
        gate.wait_until_held(third)
        seen = epochs()
        [lost] = [p for p, t in descendants({third.pid}).items() if b"ray::ImplicitFunc" in _cmdline(p)]
        os.kill(lost, signal.SIGKILL)
        gate.open()
        wait_for(lambda: epochs() > seen, third)
        third.send_signal(signal.SIGTERM)
        _, err = third.communicate(timeout=120)
        assert third.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert f"lost its process; restarting from epoch {before[interrupted][2]}" in err
        assert "interrupted (SIGTERM)" in err.strip().splitlines()[-1]
        assert query(db, "SELECT status FROM sweep") == [("interrupted",)]
        restarted = json.loads(query(db, "SELECT metrics_json FROM epochs WHERE trial_id = ? AND epoch = ?",
                                     interrupted, before[interrupted][2] + 1)[0][0])  # fmt: skip
        assert restarted["resumed_from_epoch"] == before[interrupted][2] and restarted["worker_pid"] != lost

        # 4. The store's disk fills up while a trial is held in its judging; its epoch cannot be written.
        gate.close()
        fourth = start("resume", "sweep", "--runs-dir", str(runs), env=env)
        gate.wait_until_held(fourth)
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until the disk is full
        gate.open()
        _, err = fourth.communicate(timeout=300)
        assert fourth.returncode == 1, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("peftsweep: failed: cannot write") and ("full" in line or "No space left" in line), line
        assert "`peftsweep resume sweep` continues" in line and "Traceback" not in err

        # 5. Space again: the last resume finishes the sweep. Its store has lost the base model's answers,
        # as a sweep stopped before they came (in its first seconds): the resume measures them first.
        filler.unlink()
        answered = query(db, "SELECT * FROM baseline ORDER BY prompt_id")
        conn = sqlite3.connect(db)  # foreign keys are off in a plain connection: the judgments of the answers stay
        with conn:
            conn.execute("DELETE FROM baseline")
        conn.close()
        last = peftsweep("resume", "sweep", "--runs-dir", str(runs), env=env)
    assert last.returncode == 0, last.stderr[-3000:]
    assert "judged prompts with the untouched base model (tiny), first ..." in last.stderr
    assert query(db, "SELECT * FROM baseline ORDER BY prompt_id") == answered and answered
    assert last.stdout.strip() == str(runs / "sweep" / "report.html")
    assert query(db, "SELECT status FROM sweep") == [("completed",)]
    trials = {t: (status, started) for t, status, started in query(db, "SELECT trial_id, status, started_at FROM trials")}
    assert len(trials) == 3 and {s for s, _ in trials.values()} == {"completed"}
    for trial_id in finished:  # not run again
        assert trials[trial_id][1] == before[trial_id][0]
    rows = query(db, "SELECT trial_id, epoch FROM epochs ORDER BY trial_id, epoch")
    assert rows == [(t, e) for t in sorted(trials) for e in (1, 2, 3)]  # each epoch once
    assert copies() == copies_before  # checkpoints were read in place, not copied and left in /tmp

    again = invoke("resume", "sweep", "--runs-dir", str(runs))
    assert again.returncode == 2 and "has completed; nothing to resume" in again.stderr
    with Store.open(db) as store:
        assert_mlflow_is_the_store(store)
        assert_study_is_the_store(store)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_an_interrupt_says_resume_only_where_resume_can_continue(smoke_run, tmp_path, capsys):
    """A sweep stopped before Ray Tune first saved its state cannot be resumed (`resume` refuses it):
    its interrupt line says to run it again instead of pointing at `resume`."""
    import typer

    from hpo.cli import _stopped
    from hpo.driver import _interrupted
    from hpo.spec import SweepSpec

    with Store.open(smoke_run.db) as store:
        spec = SweepSpec.from_store(store.sweep()["spec"], store.path)
    assert _interrupted(signal.SIGINT, spec, smoke_run.run_dir).resumable  # Tune's state is there
    not_started = _interrupted(signal.SIGINT, spec, tmp_path / "not_started")  # the same storage, no state of its own
    assert not not_started.resumable
    stopped_later = _interrupted(signal.SIGTERM, spec, smoke_run.run_dir)
    for exc, said in ((not_started, "nothing to resume; run it again with --overwrite"), (stopped_later, "`peftsweep resume smoke` continues the sweep")):
        with pytest.raises(typer.Exit) as exit_:
            _stopped(exc, "smoke")
        assert exit_.value.exit_code == 128 + exc.signum
        assert capsys.readouterr().err.strip().endswith(said)
