"""The results store: one SQLite file per sweep (`runs/<name>/results.db`).

The driver writes it as Ray Tune reports results; `analysis` and `export` read it.
Every write is its own transaction and the file is in WAL mode, so readers work
while a sweep is still writing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from hpo.errors import SweepError
from trainers.vocabulary import EPOCH_COLUMNS, SweepStatus, TrialStatus

# 3: answers.verdict is NULL where the judge was unavailable; 4: epochs have train_flops and eval_flops.
# Versions 2 and 3 open, migrated in place.
SCHEMA_VERSION = 4

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sweep (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    sweep_file TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    searched_json TEXT NOT NULL,
    objectives_json TEXT NOT NULL,
    versions_json TEXT NOT NULL,
    git_commit TEXT,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,
    note TEXT
);
CREATE TABLE trials (
    trial_id TEXT PRIMARY KEY,
    params_json TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    started_at REAL,
    ended_at REAL,
    node TEXT,
    devices TEXT
);
CREATE TABLE epochs (
    trial_id TEXT NOT NULL REFERENCES trials(trial_id),
    epoch INTEGER NOT NULL,
    {", ".join(f"{c} REAL" for c in EPOCH_COLUMNS)},
    metrics_json TEXT NOT NULL,
    checkpoint TEXT,
    PRIMARY KEY (trial_id, epoch)
);
CREATE TABLE baseline (
    prompt_id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    reference TEXT NOT NULL,
    answer TEXT NOT NULL
);
{{answers}}
"""
_ANSWERS = """CREATE TABLE {name} (
    trial_id TEXT NOT NULL REFERENCES trials(trial_id),
    epoch INTEGER NOT NULL,
    prompt_id INTEGER NOT NULL REFERENCES baseline(prompt_id),
    answer TEXT NOT NULL,
    verdict REAL,
    PRIMARY KEY (trial_id, epoch, prompt_id)
);"""
_SCHEMA = _SCHEMA.replace("{answers}", _ANSWERS.format(name="answers"))

def epoch_score(value: float | None, epoch: int, mode: str) -> float:
    """How good an epoch is by its objective `value` ("max" or "min" `mode`): higher is better, NaN unmeasured.

    The one rule for a trial's best epoch, used by the report, `export`, `best` and Ray Tune's
    checkpoint keeping alike: the best value wins and, among equal values, the earliest epoch (it
    cost less). Ray Tune keeps the later of equal scores, so the tie-break is in the score itself:
    it moves down by `epoch` units in the last place, which orders equal values by epoch.
    """
    if value is None or math.isnan(value):
        return math.nan
    score = float(value) if mode == "max" else -float(value)
    for _ in range(epoch):
        score = math.nextafter(score, -math.inf)
    return score


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Store:
    """Reads and writes one sweep's results file."""

    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path = path
        self.conn = conn

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        name: str,
        sweep_file: str,
        spec: dict[str, Any],
        searched: list[str],
        objectives: list[dict[str, str]],
        versions: dict[str, str],
        git_commit: str | None,
    ) -> "Store":
        """Create a new store; the file must not exist yet."""
        if path.exists():
            raise SweepError(f"{path}: a results store already exists there")
        conn = _connect(path)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(_SCHEMA)
        with _tx(conn):
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute(
                "INSERT INTO sweep (id, name, sweep_file, spec_json, searched_json, objectives_json,"
                " versions_json, git_commit, started_at, status) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    sweep_file,
                    json.dumps(spec),
                    json.dumps(searched),
                    json.dumps(objectives),
                    json.dumps(versions),
                    git_commit,
                    time.time(),
                    SweepStatus.RUNNING,
                ),
            )
        return cls(path, conn)

    @classmethod
    def open(cls, path: Path) -> "Store":
        """Open an existing store, checking that this version of peftsweep can read it and that it is whole."""
        if path.is_dir():
            raise SweepError(f"{path}: a folder, not a results store file; {_start_over(path)}")
        if not path.is_file():
            raise SweepError(f"{path}: no results store there (run the sweep first: peftsweep run SWEEP)")
        conn = _connect(path)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise SweepError(f"{path}: not a peftsweep results store ({exc})") from None
        version = int(row["value"]) if row and str(row["value"]).isdigit() else None
        if version is None:
            conn.close()
            raise SweepError(f"{path}: damaged results store: meta holds no schema_version; {_start_over(path)}")
        if version == 2:
            _migrate_from_2(conn, path)
            version = 3
        if version == 3:
            _migrate_from_3(conn, path)
            version = SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            conn.close()
            raise SweepError(
                f"{path}: results store schema version {version}, this peftsweep reads version "
                f"{SCHEMA_VERSION}; use the peftsweep version that wrote it"
            )
        try:
            problem = _damage(conn)
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
        if problem:
            conn.close()
            raise SweepError(f"{path}: damaged results store: {problem}; {_start_over(path)}")
        return cls(path, conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- writes, one transaction each ---------------------------------------------------------

    def add_trial(self, trial_id: str, params: dict[str, Any], *, node: str | None = None) -> None:
        with _tx(self.conn):
            self.conn.execute(
                "INSERT INTO trials (trial_id, params_json, status, started_at, node) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(trial_id) DO UPDATE SET status = excluded.status, started_at = excluded.started_at",
                (trial_id, json.dumps(params), TrialStatus.RUNNING, time.time(), node),
            )

    def set_trial_status(self, trial_id: str, status: TrialStatus, error: str | None = None) -> None:
        ended_at = None if status in (TrialStatus.PENDING, TrialStatus.RUNNING) else time.time()
        with _tx(self.conn):
            self.conn.execute(
                "UPDATE trials SET status = ?, error = ?, ended_at = ? WHERE trial_id = ?",
                (status, error, ended_at, trial_id),
            )

    def end_unfinished(self, status: TrialStatus) -> int:
        """Give every trial still pending or running `status` (the sweep ended around it); returns how many."""
        with _tx(self.conn):
            cursor = self.conn.execute(
                "UPDATE trials SET status = ?, ended_at = ? WHERE status IN (?, ?)",
                (status, time.time(), TrialStatus.PENDING, TrialStatus.RUNNING),
            )
        return cursor.rowcount

    def traceback_path(self, trial_id: str) -> Path:
        """Where a failed trial's full traceback is kept: errors/<trial_id>.txt beside the store."""
        return self.traceback_path_beside(self.path, trial_id)

    @staticmethod
    def traceback_path_beside(path: Path, trial_id: str) -> Path:
        return path.parent / "errors" / f"{trial_id}.txt"

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads within see one state of the store, while a driver goes on writing (a WAL read transaction)."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("COMMIT")

    def write_traceback(self, trial_id: str, text: str) -> None:
        """Keep a failed trial's full traceback (the store keeps its last line, in trials.error)."""
        path = self.traceback_path(trial_id)
        path.parent.mkdir(exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)

    def set_trial_placement(self, trial_id: str, node: str | None, devices: str | None) -> None:
        with _tx(self.conn):
            self.conn.execute(
                "UPDATE trials SET node = ?, devices = ? WHERE trial_id = ?", (node, devices, trial_id)
            )

    def add_epoch(self, trial_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        columns = {c: _null_nan(metrics.get(c)) for c in EPOCH_COLUMNS}  # Tune gets NaN for an objective not judged
        extra = {
            k: v
            for k, v in metrics.items()
            if k not in EPOCH_COLUMNS and k not in ("trial_id", "epoch") and _is_scalar(v)
        }
        with _tx(self.conn):
            self.conn.execute(
                f"INSERT OR REPLACE INTO epochs (trial_id, epoch, {', '.join(EPOCH_COLUMNS)}, metrics_json)"
                f" VALUES (?, ?, {', '.join('?' for _ in EPOCH_COLUMNS)}, ?)",
                (trial_id, epoch, *columns.values(), json.dumps(extra)),
            )

    def set_checkpoint(self, trial_id: str, epoch: int, path: str | None) -> None:
        """Where the epoch's checkpoint (adapter + resumable state) was stored; None: it was removed."""
        with _tx(self.conn):
            self.conn.execute("UPDATE epochs SET checkpoint = ? WHERE trial_id = ? AND epoch = ?", (path, trial_id, epoch))

    def checkpoints(self, trial_id: str | None = None) -> list[tuple[str, int, str]]:
        """(trial_id, epoch, path) of every checkpoint the store points to."""
        query, args = "SELECT trial_id, epoch, checkpoint FROM epochs WHERE checkpoint IS NOT NULL", ()
        if trial_id is not None:
            query, args = query + " AND trial_id = ?", (trial_id,)
        return [tuple(row) for row in self.conn.execute(query + " ORDER BY trial_id, epoch", args)]

    def set_baseline(self, rows: Iterable[tuple[int, str, str, str]], metrics: dict[str, Any] | None = None) -> None:
        """Store the base model's answers, (prompt_id, prompt, reference, answer) rows, and its metrics."""
        with _tx(self.conn):
            self.conn.executemany("INSERT OR REPLACE INTO baseline VALUES (?, ?, ?, ?)", rows)
            if metrics is not None:
                self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('baseline_metrics', ?)", (json.dumps(metrics),))

    def add_answers(self, trial_id: str, epoch: int, rows: Iterable[tuple[int, str, float | None]]) -> None:
        """Store a trial's answers at one epoch: (prompt_id, answer, verdict) rows; verdict None: not judged."""
        with _tx(self.conn):
            self.conn.executemany(
                "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)",
                ((trial_id, epoch, pid, answer, verdict) for pid, answer, verdict in rows),
            )

    def set_verdicts(self, trial_id: str, epoch: int, verdicts: list[float], metrics: dict[str, Any]) -> None:
        """Replace an epoch's verdicts (one per prompt_id, in order) and the metrics they give (peftsweep rejudge)."""
        row = self.conn.execute("SELECT metrics_json FROM epochs WHERE trial_id = ? AND epoch = ?", (trial_id, epoch)).fetchone()
        extra = {**json.loads(row["metrics_json"]), **{k: v for k, v in metrics.items() if k not in EPOCH_COLUMNS}}
        columns = [c for c in EPOCH_COLUMNS if c in metrics]
        with _tx(self.conn):
            self.conn.executemany(
                "UPDATE answers SET verdict = ? WHERE trial_id = ? AND epoch = ? AND prompt_id = ?",
                ((v, trial_id, epoch, pid) for pid, v in enumerate(verdicts)),
            )
            self.conn.execute(
                f"UPDATE epochs SET {''.join(f'{c} = ?, ' for c in columns)}metrics_json = ? WHERE trial_id = ? AND epoch = ?",
                (*(metrics[c] for c in columns), json.dumps(extra), trial_id, epoch),
            )

    def add_rejudge(self, record: dict[str, Any]) -> None:
        """Note a `peftsweep rejudge` (when, which judge, how many epochs) in the store's history of them."""
        with _tx(self.conn):
            self.conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('rejudged', ?)", (json.dumps([*self.rejudged(), record]),)
            )

    def set_tracking(self, tracker: str, record: dict[str, Any]) -> None:
        """Where an experiment tracker mirrors this sweep (MLflow: its URI, experiment and parent run), for `resume`."""
        with _tx(self.conn):
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('tracking', ?)", (json.dumps({**self.tracking(), tracker: record}),))

    def tracking(self) -> dict[str, dict[str, Any]]:
        """Each tracker's record (set_tracking), by tracker."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'tracking'").fetchone()
        return json.loads(row["value"]) if row else {}

    def rejudged(self) -> list[dict[str, Any]]:
        """Every `peftsweep rejudge` of this sweep, oldest first."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'rejudged'").fetchone()
        return json.loads(row["value"]) if row else []

    def reopen(self) -> None:
        """Mark a stopped sweep as running again (peftsweep resume)."""
        with _tx(self.conn):
            self.conn.execute("UPDATE sweep SET status = ?, note = NULL, finished_at = NULL WHERE id = 1", (SweepStatus.RUNNING,))

    def finish(self, status: SweepStatus, note: str | None = None) -> None:
        with _tx(self.conn):
            self.conn.execute(
                "UPDATE sweep SET status = ?, note = ?, finished_at = ? WHERE id = 1",
                (status, note, time.time()),
            )

    # --- reads ----------------------------------------------------------------------------------

    def sweep(self) -> dict[str, Any]:
        row = dict(self.conn.execute("SELECT * FROM sweep WHERE id = 1").fetchone())
        for key in ("spec", "searched", "objectives", "versions"):
            row[key] = json.loads(row.pop(f"{key}_json"))
        return row

    def trials(self, trial_id: str | None = None) -> list[dict[str, Any]]:
        """Every trial (or the one named), in the order they started."""
        query, args = "SELECT * FROM trials", ()
        if trial_id is not None:
            query, args = query + " WHERE trial_id = ?", (trial_id,)
        rows = self.conn.execute(query + " ORDER BY started_at, trial_id", args).fetchall()
        out = []
        for row in rows:
            trial = dict(row)
            trial["params"] = json.loads(trial.pop("params_json"))
            out.append(trial)
        return out

    def epochs(self, trial_id: str | None = None) -> list[dict[str, Any]]:
        """Every trial's epochs (or one trial's), each row's metrics_json spread into it."""
        query, args = "SELECT * FROM epochs", ()
        if trial_id is not None:
            query, args = query + " WHERE trial_id = ?", (trial_id,)
        rows = self.conn.execute(query + " ORDER BY trial_id, epoch", args).fetchall()
        out = []
        for row in rows:
            epoch = dict(row)
            epoch.update(json.loads(epoch.pop("metrics_json")))
            out.append(epoch)
        return out

    def baseline_metrics(self) -> dict[str, Any]:
        """The untouched base model's eval_ppl and retention_ppl (measured once per sweep)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'baseline_metrics'").fetchone()
        return json.loads(row["value"]) if row else {}

    def baseline(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM baseline ORDER BY prompt_id")]

    def answers(self, trial_id: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM answers", ()
        if trial_id is not None:
            query, args = query + " WHERE trial_id = ?", (trial_id,)
        return [dict(r) for r in self.conn.execute(query + " ORDER BY trial_id, epoch, prompt_id", args)]


def _start_over(path: Path) -> str:
    return (
        f"peftsweep cannot repair it: start the sweep over with "
        f"peftsweep run SWEEP --name {path.parent.name} --overwrite"
    )


# JSON columns and what each holds: readers take these apart on every read.
_JSON_COLUMNS = {
    "sweep": {"spec_json": dict, "searched_json": list, "objectives_json": list, "versions_json": dict},
    "trials": {"params_json": dict},
    "epochs": {"metrics_json": dict},
}
_NUMBER_COLUMNS = {"sweep": ("started_at", "finished_at"), "trials": ("started_at", "ended_at"), "epochs": ("epoch", *EPOCH_COLUMNS)}


@functools.cache
def _schema_columns() -> dict[str, list[str]]:
    """Each table of the schema with its columns, read off a store created in memory."""
    expected = sqlite3.connect(":memory:")
    try:
        expected.executescript(_SCHEMA)
        tables = [t for (t,) in expected.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
        return {t: [row[1] for row in expected.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        expected.close()


def _damage(conn: sqlite3.Connection) -> str | None:
    """What is wrong with an opened store that reports the right schema version, or None when it is whole.

    Checks what every reader relies on: the tables and columns of the schema, the one sweep row,
    JSON that parses to the right shape, and numbers where numbers belong.
    """
    if (problem := conn.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
        return f"SQLite reports {problem}"
    for table, wanted in _schema_columns().items():
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if not columns:
            return f"table {table} is missing"
        missing = [c for c in wanted if c not in columns]
        if missing:
            return f"table {table} lacks column {', '.join(missing)}"
    if conn.execute("SELECT count(*) FROM sweep WHERE id = 1").fetchone()[0] != 1:
        return "table sweep has no sweep row"
    for table, columns in _JSON_COLUMNS.items():
        key = "id" if table == "sweep" else "trial_id, epoch" if table == "epochs" else "trial_id"
        for row in conn.execute(f"SELECT {key}, {', '.join(columns)} FROM {table}"):
            for column, shape in columns.items():
                try:
                    value = json.loads(row[column])
                except (TypeError, ValueError):
                    value = None
                if not isinstance(value, shape):
                    where = ", ".join(f"{k.strip()} {row[k.strip()]}" for k in key.split(","))
                    return f"{table} row ({where}): {column} is not a JSON {shape.__name__}"
    for table, columns in _NUMBER_COLUMNS.items():
        for column in columns:
            found = conn.execute(
                f"SELECT count(*) FROM {table} WHERE typeof({column}) NOT IN ('integer', 'real', 'null')"
            ).fetchone()[0]
            if found:
                return f"table {table}: {found} row(s) hold a non-number in {column}"
    return None


class _tx:
    """One explicit transaction (the connection runs in autocommit mode otherwise)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _migrate_from_2(conn: sqlite3.Connection, path: Path) -> None:
    """Version 2 -> 3 in one transaction: answers.verdict becomes nullable (SQLite alters no
    constraint in place, so the table is recreated and its rows copied)."""
    try:
        with _tx(conn):
            conn.execute(_ANSWERS.format(name="answers_v3"))
            conn.execute("INSERT INTO answers_v3 SELECT trial_id, epoch, prompt_id, answer, verdict FROM answers")
            conn.execute("DROP TABLE answers")
            conn.execute("ALTER TABLE answers_v3 RENAME TO answers")
            conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    except sqlite3.Error as exc:
        conn.close()
        raise SweepError(f"{path}: cannot upgrade this results store from schema version 2 to {SCHEMA_VERSION} ({exc}); make it writable") from None


def _migrate_from_3(conn: sqlite3.Connection, path: Path) -> None:
    """Version 3 -> 4 in one transaction: the epochs table gains the columns it lacks (the FLOPs), NULL
    for the epochs already stored (they were not counted)."""
    try:
        with _tx(conn):
            have = {row["name"] for row in conn.execute("PRAGMA table_info(epochs)")}
            for column in EPOCH_COLUMNS:
                if column not in have:
                    conn.execute(f"ALTER TABLE epochs ADD COLUMN {column} REAL")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    except sqlite3.Error as exc:
        conn.close()
        raise SweepError(f"{path}: cannot upgrade this results store from schema version 3 to {SCHEMA_VERSION} ({exc}); make it writable") from None


def _null_nan(value: Any) -> Any:
    return None if isinstance(value, float) and value != value else value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None
