"""The code's shape, checked: dependencies point one way, benchmarks use public functions only,
and every name of the vocabulary (trainers.vocabulary) is declared once and documented."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO
from trainers.vocabulary import (
    BEST_EPOCH_METRICS,
    COST_METRICS,
    EPOCH_COLUMNS,
    PEAK_METRICS,
    QUALITY_METRICS,
    TRIAL_METRICS,
    VERDICT_METRICS,
    EpochMetrics,
    TrialSummary,
    metric_docs,
)

PACKAGES = ("trainers", "hpo", "analysis", "tracking", "benchmarks")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, at the top or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).glob("*.py"))


def _violations(package: str, forbidden: tuple[str, ...], allowed_files: tuple[str, ...] = ()) -> list[str]:
    return [
        f"{path.relative_to(REPO)} imports {module}"
        for path in _modules(package)
        if path.name not in allowed_files
        for module, _ in _imports(path)
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]


def test_the_trainers_know_nothing_of_ray_optuna_the_store_or_analysis():
    assert _violations("trainers", ("ray", "optuna", "sqlite3", "hpo", "analysis", "tracking", "benchmarks")) == []


DRIVER_SIDE = ("hpo.driver", "hpo.cli", "hpo.trial", "hpo.callbacks", "hpo.runtime", "hpo.rundir", "hpo.space",
               "hpo.progress", "hpo.searchers", "hpo.rejudge", "hpo.checks", "hpo.packs", "benchmarks")  # fmt: skip


def test_analysis_reads_the_store_and_never_the_driver():
    assert _violations("analysis", (*DRIVER_SIDE, "ray", "optuna", "tracking")) == []


def test_the_trackers_mirror_the_store_and_never_drive_the_sweep():
    """tracking reads the store (through analysis, for a trial's result) and writes to the trackers;
    the driver calls it, never the other way round."""
    assert _violations("tracking", DRIVER_SIDE) == []


def test_only_the_cli_writes_reports():
    assert _violations("hpo", ("analysis",), allowed_files=("cli.py",)) == []


def test_the_benchmarks_use_public_functions_only():
    private = [
        f"{path.relative_to(REPO)}: from {module} import {name}"
        for path in _modules("benchmarks")
        for module, names in _imports(path)
        if module.split(".")[0] in ("hpo", "analysis", "trainers")
        for name in names
        if name.startswith("_")
    ]
    patched = [  # `module.attribute = ...`: replacing a function of the code under measurement
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in _modules("benchmarks")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id in ("driver", "hpo", "trainers", "analysis")
    ]
    assert private == [] and patched == []


def test_the_import_checks_see_what_they_forbid(tmp_path, monkeypatch):
    """The checks above would catch a violation: a planted import in a copy of the tree is found."""
    import tests.test_architecture as checks

    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "trainers" / "bad.py").write_text("def f():\n    from hpo.store import Store\n")
    (tmp_path / "hpo" / "driver.py").write_text("from analysis.report import write_report\n")
    (tmp_path / "benchmarks" / "b.py").write_text("from hpo.driver import _tuner\nimport hpo.driver as driver\ndriver.run_trial = None\n")
    (tmp_path / "tracking" / "t.py").write_text("def f():\n    from hpo.driver import run_sweep\n")
    monkeypatch.setattr(checks, "REPO", tmp_path)
    with pytest.raises(AssertionError):
        checks.test_the_trainers_know_nothing_of_ray_optuna_the_store_or_analysis()
    with pytest.raises(AssertionError):
        checks.test_only_the_cli_writes_reports()
    with pytest.raises(AssertionError):
        checks.test_the_benchmarks_use_public_functions_only()
    with pytest.raises(AssertionError):
        checks.test_the_trackers_mirror_the_store_and_never_drive_the_sweep()


def test_every_metric_is_declared_once_and_documented():
    docs = metric_docs(EpochMetrics)
    assert all(metric.doc for metric in docs.values())
    named = {*EPOCH_COLUMNS, *VERDICT_METRICS, *QUALITY_METRICS, *COST_METRICS, *BEST_EPOCH_METRICS, *TRIAL_METRICS, *PEAK_METRICS}
    assert named <= set(docs), named - set(docs)  # every list names declared metrics only
    assert all(metric.doc for metric in metric_docs(TrialSummary).values())
    assert set(TrialSummary.__annotations__) & set(docs) == {"judge"}  # the best epoch's; the others are the trial's own


def test_the_store_keeps_the_vocabularys_columns(tmp_path):
    from hpo.store import Store

    with Store.create(tmp_path / "results.db", name="s", sweep_file="s.yaml", spec={}, searched=[], objectives=[],
                      versions={}, git_commit=None) as store:  # fmt: skip
        columns = [row[1] for row in store.conn.execute("PRAGMA table_info(epochs)")]
    assert set(columns) == {"trial_id", "epoch", *EPOCH_COLUMNS, "metrics_json", "checkpoint"}


def test_a_trials_row_is_the_vocabularys_trial_summary(tmp_path):
    from analysis.load import load_trials
    from hpo.store import Store

    with Store.create(tmp_path / "results.db", name="s", sweep_file="s.yaml", spec={}, searched=["learning_rate"],
                      objectives=[{"metric": "eval_ppl", "mode": "min"}], versions={}, git_commit=None) as store:  # fmt: skip
        store.add_trial("t1", {"learning_rate": 1e-3})
        store.add_epoch("t1", 1, {"eval_ppl": 3.0, "train_seconds": 1.0})
        columns = list(load_trials(store).columns)
    rest = [c for c in columns if c not in ("learning_rate", *BEST_EPOCH_METRICS, *TRIAL_METRICS)]
    assert rest == list(TrialSummary.__annotations__)
