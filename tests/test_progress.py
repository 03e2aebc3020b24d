"""The live table of a running sweep, on a terminal: what it shows of many trials."""

from __future__ import annotations

import io

from ray.tune.experiment import Trial
from rich.console import Console

from hpo.progress import ProgressCallback
from hpo.spec import SweepSpec


def _epoch(epoch: int) -> dict:
    return {"epoch": epoch, "eval_ppl": 3.0, "win_rate": 0.5, "train_seconds": 1.0}


def test_a_long_sweep_shows_its_running_trials_then_the_latest_to_end_within_the_terminal():
    spec = SweepSpec.model_validate({"train": {"epochs": 1}, "search": {"algorithm": "grid", "space": {"seed": {"grid": list(range(30))}}}})
    progress = ProgressCallback(spec, "long", console=Console(file=io.StringIO(), force_terminal=True, width=120, height=20))
    trials = [Trial("standin", config={"seed": seed}, stub=True) for seed in range(30)]
    for trial in trials:
        progress.on_trial_start(0, trials, trial)
    for trial in trials[:25]:  # the first 25 end, in order; the last 5 still run
        progress.on_trial_result(0, trials, trial, _epoch(1))
        progress.on_trial_complete(0, trials, trial)

    table = progress._table()
    [ids, statuses, *_] = [list(column.cells) for column in table.columns]
    running = [t.trial_id for t in trials[25:]]
    latest_ended = [t.trial_id for t in reversed(trials[12:25])]
    assert len(ids) == 20 - 7  # the terminal's height less the table's frame
    assert sorted(ids[:5]) == sorted(running) and set(statuses[:5]) == {"running"}
    assert ids[5:] == latest_ended[: len(ids) - 5]
    assert "30 trials (5 running, 25 completed)" in str(table.title)
    assert table.caption == "17 earlier trials not shown"

    terminal = Console(file=io.StringIO(), force_terminal=True, width=120, height=20)
    terminal.print(table)  # and all of it fits: none of it is cut off at the terminal's height
    assert len(terminal.file.getvalue().splitlines()) <= 20
