"""The one error type users see: a problem they can fix, told in one line."""


class SweepError(Exception):
    """Bad input or an unusable environment; the CLI prints it as one line and exits 2."""
