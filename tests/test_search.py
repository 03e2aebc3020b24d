"""Search and scheduling through Ray Tune and Optuna: seeding, multi-objective, folding, ASHA, budgets."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from pathlib import Path

import pytest
from ray import tune

from hpo.callbacks import GpuHoursBudget
from hpo.space import param_space, search_alg
from hpo.trial import SPENT_KEY
from hpo.spec import load_sweep
from tests.conftest import REPO, invoke, query


def _searcher(spec):
    """The sweep's searcher as Tune sets it up."""
    searcher = search_alg(spec)
    searcher.set_search_properties(None, None, param_space(spec))
    return searcher


def _first_suggestions(spec, n: int = 4) -> list[dict]:
    searcher = _searcher(spec)
    return [searcher.suggest(f"t{i}") for i in range(n)]


@pytest.mark.parametrize("sweep", ["tpe_asha", "pareto"])
def test_same_seed_proposes_the_same_first_trials(sweep, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_sweep(sweep).spec
    first, again = _first_suggestions(spec), _first_suggestions(spec)
    assert first == again
    assert len({json.dumps(s, sort_keys=True) for s in first}) == len(first)  # and they are distinct trials
    other = load_sweep(sweep, ["search.seed=1"]).spec
    assert _first_suggestions(other) != first


def test_multi_objective_search_gets_every_objective(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_sweep("pareto").spec
    searcher = search_alg(spec)
    assert spec.multi_objective
    assert searcher.metric == ["win_rate", "train_flops"] and searcher.mode == ["max", "min"]
    assert type(searcher._sampler).__name__ == "NSGAIISampler"
    single = load_sweep("tpe_asha").spec
    assert not single.multi_objective and search_alg(single).metric == "win_rate"


def test_tpe_takes_its_random_startup_trials_from_the_sweep(monkeypatch):
    monkeypatch.chdir(REPO)
    for overrides, startup in ((["search.num_samples=12"], 10), (["search.num_samples=12", "search.startup_trials=3"], 3)):
        spec = load_sweep("tpe_asha", overrides).spec
        assert search_alg(spec)._sampler._n_startup_trials == startup, overrides


def test_folded_epochs_are_not_searched(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_sweep("llm_league").spec
    assert spec.folded_epochs == [5, 10, 20, 30]
    assert "epochs" not in param_space(spec)
    assert spec.trial_config({"learning_rate": 1e-5, "lora_r": 8}).train.epochs == 30
    unfolded = load_sweep("llm_league", ["search.fold_epochs=false"]).spec
    assert unfolded.folded_epochs is None
    assert param_space(unfolded)["epochs"] == tune.grid_search([5, 10, 20, 30])


def test_gpu_hours_budget_stops_all_once_spent():
    budget = GpuHoursBudget(1.0)
    assert budget("a", {SPENT_KEY: 0.4}) is False and not budget.stop_all()
    budget("b", {SPENT_KEY: 0.5})
    budget("a", {SPENT_KEY: 0.45})  # cumulative per trial: the latest value counts, not the sum of reports
    assert not budget.stop_all()
    budget("b", {SPENT_KEY: 0.6})
    assert budget.stop_all()


def _export(runs: Path, name: str) -> list[dict]:
    proc = invoke("export", name, "--runs-dir", str(runs))
    assert proc.returncode == 0, proc.stderr
    return list(csv.DictReader(io.StringIO(proc.stdout)))


def test_a_folded_grid_exports_one_row_per_epochs_value(tmp_path):
    """One training per configuration answers every epochs value of a folded grid: `export` gives each
    (configuration, epochs) point its own row, read off the training's first `epochs` epochs, with the
    cost paid up to there. (That the sweep trains each configuration once: benchmarks.epoch_folding's test.)"""
    from hpo.store import Store

    spec = load_sweep(str(REPO / "sweeps" / "smoke.yaml"), ["search.space.epochs={grid: [1, 2, 3]}"]).spec
    assert spec.folded_epochs == [1, 2, 3] and spec.num_trainings == 2
    (tmp_path / "runs" / "folded").mkdir(parents=True)
    store = Store.create(
        tmp_path / "runs" / "folded" / "results.db", name="folded", sweep_file="smoke.yaml", spec=spec.model_dump(mode="json"),
        searched=spec.searched, objectives=[o.model_dump() for o in spec.objectives], versions={}, git_commit=None,
    )  # fmt: skip
    for trial_id, learning_rate in (("a", 3e-4), ("b", 3e-3)):
        store.add_trial(trial_id, {"learning_rate": learning_rate, "epochs": 3})
        for epoch in (1, 2, 3):
            store.add_epoch(trial_id, epoch, {"eval_ppl": 5.0 - epoch, "win_rate": 0.5 + 0.1 * epoch, "train_seconds": 10.0 * epoch})
        store.set_trial_status(trial_id, "completed")
    store.finish("completed")
    store.close()
    exported = invoke("export", "folded", "--runs-dir", str(tmp_path / "runs"))
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert sorted(r["trial_id"] for r in rows) == ["a@1", "a@2", "a@3", "b@1", "b@2", "b@3"]
    for row in rows:
        epochs = int(row["epochs"])
        assert row["trial_id"].endswith(f"@{epochs}") and row["status"] == "completed"
        assert int(row["epochs_completed"]) == epochs and float(row["train_seconds"]) == 10.0 * epochs
        assert float(row["eval_ppl"]) == 5.0 - epochs and float(row["best_epoch"]) == epochs  # its own best: its last epoch


def test_tpe_with_asha_stops_weak_trials_early(asha_run):
    runs = asha_run.runs
    rows = _export(runs, "tpe_asha")
    assert len(rows) == 6
    stopped = [r for r in rows if r["status"] == "early_stopped"]
    assert stopped, [(r["status"], r["epochs_completed"]) for r in rows]
    for row in stopped:
        assert int(row["epochs_completed"]) < 3
        assert float(row["eval_ppl"]) > 1 and float(row["train_seconds"]) > 0  # metrics up to the stop are kept
    assert any(r["status"] == "completed" and r["epochs_completed"] == "3" for r in rows)
    assert {r["status"] for r in rows} == {"completed", "early_stopped"}  # no trial errored in a reused worker
    # A stopped trial's worker process ran a later trial: its thread, stopped inside tune.report, ended in time.
    conn = sqlite3.connect(asha_run.db)
    pids = {}
    for trial_id, status, started, metrics in conn.execute(
        "SELECT trial_id, status, started_at, metrics_json FROM trials JOIN epochs USING (trial_id) WHERE epoch = 1"
    ):
        pids[trial_id] = (json.loads(metrics)["worker_pid"], status, started)
    assert any(
        later_pid == pid and later_started > started
        for pid, status, started in pids.values() if status == "early_stopped"
        for later_pid, _, later_started in pids.values()
    ), pids
    html = (asha_run.run_dir / "report.html").read_text()
    assert "early stopped" in html


def test_local_paths_become_absolute_before_trials(tmp_path, monkeypatch):
    """Ray Tune runs each trial in its own working directory, so a relative data path must not reach it."""
    from hpo.driver import _absolute_paths

    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    monkeypatch.chdir(tmp_path)
    spec = load_sweep(str(REPO / "sweeps" / "smoke.yaml"), ["data.source=data.jsonl"]).spec
    fixed = _absolute_paths(spec)
    assert fixed.data.source == str(tmp_path / "data.jsonl")
    assert fixed.model.name == "tiny" and fixed.train == spec.train


def test_a_decaying_schedule_trains_each_epochs_value_on_its_own(tmp_path, tiny_model_dir):
    """Under a linear or cosine schedule the learning rate at epoch k depends on the total epochs,
    so one long training cannot answer the shorter ones: folding is off, and the CLI says why."""
    from hpo.spec import SweepSpec

    def stored(spec: SweepSpec) -> SweepSpec:  # as analysis reads it back from a store (one decision: the spec's)
        return SweepSpec.from_store({**spec.model_dump(mode="json"), "overrides": []}, tmp_path / "results.db")

    path = tmp_path / "cosine.yaml"
    path.write_text("train: {lr_schedule: cosine}\nsearch:\n  space:\n    epochs: {grid: [1, 2, 3]}\n")
    spec = load_sweep(str(path), []).spec
    assert spec.folded_epochs is None and spec.num_trainings == 3
    assert stored(spec).folded_epochs is None
    constant = load_sweep(str(path), ["train.lr_schedule=constant"]).spec
    assert constant.folded_epochs == [1, 2, 3] and stored(constant).folded_epochs == [1, 2, 3]
    # A searched schedule overrides train.lr_schedule: a grid of [constant] folds, whatever train says.
    searched = load_sweep(str(path), ["search.space.lr_schedule.grid=[constant]"]).spec
    assert searched.folded_epochs == [1, 2, 3] and stored(searched).folded_epochs == [1, 2, 3]
    proc = invoke("validate", str(path))
    assert proc.returncode == 0 and "epochs not folded: a decaying lr_schedule depends on the total epochs" in proc.stdout


CONDITIONAL = (
    "search:\n"
    "  algorithm: ALGO\n"
    "  num_samples: 12\n"
    "  space:\n"
    "    method: {choice: [lora, prefix, none]}\n"
    "  conditional:\n"
    "    lora: {lora_r: {choice: [2, 4]}, learning_rate: {loguniform: [1e-4, 1e-2]}}\n"
    "    prefix: {num_virtual_tokens: {int: [4, 16]}}\n"
)


def test_conditional_parameters_exist_only_for_their_method(tmp_path):
    import optuna

    from hpo.space import _optuna_space

    path = tmp_path / "conditional.yaml"
    path.write_text(CONDITIONAL.replace("ALGO", "tpe"))
    spec = load_sweep(str(path), []).spec
    assert param_space(spec) == {}  # Optuna samples the space itself (define-by-run)
    assert spec.searched == ["method", "lora_r", "learning_rate", "num_virtual_tokens"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = _optuna_space(spec)
    seen = set()
    for _ in range(30):
        trial = study.ask()
        space(trial)
        params = trial.params
        seen.add(params["method"])
        expected = {"lora": {"method", "lora_r", "learning_rate"}, "prefix": {"method", "num_virtual_tokens"}, "none": {"method"}}
        assert set(params) == expected[params["method"]]
        study.tell(trial, 0.5)
    assert seen == {"lora", "prefix", "none"}


def test_a_grid_with_conditional_parameters_runs_each_method_with_its_own_values(variants_run):
    """The variants sweep of tests/conftest.py: method {lora, none}; lora alone with lora_alpha and target_modules."""
    assert "5 trials (grid)" in variants_run.proc.stderr
    rows = _export(variants_run.runs, "variants")
    configs = sorted((r["method"], r["lora_alpha"], r["target_modules"]) for r in rows)
    assert configs == [  # the store holds plain fields, no variant dicts
        ("lora", "1000000000.0", "no_such_module"), ("lora", "1000000000.0", "q_proj,v_proj"),
        ("lora", "8.0", "no_such_module"), ("lora", "8.0", "q_proj,v_proj"), ("none", "", ""),
    ]  # fmt: skip
    # Without a `storage`, Tune keeps each trial's checkpoints in the run folder: runs/<name>/tune/<trial_id>.
    kept = query(variants_run.db, "SELECT trial_id, checkpoint, params_json FROM epochs JOIN trials USING (trial_id)")
    [(trial_id, checkpoint)] = [(t, Path(c)) for t, c, p in kept if json.loads(p)["method"] == "lora"]  # the one that trained
    assert checkpoint.parent == variants_run.run_dir / "tune" / trial_id and (checkpoint / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    "conditional, expected",
    [
        ("    lorra: {lora_r: {grid: [2]}}\n", "search.conditional.lorra: not a method; did you mean 'lora'?"),
        ("    full: {learning_rate: {grid: [1e-4]}}\n", "search.conditional.full: method full is never tried"),
        ("    lora: {method: {grid: [lora]}}\n", "search.conditional.lora.method: already searched"),
        ("    lora: {lora_r: {grid: [0]}}\n", "search.conditional.lora.lora_r.grid[0]: input should be greater than or equal to 1"),
    ],
)
def test_bad_conditional_parameters(tmp_path, conditional, expected):
    from hpo.errors import SweepError

    path = tmp_path / "bad.yaml"
    path.write_text("search:\n  space:\n    method: {grid: [lora, none]}\n  conditional:\n" + conditional)
    with pytest.raises(SweepError, match=re.escape(expected)):
        load_sweep(str(path), [])


def test_max_concurrent_trials_reaches_the_grid_generator(tmp_path):
    """Ray Tune applies TuneConfig.max_concurrent_trials to Searchers only; a grid's generator needs its own limit."""
    path = tmp_path / "one_at_a_time.yaml"
    path.write_text("search:\n  max_concurrent_trials: 1\n  space:\n    learning_rate: {grid: [1e-3, 3e-3]}\n")
    assert search_alg(load_sweep(str(path), []).spec).max_concurrent == 1


@pytest.mark.parametrize("algorithm", ["tpe", "nsga2"])
def test_a_discrete_space_never_trains_a_configuration_twice(tmp_path, algorithm):
    """Optuna proposes configurations that already ran (TPE alone: about 8 distinct in 12 proposals
    on 12 configurations); their earlier result answers, and a finished space ends the search."""
    objectives = "{metric: win_rate, mode: max}" + (", {metric: train_seconds, mode: min}" if algorithm == "nsga2" else "")
    path = tmp_path / "small.yaml"
    path.write_text(
        f"search:\n  algorithm: {algorithm}\n  num_samples: 20\n"
        "  space:\n    learning_rate: {choice: [1e-4, 1e-3, 1e-2]}\n    lora_r: {grid: [4, 8, 16, 32]}\n"
        f"objectives: [{objectives}]\n"
    )
    searcher = _searcher(load_sweep(str(path), []).spec)
    ran = _drive(searcher, 20, lambda c: {"win_rate": c["lora_r"] * c["learning_rate"], "train_seconds": 1.0})
    assert len(ran) == 12 and len(set(ran)) == 12  # each of the 3 x 4 configurations once, then finished
    assert searcher.repeats_answered > 0  # Optuna did propose repeats; none of them ran


def _drive(searcher, trials: int, score) -> list[str]:
    """Tune's calls to a searcher, trial after trial: suggest, one result, complete."""
    from ray.tune.search import Searcher

    ran = []
    for i in range(trials):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        ran.append(json.dumps(config, sort_keys=True))
        result = {**score(config), "training_iteration": 1}
        searcher.on_trial_result(f"t{i}", result)
        searcher.on_trial_complete(f"t{i}", result)
    return ran


def test_a_used_up_conditional_space_still_gets_trials(tmp_path):
    """A conditional space is not counted, so it never finishes: once every configuration has run,
    a repeat runs after all, as an open Optuna trial that takes its results."""
    path = tmp_path / "small_conditional.yaml"
    path.write_text(
        "search:\n  algorithm: tpe\n  num_samples: 8\n  space:\n    method: {choice: [lora, none]}\n"
        "  conditional:\n    lora: {lora_r: {choice: [2, 4]}}\n"
        "objectives: [{metric: win_rate, mode: max}]\n"
    )
    searcher = _searcher(load_sweep(str(path), []).spec)
    ran = _drive(searcher, 8, lambda c: {"win_rate": 0.5 + 0.1 * (c.get("lora_r") or 0)})
    assert len(ran) == 8 and len(set(ran)) == 3  # lora r2, lora r4, none; then repeats
    assert searcher.repeats_answered > 0


def test_deterministic_failures_are_remembered_and_errors_are_not(tmp_path):
    from hpo.trial import STATUS_KEY

    path = tmp_path / "ppl.yaml"
    path.write_text(
        "search:\n  algorithm: tpe\n  num_samples: 4\n  space:\n    lora_r: {grid: [4, 8]}\n"
        "objectives: [{metric: eval_ppl, mode: min}]\n"
    )
    searcher = _searcher(load_sweep(str(path), []).spec)
    statuses = {4: "oom", 8: "error"}  # out of memory again if run again; an error may not recur
    ran = _drive(searcher, 4, lambda c: {STATUS_KEY: statuses[c["lora_r"]], "eval_ppl": float("inf")})
    assert list(searcher.results.values()) == [float("inf")]  # the oom configuration only
    assert ran.count(json.dumps({"lora_r": 4})) == 1 and ran.count(json.dumps({"lora_r": 8})) >= 1
