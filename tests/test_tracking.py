"""The trackers, read back with their own clients and compared with the results store: the Optuna
study every sweep keeps (optuna.load_study, optuna.visualization, optuna-dashboard over HTTP on
127.0.0.1), MLflow's runs in a real local tracking database (mlflow.MlflowClient), and W&B's
offline run files. On a hand-made store in-process, and on the sweeps the session runs anyway."""

from __future__ import annotations

import json
import math
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

from analysis.load import load_epochs, load_results, load_trials, selection_objective
from hpo.spec import SweepSpec
from hpo.store import Store
from tests.conftest import REPO, SMOKE_EPOCHS, WANDB_PROJECT, invoke
from tracking.callbacks import MlflowCallback
from tracking.hooks import finish_tracking, start_tracking
from tracking.optuna_study import TRIAL_ID_ATTR

# How each store status shows in each tracker: written out here, not read from the code under test.
OPTUNA_STATES = {"completed": "COMPLETE", "early_stopped": "PRUNED", "error": "FAIL", "diverged": "FAIL", "oom": "FAIL",
                 "infeasible": "FAIL", "running": "RUNNING"}  # fmt: skip
MLFLOW_STATUSES = {"completed": "FINISHED", "early_stopped": "FINISHED", "error": "FAILED", "diverged": "FAILED", "oom": "FAILED",
                   "infeasible": "FAILED", "running": "RUNNING"}  # fmt: skip
NOT_METRICS = ("trial_id", "epoch", "worker_pid")


# --- a hand-made sweep ---------------------------------------------------------------------------

SPEC = {
    "search": {"algorithm": "tpe", "num_samples": 5,
               "space": {"learning_rate": {"loguniform": [1e-4, 1e-2]}, "lora_r": {"choice": [4, 8]}}},
    "objectives": [{"metric": "win_rate", "mode": "max"}, {"metric": "train_flops", "mode": "min"}],
    "tracking": {"mlflow": {}},
}  # fmt: skip
# trial_id: (status, params, win rate per epoch, error). "a" is best at epoch 2 of 3; "d" finished
# without a single verdict (its judge was down): no value to give Optuna.
TRIALS = {
    "a": ("completed", {"learning_rate": 1e-3, "lora_r": 4}, [0.4, 0.7, 0.6], None),
    "b": ("early_stopped", {"learning_rate": 2e-3, "lora_r": 8}, [0.3], None),
    "c": ("diverged", {"learning_rate": 9e-3, "lora_r": 8}, [0.2], "training loss became nan at epoch 2"),
    "d": ("completed", {"learning_rate": 5e-4, "lora_r": 4}, [None, None], None),
    "e": ("running", {"learning_rate": 3e-4, "lora_r": 8}, [0.5], None),
}


def hand_made_sweep(run_dir: Path, lines: list[str], mlflow: bool = True) -> Store:
    """An interrupted sweep of TRIALS, as the driver writes it: MLflow's parent run first, then each trial
    mirrored by the MLflow callback after every write of the store (as Ray Tune's events would call it)."""
    spec = SweepSpec.model_validate({**SPEC, "tracking": SPEC["tracking"] if mlflow else {}})
    run_dir.mkdir()
    trackers = start_tracking(spec, run_dir, {}, lines.append)
    store = Store.create(run_dir / "results.db", name=run_dir.name, sweep_file="demo.yaml", spec=spec.model_dump(mode="json"),
                         searched=spec.searched, objectives=[o.model_dump() for o in spec.objectives], versions={}, git_commit=None)  # fmt: skip
    for tracker, record in trackers.records.items():
        store.set_tracking(tracker, record)
    mirror = trackers.callbacks[0]._mirror if mlflow else lambda trial_id: None
    for trial_id, (status, params, win_rates, error) in TRIALS.items():
        store.add_trial(trial_id, params)
        mirror(trial_id)
        for epoch, win_rate in enumerate(win_rates, start=1):
            store.add_epoch(trial_id, epoch, {"win_rate": win_rate, "eval_ppl": 5.0 - epoch, "train_flops": 1e12 * epoch,
                                              "train_seconds": 1.5 * epoch, "judge": "reference", "worker_pid": 1234})  # fmt: skip
            store.set_checkpoint(trial_id, epoch, str(run_dir / "tune" / trial_id / f"checkpoint_{epoch:06d}"))
            mirror(trial_id)
        if status != "running":
            store.set_trial_status(trial_id, status, error)
            mirror(trial_id)
    store.finish("interrupted")
    return store


def test_the_optuna_study_is_the_store_with_each_trials_result_as_the_report_reads_it(tmp_path):
    lines: list[str] = []
    with hand_made_sweep(tmp_path / "demo", lines, mlflow=False) as store:
        finish_tracking(store, lines.append)
        study = load_study(store)
        assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"] and study.metric_names == ["win_rate", "train_flops"]
        trials = {t.user_attrs[TRIAL_ID_ATTR]: t for t in study.trials}
        assert {k: t.state.name for k, t in trials.items()} == {
            "a": "COMPLETE", "b": "PRUNED", "c": "FAIL", "d": "FAIL", "e": "RUNNING"
        }  # fmt: skip
        assert trials["a"].values == [0.7, 3e12]  # the best epoch's win rate, the whole trial's FLOPs
        assert trials["a"].intermediate_values == {1: 0.4, 2: 0.7, 3: 0.6}
        assert trials["a"].params == TRIALS["a"][1] and trials["a"].user_attrs["best_epoch"] == 2
        assert trials["a"].user_attrs["adapter"] == str(tmp_path / "demo" / "tune" / "a" / "checkpoint_000002" / "adapter")
        assert trials["b"].values == [0.3, 1e12]  # what it reached before it was stopped
        assert trials["c"].values is None and trials["c"].user_attrs["error"] == TRIALS["c"][3]
        assert trials["d"].values is None and trials["d"].user_attrs["note"] == "no value for win_rate"
        assert trials["e"].datetime_complete is None
        assert_study_is_the_store(store)

        finish_tracking(store, lines.append)  # rebuilt, not added to
        assert len(load_study(store).trials) == len(TRIALS)
        assert sorted(p.name for p in store.path.parent.glob("optuna.db*")) == ["optuna.db"]
    assert not [line for line in lines if line.startswith("Warning")], lines


def test_a_folded_grid_is_one_optuna_trial_per_training(tmp_path):
    """Epochs folded (tests/test_search.py): the report has a row per epochs value, the study a trial per
    training, its result read over all its epochs."""
    spec = SweepSpec.model_validate({"search": {"space": {"epochs": {"grid": [1, 3]}, "learning_rate": {"grid": [1e-3]}}},
                                     "objectives": [{"metric": "eval_ppl", "mode": "min"}]})  # fmt: skip
    assert spec.folded_epochs == [1, 3]
    (tmp_path / "folded").mkdir()
    with Store.create(tmp_path / "folded" / "results.db", name="folded", sweep_file="f.yaml", spec=spec.model_dump(mode="json"),
                      searched=spec.searched, objectives=[o.model_dump() for o in spec.objectives], versions={}, git_commit=None) as store:  # fmt: skip
        store.add_trial("t", {"learning_rate": 1e-3})
        for epoch, ppl in enumerate([4.0, 3.0, 3.5], start=1):
            store.add_epoch("t", epoch, {"eval_ppl": ppl, "train_flops": 1e12 * epoch})
        store.set_trial_status("t", "completed")
        store.finish("completed")
        finish_tracking(store, print)
        assert len(load_trials(store)) == 2  # t@1 and t@3
        [trial] = load_study(store).trials
    assert trial.params == {"learning_rate": 1e-3} and trial.values == [3.0] and trial.user_attrs["best_epoch"] == 2
    assert trial.intermediate_values == {1: 4.0, 2: 3.0, 3: 3.5}


def test_a_grid_over_methods_with_distill_keeps_its_optuna_study(tmp_path, monkeypatch):
    """A method searched beside distill (which needs a teacher, checked with the whole configuration): the study is
    written with the methods as choices, not a warning."""
    from hpo.spec import load_sweep

    spec = load_sweep(str(REPO / "sweeps" / "distill.yaml")).spec
    (tmp_path / "d").mkdir()
    lines: list[str] = []
    with Store.create(tmp_path / "d" / "results.db", name="d", sweep_file="d.yaml", spec=spec.model_dump(mode="json"),
                      searched=spec.searched, objectives=[o.model_dump() for o in spec.objectives], versions={}, git_commit=None) as store:  # fmt: skip
        for trial_id, method in (("a", "lora"), ("b", "distill")):
            store.add_trial(trial_id, {"method": method, "lora_r": 4})
            store.add_epoch(trial_id, 1, {"win_rate": 0.6, "eval_ppl": 3.0, "train_flops": 1e12})
            store.set_trial_status(trial_id, "completed")
        store.finish("completed")
        finish_tracking(store, lines.append)
        trials = load_study(store).trials
    assert not lines and [t.params["method"] for t in trials] == ["lora", "distill"]

    # A study that fails halfway is one warning and leaves nothing beside the store (no optuna.db.partial).
    import tracking.optuna_study

    def broken(spec, trials):
        raise ValueError("no distributions today")

    monkeypatch.setattr(tracking.optuna_study, "_distributions", broken)
    (tmp_path / "d" / "optuna.db").unlink()
    with Store.open(tmp_path / "d" / "results.db") as store:
        finish_tracking(store, lines.append)
    assert lines == [f"Warning: cannot write the Optuna study {tmp_path / 'd' / 'optuna.db'}: no distributions today (the store keeps every result)"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["results.db"]


def test_the_mlflow_runs_are_the_store_and_mirroring_again_adds_nothing(tmp_path):
    from mlflow import MlflowClient

    with hand_made_sweep(tmp_path / "demo", []) as store:
        record = store.tracking()["mlflow"]
        assert record["uri"] == f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}"  # the default: in the run folder
        runs_while_running = assert_mlflow_is_the_store(store)  # what the callback wrote, epoch by epoch
        finish_tracking(store, print)
        runs = assert_mlflow_is_the_store(store)
        assert runs == runs_while_running  # the same runs, brought up to date
        client = MlflowClient(record["uri"])
        assert client.get_run(runs["a"]).data.tags["peftsweep.best_epoch"] == "2"
        assert client.get_run(runs["a"]).data.tags["peftsweep.best_adapter"].endswith("/a/checkpoint_000002/adapter")
        assert client.get_run(runs["c"]).data.tags["peftsweep.error"] == TRIALS["c"][3]
        parent = client.get_run(record["parent_run_id"])
        assert parent.info.status == "KILLED" and parent.data.tags["peftsweep.status"] == "interrupted"
        assert parent.data.params["search.algorithm"] == "tpe"

        # Answers judged again (peftsweep rejudge) change a logged value: that trial's run is rebuilt.
        store.set_verdicts("a", 2, [], {"win_rate": 0.55})
        finish_tracking(store, print)
        rebuilt = assert_mlflow_is_the_store(store)
        assert rebuilt["a"] != runs["a"] and client.get_run(runs["a"]).info.lifecycle_stage == "deleted"
        assert {k: v for k, v in rebuilt.items() if k != "a"} == {k: v for k, v in runs.items() if k != "a"}

        # `resume` finds the parent run again and marks it running; one deleted in MLflow meanwhile is made anew.
        spec, run_dir = SweepSpec.model_validate(SPEC), store.path.parent
        assert start_tracking(spec, run_dir, store.tracking(), print).records["mlflow"] == record
        assert client.get_run(record["parent_run_id"]).info.status == "RUNNING"
        client.delete_run(record["parent_run_id"])
        store.set_tracking("mlflow", start_tracking(spec, run_dir, store.tracking(), print).records["mlflow"])
        assert store.tracking()["mlflow"]["parent_run_id"] != record["parent_run_id"]
        finish_tracking(store, print)
        assert sorted(assert_mlflow_is_the_store(store)) == sorted(TRIALS)


def test_mlflow_going_away_mid_sweep_is_one_warning_and_the_store_keeps_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    lines: list[str] = []
    with hand_made_sweep(tmp_path / "demo", []) as store:
        store.set_tracking("mlflow", {"uri": f"http://127.0.0.1:{closed_port()}", "experiment_id": "1", "parent_run_id": "x"})
        live = MlflowCallback(store.path, lines.append)
        store.add_epoch("e", 2, {"win_rate": 0.6})
        live._mirror("e")
        live._mirror("e")
        assert len(lines) == 1 and lines[0].startswith("Warning: MLflow: ") and "the sweep goes on without it" in lines[0]
        finish_tracking(store, lines.append)  # the study is written all the same
        assert len(lines) == 2 and lines[1].startswith("Warning: cannot bring MLflow (http://127.0.0.1:")
        assert len(load_study(store).trials) == len(TRIALS)
        assert len(store.epochs("e")) == 2


def test_a_tracking_server_that_does_not_answer_fails_the_sweep_before_anything_runs(tmp_path):
    sweep = tmp_path / "tracked.yaml"
    sweep.write_text(f"tracking: {{mlflow: {{uri: 'http://127.0.0.1:{closed_port()}'}}}}\n")
    for command in (["run", str(sweep), "--runs-dir", str(tmp_path / "runs")], ["validate", str(sweep)]):
        proc = invoke(*command)
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("peftsweep: error: tracking.mlflow.uri http://127.0.0.1:") and "MLflow does not answer" in line, line
    assert not (tmp_path / "runs").exists()
    sweep.write_text("tracking: {mlflow: {uri: 'sqlite:////no/such/folder/mlflow.db'}}\n")
    proc = invoke("validate", str(sweep))
    assert proc.returncode == 2 and "no folder /no/such/folder for the database" in proc.stderr, proc.stderr


def test_help_and_validate_import_no_tracker():
    """A sweep without trackers never pays for their imports (MLflow alone takes a second or two)."""
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom hpo.cli import app\n"
        "for args in (['--help'], ['validate', 'smoke']):\n    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "print(sorted(m for m in ('mlflow', 'wandb', 'optuna_dashboard', 'optuna', 'tracking.callbacks') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


# --- the session's sweeps ------------------------------------------------------------------------


def test_a_grid_sweep_keeps_an_optuna_study_equal_to_its_store(smoke_run):
    """Two objectives (win rate and FLOPs): a multi-objective study, though no Optuna sampler ran."""
    with Store.open(smoke_run.db) as store:
        study = assert_study_is_the_store(store)
    assert {t.state.name for t in study.trials} == {"COMPLETE"} and len(study.directions) == 2


def test_a_tpe_sweep_under_asha_keeps_its_early_stops_as_pruned_trials(asha_run):
    with Store.open(asha_run.db) as store:
        study = assert_study_is_the_store(store)
    assert {t.state.name for t in study.trials} == {"COMPLETE", "PRUNED"}


def test_a_failed_trial_is_a_failed_optuna_trial(failing_run):
    with Store.open(failing_run.db) as store:
        study = assert_study_is_the_store(store)
    [trial] = study.trials
    assert trial.state.name == "FAIL" and "no_such_module" in trial.user_attrs["error"]


def test_optuna_visualization_and_optuna_dashboard_read_the_study(asha_run):
    import optuna

    with Store.open(asha_run.db) as store:
        study = load_study(store)
        per_epoch = {}
        for row in store.epochs():
            per_epoch.setdefault(row["trial_id"], []).append(row["eval_ppl"])
    figure = optuna.visualization.plot_intermediate_values(study)  # a line per trial: its eval_ppl by epoch
    assert sorted(list(trace.y) for trace in figure.data) == sorted(per_epoch.values())

    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is an optional extra: pip install 'peftsweep[dashboard]'")
    from optuna_dashboard import wsgi

    server = make_server("127.0.0.1", 0, wsgi(f"sqlite:///{asha_run.run_dir / 'optuna.db'}"), handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        [summary] = json.load(urllib.request.urlopen(f"{base}/api/studies", timeout=30))["study_summaries"]
        assert summary["study_name"] == "tpe_asha"
        detail = json.load(urllib.request.urlopen(f"{base}/api/studies/{summary['study_id']}", timeout=30))
    finally:
        server.shutdown()
    assert sorted(t["state"] for t in detail["trials"]) == sorted(t.state.name.title() for t in study.trials)
    assert detail["has_intermediate_values"] and detail["best_trials"]


def test_wandb_offline_runs_hold_each_trials_metrics(smoke_run):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install 'peftsweep[wandb]') and is not installed here")
    with Store.open(smoke_run.db) as store:
        expected = {t["trial_id"]: [e["eval_ppl"] for e in store.epochs(t["trial_id"])] for t in store.trials()}
    files = sorted((smoke_run.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = {}
    for path in files:
        records = list(wandb_records(path))
        [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.project == WANDB_PROJECT and run.run_group == "smoke"
        steps: dict[int, dict] = {}  # a step's values may come in more than one record
        for record in records:
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                steps.setdefault(row["_step"], {}).update(row)
        logged[run.run_id] = [steps[step]["eval_ppl"] for step in sorted(steps)]
    assert logged == expected and all(len(v) == SMOKE_EPOCHS for v in logged.values())


# --- reading the trackers back ---------------------------------------------------------------------


def load_study(store: Store):
    import optuna

    return optuna.load_study(study_name=store.sweep()["name"], storage=f"sqlite:///{store.path.parent / 'optuna.db'}")


def assert_study_is_the_store(store: Store):
    """optuna.db holds the store's trials: parameters, states, the report's values at each trial's best
    epoch, and each epoch's value of the metric that picks it. Returns the study."""
    study = load_study(store)
    results = load_results(store)
    rows = load_trials(results).set_index("trial_id")
    metric, _ = selection_objective(results.sweep["objectives"], load_epochs(results))
    objectives = results.sweep["objectives"]
    assert [d.name for d in study.directions] == [{"max": "MAXIMIZE", "min": "MINIMIZE"}[o["mode"]] for o in objectives]
    trials = {t.user_attrs[TRIAL_ID_ATTR]: t for t in study.trials}
    assert sorted(trials) == sorted(t["trial_id"] for t in results.trials)
    for trial in results.trials:
        got = trials[trial["trial_id"]]
        values = [rows.loc[trial["trial_id"], o["metric"]] for o in objectives]
        expected_state = OPTUNA_STATES[trial["status"]]
        if expected_state == "COMPLETE" and not all(math.isfinite(v) for v in values):
            expected_state = "FAIL"  # Optuna keeps no NaN in a complete trial
        assert got.state.name == expected_state
        assert got.params == trial["params"]
        if expected_state in ("COMPLETE", "PRUNED"):
            assert got.values == pytest.approx(values)
        epochs = [e for e in results.epochs if e["trial_id"] == trial["trial_id"]]
        assert got.intermediate_values == {e["epoch"]: pytest.approx(e[metric]) for e in epochs if e[metric] is not None}
    return study


def assert_mlflow_is_the_store(store: Store) -> dict[str, str]:
    """Under the sweep's parent run, one run per trial with its parameters, status and every numeric
    metric of its epochs at step = epoch, once. Returns each trial's run id."""
    from mlflow import MlflowClient

    record = store.tracking()["mlflow"]
    client = MlflowClient(record["uri"])
    found = client.search_runs([record["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{record['parent_run_id']}'")
    runs = {run.data.tags["peftsweep.trial_id"]: run for run in found}
    assert sorted(runs) == sorted(t["trial_id"] for t in store.trials())
    for trial in store.trials():
        run = runs[trial["trial_id"]]
        assert run.info.status == MLFLOW_STATUSES[trial["status"]] and run.data.tags["peftsweep.status"] == trial["status"]
        assert run.data.params == {k: json.dumps(v) if not isinstance(v, str) else v for k, v in trial["params"].items()}
        expected: dict[str, list[tuple[int, float]]] = {}
        for epoch in store.epochs(trial["trial_id"]):
            for key, value in epoch.items():
                if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    expected.setdefault(key, []).append((epoch["epoch"], float(value)))
        assert set(run.data.metrics) == set(expected)
        for key, history in expected.items():
            assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) == history, key
    return {trial_id: run.info.run_id for trial_id, run in runs.items()}


def wandb_records(path: Path):
    """The records of a W&B run file (.wandb): a header, then LevelDB-style log records in 32 KiB blocks
    (4-byte checksum, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass
