"""Bad input, in one table: every case ends with exit code 2 and one line that names what is wrong,
before Ray starts, with no traceback and nothing written.

In-process (typer's CliRunner on the real `hpo.cli.app`): real files, real SQLite stores made with
`hpo.store.Store` and then damaged with sqlite3, the real tiny model's tokenizer. Nothing is mocked.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Callable

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from typer.testing import CliRunner

from hpo.cli import app
from hpo.spec import SweepSpec
from hpo.store import Store
from trainers.vocabulary import TrialStatus

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "sweeps" / "smoke.yaml")
Argv = Callable[[Path], list[str]]  # a case's command line, given its tmp folder
LONG_PROMPT = "Describe, in one short sentence, " + "the many creatures of the forest " * 12


def make_store(runs: Path, name: str = "done") -> Path:
    """A whole store of one finished trial, as a sweep leaves it."""
    (runs / name).mkdir(parents=True)
    spec = SweepSpec()
    store = Store.create(
        runs / name / "results.db",
        name=name,
        sweep_file="sweeps/smoke.yaml",
        spec={**spec.model_dump(mode="json"), "overrides": []},
        searched=["learning_rate"],
        objectives=[o.model_dump() for o in spec.objectives],
        versions={"peftsweep": "test"},
        git_commit=None,
    )
    store.add_trial("t1", {"learning_rate": 0.001})
    metrics = {"train_loss": 1.0, "eval_ppl": 5.0, "win_rate": 0.5, "win_rate_low": 0.2, "win_rate_high": 0.8}
    store.add_epoch("t1", 1, {**metrics, "train_seconds": 2.0, "eval_seconds": 1.0, "gpu_hours": 0.0, "cost_usd": 0.0})
    store.set_trial_status("t1", TrialStatus.COMPLETED)
    store.finish("completed")
    store.close()
    return runs / name / "results.db"


def damage(db: Path, sql: str) -> None:
    conn = sqlite3.connect(db)
    conn.executescript(sql)
    conn.close()


DAMAGES = {  # what is done to a whole store, and what the one line must say about it
    "no_trials_table": ("DROP TABLE trials;", "table trials is missing"),
    "bad_json": ("UPDATE sweep SET spec_json = '{\"model\": ';", "spec_json is not a JSON dict"),
    "no_sweep_row": ("DELETE FROM sweep;", "no sweep row"),
    "bad_params_json": ("UPDATE trials SET params_json = 'lr=0.001';", "trials row (trial_id t1): params_json"),
    "no_column": ("ALTER TABLE epochs DROP COLUMN win_rate;", "table epochs lacks column win_rate"),
    "text_in_a_number": ("UPDATE epochs SET win_rate = 'high';", "non-number in win_rate"),
}


def _data(tmp: Path) -> None:
    """The data files the cases point at."""
    good = {"instruction": "Name a colour.", "output": "Blue."}
    (tmp / "empty.jsonl").write_text("")
    (tmp / "none.json").write_text("[]")
    (tmp / "latin1.jsonl").write_bytes(json.dumps(good).encode() + b"\n" + '{"instruction": "caf\xe9"}\n'.encode("latin-1"))
    (tmp / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    (tmp / "no_output.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "Name a tree.", "input": ""}) + "\n")
    (tmp / "columns.csv").write_text("question,answer\nWhy?,Because.\n")
    (tmp / "malformed.jsonl").write_text(json.dumps(good) + "\n{\"instruction\": \n")
    (tmp / "no_assistant.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    (tmp / "long.jsonl").write_text("".join(json.dumps({**good, "instruction": LONG_PROMPT * n}) + "\n" for n in (2, 1, 3)))
    (tmp / "two.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    (tmp / "a_folder.jsonl").mkdir()
    (tmp / "file").write_text("not a folder")
    _saved_datasets(tmp, good)
    (tmp / "model").mkdir()  # a model folder whose tokenizer.json is damaged
    (tmp / "model" / "config.json").write_text('{"model_type": "llama"}')
    (tmp / "model" / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend"}')
    (tmp / "model" / "tokenizer.json").write_text('{"model": ')
    (tmp / "other_tokenizer").mkdir()  # a model folder whose tokenizer is not the tiny model's
    (tmp / "other_tokenizer" / "config.json").write_text('{"model_type": "llama"}')
    (tmp / "other_tokenizer" / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend", "eos_token": "</s>"}')
    Tokenizer(WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>")).save(str(tmp / "other_tokenizer" / "tokenizer.json"))


def _saved_datasets(tmp: Path, good: dict[str, str]) -> None:
    """Folders written by datasets' save_to_disk: a DatasetDict of train and validation, one without train, one whose
    train split is empty, and a Dataset that lost its Arrow file."""
    import datasets

    datasets.disable_progress_bars()
    rows = datasets.Dataset.from_list([good] * 4)
    datasets.DatasetDict({"train": rows, "validation": rows}).save_to_disk(str(tmp / "saved"))
    datasets.DatasetDict({"validation": rows}).save_to_disk(str(tmp / "saved_no_train"))
    datasets.DatasetDict({"train": rows.select([])}).save_to_disk(str(tmp / "saved_empty"))
    rows.save_to_disk(str(tmp / "saved_damaged"))
    for arrow in (tmp / "saved_damaged").glob("*.arrow"):
        arrow.unlink()


def sweep_file(tmp: Path, name: str, text: str) -> str:
    path = tmp / f"{name}.yaml"
    path.write_text(text.replace("TMP", str(tmp)) + "search:\n  space:\n    learning_rate: {grid: [1e-3]}\n")
    return str(path)


def data_sweep(source: str, extra: str = "") -> Argv:
    return lambda tmp: ["run", sweep_file(tmp, "s", f"data: {{source: TMP/{source}{extra}}}\n"), "--runs-dir", str(tmp / "runs")]


def run_smoke(*args: str) -> Argv:
    return lambda tmp: ["run", SMOKE, *args, "--runs-dir", str(tmp / "runs")]


def distill_sweep(teacher: str, store: bool = False) -> Argv:
    """A distillation sweep on the tiny model with `teacher`; `store`: a finished run 'done' (one trial, no checkpoint) exists."""

    def argv(tmp: Path) -> list[str]:
        if store:
            make_store(tmp / "runs")
        return ["run", sweep_file(tmp, "s", f"train: {{method: distill, teacher: '{teacher}'}}\n"), "--runs-dir", str(tmp / "runs")]

    return argv


def store_command(command: str, damage_kind: str | None, *args: str) -> Argv:
    def argv(tmp: Path) -> list[str]:
        db = make_store(tmp / "runs")
        if damage_kind == "folder":
            db.unlink()
            db.mkdir()
        elif damage_kind == "garbage":
            db.write_bytes(b"these bytes are no SQLite file" * 100)
        elif damage_kind is not None:
            damage(db, DAMAGES[damage_kind][0])
        return [command, "done", *args, "--runs-dir", str(tmp / "runs")]

    return argv


CASES = {  # id: (argv for a tmp folder, what the one line must contain; TMP stands for the tmp folder)
    # data files
    "data_missing": (data_sweep("nope.jsonl"), "no file TMP/nope.jsonl"),
    "data_empty": (data_sweep("empty.jsonl"), "TMP/empty.jsonl: no records"),
    "data_no_records_json": (data_sweep("none.json"), "TMP/none.json: no records"),
    "data_invalid_utf8_jsonl": (data_sweep("latin1.jsonl"), "TMP/latin1.jsonl"),
    "data_binary_json": (data_sweep("binary.json"), "TMP/binary.json"),
    "data_no_output": (data_sweep("no_output.jsonl", ", format: alpaca"), "no_output.jsonl:2: record lacks output"),
    "data_csv_without_columns": (data_sweep("columns.csv"), "columns.csv: columns question, answer match no data format"),
    "data_malformed_jsonl": (data_sweep("malformed.jsonl"), "malformed.jsonl:2: malformed JSON"),
    "data_chat_without_answer": (data_sweep("no_assistant.jsonl"), "no_assistant.jsonl:1: no assistant message"),
    "data_a_folder": (data_sweep("a_folder.jsonl"), "TMP/a_folder.jsonl is a folder, not a dataset saved with save_to_disk"),
    "data_saved_damaged": (data_sweep("saved_damaged"), "data.source: TMP/saved_damaged: damaged save_to_disk folder ([Errno 2] No such file or directory"),
    "data_saved_empty": (data_sweep("saved_empty"), "data.source TMP/saved_empty: no records"),
    "data_saved_without_the_split": (
        data_sweep("saved_no_train"), "data.source: TMP/saved_no_train has no split 'train' (it has validation); set data.split"
    ),
    "data_saved_without_the_eval_split": (
        data_sweep("saved", ", eval_source: TMP/saved"), "data.eval_source: TMP/saved has no split 'test' (it has train, validation); set data.eval_split"
    ),
    "data_split_left_empty": (data_sweep("two.jsonl", ", eval_fraction: 0.1"), "data.eval_fraction 0.1 of 2 records leaves an empty split"),
    "data_eval_source_missing": (data_sweep("two.jsonl", ", eval_source: TMP/nope.jsonl"), "data.eval_source: no file TMP/nope.jsonl"),
    "data_prompt_too_long": (
        data_sweep("long.jsonl", ", eval_source: TMP/two.jsonl, max_length: 64"),
        "TMP/long.jsonl: no response token fits in data.max_length 64 for any record (the shortest prompt, record 2, is",
    ),
    "data_prompts_too_long_for_tinyworld": (run_smoke("--set", "data.max_length=16"), "no response token fits in data.max_length 16"),
    "retention_data_missing": (run_smoke("--set", "eval.retention_data=TMP/nope.txt"), "eval.retention_data: no file TMP/nope.txt"),
    # run names
    "name_empty": (run_smoke("--name", ""), "--name '': empty"),
    "name_300_characters": (run_smoke("--name", "n" * 300), "--name 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnn"),
    "name_parent_folder": (run_smoke("--name", "../x"), "--name '../x'"),
    "name_with_spaces": (run_smoke("--name", "my run"), "--name 'my run'"),
    "name_with_slash": (run_smoke("--name", "a/b"), "--name 'a/b'"),
    "name_leading_underscore": (run_smoke("--name", "_x"), "--name '_x'"),
    # --set values
    "set_unknown_key": (run_smoke("--set", "train.lora_rank=8"), "train.lora_rank (from --set): unknown key; did you mean 'lora_r'?"),
    "set_unknown_section": (run_smoke("--set", "trainer.epochs=2"), "trainer (from --set): unknown key"),
    "set_wrong_type": (run_smoke("--set", "train.epochs=many"), "train.epochs (from --set): input should be a valid integer"),
    "set_boolean_epochs": (run_smoke("--set", "train.epochs=true"), "train.epochs (from --set): expected a number, not true or false"),
    "set_boolean_learning_rate": (run_smoke("--set", "train.learning_rate=false"), "train.learning_rate (from --set): expected a number"),
    "set_boolean_num_samples": (run_smoke("--set", "search.num_samples=true"), "search.num_samples (from --set): expected a number"),
    "set_boolean_in_a_grid": (run_smoke("--set", "search.space.lora_r.grid=[true]"), "search.space.lora_r.grid[0]: expected a number"),
    "set_boolean_gpus": (run_smoke("--set", "resources.gpus_per_trial=true"), "resources.gpus_per_trial (from --set): expected a number"),
    "set_negative_epochs": (run_smoke("--set", "train.epochs=-1"), "train.epochs (from --set): input should be greater than or equal to 1"),
    "set_zero_batch_size": (run_smoke("--set", "train.batch_size=0"), "train.batch_size (from --set)"),
    "set_zero_learning_rate": (run_smoke("--set", "train.learning_rate=0"), "train.learning_rate (from --set): input should be greater than 0"),
    "set_lora_dropout_one": (run_smoke("--set", "train.lora_dropout=1"), "train.lora_dropout (from --set)"),
    "set_max_length_too_small": (run_smoke("--set", "data.max_length=8"), "data.max_length (from --set)"),
    "set_empty_grid": (run_smoke("--set", "search.space.learning_rate.grid=[]"), "search.space.learning_rate: empty grid"),
    "set_unknown_method": (run_smoke("--set", "train.method=lorax"), "train.method (from --set)"),
    "set_reversed_lr_range": (
        run_smoke("--set", "search.algorithm=random", "--set", "search.space.learning_rate={loguniform: [1e-2, 1e-4]}"),
        "loguniform range [0.01, 0.0001] is empty",
    ),
    "set_lr_range_from_zero": (
        run_smoke("--set", "search.algorithm=random", "--set", "search.space.learning_rate={loguniform: [0, 1e-2]}"),
        "loguniform needs a positive low end",
    ),
    "set_lr_above_one": (run_smoke("--set", "search.space.learning_rate.grid=[2.0]"), "search.space.learning_rate.grid[0]: input should be less than 1"),
    "report_gpu_hours_without_gpus": (
        run_smoke("--set", "report.cost_axis=gpu_hours"), "report.cost_axis: gpu_hours is 0 for trials that hold no GPU; set resources.gpus_per_trial or use flops"
    ),
    "report_cost_usd_without_a_price": (
        run_smoke("--set", "report.cost_axis=cost_usd", "--set", "resources.gpus_per_trial=1"),
        "report.cost_axis: cost_usd needs a price; set cost.usd_per_gpu_hour or use gpu_hours",
    ),
    "report_unknown_cost_axis": (run_smoke("--set", "report.cost_axis=seconds"), "report.cost_axis (from --set): input should be 'flops', 'gpu_hours'"),
    "report_min_saving_of_one": (run_smoke("--set", "report.min_saving=1"), "report.min_saving (from --set): input should be less than 1"),
    "set_without_equals": (run_smoke("--set", "train.epochs"), "--set 'train.epochs': expected KEY=VALUE"),
    "set_value_as_section": (run_smoke("--set", "train.epochs.max=2"), "'train.epochs' is a value, not a section"),
    "set_unknown_objective": (run_smoke("--set", "objectives=[{metric: accuracy, mode: max}]"), "objectives.0.metric (from --set)"),
    # distillation
    "teacher_other_tokenizer": (
        distill_sweep("TMP/other_tokenizer"),
        "train.teacher 'TMP/other_tokenizer': its tokenizer is not model.name 'tiny''s (3 tokens against 1024; ",
    ),
    "teacher_missing_folder": (distill_sweep("TMP/nope"), "train.teacher 'TMP/nope': no folder TMP/nope"),
    "teacher_unknown_run": (distill_sweep("best:nope"), "train.teacher 'best:nope': no finished sweep 'nope' (no TMP/runs/nope/results.db); run the teacher's sweep first (peftsweep run nope)"),
    "teacher_without_checkpoint": (
        distill_sweep("best:done", store=True), "train.teacher 'best:done': no finished trial of TMP/runs/done kept no checkpoint of a trained model"
    ),
    "teacher_unknown_trial": (distill_sweep("TMP/runs/done:t9", store=True), "train.teacher 'TMP/runs/done:t9': TMP/runs/done has no trial t9"),
    "distill_alpha_searched_for_lora": (
        run_smoke("--set", "search.space.distill_alpha={grid: [0.5]}"), "search.space.distill_alpha: lora does not use distill_alpha (it belongs to distill)"
    ),
    "distill_without_teacher": (run_smoke("--set", "train.method=distill"), "method distill needs train.teacher"),
    # storage
    "storage_in_proc": (run_smoke("--set", "storage=/proc/nope"), "storage /proc/nope: cannot create a folder in /proc"),
    "storage_under_a_file": (run_smoke("--set", "storage=TMP/file/tune"), "storage TMP/file/tune: TMP/file is a file, not a folder"),
    # validate makes the checks run makes
    "validate_missing_data": (lambda tmp: ["validate", sweep_file(tmp, "s", "data: {source: TMP/nope.jsonl}\n")], "no file TMP/nope.jsonl"),
    "validate_no_output": (
        lambda tmp: ["validate", sweep_file(tmp, "s", "data: {source: TMP/no_output.jsonl, format: alpaca}\n")],
        "no_output.jsonl:2: record lacks output",
    ),
    "validate_prompt_too_long": (lambda tmp: ["validate", SMOKE, "--set", "data.max_length=16"], "no response token fits"),
    "validate_storage": (lambda tmp: ["validate", SMOKE, "--set", "storage=/proc/nope"], "storage /proc/nope"),
    "validate_damaged_tokenizer": (
        lambda tmp: ["validate", sweep_file(tmp, "s", "model: {name: TMP/model}\n")],
        "model.name: cannot load the tokenizer of 'TMP/model': TMP/model/tokenizer.json: ",
    ),
    # stores: damaged, a folder, not SQLite, unknown
    **{
        f"{command}_{kind}": (store_command(command, kind), ("TMP/runs/done/results.db: damaged results store: ", DAMAGES[kind][1]))
        for command in ("export", "report", "best", "resume")
        for kind in ("no_trials_table", "bad_json", "no_sweep_row")
    },
    "export_bad_params_json": (store_command("export", "bad_params_json"), "trials row (trial_id t1): params_json is not a JSON dict"),
    "report_no_column": (store_command("report", "no_column"), DAMAGES["no_column"][1]),
    "best_text_in_a_number": (store_command("best", "text_in_a_number"), DAMAGES["text_in_a_number"][1]),
    "export_store_is_a_folder": (store_command("export", "folder"), "TMP/runs/done/results.db: a folder, not a results store file"),
    "resume_store_is_a_folder": (store_command("resume", "folder"), "TMP/runs/done/results.db: a folder, not a results store file"),
    "best_not_sqlite": (store_command("best", "garbage"), "TMP/runs/done/results.db: not a peftsweep results store"),
    "report_unknown_run": (lambda tmp: ["report", "nope", "--runs-dir", str(tmp / "runs")], "no run 'nope'"),
    "resume_unknown_run": (lambda tmp: ["resume", "nope", "--runs-dir", str(tmp / "runs")], "no run 'nope'"),
    "best_unknown_run": (lambda tmp: ["best", "nope", "--runs-dir", str(tmp / "runs")], "no run 'nope'"),
    "export_bad_format": (store_command("export", None, "--format", "xml"), "--format 'xml': use csv or json"),
}


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder`, with the bytes of each file."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case, tiny_model_dir):
    # tiny_model_dir: the model is built first, since a first build's progress lines precede any error.
    import ray

    _data(tmp_path)
    make_argv, expected = CASES[case]
    argv = [a.replace("TMP", str(tmp_path)) for a in make_argv(tmp_path)]
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftsweep: error: "), result.stderr
    for part in [expected] if isinstance(expected, str) else expected:
        assert part.replace("TMP", str(tmp_path)) in lines[0]
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before  # no run folder, no report, the store byte for byte
    assert not ray.is_initialized()


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


def test_the_stores_are_whole_before_they_are_damaged(tmp_path):
    """The damaged cases fail for their damage: the same store undamaged exports and names its best trial."""
    make_store(tmp_path / "runs")
    runner = CliRunner()
    exported = runner.invoke(app, ["export", "done", "--format", "json", "--runs-dir", str(tmp_path / "runs")])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)[0]["trial_id"] == "t1"
    best = runner.invoke(app, ["best", "done", "--runs-dir", str(tmp_path / "runs")])
    assert best.exit_code == 0 and best.stdout.startswith("best trial t1"), best.output


def _number_fields(model: type, prefix: str = "") -> list[tuple[type, str, str]]:
    """(model, field, dotted key) for every int or float field of the spec, sections walked recursively."""
    import typing

    from pydantic import BaseModel

    def holds_numbers(annotation) -> bool:
        return annotation in (int, float) or any(holds_numbers(a) for a in typing.get_args(annotation) if not isinstance(a, (str, bool)))

    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        if typing.get_origin(field.annotation) is dict:  # search.space: a Dimension per searched field
            key, args = f"{key}.learning_rate", [typing.get_args(field.annotation)[1]]
        else:
            args = [field.annotation, *typing.get_args(field.annotation)]
        section = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if section is not None:
            out += _number_fields(section, f"{key}.")
        elif holds_numbers(field.annotation):
            out.append((model, name, prefix + name))
    return out


NUMBER_FIELDS = _number_fields(SweepSpec)


def test_every_number_field_is_walked():
    keys = {key for _, _, key in NUMBER_FIELDS}
    assert {"train.epochs", "train.learning_rate", "data.max_length", "search.num_samples", "eval.temperature"} <= keys
    assert len(keys) >= 40


@pytest.mark.parametrize("model, field, key", NUMBER_FIELDS, ids=[key for _, _, key in NUMBER_FIELDS])
def test_a_boolean_is_no_number(tmp_path, model, field, key):
    """pydantic reads true as 1 and false as 0; in any number field of a sweep that is refused, naming the key."""
    from hpo.errors import SweepError
    from hpo.spec import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("")
    value = "[true, false]" if "tuple" in str(model.model_fields[field].annotation) else "true"
    with pytest.raises(SweepError, match=rf"{key} \(from --set\): expected a number, not true or false"):
        load_sweep(str(path), [f"{key}={value}"])


def test_ls_lists_the_runs_beside_a_damaged_one(tmp_path):
    runs = tmp_path / "runs"
    make_store(runs, "first")
    damage(make_store(runs, "broken"), DAMAGES["no_trials_table"][0])
    make_store(runs, "last")
    (runs / "folder" / "results.db").mkdir(parents=True)
    result = CliRunner().invoke(app, ["ls", "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[-4:]}
    assert lines["first"].split()[1:] == ["completed", "1", "trials"]
    assert lines["last"].split()[1:] == ["completed", "1", "trials"]
    assert "unreadable" in lines["broken"] and f"{runs}/broken/results.db: damaged results store: table trials is missing" in lines["broken"]
    assert "unreadable" in lines["folder"] and "a folder, not a results store file" in lines["folder"]


def test_a_writable_storage_passes_and_keeps_no_probe(tmp_path):
    from hpo.checks import check_storage

    check_storage(str(tmp_path / "shared" / "tune"))  # not there yet: Ray Tune creates it
    check_storage("s3://bucket/prefix")  # an object store is Ray Tune's to reach
    assert list(tmp_path.iterdir()) == []


def test_validate_passes_a_sweep_run_would_take(tiny_model_dir):
    result = CliRunner().invoke(app, ["validate", SMOKE, "--set", "data.max_length=64"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok {SMOKE}: 2 trials (grid)")
