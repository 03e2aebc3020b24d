"""The command line: help, validate, ls, and bad input answered with one line and exit code 2.

In-process (typer's CliRunner on the real `hpo.cli.app`, as tests/test_bad_input.py): bad input is
answered before anything starts, so a process of its own would only add start-up time. That the
installed command itself runs: test_the_command_runs_as_a_process, and every sweep of the suite.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from tests.conftest import REPO
from tests.conftest import invoke as peftsweep

# `run` and `validate` check their inputs with the model's tokenizer first: a first build's lines would come before any error.
pytestmark = pytest.mark.usefixtures("tiny_model_dir")


def test_the_command_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "hpo.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Hyperparameter sweeps" in proc.stdout


def test_help_lists_the_commands():
    proc = peftsweep("--help")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    listed = lines[lines.index("Commands:") + 1 :]
    assert [line.split()[0] for line in listed] == ["run", "resume", "report", "rejudge", "export", "best", "validate", "ls"]
    assert not any(line.endswith("...") for line in listed)  # each says what it does in words of its own, not cut short
    assert peftsweep("-h").stdout == proc.stdout


def test_help_reads_like_git_and_pip():
    """Usage names the argument (SWEEP, not {sweep}); options name their value; flags stand alone (no <bool>)."""
    run = peftsweep("run", "--help").stdout
    assert "[OPTIONS] SWEEP\n" in run.splitlines(keepends=True)[0]
    options = {line.split()[0]: line.split()[1] for line in run.splitlines() if line.startswith("  --")}
    assert options["--name"] == "NAME" and options["--set"] == "KEY=VALUE" and options["--runs-dir"] == "DIR"
    assert options["--address"] == "HOST:PORT" and options["--overwrite"] == "replace"  # a flag: its help follows it
    assert "\n  SWEEP  sweep name" in run
    assert "[OPTIONS] SWEEP...\n" in peftsweep("validate", "-h").stdout.splitlines(keepends=True)[0]
    export = peftsweep("export", "--help").stdout
    assert "-f, --format FORMAT" in export and "-o, --output PATH" in export
    for command in ("run", "resume", "report", "rejudge", "export", "best", "validate", "ls"):
        text = peftsweep(command, "--help").stdout
        assert "<" not in text and "{" not in text and "\u256d" not in text, text  # no <str>/<bool>, no {name}, no boxes


def test_validate_shipped_sweeps():
    proc = peftsweep("validate", "smoke", "lora_rank_lr")
    assert proc.returncode == 0, proc.stderr
    assert "ok sweeps/lora_rank_lr.yaml: 8 trials (grid)" in proc.stdout


def test_validate_says_how_a_sweep_packs():
    """resources.pack: which configurations train together, and which run alone and why."""
    proc = peftsweep("validate", "packed_lora", "smoke")
    assert proc.returncode == 0, proc.stderr
    packed, unpacked = proc.stdout.split("ok sweeps/smoke.yaml")
    assert "packed trials: up to 8 configurations train together in one worker" in packed
    assert "packed trials" not in unpacked  # resources.pack 1: nothing to say
    mixed = peftsweep("validate", "methods", "--set", "resources.pack=4").stdout
    assert "dora, prefix, prompt, ia3, full, none trials run alone (only lora, qlora configurations pack)" in mixed
    assert "configurations that differ in method (lora and qlora load different bases) go to different packs" in mixed
    alone = peftsweep("validate", "smoke", "--set", "resources.pack=2", "--set", "train.packing=true").stdout
    assert "every trial runs alone, as train.packing (several examples in one row) does not combine" in alone


def test_ls_shows_sweeps_and_runs(tmp_path):
    proc = peftsweep("ls", "--runs-dir", str(tmp_path))
    assert proc.returncode == 0
    assert "lora_rank_lr" in proc.stdout and "smoke" in proc.stdout


BAD = {
    "yaml": ("train: {epochs: [1\n", ":2: YAML syntax error"),
    "unknown_key": ("train: {lora_rank: 8}\n", "train.lora_rank: unknown key; did you mean 'lora_r'?"),
    "wrong_type": ("train: {epochs: many}\n", "train.epochs: input should be a valid integer"),
    "rank_zero": ("search:\n  space:\n    lora_r: {grid: [0]}\n", "search.space.lora_r.grid[0]"),
    "negative_lr": ("train: {learning_rate: -1e-3}\n", "train.learning_rate: input should be greater than 0"),
    "empty_grid": ("search:\n  space:\n    learning_rate: {grid: []}\n", "empty grid"),
    "missing_data": ("data: {source: no/such/file.jsonl}\nsearch:\n  space:\n    lora_r: {grid: [4]}\n", "no file no/such/file.jsonl"),
    "malformed_data": ("data: {source: DATA}\n", "bad.jsonl:2: malformed JSON"),
    "empty_data": ("data: {source: EMPTY}\n", "empty.jsonl: no records"),
    "missing_model": ("model: {name: ./no/such/model}\nsearch:\n  space:\n    lora_r: {grid: [4]}\n", "no folder no/such/model"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sweep_file_fails_before_ray_with_one_line(tmp_path, case):
    import ray

    text, expected = BAD[case]
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output"\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    sweep = tmp_path / f"{case}.yaml"
    sweep.write_text(text.replace("DATA", str(tmp_path / "bad.jsonl")).replace("EMPTY", str(tmp_path / "empty.jsonl")))
    runs = tmp_path / "runs"
    proc = peftsweep("run", str(sweep), "--runs-dir", str(runs))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("peftsweep: error: ") and expected in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not ray.is_initialized()  # nothing started
    assert not runs.exists()  # nothing written


def test_unknown_sweep_name(tmp_path):
    proc = peftsweep("run", "lora_rank_l", "--runs-dir", str(tmp_path / "runs"))
    assert proc.returncode == 2
    assert "unknown sweep 'lora_rank_l'" in proc.stderr and "did you mean 'lora_rank_lr'" in proc.stderr


def test_bad_override(tmp_path):
    proc = peftsweep("run", "smoke", "--set", "train.epochs=0", "--runs-dir", str(tmp_path / "runs"))
    assert proc.returncode == 2
    assert "train.epochs (from --set)" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_unwritable_runs_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = peftsweep("run", "smoke", "--runs-dir", str(blocker / "runs"))
    assert proc.returncode == 2
    assert "cannot create" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [("report", "nope"), ("export", "nope")])
def test_report_and_export_of_a_missing_run(tmp_path, command):
    proc = peftsweep(*command, "--runs-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "no run 'nope'" in proc.stderr


def _demo_run(tmp_path):
    """runs/demo: test_report's hand-made sweep, whose best is t-good and sweet spot t-cheap."""
    from tests.test_report import make_store

    (tmp_path / "runs" / "demo").mkdir(parents=True)
    make_store(tmp_path / "runs" / "demo" / "results.db").close()
    return str(tmp_path / "runs")


def test_export_has_the_reports_recommendation(tmp_path):
    import csv
    import io
    import json

    runs = _demo_run(tmp_path)
    rows = list(csv.DictReader(io.StringIO(peftsweep("export", "demo", "--runs-dir", runs).stdout)))
    assert list(rows[0])[-1] == "recommendation"
    assert {r["trial_id"]: r["recommendation"] for r in rows if r["recommendation"]} == {"t-good": "best", "t-cheap": "sweet_spot"}
    assert [r["trial_id"] for r in rows] == ["t-bad", "t-cheap", "t-crash", "t-good", "t-late", "t-mid", "t-oom"]  # by trial id
    records = json.loads(peftsweep("export", "demo", "-f", "json", "--runs-dir", runs).stdout)
    assert {r["trial_id"]: r["recommendation"] for r in records} == {
        "t-good": "best", "t-cheap": "sweet_spot", "t-bad": "", "t-mid": "", "t-late": "", "t-oom": "", "t-crash": "",
    }  # fmt: skip


def test_export_writes_counts_as_integers(tmp_path):
    import csv
    import io
    import json

    runs = _demo_run(tmp_path)
    rows = {r["trial_id"]: r for r in csv.DictReader(io.StringIO(peftsweep("export", "demo", "--runs-dir", runs).stdout))}
    good = rows["t-good"]
    assert (good["epochs_completed"], good["best_epoch"], good["wins"], good["losses"], good["ties"]) == ("3", "2", "6", "4", "0")
    assert good["lora_r"] == "16" and good["win_rate"] == "0.62" and good["train_seconds"] == "41.0"  # measurements stay floats
    assert rows["t-crash"]["best_epoch"] == "" and rows["t-crash"]["wins"] == ""  # no epoch: missing, as before
    records = {r["trial_id"]: r for r in json.loads(peftsweep("export", "demo", "-f", "json", "--runs-dir", runs).stdout)}
    assert [type(records["t-good"][c]) for c in ("epochs_completed", "best_epoch", "wins", "ties")] == [int] * 4
    assert records["t-crash"]["best_epoch"] is None


def test_export_sorts_folded_rows_after_their_trial_by_epochs(tmp_path):
    """Trial ids sort by their numbers' values (t2 before t10), a folded trial's rows <id>@<epochs> by epochs (2 before 10)."""
    import csv
    import io

    from hpo.spec import SweepSpec
    from hpo.store import Store
    from trainers.vocabulary import TrialStatus

    (tmp_path / "runs" / "folded").mkdir(parents=True)
    spec = SweepSpec.model_validate({"search": {"space": {"epochs": {"grid": [10, 2]}, "lora_r": {"grid": [4, 8]}}}})
    store = Store.create(
        tmp_path / "runs" / "folded" / "results.db", name="folded", sweep_file="x.yaml", spec=spec.model_dump(mode="json"),
        searched=["epochs", "lora_r"], objectives=[o.model_dump() for o in spec.objectives], versions={}, git_commit=None,
    )  # fmt: skip
    for trial_id, lora_r in (("t10", 8), ("t2", 4)):  # the store's order is not the trials'
        store.add_trial(trial_id, {"epochs": 10, "lora_r": lora_r})
        for epoch in range(1, 11):
            store.add_epoch(trial_id, epoch, {"eval_ppl": 5.0 - epoch / 10, "win_rate": 0.5, "train_seconds": float(epoch), "gpu_hours": 0.0})
        store.set_trial_status(trial_id, TrialStatus.COMPLETED)
    store.finish("completed")
    store.close()
    proc = peftsweep("export", "folded", "--runs-dir", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["trial_id"] for r in rows] == ["t2@2", "t2@10", "t10@2", "t10@10"]
    assert [r["epochs_completed"] for r in rows] == ["2", "10", "2", "10"]


def test_best_prints_the_sweet_spot(tmp_path):
    proc = peftsweep("best", "demo", "--runs-dir", _demo_run(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "best trial t-good (completed) by win_rate, at epoch 2 of 3"
    assert lines[1] == "  name in the report: lr 2e-4 · r 16"
    sweet = lines.index("sweet spot trial t-cheap (early_stopped), at epoch 1 of 1")
    assert lines[sweet + 1 : sweet + 3] == ["  name in the report: lr 1e-3 · r 4", "  parameters: learning_rate=0.001 lora_r=4"]
    assert lines[sweet + 3].startswith("  win_rate 0.450 ") and "train_seconds 10.0" in lines[sweet + 3]
    # Why, in the report's words: fine-tuning did not clearly help (t-good's interval includes 0.5), and the sweet spot.
    assert lines[-2].startswith("  Fine-tuning did not clearly help: the best trial's win rate against the base model, 0.62")
    assert lines[-1].startswith("  Sweet spot: trial t-cheap (learning_rate 0.001, lora_r 4, epochs 3) costs 76% less")


def test_export_rejects_unknown_format(tmp_path):
    proc = peftsweep("export", "nope", "--format", "xml", "--runs-dir", str(tmp_path))
    assert proc.returncode == 2 and "--format 'xml'" in proc.stderr


def test_a_ray_address_that_does_not_answer(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = tmp_path / "runs"
    proc = peftsweep("run", "smoke", "--address", f"127.0.0.1:{port}", "--runs-dir", str(runs))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"peftsweep: error: --address 127.0.0.1:{port}: no Ray cluster answers there")
    assert "Traceback" not in proc.stderr and not runs.exists()


def test_a_store_from_another_schema_version(tmp_path):
    from hpo.store import SCHEMA_VERSION, Store

    runs = tmp_path / "runs"
    (runs / "old").mkdir(parents=True)
    store = Store.create(
        runs / "old" / "results.db", name="old", sweep_file="x.yaml", spec={}, searched=[], objectives=[], versions={}, git_commit=None
    )
    store.conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store.close()
    proc = peftsweep("report", "old", "--runs-dir", str(runs))
    assert proc.returncode == 2
    assert f"schema version 1, this peftsweep reads version {SCHEMA_VERSION}; use the peftsweep version that wrote it" in proc.stderr
    assert not (runs / "old" / "report.html").exists()



def test_ctrl_c_while_the_report_is_written_says_the_sweep_is_kept(tmp_path, monkeypatch, capsys):
    """The sweep ran to its end and is in the store; a Ctrl-C in the report says so and how to write it."""
    import typer

    import analysis.report
    from hpo import cli
    from hpo.driver import SweepOutcome
    from hpo.store import Store
    from trainers.vocabulary import SweepStatus

    run_dir = tmp_path / "runs" / "done"
    run_dir.mkdir(parents=True)
    Store.create(run_dir / "results.db", name="done", sweep_file="x.yaml", spec={}, searched=[], objectives=[],
                 versions={}, git_commit=None).close()  # fmt: skip

    def interrupted(store, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis.report, "write_report", interrupted)
    with pytest.raises(typer.Exit) as stopped:
        cli._report(SweepOutcome(run_dir, SweepStatus.COMPLETED, None))
    assert stopped.value.exit_code == 130
    assert capsys.readouterr().err.strip() == (
        "peftsweep: interrupted while writing the report; the sweep is in the store: `peftsweep report done` writes it"
    )
