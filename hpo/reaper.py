"""Ends a dead driver's local Ray processes: `python -m hpo.reaper DRIVER_PID`.

The driver starts it in a session of its own right after Ray starts. While the driver runs, it
notes the driver's descendants (Ray's services, agents and workers) every half second. A driver
that shut Ray down leaves none of them behind; one killed with kill -9 leaves Ray's agents
running for minutes, so then every noted process still alive (the same pid and start time), and
every descendant of one, is sent SIGTERM, and SIGKILL a few seconds later.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 5.0


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process: the start time tells it apart from a later one of the same pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def descendants(roots: set[int]) -> dict[int, str]:
    """Every live process below `roots` in the process tree, with its start time."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: dict[int, str] = {}
    stack = list(roots)
    while stack:
        for pid, started in children.get(stack.pop(), []):
            if pid not in found and pid != os.getpid():
                found[pid] = started
                stack.append(pid)
    return found


def reap(known: dict[int, str]) -> list[int]:
    """End the processes in `known` that still run, and their descendants: SIGTERM, then SIGKILL after GRACE_S."""

    def alive() -> dict[int, str]:
        live = {pid: started for pid, started in known.items() if (_stat(pid) or (0, None))[1] == started}
        return live | descendants(set(live))

    targets = alive()
    for pid in targets:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and alive():
        time.sleep(0.2)
    for pid in alive():
        _signal(pid, signal.SIGKILL)
    return sorted(targets)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError:
        pass


def main(driver_pid: int) -> None:
    driver = _stat(driver_pid)
    known: dict[int, str] = {}
    while driver is not None and _stat(driver_pid) == driver:
        known |= descendants({driver_pid})
        time.sleep(POLL_S)
    reap(known)


if __name__ == "__main__":
    main(int(sys.argv[1]))
