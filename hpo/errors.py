"""The errors users see: a problem they can fix, told in one line, and how a sweep ended when it did not complete."""


class SweepError(Exception):
    """Bad input or an unusable environment; the CLI prints it as one line and exits 2."""


class SweepInterrupted(Exception):
    """A signal (Ctrl-C, SIGTERM) stopped the sweep; its store says `interrupted` and `resume` continues
    it, unless it stopped before Ray Tune first saved its state (`resumable` False: run it again)."""

    def __init__(self, signum: int, resumable: bool = True):
        import signal

        self.signum = signum
        self.resumable = resumable
        super().__init__(signal.Signals(signum).name)


NOT_STARTED = "stopped before its first trial started, so there is nothing to resume; run it again with --overwrite"


class SweepFailed(Exception):
    """The sweep ran but no trial finished (every one failed), or it could not go on (its store cannot be written)."""


def last_line(text: str) -> str:
    """The last non-empty line of `text` (of a traceback: the exception itself), for a one-line message."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text
