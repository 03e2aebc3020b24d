"""A sweep's run folder (runs/<name>: the store, the report, Tune's state unless `storage` holds it):
made, refused or replaced, and locked so that one driver at a time writes it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hpo.errors import SweepError
from hpo.spec import SweepSpec
from trainers.vocabulary import SweepStatus


def runs_root(runs_dir: str | None = None) -> Path:
    return Path(runs_dir or os.environ.get("PEFTSWEEP_RUNS", "runs"))


class DriverLock:
    """One driver per run folder: `resume` must not start a second driver on a live sweep.

    An OS file lock, so a killed driver (even kill -9) releases it.
    """

    FILE = "driver.lock"

    def __init__(self, run_dir: Path):
        self.path = run_dir / self.FILE

    def __enter__(self) -> None:
        import fcntl

        if not self.path.parent.is_dir():
            raise SweepError(f"no sweep at {self.path.parent} (peftsweep ls lists the runs)")
        self.file = self.path.open("w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise SweepError(f"{self.path.parent}: a driver is still running this sweep; wait for it or stop it first") from None

    def __exit__(self, *exc_info) -> None:
        self.file.close()


def make_run_dir(run_dir: Path) -> bool:
    """The run folder, made if needed; whether this call made it."""
    try:
        if run_dir.is_dir():
            return False
        run_dir.mkdir(parents=True)
        return True
    except FileExistsError:
        return False  # another driver made it just now: the driver lock decides
    except OSError as exc:
        raise SweepError(f"cannot create {run_dir}: {exc.strerror}; choose a writable --runs-dir") from None


def clear_run_dir(run_dir: Path, overwrite: bool) -> None:
    """An earlier run of this name is refused, or with --overwrite removed (the caller holds its driver lock)."""
    earlier = [p for p in run_dir.iterdir() if p.name != DriverLock.FILE]
    if not earlier:
        return
    if not overwrite:
        raise SweepError(f"{run_dir} already exists: {_what_to_do_with(run_dir)}")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _what_to_do_with(run_dir: Path) -> str:
    """The advice for a run name that is taken: resume only what can be resumed."""
    import sqlite3

    name = run_dir.name
    keep = "--overwrite replaces it, --name NAME keeps both"
    try:
        conn = sqlite3.connect(f"file:{run_dir / 'results.db'}?mode=ro", uri=True)
        try:
            status = conn.execute("SELECT status FROM sweep").fetchone()[0]
        finally:
            conn.close()
    except (sqlite3.Error, TypeError):
        return keep
    if status == SweepStatus.COMPLETED:
        return f"that sweep has completed (its report: peftsweep report {name}); {keep}"
    return f"`peftsweep resume {name}` continues it ({status}), {keep}"


def prepare_storage(spec: SweepSpec, run_dir: Path, overwrite: bool) -> None:
    """A local `storage` must not hold an earlier sweep of this name, unless --overwrite replaces it."""
    if not spec.storage or "://" in spec.storage:
        return  # object stores: Ray Tune writes there; an earlier experiment of the name is the user's to remove
    shared = Path(experiment_path(spec, run_dir))
    if shared.exists():
        if not overwrite:
            raise SweepError(f"storage {shared} already holds a sweep named {run_dir.name}: --overwrite replaces it, --name NAME keeps both")
        shutil.rmtree(shared)


def experiment_name(spec: SweepSpec, run_dir: Path) -> str:
    return run_dir.name if spec.storage else "tune"


def experiment_path(spec: SweepSpec, run_dir: Path) -> str:
    """Where Ray Tune keeps the sweep's experiment state and checkpoints: runs/<name>/tune, or
    <storage>/<name> (a shared filesystem path or an object-store URI)."""
    if not spec.storage:
        return str((run_dir / "tune").resolve())
    return f"{spec.storage.rstrip('/')}/{run_dir.name}"
