"""Progress while a sweep runs: a live table of trials on a terminal, one line per event elsewhere."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from hpo.spec import SweepSpec, flatten_params
from hpo.trial import STATUS_KEY
from trainers.vocabulary import TrialStatus

_RUNNING = (TrialStatus.RUNNING, "restarting")  # rows shown first
_FRAME_LINES = 7  # the table's lines besides its rows: title, borders, header, caption


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressCallback(Callback):
    """Shows each trial's status, parameters and latest metrics."""

    def __init__(self, spec: SweepSpec, name: str, console: Console | None = None):
        self.spec = spec
        self.name = name
        self.console = console or Console(stderr=True)
        self.rows: dict[str, dict[str, Any]] = {}
        self._last_change = 0  # orders the rows by their last change
        self.live: Live | None = None
        self.started = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into its experiment state; consoles and live displays do not pickle.
        return {**self.__dict__, "console": None, "live": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Restored by `peftsweep resume`: report one line per event.
        self.__dict__.update({"_last_change": 0, **state}, console=Console(stderr=True))

    # --- plain lines, for logs and non-terminals ------------------------------------------------

    def say(self, message: str) -> None:
        if self.live is not None:
            self.live.console.print(message)
        else:
            self.console.print(message, highlight=False, soft_wrap=True)

    def _event(self, message: str) -> None:
        if self.live is None:
            elapsed = time.monotonic() - self.started
            self.console.print(f"[{elapsed:6.0f}s] {message}", highlight=False, markup=False, soft_wrap=True)
        else:
            self.live.update(self._table())

    # --- the live table --------------------------------------------------------------------------

    def start(self) -> None:
        self.started = time.monotonic()
        if self.console.is_terminal:
            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()
            self.live = None

    def _table(self) -> Table:
        """As many trials as the terminal shows: the running ones, then those that changed last; the title counts them all.

        Live draws the table twice a second, at a cost per row (with every trial in it, a draw took
        0.09 s of the driver's CPU at 192 trials, 0.5 s at 1000), while a terminal shows only its height.
        """
        searched = self.spec.searched
        elapsed = time.monotonic() - self.started
        counts = Counter(row["status"] for row in self.rows.values())
        census = ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda sn: (sn[0] not in _RUNNING, -sn[1])))
        latest = sorted(self.rows.items(), key=lambda item: (item[1]["status"] in _RUNNING, item[1].get("changed", 0)), reverse=True)
        shown = latest[: max(1, self.console.height - _FRAME_LINES)]
        table = Table(
            title=f"sweep {self.name} — {len(self.rows)} trials{f' ({census})' if census else ''}, {elapsed:.0f}s",
            title_justify="left",
            caption=f"{len(self.rows) - len(shown)} earlier trials not shown" if len(shown) < len(self.rows) else None,
            caption_justify="left",
        )
        for column in ["trial", "status", *searched, "epoch", "eval_ppl", "win_rate", "train_s"]:
            table.add_column(column, justify="left" if column in ("trial", "status") else "right")
        for trial_id, row in shown:
            table.add_row(
                trial_id,
                row["status"],
                *(_fmt(row["params"].get(k, "")) for k in searched),
                f"{row.get('epoch', '')}/{row['epochs']}",
                _fmt(row.get("eval_ppl", "")),
                _fmt(row.get("win_rate", "")),
                _fmt(row.get("train_seconds", "")),
            )
        return table

    def _changed(self, trial: Any, **updates: Any) -> dict[str, Any]:
        """The trial's row, updated and marked as the latest to change."""
        self._last_change += 1
        row = self.rows[trial.trial_id]
        row.update(updates, changed=self._last_change)
        return row

    def _params(self, trial: Any) -> str:
        return " ".join(f"{k}={_fmt(v)}" for k, v in flatten_params(trial.config).items())

    # --- Tune's hooks ----------------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        epochs = self.spec.trial_config(trial.config).train.epochs
        self.rows[trial.trial_id] = {"status": TrialStatus.RUNNING, "params": flatten_params(trial.config), "epochs": epochs}
        self._changed(trial)
        self._event(f"trial {trial.trial_id} started: {self._params(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._changed(trial)
        if STATUS_KEY in result:
            row["status"] = TrialStatus(result[STATUS_KEY])
            self._event(f"trial {trial.trial_id} {result[STATUS_KEY]}: {result['error']}")
            return
        row.update({k: result[k] for k in ("epoch", "eval_ppl", "win_rate", "train_seconds")})
        judged = f"win_rate={result['win_rate']:.2f}" if not result.get("judge_error") else "win_rate=not judged"
        self._event(
            f"trial {trial.trial_id} epoch {result['epoch']}/{row['epochs']}: eval_ppl={result['eval_ppl']:.3f}"
            f" {judged} train_seconds={result['train_seconds']:.1f}"
        )
        if result.get("judge_error"):
            self._event(f"trial {trial.trial_id} epoch {result['epoch']} kept without verdicts: {result['judge_error']}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if STATUS_KEY in (trial.last_result or {}):
            return  # its closing report said how it ended
        row = self.rows[trial.trial_id]
        self._changed(trial, status=TrialStatus.COMPLETED if row.get("epoch", 0) >= row["epochs"] else TrialStatus.EARLY_STOPPED)
        self._event(f"trial {trial.trial_id} {row['status']}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._changed(trial, status="restarting")  # shown only: the store keeps it running
        epoch = (trial.last_result or {}).get("epoch", 0)
        self._event(f"trial {trial.trial_id} lost its process; restarting from epoch {epoch} (retry {trial.num_failures} of {self.spec.search.max_retries})")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._changed(trial, status=TrialStatus.ERROR)
        error = str(trial.get_error() or "unknown error").strip().splitlines()
        self._event(f"trial {trial.trial_id} failed: {error[-1] if error else 'unknown error'}")
