"""Progress lines for the long one-off steps a first sweep runs (pre-training the tiny model, converting a GGUF):
steps done of the total, the loss, time elapsed and time left, at most one line every few seconds."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

EVERY_SECONDS = 10.0


class Progress:
    """Counts steps of a known total and logs where it stands: when `every_s` has passed since the last line, and at the end."""

    def __init__(
        self, what: str, total: int, log: Callable[[str], None], every_s: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.what, self.total, self.log, self.clock = what, total, log, clock
        self.every_s = EVERY_SECONDS if every_s is None else every_s
        self.started = self.last = clock()

    def update(self, done: int, **fields: float) -> None:
        """`done` steps of the total are done; `fields` (e.g. loss=2.31) are shown with the step."""
        now = self.clock()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        elapsed = now - self.started
        shown = "".join(f", {name} {value:.3f}" for name, value in fields.items())
        line = f"{self.what} {done}/{self.total} ({100 * done // self.total}%){shown}, {duration(elapsed)} elapsed"
        if done < self.total:
            line += f", about {duration(elapsed / done * (self.total - done))} left" if done else ""
        self.log(line)


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 45s, 2m05s, 1h02m."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silences transformers' own tqdm bars (e.g. "Writing model shards") where a Progress line already says enough."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
