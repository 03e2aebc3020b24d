"""The report's data and HTML, built from a real SQLite store with a handful of hand-made trials."""

import math
from pathlib import Path

import plotly.offline
import pytest

from analysis.load import load_answers, load_epochs, load_trials
from analysis.report import build_report, report_data, write_report
from hpo.store import COMPLETED, EARLY_STOPPED, ERROR, Store

INJECTED = "<script>alert(1)</script>"
SWEEP_NAME = "lora <i>demo</i>"
OOM = "CUDA out of memory <b>12 GiB</b>\nTraceback (most recent call last):\n  ..."

# trial_id: (status, params, per-epoch (win_rate, eval_ppl, cumulative train_seconds, peak_memory_gb), error)
TRIALS = {
    "t-good": (
        COMPLETED, {"learning_rate": 2e-4, "lora_r": 16},
        [(0.40, 5.0, 14, 6.0), (0.62, 4.1, 28, 6.5), (0.60, 4.0, 41, 6.2)], None,
    ),
    "t-cheap": (EARLY_STOPPED, {"learning_rate": 1e-3, "lora_r": 4}, [(0.45, 4.8, 10, 5.0)], None),
    "t-bad": (
        COMPLETED, {"learning_rate": 1e-5, "lora_r": 8},
        [(0.30, 5.9, 17, 5.5), (0.35, 5.5, 33, 5.5), (0.34, 5.6, 50, 5.5)], None,
    ),
    # Failed after one good, cheap epoch: plotted, but never on a frontier nor the best trial.
    "t-late": (ERROR, {"learning_rate": 5e-4, "lora_r": 32}, [(0.70, 3.9, 5, 9.0)], "NaN loss at epoch 2"),
    "t-oom": (ERROR, {"learning_rate": 3e-4, "lora_r": 64}, [], OOM),
}  # fmt: skip

PROMPTS = [(i, f"prompt {i}", f"reference {i}", f"base answer {i}") for i in range(1, 8)]


def make_store(path: Path, objectives: list[dict[str, str]] | None = None) -> Store:
    """A finished sweep of TRIALS; t-good's answer to prompt 2 at epoch 2 is INJECTED."""
    store = Store.create(
        path,
        name=SWEEP_NAME,
        sweep_file="sweeps/demo.yaml",
        spec={"method": "lora"},
        searched=["learning_rate", "lora_r"],
        objectives=objectives or [{"metric": "win_rate", "mode": "max"}, {"metric": "train_seconds", "mode": "min"}],
        versions={"peft": "0.0"},
        git_commit="0123456789abcdef",
    )
    for trial_id, (status, params, epochs, error) in TRIALS.items():
        store.add_trial(trial_id, {**params, "epochs": 3, "model": "tiny"})
        for epoch, (win_rate, eval_ppl, seconds, memory) in enumerate(epochs, start=1):
            wins = round(win_rate * 10)
            store.add_epoch(
                trial_id,
                epoch,
                {
                    "win_rate": win_rate,
                    "eval_ppl": eval_ppl,
                    "wins": wins,
                    "losses": 10 - wins,
                    "ties": 0,
                    "train_seconds": seconds,
                    "gpu_hours": seconds / 3600,
                    "cost_usd": seconds / 3600 * 2.5,
                    "peak_memory_gb": memory,
                    "grad_norm": 1.0,  # not a column: kept in metrics_json
                },
            )
        store.set_trial_status(trial_id, status, error)
    store.set_baseline(PROMPTS)
    verdicts = [1.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0]
    store.add_answers("t-good", 1, [(i, f"early answer {i}", 0.0) for i, *_ in PROMPTS])
    answers = [(i, INJECTED if i == 2 else f"answer {i}", v) for (i, *_), v in zip(PROMPTS, verdicts)]
    store.add_answers("t-good", 2, answers)
    store.finish("completed")
    return store


@pytest.fixture
def store(tmp_path):
    store = make_store(tmp_path / "results.db")
    yield store
    store.close()


def by_id(df):
    return df.set_index("trial_id")


def test_load_trials_columns_best_epoch_and_totals(store):
    trials = load_trials(store)
    assert list(trials.columns) == [
        "trial_id", "status", "learning_rate", "lora_r", "epochs", "epochs_completed", "best_epoch",
        "eval_ppl", "win_rate", "win_rate_low", "win_rate_high", "wins", "losses", "ties",
        "retention_ppl", "order_agreement", "answer_length_diff",
        "train_seconds", "eval_seconds", "judge_seconds", "gpu_hours", "cost_usd", "peak_memory_gb", "error",
    ]  # fmt: skip
    assert set(trials["trial_id"]) == set(TRIALS)
    good = by_id(trials).loc["t-good"]
    # Best epoch by win rate is 2; its metrics, but the whole trial's cost and the peak memory of any epoch.
    assert (good["best_epoch"], good["win_rate"], good["eval_ppl"], good["wins"]) == (2, 0.62, 4.1, 6)
    assert good["epochs_completed"] == 3
    assert good["train_seconds"] == 41 and good["peak_memory_gb"] == 6.5
    assert good["gpu_hours"] == pytest.approx(41 / 3600) and good["cost_usd"] == pytest.approx(41 / 3600 * 2.5)
    assert (good["learning_rate"], good["lora_r"], good["epochs"]) == (2e-4, 16, 3)


def test_load_trials_keeps_trials_without_epochs_with_nan_metrics(store):
    oom = by_id(load_trials(store)).loc["t-oom"]
    assert oom["status"] == ERROR and oom["error"] == OOM
    assert oom["epochs_completed"] == 0 and oom["lora_r"] == 64
    for column in ("best_epoch", "eval_ppl", "win_rate", "wins", "train_seconds", "cost_usd", "peak_memory_gb"):
        assert math.isnan(oom[column]), column


def test_best_epoch_follows_the_first_per_epoch_objective(tmp_path):
    # train_seconds comes first but is cumulative (its best epoch would always be the first), so
    # eval_ppl picks the epoch: t-good's epoch 3 (4.0), where the win rate picked epoch 2.
    objectives = [{"metric": "train_seconds", "mode": "min"}, {"metric": "eval_ppl", "mode": "min"}]
    store = make_store(tmp_path / "results.db", objectives)
    trials = by_id(load_trials(store))
    assert trials.loc["t-good", "best_epoch"] == 3
    assert (trials.loc["t-good", "eval_ppl"], trials.loc["t-good", "win_rate"]) == (4.0, 0.60)
    store.close()

    # With eval_ppl maximised (silly, but it shows the mode is used) t-good's best is epoch 1.
    store = make_store(tmp_path / "max.db", [{"metric": "eval_ppl", "mode": "max"}])
    trials = by_id(load_trials(store))
    assert trials.loc["t-good", "best_epoch"] == 1 and trials.loc["t-good", "win_rate"] == 0.40
    store.close()


def test_load_epochs_and_answers_join_params_and_baseline(store):
    epochs = load_epochs(store)
    assert len(epochs) == sum(len(e) for _, _, e, _ in TRIALS.values())
    row = epochs[(epochs["trial_id"] == "t-bad") & (epochs["epoch"] == 2)].iloc[0]
    assert (row["learning_rate"], row["lora_r"], row["win_rate"], row["grad_norm"]) == (1e-5, 8, 0.35, 1.0)

    answers = load_answers(store, "t-good")
    assert len(answers) == 2 * len(PROMPTS)
    row = answers[(answers["epoch"] == 2) & (answers["prompt_id"] == 3)].iloc[0]
    assert (row["prompt"], row["reference"], row["base_answer"], row["answer"], row["verdict"]) == (
        "prompt 3", "reference 3", "base answer 3", "answer 3", 0.5,
    )  # fmt: skip
    assert len(load_answers(store)) == len(answers)


def test_report_data_frontiers_best_trial_and_captions(store):
    data = report_data(store)
    assert data.best_trial == "t-good"
    assert data.summary == (
        "Best trial t-good: win rate 0.62 at epoch 2, eval perplexity 4.1, 41 s of training; "
        "5 trials: 2 completed, 1 early stopped, 2 errors."
    )
    # Finished trials first, best first; the trial without metrics last.
    assert list(data.trials["trial_id"]) == ["t-good", "t-cheap", "t-bad", "t-late", "t-oom"]

    assert [f.title for f in data.frontiers] == ["cost vs win rate", "cost vs perplexity"]
    assert [c.metric for c in data.curves] == ["eval_ppl", "win_rate"]
    assert data.figure_count == 4 and data.notes == []
    win, ppl = data.frontiers
    for plot in (win, ppl):
        # The error trial with metrics is plotted (not on the front), the one without is not.
        assert set(plot.points["trial_id"]) == {"t-good", "t-cheap", "t-bad", "t-late"}
        assert not by_id(plot.points).loc["t-late", "eligible"]
        assert list(plot.front["trial_id"]) == ["t-cheap", "t-good"]
    assert win.caption == (
        "2 of 3 finished trials are on the frontier, from t-cheap (win rate 0.45 after 10 s) "
        "to t-good (win rate 0.62 after 41 s); 1 trial without these metrics is only in the table."
    )
    assert ppl.caption.startswith(
        "2 of 3 finished trials are on the frontier, from t-cheap (eval perplexity 4.8 after 10 s) "
        "to t-good (eval perplexity 4.1 after 41 s)"
    )

    curves = data.curves[0]
    assert list(curves.curves["trial_id"].unique()) == ["t-good", "t-cheap", "t-bad", "t-late"]
    assert curves.caption == "Eval perplexity per epoch for 4 trials; the lowest, 3.9, is trial t-late at epoch 1."

    samples = data.samples
    assert (samples.trial_id, samples.epoch) == ("t-good", 2)
    # Up to 4 per verdict: 4 of the 5 wins, the tie, the loss; wins first.
    assert list(samples.rows["verdict"]) == [1.0] * 4 + [0.5, 0.0]
    assert INJECTED in set(samples.rows["answer"])
    assert samples.caption == (
        "6 of 7 judged prompts for trial t-good at epoch 2, up to 4 per verdict; over all 7: 5 wins, 1 tie, 1 loss."
    )


def test_report_data_without_any_finished_trial(tmp_path):
    store = Store.create(
        tmp_path / "results.db", name="empty", sweep_file="s.yaml", spec={}, searched=["lora_r"],
        objectives=[{"metric": "eval_ppl", "mode": "min"}], versions={}, git_commit=None,
    )  # fmt: skip
    store.add_trial("t-0", {"lora_r": 4})
    data = report_data(store)
    assert data.best_trial is None and data.samples is None and data.figure_count == 0
    assert data.summary == "No trial has finished with metrics yet; 1 trial: 1 running."
    assert len(data.notes) == 4
    page = build_report(store)
    assert "plotly-graph-div" not in page and "t-0" in page
    store.close()


def test_report_html_is_self_contained_and_escaped(store):
    page = build_report(store)
    assert page.count(plotly.offline.get_plotlyjs()) == 1
    assert page.count('class="plotly-graph-div"') == 4
    assert "<script src" not in page.lower() and "<link" not in page.lower()
    # Every string from the store is escaped: the answer, the sweep name, the error.
    assert INJECTED not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<i>demo</i>" not in page and "lora &lt;i&gt;demo&lt;/i&gt;" in page
    assert "<b>12 GiB</b>" not in page and "CUDA out of memory &lt;b&gt;12 GiB&lt;/b&gt;" in page
    # Error trials are listed, the one without metrics included, marked by their row class.
    assert page.count('<tr class="status-error">') == 2
    assert '<tr class="status-completed best">' in page


def test_write_report_replaces_the_file_atomically(store, tmp_path):
    target = tmp_path / "out" / "report.html"
    target.parent.mkdir()
    target.write_text("old")
    assert write_report(store, target) == target
    assert target.read_text(encoding="utf-8") == build_report(store)
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]
