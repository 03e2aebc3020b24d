"""Sweep files and --set overrides: validation and the one-line errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpo.errors import SweepError
from hpo.spec import available_sweeps, load_sweep, resolve_sweep

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml")))
def test_every_shipped_sweep_validates(name, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(name)
    assert sweep.name == name
    assert sweep.spec.search.space, "a shipped sweep searches something"


def test_shipped_sweeps_include_the_defaults(monkeypatch):
    monkeypatch.chdir(REPO)
    assert {"lora_rank_lr", "smoke"} <= set(available_sweeps())


def test_defaults_fill_a_minimal_file(tmp_path):
    spec = load_sweep(write(tmp_path, "search:\n  space:\n    lora_r: {grid: [4, 8]}\n")).spec
    assert spec.model.name == "tiny"
    assert spec.train.target_modules == ("q_proj", "v_proj")
    assert spec.tune_objective.metric == "win_rate"


def test_a_sweep_quantizes_where_some_method_it_tries_loads_a_4_bit_base(tmp_path):
    """Its workers then keep bitsandbytes (trainers.methods.without_bitsandbytes skips it otherwise)."""
    assert not load_sweep(write(tmp_path, "train: {method: lora}\n")).spec.quantizes
    assert load_sweep(write(tmp_path, "train: {method: qlora}\n")).spec.quantizes
    assert load_sweep(write(tmp_path, "search:\n  space:\n    method: {grid: [lora, qlora]}\n")).spec.quantizes
    assert not load_sweep(write(tmp_path, "search:\n  space:\n    method: {grid: [lora, dora, none]}\n")).spec.quantizes


def test_scientific_notation_is_a_float(tmp_path):
    spec = load_sweep(write(tmp_path, "train: {learning_rate: 5e-5}\nsearch:\n  space:\n    learning_rate: {grid: [1e-4, 2e-3]}\n")).spec
    assert spec.train.learning_rate == pytest.approx(5e-5)
    assert spec.search.space["learning_rate"].grid == [1e-4, 2e-3]


def test_overrides_set_nested_values_and_parse_types(tmp_path):
    path = write(tmp_path, "train: {epochs: 3}\n")
    spec = load_sweep(path, ["train.epochs=2", "search.algorithm=tpe", "train.target_modules=q_proj,k_proj"]).spec
    assert spec.train.epochs == 2
    assert spec.search.algorithm == "tpe"
    assert spec.train.target_modules == ("q_proj", "k_proj")


def test_trial_config_merges_searched_values(tmp_path):
    spec = load_sweep(write(tmp_path, "train: {lora_r: 8, epochs: 2}\n")).spec
    config = spec.trial_config({"lora_r": 16, "learning_rate": 0.002})
    assert (config.train.lora_r, config.train.learning_rate, config.train.epochs) == (16, 0.002, 2)


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("train: {epochs: [1\n", [], ":2: YAML syntax error"),
        ("train: {learning_rat: 1e-3}\n", [], "train.learning_rat: unknown key; did you mean 'learning_rate'?"),
        ("train: {epochs: two}\n", [], "train.epochs: input should be a valid integer"),
        ("train: {learning_rate: -0.1}\n", [], "train.learning_rate: input should be greater than 0 (got -0.1)"),
        ("search:\n  space:\n    lora_r: {grid: [0, 4]}\n", [], "search.space.lora_r.grid[0]: input should be greater than or equal to 1 (got 0)"),
        ("search:\n  space:\n    lora_r: {grid: []}\n", [], "search.space.lora_r: empty grid"),
        ("search:\n  space:\n    lora_rank: {grid: [4]}\n", [], "search.space.lora_rank: not a field of train; did you mean 'lora_r'?"),
        ("search:\n  space:\n    learning_rate: {loguniform: [1e-3, 1e-4]}\n", ["search.algorithm=random"], "range [0.001, 0.0001] is empty"),
        ("search:\n  space:\n    learning_rate: {uniform: [1e-4, 1e-3]}\n", [], "search.algorithm 'grid' takes only grid values"),
        ("objectives: [{metric: train_seconds, mode: min}]\n", [], "objectives: name at least one per-epoch metric"),
        ("train: {epochs: 2}\n", ["train.epochs=0"], "train.epochs (from --set): input should be greater than or equal to 1"),
        ("train: {epochs: 2}\n", ["train.epochs"], "--set 'train.epochs': expected KEY=VALUE"),
        ("- a\n- b\n", [], "expected a mapping of sections"),
        ("eval: {do_sample: true}\ntrain: {method: prefix}\n", [], "eval.do_sample: prefix tuning answers greedily only"),
        (
            "search:\n  space:\n    lora_r: {grid: [4, 8, 16, 32]}\n    learning_rate: {grid: [1e-4, 1e-3, 1e-2]}\n",
            ["search.max_trials=10"],
            "search: 12 trials is more than search.max_trials (10); shrink the grid or num_samples, or raise search.max_trials",
        ),
    ],
)
def test_bad_input_is_one_line_naming_file_and_key(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(SweepError) as info:
        load_sweep(path, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if not expected.startswith("--set"):
        assert message.startswith(path)


def test_unknown_sweep_lists_the_available_ones(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SweepError, match=r"unknown sweep 'lora_rank_l'.*did you mean 'lora_rank_lr'"):
        resolve_sweep("lora_rank_l")
