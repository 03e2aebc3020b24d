"""The report's data and HTML, built from a real SQLite store with a handful of hand-made trials."""

import io
import math
import re
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import plotly.offline
import pytest

from analysis.load import load_answers, load_epochs, load_judgments, load_trials
from analysis import figures
from analysis.report import build_report, figure_for, marks_for, report_data, sweet_spot, table_columns, write_report
from analysis.report_data import FrontierPlot, recommendations, trial_names
from analysis.style import compact
from hpo.store import Store
from trainers.vocabulary import TrialStatus
from trainers.stats import wilson_interval

INJECTED = "<script>alert(1)</script>"
SWEEP_NAME = "lora <i>demo</i>"
OOM_ERROR = "CUDA out of memory <b>12 GiB</b>\nTraceback (most recent call last):\n  ..."

# trial_id: (status, params, per-epoch (win_rate, eval_ppl, cumulative train_seconds, peak_memory_gb), error)
TRIALS = {
    "t-good": (
        TrialStatus.COMPLETED, {"learning_rate": 2e-4, "lora_r": 16},
        [(0.40, 5.0, 14, 6.0), (0.62, 4.1, 28, 6.5), (0.60, 4.0, 41, 6.2)], None,
    ),
    "t-cheap": (TrialStatus.EARLY_STOPPED, {"learning_rate": 1e-3, "lora_r": 4}, [(0.45, 4.8, 10, 5.0)], None),
    "t-bad": (
        TrialStatus.COMPLETED, {"learning_rate": 1e-5, "lora_r": 8},
        [(0.30, 5.9, 17, 5.5), (0.35, 5.5, 33, 5.5), (0.34, 5.6, 50, 5.5)], None,
    ),
    # The lowest perplexity, not the highest win rate: the paradox in miniature.
    "t-mid": (TrialStatus.COMPLETED, {"learning_rate": 1e-4, "lora_r": 8}, [(0.50, 4.2, 22, 5.5), (0.55, 3.8, 45, 5.5)], None),
    # Diverged after one good, cheap epoch: plotted, but never on a frontier, the best trial or in a statistic.
    "t-late": (TrialStatus.DIVERGED, {"learning_rate": 5e-4, "lora_r": 32}, [(0.70, 3.9, 5, 9.0)], "training loss became nan at epoch 2"),
    "t-oom": (TrialStatus.OOM, {"learning_rate": 3e-4, "lora_r": 64}, [], OOM_ERROR),
    "t-crash": (TrialStatus.ERROR, {"learning_rate": 3e-4, "lora_r": 4}, [], "ValueError: <bad> value"),
}  # fmt: skip
# Perplexity on the base model's own text, the same at every epoch; the base model's is BASELINE's.
RETENTION = {"t-good": 3.3, "t-cheap": 3.6, "t-bad": 3.05, "t-mid": 2.9, "t-late": 4.5}
BASELINE = {"eval_ppl": 6.0, "retention_ppl": 3.0}

# Prompt 1, judged a win for the best trial, is long: its cell in the report wraps rather than clips.
LONG_PROMPT = "Describe, in one sentence, " + " and ".join(f"what the creature number {i} eats" for i in range(12)) + "."
PROMPTS = [(i, LONG_PROMPT if i == 1 else f"prompt {i}", f"reference {i}", f"base answer {i}") for i in range(1, 8)]
# Verdicts against the base model, prompt by prompt, at each trial's best epoch. t-good beats t-cheap
# on prompts 2 and 6 and ties it on the rest: a sign test p of 2 * (1/2)^2 = 0.5.
VERDICTS = {
    ("t-good", 2): [1.0, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0],
    ("t-cheap", 1): [1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 1.0],
    ("t-bad", 2): [0.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.5],
}


def make_store(
    path: Path,
    objectives: list[dict[str, str]] | None = None,
    *,
    retention: bool = True,
    trials: dict = TRIALS,
    report: dict | None = None,
) -> Store:
    """A finished sweep of `trials`; t-good's answer to prompt 2 at epoch 2 is INJECTED. Its trials held
    GPUs (gpu_hours > 0) and counted FLOPs (train_flops = 1e12 per second); the report's cost axis is
    train_seconds unless `report` (the sweep file's report section) says otherwise."""
    store = Store.create(
        path,
        name=SWEEP_NAME,
        sweep_file="sweeps/demo.yaml",
        spec={"train": {"method": "lora"}, "report": {"cost_axis": "train_seconds"} if report is None else report},
        searched=["learning_rate", "lora_r"],
        objectives=objectives or [{"metric": "win_rate", "mode": "max"}, {"metric": "train_seconds", "mode": "min"}],
        versions={"peft": "0.0"},
        git_commit="0123456789abcdef",
    )
    for trial_id, (status, params, epochs, error) in trials.items():
        store.add_trial(trial_id, {**params, "epochs": 3, "model": "tiny"})
        for epoch, (win_rate, eval_ppl, seconds, memory) in enumerate(epochs, start=1):
            wins = round(win_rate * 10)
            low, high = wilson_interval(wins, 10 - wins, 0)
            store.add_epoch(
                trial_id,
                epoch,
                {
                    "win_rate": win_rate,
                    "win_rate_low": low,
                    "win_rate_high": high,
                    "eval_ppl": eval_ppl,
                    "retention_ppl": RETENTION[trial_id] if retention else None,
                    "wins": wins,
                    "losses": 10 - wins,
                    "ties": 0,
                    "train_seconds": seconds,
                    "train_flops": seconds * 1e12,
                    "gpu_hours": seconds / 3600,
                    "cost_usd": seconds / 3600 * 2.5,
                    "peak_memory_gb": memory,
                    "grad_norm": 1.0,  # not a column: kept in metrics_json
                },
            )
        store.set_trial_status(trial_id, status, error)
    store.set_baseline(PROMPTS, BASELINE if retention else {"eval_ppl": BASELINE["eval_ppl"]})
    store.add_answers("t-good", 1, [(i, f"early answer {i}", 0.0) for i, *_ in PROMPTS])
    for (trial_id, epoch), verdicts in VERDICTS.items():
        if trial_id not in trials:
            continue
        answers = [(i, f"{trial_id} answer {i}", v) for (i, *_), v in zip(PROMPTS, verdicts)]
        if trial_id == "t-good":
            answers[1] = (2, INJECTED, verdicts[1])
        store.add_answers(trial_id, epoch, answers)
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
        "retention_ppl", "order_agreement", "judge_parse_rate", "answer_length_diff",
        "train_seconds", "eval_seconds", "judge_seconds", "gpu_hours", "cost_usd", "train_flops", "eval_flops",
        "tokens_trained", "tokens_per_second",
        "trainable_params", "total_params", "peak_memory_gb", "train_memory_gb", "inference_memory_gb", "error", "error_log",
        "judge", "epochs_not_judged",
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
    trials = by_id(load_trials(store))
    oom = trials.loc["t-oom"]
    assert oom["status"] == TrialStatus.OOM and oom["error"] == OOM_ERROR
    assert oom["epochs_completed"] == 0 and oom["lora_r"] == 64
    for column in ("best_epoch", "eval_ppl", "win_rate", "wins", "train_seconds", "cost_usd", "peak_memory_gb"):
        assert math.isnan(oom[column]), column
    assert trials.loc["t-crash", "status"] == TrialStatus.ERROR and trials.loc["t-late", "status"] == TrialStatus.DIVERGED


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


def test_load_epochs_answers_and_judgments(store):
    epochs = load_epochs(store)
    assert len(epochs) == sum(len(e) for _, _, e, _ in TRIALS.values())
    row = epochs[(epochs["trial_id"] == "t-bad") & (epochs["epoch"] == 2)].iloc[0]
    assert (row["learning_rate"], row["lora_r"], row["win_rate"], row["grad_norm"]) == (1e-5, 8, 0.35, 1.0)
    assert row["retention_ppl"] == 3.05

    answers = load_answers(store, "t-good")
    assert len(answers) == 2 * len(PROMPTS)
    row = answers[(answers["epoch"] == 2) & (answers["prompt_id"] == 3)].iloc[0]
    assert (row["prompt"], row["reference"], row["base_answer"], row["answer"], row["verdict"]) == (
        "prompt 3", "reference 3", "base answer 3", "t-good answer 3", 0.5,
    )  # fmt: skip
    assert len(load_answers(store)) == 2 * len(PROMPTS) + 2 * len(PROMPTS)  # t-good's two epochs, t-cheap, t-bad

    # One row per (trial, prompt) at each trial's best epoch: t-good's epoch 1 answers are not there.
    judged = load_judgments(store)
    assert list(judged.columns) == ["trial_id", "epoch", "prompt_id", "verdict"]
    assert sorted(judged.groupby("trial_id")["epoch"].first().items()) == [("t-bad", 2), ("t-cheap", 1), ("t-good", 2)]
    assert list(judged[judged["trial_id"] == "t-good"]["verdict"]) == VERDICTS[("t-good", 2)]


def test_report_data_sweet_spot_names_the_cheaper_trial_with_numbers(store):
    data = report_data(store)
    spot = data.sweet_spot
    assert (spot.best, spot.cheapest) == ("t-good", "t-cheap")
    assert spot.test == (2, 0, 5, 0.5) and spot.cost_ratio == pytest.approx(41 / 10)
    assert spot.saving == pytest.approx(1 - 10 / 41) and spot.helped is False
    assert data.headline == [
        "Fine-tuning did not clearly help: the best trial's win rate against the base model, 0.62 (95% CI 0.31–0.83), "
        "includes 0.5, a tie with the base model.",
        "Best by win rate: trial t-good (learning_rate 0.0002, lora_r 16, epochs 3) with win rate 0.62 "
        "(95% CI 0.31–0.83) at epoch 2, eval perplexity 4.1, 41 s of measured training time.",
        "Sweet spot: trial t-cheap (learning_rate 0.001, lora_r 4, epochs 3) costs 76% less: 10 s of measured training "
        "time, against 41 s; with win rate 0.45 (95% CI 0.17–0.69) at epoch 1, eval perplexity 4.8, it is not "
        "significantly worse than t-good: on 7 shared prompts t-good was judged better on 2, t-cheap on 0, equal on 5 "
        "(exact two-sided sign test, p = 0.5, level 0.05; not significantly worse is not proven equal).",
    ]
    assert data.census == "7 trials: 3 completed, 1 early stopped, 1 error, 1 diverged, 1 out of memory."


def test_trials_are_named_by_the_parameters_that_differ(store):
    data = report_data(store)
    # epochs is 3 for every trial: left out of every name.
    assert data.names.to_dict() == {
        "t-good": "lr 2e-4 · r 16", "t-mid": "lr 1e-4 · r 8", "t-cheap": "lr 1e-3 · r 4", "t-bad": "lr 1e-5 · r 8",
        "t-late": "lr 5e-4 · r 32", "t-oom": "lr 3e-4 · r 64", "t-crash": "lr 3e-4 · r 4",
    }  # fmt: skip


def test_trial_names_drop_what_is_equal_and_tell_repeats_apart():
    trials = pd.DataFrame({
        "trial_id": ["t2", "t1", "t3", "t4"],
        "method": ["lora", "lora", "lora", "prefix"],
        "learning_rate": [1e-3, 1e-3, 2.5e-4, 1e-3],
        "lora_r": pd.array([16, 16, 16, None], dtype="Int64"),  # prefix tuning has no rank
        "lora_dropout": [0.05] * 4,
    })  # fmt: skip
    names = trial_names(trials, ["method", "learning_rate", "lora_r", "lora_dropout"])
    # Repeated seeds of one configuration: numbered in trial_id order, so a name never stands for two trials.
    assert names.to_dict() == {
        "t2": "lora · lr 1e-3 · r 16 #2", "t1": "lora · lr 1e-3 · r 16 #1",
        "t3": "lora · lr 2.5e-4 · r 16", "t4": "prefix · lr 1e-3",
    }  # fmt: skip
    # One trial: nothing differs, so it is named by all its parameters.
    assert trial_names(trials.iloc[2:3], ["learning_rate", "lora_dropout"]).to_dict() == {"t3": "lr 2.5e-4 · dropout 0.05"}
    assert [compact(v) for v in (1e-3, 3e-5, 0.05, 16, 16.0, 1234.5, True, ("q_proj", "v_proj"))] == [
        "1e-3", "3e-5", "0.05", "16", "16", "1234", "on", "q_proj+v_proj",
    ]  # fmt: skip


def test_recommendations_mark_the_best_and_a_cheaper_sweet_spot(store):
    data = report_data(store)
    assert data.recommendation.to_dict() == {
        "t-good": "best", "t-mid": "", "t-cheap": "sweet_spot", "t-bad": "", "t-late": "", "t-oom": "", "t-crash": "",
    }  # fmt: skip
    # The best is its own sweet spot, or no paired test was possible: no sweet_spot row.
    for cheapest in ("t-good", None):
        marks = recommendations(data.trials, data.sweet_spot._replace(cheapest=cheapest))
        assert marks[marks != ""].to_dict() == {"t-good": "best"}
    assert recommendations(data.trials, None).eq("").all()


BEST, SWEET = "best: lr 2e-4 · r 16", "sweet spot: lr 1e-3 · r 4"


def legend(fig) -> list[str]:
    return [t.name for t in fig.data if t.name and t.showlegend is not False]


def labels(fig) -> list[str]:
    return [a.text for a in fig.layout.annotations]


def test_figures_name_trials_by_what_differs_and_mark_the_best_and_the_sweet_spot(store):
    data = report_data(store)
    marks = marks_for(data)
    assert marks.picks == {"best": "t-good", "sweet_spot": "t-cheap"} and marks.epochs == {"t-good": 2, "t-cheap": 1}
    plots = [plot for _, section in data.sections for plot in section if not isinstance(plot, type(data.importance))]
    assert len(plots) == 8
    for plot in plots:  # every plot of trials marks both, each in the legend under its name
        entries = legend(figure_for(plot, data))
        assert BEST in entries and SWEET in entries, (plot.title, entries)

    win, ppl = (figure_for(plot, data) for plot in data.frontiers)
    # Labelled: the frontier and the two recommended trials, nothing else (the base model's line has its own).
    assert labels(win) == ["base model 0.5", BEST, SWEET]
    assert labels(ppl) == ["base model 6", BEST, SWEET, "lr 1e-4 · r 8"]  # t-mid ends the perplexity frontier
    # The hover names the trial and gives its id.
    hover = next(text for trace in win.data for text in (trace.hovertext or ()) if "trial t-mid " in text)
    assert hover.startswith("<b>lr 1e-4 · r 8</b><br>trial t-mid (completed)<br>learning_rate = 0.0001")

    curves = figure_for(data.curves[1], data)
    assert legend(curves) == [
        BEST, "lr 1e-4 · r 8", SWEET, "lr 1e-5 · r 8", "lr 5e-4 · r 32 (diverged)", "best epoch",
    ]  # fmt: skip
    star = next(t for t in curves.data if t.name == BEST and t.mode == "markers")  # on the epoch it is read at
    assert (list(star.x), list(star.y)) == ([2], [0.62])

    paradox = figure_for(data.paradox, data)
    assert labels(paradox) == [BEST, SWEET]  # a scatter labels the recommended trials only
    assert not any(t.text for t in paradox.data)


def test_labels_never_overlap_and_the_recommended_come_first():
    """Twenty frontier points packed into a corner: labels that would overlap are left out, and the best's and the
    sweet spot's labels are placed first. Each label's box is estimated as the figure places it."""
    n = 20
    points = pd.DataFrame({
        "trial_id": [f"t{i}" for i in range(n)],
        "status": TrialStatus.COMPLETED,
        "train_seconds": [10.0 + i * 0.1 for i in range(n)],
        "win_rate": [0.5 + i * 0.002 for i in range(n)],
        "learning_rate": [1e-4 * (i + 1) for i in range(n)],
        "best_epoch": 1.0,
    }).assign(eligible=True, on_front=True)  # fmt: skip
    points.loc[n - 1, ["train_seconds", "win_rate"]] = (100.0, 0.9)  # far off: the others are a tight cluster
    plot = FrontierPlot("cost vs win rate", "train_seconds", "win_rate", "max", points, None, "")
    names = trial_names(points, ["learning_rate"]).to_dict()
    marks = figures.Marks(names, {"best": "t19", "sweet_spot": "t3"}, {"t19": 1, "t3": 1})
    fig = figures.frontier_figure(plot, ["learning_rate"], marks)
    placed = list(fig.layout.annotations)
    assert [a.text for a in placed[:2]] == ["best: lr 2e-3", "sweet spot: lr 4e-4"]
    assert 2 < len(placed) < n  # some of the cluster labelled, not all
    x_range, y_range = list(fig.layout.xaxis.range), list(fig.layout.yaxis.range)
    for area in figures.PLOT_AREAS_PX:
        boxes = []
        for a in placed:
            label = figures.Label(a.x, a.y, a.text, 9)
            spot = {"showarrow": True, "ax": a.ax, "ay": a.ay} if a.showarrow else a.to_plotly_json()
            boxes.append(figures._spot_box(label, spot, area, x_range, y_range))
        for i, a in enumerate(boxes):
            assert 0 <= a[0] and a[2] <= area[0] and 0 <= a[1] and a[3] <= area[1]
            for b in boxes[i + 1 :]:
                assert not figures._overlap(a, b), (area, a, b)


def _ranked(rows):
    """A ranked trials table (finished first, best first) from (trial_id, status, win_rate, train_seconds) rows."""
    df = pd.DataFrame(rows, columns=["trial_id", "status", "win_rate", "train_seconds"])
    return df.assign(learning_rate=1e-3, best_epoch=1.0, eval_ppl=float("nan"), win_rate_low=float("nan"))


def _judged(verdicts):
    return pd.DataFrame(
        [(t, 1, i, v) for t, vs in verdicts.items() for i, v in enumerate(vs)],
        columns=["trial_id", "epoch", "prompt_id", "verdict"],
    )


def test_sweet_spot_skips_significantly_worse_cheaper_trials():
    trials = _ranked([
        ("A", TrialStatus.COMPLETED, 0.9, 100.0),
        ("C", TrialStatus.COMPLETED, 0.7, 30.0),
        ("B", TrialStatus.COMPLETED, 0.6, 10.0),
        ("D", TrialStatus.COMPLETED, 0.5, 5.0),  # cheapest finished, but never judged: not a candidate
        ("E", TrialStatus.ERROR, 0.95, 1.0),  # failed: never a candidate, however good and cheap
    ])  # fmt: skip
    best = [1.0] * 20
    judged = _judged({
        "A": best,
        "B": [0.0] * 6 + [1.0] * 14,  # worse on 6 of 6 differing prompts: p = 2/64 < 0.05
        "C": [0.5] * 5 + [1.0] * 15,  # worse on 5 of 5: p = 2/32 = 0.0625, not significant
        "E": [1.0] * 20,
    })  # fmt: skip
    spot = sweet_spot(trials, judged, ["learning_rate"], "win_rate", "train_seconds")
    assert (spot.best, spot.cheapest) == ("A", "C")
    assert spot.test.p_value == pytest.approx(0.0625) and (spot.test.better, spot.test.worse) == (5, 0)
    assert spot.cost_ratio == pytest.approx(100 / 30)
    assert "costs 70% less: 30 s of measured training time, against 100 s" in spot.sentences[1]
    assert "p = 0.062" in spot.sentences[1]


def test_sweet_spot_when_every_cheaper_trial_is_worse_or_the_best_is_cheapest():
    trials = _ranked([("A", TrialStatus.COMPLETED, 0.9, 100.0), ("B", TrialStatus.EARLY_STOPPED, 0.6, 10.0)])
    judged = _judged({"A": [1.0] * 20, "B": [0.0] * 6 + [1.0] * 14})
    spot = sweet_spot(trials, judged, [], "win_rate", "train_seconds")
    assert (spot.cheapest, spot.test, spot.cost_ratio) == ("A", None, 1.0)
    assert spot.sentences[1] == (
        "No configuration is meaningfully cheaper at the same quality: the one trial that saves at least 20% of A's "
        "training time (measured) and shares judged prompts with it is significantly worse (exact two-sided sign test "
        "over shared prompts, p < 0.05)."
    )

    trials = _ranked([("A", TrialStatus.COMPLETED, 0.9, 10.0), ("B", TrialStatus.COMPLETED, 0.6, 100.0)])
    spot = sweet_spot(trials, judged, [], "win_rate", "train_seconds")
    assert spot.cheapest == "A" and spot.sentences[1] == (
        "No configuration is meaningfully cheaper at the same quality: no finished trial saves at least 20% of A's "
        "training time (measured); A is also the cheapest."
    )

    # No verdicts at all (a sweep judged by perplexity only): no paired test, said so.
    spot = sweet_spot(trials, judged.iloc[0:0], [], "win_rate", "train_seconds")
    assert spot.cheapest is None and "no paired test" in spot.sentences[1]


def test_the_cost_axis_is_gpu_hours_on_gpus_else_flops_unless_the_sweep_names_one(tmp_path):
    store = make_store(tmp_path / "gpus.db", report={})  # its trials held GPUs: gpu_hours > 0
    data = report_data(store)
    assert data.cost == "gpu_hours" and [(f.x, f.y) for f in data.frontiers] == [
        ("gpu_hours", "win_rate"), ("gpu_hours", "eval_ppl"), ("train_seconds", "win_rate"),
    ]  # fmt: skip
    assert data.frontiers[0].caption.startswith("2 of 4 finished trials are on the frontier, from t-cheap (win rate 0.45, 0.00278 GPU-hours)")
    assert "costs 76% less: 0.00278 GPU-hours, against 0.0114 GPU-hours" in data.headline[2]
    assert "gpu_hours" in table_columns(data)
    store.close()

    cpu = {tid: (status, params, [(w, p, s, m) for w, p, s, m in epochs], error) for tid, (status, params, epochs, error) in TRIALS.items()}
    store = make_store(tmp_path / "cpu.db", report={}, trials=cpu)
    store.conn.execute("UPDATE epochs SET gpu_hours = 0, cost_usd = 0")  # on CPU: no GPU-hours
    data = report_data(store)
    assert data.cost == "train_flops" and data.frontiers[0].x == "train_flops"
    assert "costs 76% less: 10 TFLOPs of training compute, against 41 TFLOPs" in data.headline[2]
    store.close()

    store = make_store(tmp_path / "named.db", report={"cost_axis": "cost_usd"})
    assert report_data(store).cost == "cost_usd"
    store.close()


def test_report_data_frontiers_best_trial_and_captions(store):
    data = report_data(store)
    assert data.best_trial == "t-good" and (data.metric, data.cost) == ("win_rate", "train_seconds")
    # Finished trials first, best first; failed trials after, those without metrics last.
    assert list(data.trials["trial_id"]) == ["t-good", "t-mid", "t-cheap", "t-bad", "t-late", "t-oom", "t-crash"]

    assert [f.title for f in data.frontiers] == ["cost vs win rate", "cost vs perplexity"]
    assert [c.metric for c in data.curves] == ["eval_ppl", "win_rate"]
    assert data.figure_count == 9 and data.notes == []
    win, ppl = data.frontiers
    for plot in (win, ppl):
        # The diverged trial with metrics is plotted (not on the front), the two without are not.
        assert set(plot.points["trial_id"]) == {"t-good", "t-mid", "t-cheap", "t-bad", "t-late"}
        assert not by_id(plot.points).loc["t-late", "eligible"]
    assert list(win.front["trial_id"]) == ["t-cheap", "t-good"]
    assert list(ppl.front["trial_id"]) == ["t-cheap", "t-good", "t-mid"]
    # The base model ties itself (win rate 0.5) and its perplexity is stored with the sweep.
    assert (win.reference, ppl.reference) == (0.5, 6.0)
    assert win.caption == (
        "2 of 4 finished trials are on the frontier, from t-cheap (win rate 0.45, 10 s of measured training time) "
        "to t-good (win rate 0.62, 41 s of measured training time); bars are 95% intervals, median ±0.26, so smaller "
        "differences are mostly noise; 2 trials without these metrics are only in the table."
    )
    assert ppl.caption.startswith(
        "3 of 4 finished trials are on the frontier, from t-cheap (eval perplexity 4.8, 10 s of measured training time) "
        "to t-mid (eval perplexity 3.8, 45 s of measured training time)"
    )

    curves = data.curves[0]
    assert list(curves.curves["trial_id"].unique()) == ["t-good", "t-mid", "t-cheap", "t-bad", "t-late"]
    # Each trial's best epoch by win rate, drawn on both metrics' curves.
    assert sorted(map(tuple, curves.best[["trial_id", "epoch"]].to_numpy())) == [
        ("t-bad", 2), ("t-cheap", 1), ("t-good", 2), ("t-late", 1), ("t-mid", 2),
    ]  # fmt: skip
    assert by_id(curves.best).loc["t-good", "eval_ppl"] == 4.1
    assert curves.caption == (
        "Eval perplexity per epoch for 5 trials; the lowest, 3.8, is trial t-mid at epoch 2; ◆ marks each "
        "trial's best epoch by win rate, before its last epoch for 2 of 3 trials with more than one."
    )

    samples = data.samples
    assert (samples.trial_id, samples.epoch) == ("t-good", 2)
    # Up to 4 per verdict: 4 of the 5 wins, the tie, the loss; wins first.
    assert list(samples.rows["verdict"]) == [1.0] * 4 + [0.5, 0.0]
    assert INJECTED in set(samples.rows["answer"])
    assert samples.caption == (
        "6 of 7 judged prompts for trial t-good at epoch 2, up to 4 per verdict; over all 7: 5 wins, 1 tie, 1 loss."
    )


def test_report_data_perplexity_paradox_and_retention(store):
    data = report_data(store)
    paradox = data.paradox
    # Finished trials only: t-late (diverged) is drawn but not counted. Ranks by hand give -0.8.
    assert set(paradox.points["trial_id"]) == {"t-good", "t-mid", "t-cheap", "t-bad", "t-late"}
    assert paradox.correlation.n == 4 and paradox.correlation.rho == pytest.approx(-0.8)
    assert paradox.reference == {"x": 6.0, "y": 0.5}
    assert paradox.caption == (
        "Spearman's ρ between eval perplexity and win rate is -0.80 over 4 finished trials (95% CI -1.00 to +0.82): "
        "perplexity does not reliably rank trials by win rate here; the lowest perplexity (t-mid, 3.8) is not the "
        "highest win rate (t-good, 0.62)."
    )

    retention = data.retention
    assert (retention.x, retention.y, retention.reference) == ("retention_ppl", "win_rate", {"x": 3.0})
    assert retention.caption.startswith(
        "3 of 4 finished trials forgot part of the base domain (retention perplexity above the base model's 3), "
        "most t-cheap at 3.6 (+20%); Spearman's ρ between retention perplexity and win rate is +0.00"
    )


def test_report_data_without_retention_says_why(tmp_path):
    store = make_store(tmp_path / "results.db", retention=False)
    data = report_data(store)
    assert data.retention is None and data.figure_count == 8
    assert any("No trial has a retention_ppl" in note for note in data.notes)
    assert "retention_ppl" not in table_columns(data)
    store.close()


def test_report_data_parameter_effects_parallel_view_and_importance(store):
    data = report_data(store)
    effects = data.effects
    # epochs is 3 for every trial: nothing to show for it.
    assert (effects.metric, effects.params, effects.log_x) == ("win_rate", ["learning_rate", "lora_r"], ["learning_rate"])
    means = effects.means[effects.means["param"] == "lora_r"]
    # Finished trials only: t-late (lora_r 32, diverged) is no level; lora_r 8 averages t-bad and t-mid.
    assert list(means["level"]) == ["4", "8", "16"]
    assert list(means["mean"]) == pytest.approx([0.45, (0.35 + 0.55) / 2, 0.62])
    assert list(means["n"]) == [1, 2, 1]
    assert effects.caption == (
        "The mean win rate of finished trials moves most with learning_rate, from 0.35 at 1e-05 to 0.62 at 0.0002; "
        "then lora_r, from 0.45 at 4 to 0.62 at 16."
    )

    parallel = data.parallel
    assert parallel.axes == ["learning_rate", "lora_r", "train_seconds", "eval_ppl", "win_rate"]
    assert set(parallel.lines["trial_id"]) == {"t-good", "t-mid", "t-cheap", "t-bad", "t-late"}
    assert parallel.caption == (
        "One line per trial (5 with win rate), coloured by win rate from 0.35 to 0.7; "
        "the best, t-good, has learning_rate 0.0002, lora_r 16."
    )

    # Four finished trials, each with its own learning rate: no replication, so not estimable;
    # lora_r's groups differ less than the noise within them: 0.
    importance = by_id(data.importance.importances.rename(columns={"param": "trial_id"}))
    assert importance.loc["lora_r", "share"] == 0.0 and math.isnan(importance.loc["learning_rate", "share"])
    assert data.importance.n == 4
    assert data.importance.caption.endswith("lora_r 0%, learning_rate not estimable (one trial per value).")


def test_importance_needs_three_finished_trials(tmp_path):
    two = {k: TRIALS[k] for k in ("t-good", "t-cheap", "t-late")}
    store = make_store(tmp_path / "results.db", trials=two)
    data = report_data(store)
    assert data.importance is None and data.effects is not None and data.parallel is not None
    assert "Parameter importances need at least 3 finished trials with win_rate; there are 2." in data.notes
    page = build_report(store)
    assert page.count('class="plotly-graph-div"') == data.figure_count == 8
    store.close()


def test_report_data_without_any_finished_trial(tmp_path):
    store = Store.create(
        tmp_path / "results.db", name="empty", sweep_file="s.yaml", spec={}, searched=["lora_r"],
        objectives=[{"metric": "eval_ppl", "mode": "min"}], versions={}, git_commit=None,
    )  # fmt: skip
    store.add_trial("t-0", {"lora_r": 4})
    data = report_data(store)
    assert data.best_trial is None and data.samples is None and data.sweet_spot is None and data.figure_count == 0
    assert data.headline == ["No trial has finished with metrics yet."]
    assert data.census == "1 trial: 1 running."
    # One note per missing figure: 2 frontiers, 2 curves, the paradox, retention, the parameter figures.
    assert len(data.notes) == 7
    assert data.notes[-1] == "No searched parameter took two values among trials with eval_ppl, so there are no parameter figures."
    page = build_report(store)
    assert "plotly-graph-div" not in page and "t-0" in page
    store.close()


def test_report_html_is_self_contained_and_escaped(store):
    page = build_report(store)
    assert page.count(plotly.offline.get_plotlyjs()) == 1
    assert page.count('class="plotly-graph-div"') == 9
    assert "<script src" not in page.lower() and "<link" not in page.lower()
    # Every string from the store is escaped: the answer, the sweep name, the error.
    assert INJECTED not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<i>demo</i>" not in page and "lora &lt;i&gt;demo&lt;/i&gt;" in page
    assert "<b>12 GiB</b>" not in page and "CUDA out of memory &lt;b&gt;12 GiB&lt;/b&gt;" in page
    assert "<bad>" not in page and "ValueError: &lt;bad&gt; value" in page
    # Every failed trial is listed, each status with its own row class, the best trial marked.
    for status in ("error", "diverged", "oom"):
        assert page.count(f'<tr class="status-{status}">') == 1, status
    assert '<tr class="status-completed best">' in page
    assert page.count("<h2>") == 7  # 4 sections of figures, trials, judged prompts, how the numbers are computed


def test_trials_table_sort_keys_and_csv_download(store):
    page = build_report(store)
    table = page[page.index('<table class="trials sortable">') : page.index("</table>", page.index("trials sortable"))]
    headers = re.findall(r"<button type=\"button\">(.*?)</button>", table)
    assert [h.replace("<wbr>", "") for h in headers] == [
        "name", "trial_id", "status", "learning_rate", "lora_r", "epochs", "epochs_completed", "best_epoch", "eval_ppl",
        "win_rate", "retention_ppl", "train_seconds", "peak_memory_gb", "error",
    ]  # fmt: skip
    # Measured seconds are labelled as such, on hover and in the caption.
    assert '<th scope="col" title="training time measured on the machine that ran the sweep (moves with its load)">' in table
    assert "train_seconds is time measured on the machine that ran the sweep, and moves with its load" in page
    # Each row named by what differs, its id beside; the best and the sweet spot highlighted and said so.
    rows = {re.search(r'<td class="id">(.*?)</td>', row).group(1): row for row in table.split("<tr")[2:]}
    assert rows["t-mid"].startswith(' class="status-completed"><td class="name">lr 1e-4 · r 8</td><td class="id">t-mid</td>')
    assert rows["t-good"].startswith(' class="status-completed best"><td class="name">lr 2e-4 · r 16 <span class="pick"')
    assert "★&nbsp;best</span>" in rows["t-good"]
    assert rows["t-cheap"].startswith(' class="status-early_stopped sweet-spot"><td class="name">lr 1e-3 · r 4 <span')
    assert "◆&nbsp;sweet spot</span>" in rows["t-cheap"]
    assert '<td data-sort="1e-05">1e-05</td>' in rows["t-bad"]  # the parameters' own columns keep their values
    assert sum("class=\"pick\"" in row for row in rows.values()) == 2
    # The win rate shows its interval, sorts by its value, and a missing one sorts last.
    assert '<td class="num" data-sort="0.62" title="6 wins, 0 ties, 4 losses">0.620 <span class="interval">[0.31, 0.83]</span></td>' in table
    assert table.count('data-sort=""') > 0

    # The CSV is every column of `peftsweep export`, in the table's order, unescaped data.
    href = re.search(r'download="lora__i_demo__i_-trials.csv" href="data:text/csv;charset=utf-8,([^"]*)"', page)
    csv = unquote(href.group(1))
    frame = pd.read_csv(io.StringIO(csv), keep_default_na=False)
    assert list(frame.columns) == [*load_trials(store).columns, "recommendation"]
    assert list(frame["trial_id"]) == list(report_data(store).trials["trial_id"])
    assert list(frame["recommendation"]) == ["best", "", "sweet_spot", "", "", "", ""]
    assert frame.set_index("trial_id").loc["t-oom", "error"] == OOM_ERROR



def test_trials_table_shows_a_pairwise_judges_parse_rate_and_agreement_beside_the_win_rate(store):
    # t-good's best epoch judged again by a pairwise judge: 11 of its 20 replies parsed
    store.set_verdicts("t-good", 2, VERDICTS["t-good", 2], {"judge_parse_rate": 0.55, "order_agreement": 0.8})
    page = build_report(store)
    table = page[page.index('<table class="trials sortable">') : page.index("</table>", page.index("trials sortable"))]
    headers = [h.replace("<wbr>", "") for h in re.findall(r"<button type=\"button\">(.*?)</button>", table)]
    assert headers[headers.index("win_rate") + 1 : headers.index("win_rate") + 3] == ["judge_parse_rate", "order_agreement"]
    good = table[table.index("<td class=\"id\">t-good</td>") :].split("</tr>")[0]
    assert '<td class="num" data-sort="0.55">0.55</td><td class="num" data-sort="0.8">0.80</td>' in good


def test_write_report_replaces_the_file_atomically(store, tmp_path):
    target = tmp_path / "out" / "report.html"
    target.parent.mkdir()
    target.write_text("old")
    assert write_report(store, target) == target
    assert target.read_text(encoding="utf-8") == build_report(store)
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_the_methods_say_the_sweeps_own_sweet_spot_rule(store, tmp_path):
    page = build_report(store)
    assert "Sweet spot: every finished trial that saves at least 20% of the best&#x27;s training time (measured)" in page
    assert "exact two-sided binomial (sign) test" in page and "95% t interval" not in page
    with make_store(tmp_path / "margin.db", report={"cost_axis": "train_seconds", "min_saving": 0.3, "margin": 0.05}) as other:
        page = build_report(other)
    assert "saves at least 30% of the best&#x27;s" in page
    assert "a 95% t interval above -0.05 (report.margin), over at least 10 shared prompts" in page
