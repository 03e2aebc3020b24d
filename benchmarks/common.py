"""What the benchmarks share: the machine's description, result tables, sweep files, the real
command line run with timestamps, and a private Ray temp dir.

Every benchmark measures the sides it compares in one run, on one machine, under the same
conditions, and reports ratios (medians over repeats) against the targets of issue 9; `--json PATH` also writes the
result as plain values, which the tests read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

REPO = Path(__file__).resolve().parent.parent
STARTED = time.monotonic()  # at import, nearly the process start: a benchmark's "took" includes its imports
# bitsandbytes (imported with peft, and by transformers' Trainer) says on CPU that it cannot fetch an
# optional kernel from the hub, as trainers.methods notes; silenced before anything imports it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def quiet() -> None:
    """Progress bars, per-step log lines and deprecation notes of the libraries would bury the tables."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes: --quick and --json."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny size, seconds to a minute: checks that the benchmark runs, measures little")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON to PATH")
    return p


# --- the machine -----------------------------------------------------------------------------------


def machine(check_gpu: bool = True) -> dict[str, Any]:
    """CPU model, cores, memory, GPU, load and package versions: what a reader needs to compare numbers.

    `check_gpu=False` leaves torch unimported (cluster_sim measures its driver's memory without it).
    """
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from hpo.runtime import versions as package_versions

    versions = package_versions()  # the versions every sweep records, peftsweep's own among them
    gpu = None
    if check_gpu:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(_mem_total_gib(), 1),
        "gpu": gpu,  # None: not checked
        "load_start": round(os.getloadavg()[0], 2),
        "load_end": None,
        "versions": versions,
        "git_commit": _git_commit(),
    }


def finish_machine(info: dict[str, Any]) -> dict[str, Any]:
    """The machine description with the load average at the end of the run."""
    return {**info, "load_end": round(os.getloadavg()[0], 2)}


def describe(info: dict[str, Any]) -> str:
    v = info["versions"]
    gpu = info["gpu"] or "GPU not checked"
    load = f"load average {info['load_start']:.1f} at start, {info['load_end']:.1f} at end" if info["load_end"] is not None else ""
    packages = ", ".join(f"{name} {version}" for name, version in v.items())
    return (
        f"machine: {info['cpu']}, {info['cores_usable']} of {info['cores']} cores usable, {info['ram_gib']:g} GiB RAM, {gpu}; "
        f"{load}\n         {packages}; git {(info['git_commit'] or 'unknown')[:10]}"
    )


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


# --- results ---------------------------------------------------------------------------------------


def ratio(name: str, value: float | None, op: str, target: float, detail: str = "", tolerance: float = 0.1) -> dict[str, Any]:
    """One headline ratio against its target: `op` is "<=", ">=" or "within" (`tolerance` of the
    target, relative); met is None when there is no value."""
    met = None
    if value is not None and math.isfinite(value):
        met = {"<=": value <= target, ">=": value >= target, "within": abs(value / target - 1) <= tolerance}[op]
    elif value is not None and math.isinf(value) and op != "within":
        met = (value > 0) == (op == ">=")  # infinite: a target never reached
    target_text = f"within {100 * tolerance:g} % of {target:.3g}" if op == "within" else f"{op} {target:g}"
    return {"name": name, "value": value, "op": op, "target": target, "target_text": target_text, "met": met, "detail": detail}


def log(message: str) -> None:
    """A progress line with the seconds since the benchmark started (on standard error: the tables go to standard output)."""
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """The range of repeats, for the table: 'min-max' (or the single value)."""
    if len(values) < 2:
        return "1 repeat"
    return f"{_cell(float(min(values)))}-{_cell(float(max(values)))}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (pastes into docs/BENCHMARKS.md as printed)."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def ratio_table(ratios: list[dict[str, Any]]) -> str:
    rows = []
    for r in ratios:
        met = {True: "**met**", False: "**missed**", None: "n/a"}[r["met"]]
        value = "-" if r["value"] is None else f"{r['value']:.3f}"
        rows.append([r["name"], value, r["target_text"], met, r["detail"]])
    return table(["ratio", "measured", "target", "", "how"], rows)


def emit(result: dict[str, Any], render: Callable[[dict[str, Any]], str], json_path: Path | None) -> None:
    """Print the result's tables; write it as JSON too when asked."""
    print(render(result), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def header(title: str, result: dict[str, Any]) -> str:
    took = f"; the whole benchmark took {result['seconds']:.0f} s" if result.get("seconds") else ""
    return f"{title}\n{describe(result['machine'])}\nsizes: {result['sizes_text']}{took}"


# --- inputs ----------------------------------------------------------------------------------------


def tinyworld_records(folder: Path, records: int | None) -> str:
    """`data.source` for the built-in task: 'tinyworld', or a JSONL file of its first `records` records (--quick)."""
    if records is None:
        return "tinyworld"
    from trainers.tinyworld import instruction_dataset

    path = folder / f"tinyworld_{records}.jsonl"
    with path.open("w") as f:
        for record in instruction_dataset()[:records]:
            f.write(json.dumps(record) + "\n")
    return str(path)


def write_sweep(path: Path, sweep: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def ensure_model() -> Path:
    """Build the tiny model before anything is timed (once per cache: $PEFTSWEEP_CACHE)."""
    from trainers.tiny_model import ensure_tiny_model

    return ensure_tiny_model()


@contextlib.contextmanager
def private_ray() -> Iterator[dict[str, str]]:
    """Environment for a child that starts Ray: a temp dir of its own, so no other `ray.init()` on this
    machine (a test run beside us) finds and joins it; short, as Ray's socket paths must fit 107 bytes."""
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        yield {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --- running the real command line -----------------------------------------------------------------


@dataclass
class Timed:
    """A finished command: wall seconds from launch to exit, and each output line with its second."""

    seconds: float
    started_at: float  # time.time() at launch, to line up with the store's timestamps
    lines: list[tuple[float, str]]
    returncode: int

    def first(self, text: str) -> float | None:
        """Seconds after launch of the first output line containing `text`."""
        return next((t for t, line in self.lines if text in line), None)

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def run_timed(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 900) -> Timed:
    """Run a command, reading its merged output line by line as it comes, and time it."""
    started_at = time.time()
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.monotonic() - start, line.rstrip("\n")))
        if time.monotonic() - start > timeout:
            proc.kill()
            break
    returncode = proc.wait()
    return Timed(time.monotonic() - start, started_at, lines, returncode)


def peftsweep_cmd(*args: str) -> list[str]:
    """The real `peftsweep` command line, in this interpreter."""
    return [sys.executable, "-m", "hpo.cli", *args]


def check(timed: Timed, what: str) -> Timed:
    if timed.returncode != 0:
        sys.exit(f"{what} failed (exit {timed.returncode}):\n{timed.tail()}")
    return timed


def read_store(db: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A run's trials and epochs (every column, metrics_json parsed), straight from SQLite."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        trials = [dict(r) for r in conn.execute("SELECT * FROM trials ORDER BY started_at, trial_id")]
        epochs = []
        for row in conn.execute("SELECT * FROM epochs ORDER BY trial_id, epoch"):
            epoch = dict(row)
            epoch.update(json.loads(epoch.pop("metrics_json")))
            epochs.append(epoch)
    finally:
        conn.close()
    for trial in trials:
        trial["params"] = json.loads(trial.pop("params_json"))
    return trials, epochs


def last_epochs(epochs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each trial's last reported epoch (its totals: train_seconds etc. are cumulative)."""
    last: dict[str, dict[str, Any]] = {}
    for epoch in epochs:
        if epoch["trial_id"] not in last or epoch["epoch"] > last[epoch["trial_id"]]["epoch"]:
            last[epoch["trial_id"]] = epoch
    return last
