"""The recommendation (the best trial and a sweet spot worth taking), and that measured time cannot move it.

A real SQLite store of hand-made trials, read by the report's own code (analysis.report_data).
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

from analysis.report_data import _saving, fine_tuning_helped, report_data, sweet_spot
from hpo.store import Store
from trainers.stats import wilson_interval
from trainers.vocabulary import TrialStatus

PROMPTS = 40
FLOPS_PER_EPOCH = 1e13  # every trial trains the same batches each epoch: its FLOPs depend on its epochs only
SECONDS_PER_EPOCH = 100.0
# (learning rate, epochs): prompts won of PROMPTS at the last epoch, the others lost. The best, 1e-3
# for 3 epochs, wins 34; two 2-epoch trials win 32 of the same prompts (not significantly worse, at
# two thirds of its compute, and equal to each other in quality and FLOPs); the rest are worse.
WINS = {
    (1e-4, 1): 12, (3e-4, 1): 14, (1e-3, 1): 16, (3e-3, 1): 15,
    (1e-4, 2): 20, (3e-4, 2): 32, (1e-3, 2): 32, (3e-3, 2): 24,
    (1e-4, 3): 25, (3e-4, 3): 30, (1e-3, 3): 34, (3e-3, 3): 28,
}  # fmt: skip


def _verdicts(wins: int) -> list[float]:
    return [1.0] * wins + [0.0] * (PROMPTS - wins)


def make_sweep(path: Path, jitter: random.Random, report: dict | None = None) -> Store:
    """The grid above as a finished CPU sweep (no GPU-hours), each epoch's measured seconds jittered by up to ±15%."""
    store = Store.create(
        path, name="noise", sweep_file="sweeps/noise.yaml", spec={"report": report or {}},
        searched=["learning_rate", "epochs"],
        objectives=[{"metric": "win_rate", "mode": "max"}, {"metric": "train_seconds", "mode": "min"}],
        versions={}, git_commit=None,
    )  # fmt: skip
    store.set_baseline([(i, f"prompt {i}", f"reference {i}", f"base {i}") for i in range(PROMPTS)], {"eval_ppl": 9.0})
    for n, ((lr, epochs), wins) in enumerate(WINS.items()):
        trial_id = f"t{n:02d}"
        store.add_trial(trial_id, {"learning_rate": lr, "epochs": epochs})
        seconds = 0.0
        for epoch in range(1, epochs + 1):
            seconds += SECONDS_PER_EPOCH * jitter.uniform(0.85, 1.15)
            won = wins - 2 * (epochs - epoch)  # better every epoch: the last is the best
            low, high = wilson_interval(won, PROMPTS - won, 0)
            store.add_epoch(trial_id, epoch, {
                "win_rate": won / PROMPTS, "win_rate_low": low, "win_rate_high": high, "wins": won, "losses": PROMPTS - won,
                "ties": 0, "eval_ppl": 5.0 - won / 20, "train_seconds": seconds, "gpu_hours": 0.0,
                "train_flops": FLOPS_PER_EPOCH * epoch, "eval_flops": 1e10 * epoch,
            })  # fmt: skip
        store.add_answers(trial_id, epochs, [(i, f"answer {i}", v) for i, v in enumerate(_verdicts(wins))])
        store.set_trial_status(trial_id, TrialStatus.COMPLETED, None)
    store.finish("completed")
    return store


def _recommendation(path: Path, seed: int, report: dict | None = None) -> tuple[str, str | None, str]:
    with make_sweep(path, random.Random(seed), report) as store:
        data = report_data(store)
    return data.sweet_spot.best, data.sweet_spot.cheapest, data.cost


def test_the_recommendation_on_the_flops_axis_never_moves_with_measured_time(tmp_path):
    on_flops = {_recommendation(tmp_path / f"flops{seed}.db", seed) for seed in range(20)}
    assert on_flops == {("t10", "t05", "train_flops")}  # 1e-3 for 3 epochs; the first of the two 2-epoch twins
    # The same stores on measured time: the twins' order, and so the recommendation, is the noise's (the first
    # draws that show both will do).
    on_seconds: set[str | None] = set()
    for seed in range(20):
        on_seconds.add(_recommendation(tmp_path / f"seconds{seed}.db", seed, {"cost_axis": "train_seconds"})[1])
        if len(on_seconds) > 1:
            break
    assert on_seconds == {"t05", "t06"}


def _trials(rows: list[tuple[str, float, float]]) -> pd.DataFrame:
    """A ranked trials table from (trial_id, win rate, cost) rows, best first."""
    df = pd.DataFrame(rows, columns=["trial_id", "win_rate", "train_flops"])
    return df.assign(
        status=TrialStatus.COMPLETED, best_epoch=1.0, eval_ppl=float("nan"), win_rate_low=0.6, win_rate_high=0.9
    )


def _judged(verdicts: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(t, 1, i, v) for t, vs in verdicts.items() for i, v in enumerate(vs)], columns=["trial_id", "epoch", "prompt_id", "verdict"]
    )


def test_a_cheaper_trial_must_save_at_least_min_saving_of_the_best_trials_cost():
    same = [1.0] * 30 + [0.0] * 10
    judged = _judged({"A": same, "B": same, "C": same})
    saves_15 = _trials([("A", 0.75, 100.0), ("B", 0.75, 85.0)])
    spot = sweet_spot(saves_15, judged, [], "win_rate", "train_flops")
    assert spot.cheapest == "A" and spot.test is None
    assert spot.sentences[-1] == (
        "No configuration is meaningfully cheaper at the same quality: no finished trial saves at least 20% of A's "
        "training compute (FLOPs) (the one cheaper trial saves less)."
    )
    assert sweet_spot(saves_15, judged, [], "win_rate", "train_flops", min_saving=0.15).cheapest == "B"

    saves_20 = _trials([("A", 0.75, 100.0), ("B", 0.75, 85.0), ("C", 0.75, 80.0)])
    spot = sweet_spot(saves_20, judged, [], "win_rate", "train_flops")
    assert spot.cheapest == "C" and spot.saving == pytest.approx(0.2)
    assert "costs 20% less: 80 FLOPs of training compute, against 100 FLOPs" in spot.sentences[-1]
    assert not any("×" in sentence for sentence in spot.sentences)  # a ratio near 1 ("1.0× cheaper") is never printed
    assert [_saving(x) for x in (0.2, 0.025, 0.9996, 1.0)] == ["20%", "2.5%", "99.9%", "100%"]  # never rounded to 100%


def test_with_a_margin_only_a_trial_proven_at_most_that_much_worse_is_recommended():
    best = [1.0] * 40
    trials = _trials([("A", 1.0, 100.0), ("B", 0.925, 50.0), ("C", 1.0, 70.0)])
    judged = _judged({"A": best, "B": [0.0] * 3 + [1.0] * 37, "C": best})
    # B loses 3 prompts A wins: a sign test cannot tell (p = 0.25), so without a margin B is the sweet spot ...
    assert sweet_spot(trials, judged, [], "win_rate", "train_flops").cheapest == "B"
    # ... but the 95% interval of its paired difference, -0.075 ± 0.086, reaches below -0.05; C's (0 to 0) does not.
    spot = sweet_spot(trials, judged, [], "win_rate", "train_flops", margin=0.05)
    assert spot.cheapest == "C" and (spot.difference.low, spot.difference.high) == (0.0, 0.0)
    assert spot.sentences[-1].endswith(
        "it is as good as A within a margin of 0.05 win rate: over 40 shared prompts the 95% interval of their paired "
        "difference in win rate, +0.000 to +0.000, lies above -0.05."
    )
    assert sweet_spot(trials.iloc[:2], judged, [], "win_rate", "train_flops", margin=0.05).sentences[-1] == (
        "No configuration is meaningfully cheaper at the same quality: for the one trial that saves at least 20% of "
        "A's training compute (FLOPs) and shares judged prompts with it, the 95% interval of the paired difference in "
        "win rate does not lie above -0.05 over at least 10 shared prompts."
    )


def test_a_margin_accepts_a_cheaper_trial_that_is_better_but_never_one_judged_on_few_prompts():
    # The best by perplexity need not have the best win rate: a cheaper trial that wins more is at most 0.05 worse.
    trials = _trials([("A", 0.75, 100.0), ("B", 1.0, 50.0)])
    assert sweet_spot(trials, _judged({"A": [1.0] * 30 + [0.0] * 10, "B": [1.0] * 40}), [], "win_rate", "train_flops",
                      margin=0.05).cheapest == "B"  # fmt: skip
    # Two prompts alike are no proof: an interval needs at least 10 shared prompts.
    few = sweet_spot(trials, _judged({"A": [1.0, 1.0], "B": [1.0, 1.0]}), [], "win_rate", "train_flops", margin=0.05)
    assert few.cheapest == "A" and few.sentences[-1].startswith("No configuration is meaningfully cheaper")
    # ... while the sign test, which claims less, takes it.
    assert sweet_spot(trials, _judged({"A": [1.0, 1.0], "B": [1.0, 1.0]}), [], "win_rate", "train_flops").cheapest == "B"


def test_no_cheaper_trial_against_a_best_whose_cost_is_zero_or_unknown():
    judged = _judged({"A": [1.0] * 20, "B": [1.0] * 20})
    for cost, what in ((0.0, "zero"), (float("nan"), "unknown (not measured)")):
        spot = sweet_spot(_trials([("A", 1.0, cost), ("B", 1.0, 0.0)]), judged, [], "win_rate", "train_flops")
        assert spot.cheapest is None and spot.sentences[-1] == (
            f"No cheaper trial can be recommended: A's training compute (FLOPs) is {what}."
        )


def test_the_report_says_first_when_fine_tuning_did_not_help():
    trials = _trials([("A", 0.6, 100.0)])
    judged = _judged({"A": [1.0] * 24 + [0.0] * 16})
    helped = sweet_spot(trials, judged, [], "win_rate", "train_flops")  # win rate interval 0.6-0.9: above 0.5
    assert helped.helped is True and helped.sentences[0].startswith("Best by win rate: trial A")

    tie = sweet_spot(trials.assign(win_rate_low=0.45, win_rate_high=0.74), judged, [], "win_rate", "train_flops")
    assert tie.helped is False and tie.sentences[0] == (
        "Fine-tuning did not clearly help: the best trial's win rate against the base model, 0.6 (95% CI 0.45–0.74), "
        "includes 0.5, a tie with the base model."
    )
    assert tie.sentences[1].startswith("Best by win rate")

    # Judged by perplexity alone: did it fall below the base model's?
    row = pd.Series({"eval_ppl": 6.5, "win_rate_low": float("nan"), "win_rate_high": float("nan")})
    assert fine_tuning_helped(row, {"eval_ppl": 6.0}) == (
        False, "Fine-tuning did not help: the best trial's eval perplexity, 6.5, is not below the base model's 6."
    )
    assert fine_tuning_helped(row, {"eval_ppl": 7.0}) == (True, "")
    assert fine_tuning_helped(row, {}) == (None, "")
