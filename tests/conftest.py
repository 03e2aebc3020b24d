"""Shared fixtures: one model cache per test session, into which the built-in tiny model comes from
the user's cache (`make test` builds it there first, for real) or is built; a small copy of the built-in task, for sweeps whose point does not depend on its size; and
the sweeps that tests only read, each run once per session.

Those sweeps (and the benchmarks) start in the background as the session starts, two at a time,
while the other tests run: a sweep spends much of its time starting Ray and worker processes,
with a core to spare. A test that reads one waits for it. Only the ones a selected test reads run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
JUDGE_KEY_ENV = "PEFTSWEEP_TEST_JUDGE_KEY"  # tests/test_judges.py: KEY_ENV
USER_CACHE: Path | None = None  # the cache `make test` builds the tiny model into before pytest starts


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache for this session (a new user's machine); Ray workers inherit it through the environment.
    The tiny model comes into it from the user's cache where `make test` (or `make sweep`) built it."""
    global USER_CACHE
    from trainers.tiny_model import default_cache_dir

    USER_CACHE = default_cache_dir()  # before this session's cache replaces it
    cache = Path(os.environ.get("PEFTSWEEP_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["PEFTSWEEP_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """One torch thread in this process, as in each trial's worker (trainers.worker.setup): sweeps run
    beside these tests on 2 cores, where two threads of one process mostly spin waiting for each other."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache: Path, background) -> Path:
    """The built-in tiny model in this session's cache (in the background: see `_build_tiny_model`)."""
    from trainers.tiny_model import ensure_tiny_model

    if "tiny_model" in background:
        background["tiny_model"].result()
    return ensure_tiny_model(model_cache)


# --- the command line, and watching a sweep --------------------------------------------------------


def peftsweep(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, base: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run the real `peftsweep` command line in a subprocess, in this process's environment (or `base`) plus `env`."""
    return subprocess.run(
        [sys.executable, "-m", "hpo.cli", *args],
        cwd=cwd,
        env={**(os.environ if base is None else base), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real `peftsweep` command line in this process (typer's CliRunner on `hpo.cli.app`), for
    commands that start no sweep: reading a store, or refusing bad input. Exit code and both outputs."""
    from typer.testing import CliRunner

    from hpo.cli import app

    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return subprocess.CompletedProcess(["peftsweep", *args], result.exit_code, result.stdout, result.stderr)


def start(*args: str, env: dict[str, str] | None = None, base: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the real `peftsweep` command line, to watch or signal it while it runs (environment: as `peftsweep`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "hpo.cli", *args], cwd=REPO, env={**(os.environ if base is None else base), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def query(db: Path, sql: str, *params: object) -> list[tuple]:
    """Read the store; read-only, so that a look before the driver has made it never makes an empty one."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def wait_for(condition: Callable[[], Any], proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll `condition` (a look at the store, typically) until it holds; fail if the sweep ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended early (exit {proc.returncode}): {proc.stderr.read()[-3000:]}")
        try:
            if condition():
                return
        except sqlite3.OperationalError:
            pass  # the store is not created yet
        time.sleep(0.1)
    raise AssertionError("timed out")


# --- the built-in task, small ---------------------------------------------------------------------

SMALL_TASK_RECORDS = 80  # a tenth of the built-in task: 72 training and 8 eval records at eval_fraction 0.1


@pytest.fixture(scope="session")
def small_task(tmp_path_factory) -> Path:
    """The first records of the built-in task as a JSONL file: for sweeps that check how trials end,
    stop, resume or are placed, where the size of an epoch changes nothing but the time it takes."""
    from trainers.tinyworld import instruction_dataset

    path = tmp_path_factory.mktemp("data") / "tinyworld_small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in instruction_dataset()[:SMALL_TASK_RECORDS]))
    return path


@pytest.fixture(scope="session")
def data(small_task):
    """The small task as the data section of a trial's config, for tests that call the worker directly:
    what they check does not depend on the size of an epoch."""
    from trainers.config import DataConfig

    return DataConfig(source=str(small_task), eval_fraction=0.1)


def sweep_file(folder: Path, data: Path, body: str = "", *, judge_url: str | None = None, name: str = "sweep") -> Path:
    """A sweep file on the small task: LoRA rank 4 at learning rate 3e-3, 4 judged prompts of 8
    tokens (a section in `body` replaces these); judged by an OpenAI-compatible test server at
    `judge_url` (the key from $PEFTSWEEP_TEST_JUDGE_KEY, where set), else by the reference judge."""
    judge = (
        f", judge: openai, base_url: '{judge_url}', api_model: judge-model, api_key_env: {JUDGE_KEY_ENV}, max_retries: 1"
        if judge_url else ""
    )  # fmt: skip
    path = folder / f"{name}.yaml"
    path.write_text(
        f"data: {{source: '{data}', eval_fraction: 0.1}}\n"
        f"eval: {{num_prompts: 4, max_new_tokens: 8{judge}}}\n"
        "train: {lora_r: 4, learning_rate: 3e-3}\n" + body
    )
    return path


# --- a judge the test holds: an event to act at, instead of a moment -------------------------------


class JudgeGate:
    """The reply function of an OpenAI-compatible test server (tests/test_judges.py's chat_server)
    that can hold the trials' judging requests.

    `close()`, then `wait_until_held()`: a trial is inside an epoch's judging and stays there, its
    earlier epochs in the store and no later one, until `open()`; or `drop()`: the held requests get
    no answer, their connections closed, as from a server that went away. The driver's one-token
    check request is never held.
    """

    def __init__(self, reply: Callable[[str], str]):
        self.reply = reply
        self._open = threading.Event()
        self._open.set()
        self._held = threading.Event()
        self._drop = False

    def __call__(self, text: str) -> str:
        if "[Answer A]" in text and not self._open.is_set():
            self._held.set()
            self._open.wait(timeout=900)
            if self._drop:
                raise ConnectionResetError("dropped by the test")  # the handler closes the connection unanswered
        return self.reply(text)

    def close(self) -> None:
        self._drop = False
        self._held.clear()
        self._open.clear()

    def wait_until_held(self, proc: subprocess.Popen, timeout: float = 600) -> None:
        wait_for(self._held.is_set, proc, timeout)

    def open(self) -> None:
        self._open.set()

    def drop(self) -> None:
        self._drop = True
        self._open.set()


# --- the sweeps tests only read, run in the background ---------------------------------------------


@dataclass(frozen=True)
class Run:
    runs: Path  # --runs-dir
    run_dir: Path  # the store and the report
    proc: subprocess.CompletedProcess

    @property
    def db(self) -> Path:
        return self.run_dir / "results.db"


# Counts, in every process of the sweep (Ray workers included: each runs `sitecustomize` at start),
# the calls of trainers.evaluate.generate_answers, one line per call: whether the model had an adapter,
# and whether bitsandbytes was imported in that process; and writes which of torch, transformers, peft
# and mlflow the driver (`python -m hpo.cli`) had imported at its exit.
COUNT_GENERATIONS = '''
import atexit
import importlib.abc
import importlib.machinery
import os
import sys


class _CountGenerations(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "trainers.evaluate":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            real = module.generate_answers

            def counted(model, *args, **kwargs):
                kind = "trial" if hasattr(model, "peft_config") else "base"
                with open(os.environ["GENERATIONS_LOG"], "a") as log:
                    log.write(f"{kind}@{os.getpid()}\\n")
                lose = os.environ.get("LOSE_BASE_PROCESS_ONCE")  # a marker file: the process dies once, as a lost node
                if lose and kind == "base" and not os.path.exists(lose):
                    open(lose, "w").close()
                    os.kill(os.getpid(), 9)
                with open(os.environ["BITSANDBYTES_LOG"], "a") as log:
                    log.write(kind + (":imported" if sys.modules.get("bitsandbytes") else ":absent") + "\\n")
                return real(model, *args, **kwargs)

            module.generate_answers = counted

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _CountGenerations())


def _driver_imports():
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == "hpo.cli":  # the driver, not a Ray worker
        with open(os.environ["DRIVER_IMPORTS_LOG"], "w") as log:
            log.write(" ".join(m for m in ("torch", "transformers", "peft", "mlflow") if m in sys.modules))


atexit.register(_driver_imports)
'''

# The shipped smoke sweep, on the small task, 3 epochs: learning rate 3e-3 learns; 1e-9 changes no
# answer, so each of its epochs ties the base model (win rate 0.5). One trial at a time (a worker
# process fewer; other sweeps here run trials at once). Checkpoints go to a `storage`
# folder; each trial is also logged to W&B, offline, where wandb installs. (The whole built-in task
# trains in `make sweep`; here it would triple this sweep's time.)
SMOKE_EPOCHS = 3
SMOKE_LEARNING_RATES = (1e-9, 3e-3)
WANDB_PROJECT = "peftsweep-tests"


@dataclass(frozen=True)
class CountedRun(Run):
    generations: list[str]  # "base" or "trial", one per generate_answers call, in every process (COUNT_GENERATIONS)
    generation_pids: list[int]  # the process of each call


@dataclass(frozen=True)
class SmokeRun(CountedRun):
    storage: Path  # storage=: Tune's checkpoints and experiment state, in storage/smoke
    bitsandbytes: list[str]  # "trial:absent", "base:imported", ...: bitsandbytes in that call's process, one per call
    driver_imports: list[str]  # which of torch, transformers, peft and mlflow the driver process imported


def _counting(work: Path, environ: dict[str, str]) -> tuple[dict[str, str], Path, Path, Path]:
    """COUNT_GENERATIONS in every process of a sweep: its environment, and the generations,
    bitsandbytes and driver-imports logs it writes."""
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(COUNT_GENERATIONS)
    log, bnb, imports = work / "generations.log", work / "bitsandbytes.log", work / "driver_imports.log"
    env = {
        "PYTHONPATH": os.pathsep.join([str(hook), environ.get("PYTHONPATH", "")]),
        "GENERATIONS_LOG": str(log), "BITSANDBYTES_LOG": str(bnb), "DRIVER_IMPORTS_LOG": str(imports),
    }  # fmt: skip
    return env, log, bnb, imports


def _smoke_run(work: Path, small_task: Path, environ: dict[str, str]) -> SmokeRun:
    env, log, bnb, imports = _counting(work, environ)
    runs, storage = work / "runs", work / "storage"
    wandb = []  # W&B, offline, where it installs: tests/test_tracking.py reads its run files
    if importlib.util.find_spec("wandb") is not None:
        wandb, env = ["--set", f"tracking.wandb.project={WANDB_PROJECT}"], {**env, "WANDB_MODE": "offline"}
    proc = peftsweep(
        "run", "smoke", "--runs-dir", str(runs), "--set", f"storage={storage}", "--set", f"train.epochs={SMOKE_EPOCHS}",
        "--set", "search.max_concurrent_trials=1",
        "--set", "search.space.learning_rate.grid=[1e-9, 3e-3]", "--set", f"data.source={small_task}", *wandb, env=env, base=environ,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SmokeRun(runs, runs / "smoke", proc, *_generations(log), storage, bnb.read_text().split(), imports.read_text().split())


def _generations(log: Path) -> tuple[list[str], list[int]]:
    """COUNT_GENERATIONS' log: each call's kind ("base" or "trial") and process."""
    calls = [entry.split("@") for entry in log.read_text().split()]
    return [kind for kind, _ in calls], [int(pid) for _, pid in calls]


def _lost_baseline_run(work: Path, small_task: Path, environ: dict[str, str]) -> CountedRun:
    """Three trials of one epoch, two at a time; the process of the first to start dies (SIGKILL, by
    COUNT_GENERATIONS' LOSE_BASE_PROCESS_ONCE) as it starts measuring the base model."""
    env, log, _, _ = _counting(work, environ)
    runs = work / "runs"
    proc = peftsweep(
        "run", "smoke", "--runs-dir", str(runs), "--set", "train.epochs=1", "--set", "search.space.learning_rate.grid=[1e-4, 3e-4, 3e-3]",
        "--set", f"data.source={small_task}", env={**env, "LOSE_BASE_PROCESS_ONCE": str(work / "lost")}, base=environ,
    )  # fmt: skip
    return CountedRun(runs, runs / "smoke", proc, *_generations(log))


def _variants_run(work: Path, small_task: Path, environ: dict[str, str]) -> Run:
    """A grid over methods with parameters of their own, one trial at a time: LoRA with alpha 8 or
    1e9 on q_proj,v_proj or on a module the model lacks (float16 overflows at alpha 1e9: that trial
    diverges; the others cannot build their model), and no training at all."""
    path = sweep_file(
        work, small_task,
        "model: {dtype: float16}\n"
        "train: {epochs: 1, lora_r: 4, learning_rate: 3e-3}\n"
        "search:\n"
        "  max_concurrent_trials: 1\n"
        "  space:\n"
        "    method: {grid: [lora, none]}\n"
        "  conditional:\n"
        "    lora: {lora_alpha: {grid: [8, 1e9]}, target_modules: {grid: ['q_proj,v_proj', no_such_module]}}\n",
        name="variants",
    )  # fmt: skip
    runs = work / "runs"
    proc = peftsweep("run", str(path), "--runs-dir", str(runs), base=environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Run(runs, runs / "variants", proc)


def _asha_run(work: Path, small_task: Path, environ: dict[str, str]) -> Run:
    """sweeps/tpe_asha.yaml, 6 trials of up to 3 epochs by eval perplexity, on the small task."""
    runs = work / "runs"
    proc = peftsweep(
        "run", "tpe_asha", "--runs-dir", str(runs),
        "--set", "search.num_samples=6",
        "--set", "search.space.epochs={choice: [3]}",
        "--set", "objectives=[{metric: eval_ppl, mode: min}]",
        "--set", f"data.source={small_task}", "--set", "eval.num_prompts=4", "--set", "eval.max_new_tokens=8", base=environ,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Run(runs, runs / "tpe_asha", proc)


def _failing_run(work: Path, small_task: Path, environ: dict[str, str]) -> Run:
    """One trial, which fails: its target module is not in the model."""
    path = sweep_file(work, small_task, "train: {epochs: 1, lora_r: 4, target_modules: [no_such_module]}\n")
    runs = work / "runs"
    return Run(runs, runs / "sweep", peftsweep("run", str(path), "--runs-dir", str(runs), base=environ))


# A Ray cluster on this machine, in a process of its own (its RAY_TMPDIR too, so that no other
# `ray.init()` on this machine finds and joins it): a head without CPUs or GPUs (the driver only)
# and NODES worker nodes of 1 CPU and GPUS_PER_NODE GPUs. It prints its address and its nodes' ids,
# and shuts down when its standard input closes.
CLUSTER_NODES, CLUSTER_GPUS_PER_NODE = 2, 2
CLUSTER = f"""
import json, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, connect=False, head_node_args={{"num_cpus": 0, "num_gpus": 0}})
nodes = [cluster.add_node(num_cpus=1, num_gpus={CLUSTER_GPUS_PER_NODE}) for _ in range({CLUSTER_NODES})]
cluster.wait_for_nodes()
print(json.dumps({{"address": cluster.address, "gpu_nodes": [node.node_id for node in nodes]}}), flush=True)
sys.stdin.read()
cluster.shutdown()
"""
CLUSTER_LEARNING_RATES = [5e-3, 1e-2, 2e-2, 3e-2]  # 4 trials for 4 GPUs: all run at once; each changes some answer


@dataclass(frozen=True)
class ClusterRun(Run):
    gpu_nodes: list[str]  # the Ray node ids of the GPU nodes


def _cluster_run(work: Path, small_task: Path, environ: dict[str, str]) -> ClusterRun:
    """One-epoch trials, one GPU each, on the cluster, through `peftsweep run --address`. Their
    judging (a test server on 127.0.0.1) is held until every trial has started, so every trial
    started before any ended: they all ran at once."""
    from tests.test_judges import chat_server, prefers_good

    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    cluster = subprocess.Popen(
        [sys.executable, "-c", CLUSTER], cwd=REPO, env={**environ, "RAY_TMPDIR": ray_tmp},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        info = json.loads(cluster.stdout.readline())
        sweep = work / "on_cluster.yaml"
        runs = work / "runs"
        db = runs / "on_cluster" / "results.db"
        gate = JudgeGate(prefers_good)
        with chat_server(reply=gate) as server:
            sweep.write_text(
                f"description: {len(CLUSTER_LEARNING_RATES)} one-epoch trials, one GPU each, on a {CLUSTER_NODES}-node cluster\n"
                f"data: {{source: '{small_task}', eval_fraction: 0.1}}\n"
                "train: {epochs: 1, lora_r: 4, lora_alpha: 8}\n"
                f"search: {{algorithm: grid, space: {{learning_rate: {{grid: {CLUSTER_LEARNING_RATES}}}}}}}\n"
                f"eval: {{num_prompts: 4, max_new_tokens: 8, judge: openai, base_url: '{server.base_url}', api_model: m}}\n"
                "resources: {gpus_per_trial: 1, cpus_per_trial: 0.5}\n"
            )
            gate.close()
            proc = start("run", str(sweep), "--address", info["address"], "--runs-dir", str(runs), base=environ)
            wait_for(lambda: query(db, "SELECT count(*) FROM trials")[0][0] == len(CLUSTER_LEARNING_RATES), proc)
            gate.open()
            stdout, stderr = proc.communicate(timeout=600)
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=120)
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, stderr[-3000:]
    return ClusterRun(runs, runs / "on_cluster", done, info["gpu_nodes"])


# sweeps/packed_lora.yaml on the small task: three learning rates in one pack (at most 4 trials at
# once, so one pack of 4 runs; its worker has one CPU and one torch thread, as two threads spin
# waiting for each other on a busy machine), dropout 0, ASHA by eval_ppl. In grid order, so in trial order: each rung's reports come
# in trial order (trainers.packed), and 1e-9, which learns nothing, reports last.
PACKED_LEARNING_RATES = (1e-2, 3e-3, 1e-9)
PACKED_EPOCHS = 6


@dataclass(frozen=True)
class PackedRun(Run):
    killed_pid: int  # the pack worker, killed with -9 once a trial had two epochs in the store
    bitsandbytes: list[str]  # as SmokeRun's: bitsandbytes in the process of each generate_answers call


def _packed_run(work: Path, small_task: Path, environ: dict[str, str]) -> PackedRun:
    """Packed trials under ASHA; the pack worker is killed with -9 midway (as a lost node would end
    it), so that Ray Tune restarts its members, each from its own last checkpoint, in a new pack."""
    runs = work / "runs"
    db = runs / "packed_lora" / "results.db"
    env, _, bnb, _ = _counting(work, environ)
    proc = start(
        "run", "packed_lora", "--runs-dir", str(runs),
        "--set", f"data.source={small_task}", "--set", "eval.num_prompts=4", "--set", "eval.max_new_tokens=8",
        "--set", f"train.epochs={PACKED_EPOCHS}", "--set", "train.lora_dropout=0", "--set", "search.space.lora_r.grid=[4]",
        "--set", f"search.space.learning_rate.grid={list(PACKED_LEARNING_RATES)}",
        "--set", "resources.pack=4", "--set", "search.max_concurrent_trials=4",
        "--set", "objectives=[{metric: eval_ppl, mode: min}]",
        "--set", "scheduler={name: asha, grace_period: 1, reduction_factor: 2}",
        env=env, base=environ,
    )  # fmt: skip
    wait_for(lambda: query(db, "SELECT count(*) FROM epochs WHERE epoch = 2")[0][0] > 0, proc)
    pid = json.loads(query(db, "SELECT metrics_json FROM epochs WHERE epoch = 2")[0][0])["worker_pid"]
    os.kill(pid, 9)
    stdout, stderr = proc.communicate(timeout=600)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, stderr[-3000:]
    return PackedRun(runs, runs / "packed_lora", done, pid, bnb.read_text().split())


BENCHMARKS = ["epoch_folding", "search_efficiency", "overhead", "throughput", "cluster_sim", "gpu_throughput", "packing"]


@dataclass(frozen=True)
class BenchmarkRun:
    result: dict  # the benchmark's --json
    stdout: str  # its printed tables


def _benchmark(name: str, *options: str) -> Callable[[Path, Path, dict[str, str]], BenchmarkRun]:
    def run(work: Path, small_task: Path, environ: dict[str, str]) -> BenchmarkRun:
        """`python -m benchmarks.NAME --quick --json PATH [OPTIONS]`, as `make bench ARGS=--quick` runs it."""
        out = work / f"{name}.json"
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--json", str(out), *options],
            cwd=REPO, env=environ, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return BenchmarkRun(json.loads(out.read_text()), proc.stdout)

    return run


# name -> the job; started in this order (the longest first), two at a time
JOBS: dict[str, Callable[[Path, Path, dict[str, str]], Any]] = {
    "smoke_run": _smoke_run,
    "benchmark_epoch_folding": _benchmark("epoch_folding"),
    "cluster_run": _cluster_run,
    "asha_run": _asha_run,
    "benchmark_search_efficiency": _benchmark("search_efficiency"),
    "variants_run": _variants_run,
    "packed_run": _packed_run,
    "benchmark_overhead": _benchmark("overhead"),
    "failing_run": _failing_run,
    "lost_baseline_run": _lost_baseline_run,
    "benchmark_throughput": _benchmark("throughput"),
    "benchmark_cluster_sim": _benchmark("cluster_sim"),
    "benchmark_gpu_throughput": _benchmark("gpu_throughput"),
    "benchmark_packing": _benchmark("packing"),
    "benchmark_packing_gpu": _benchmark("packing", "--gpu"),
}
BACKGROUND_WORKERS = 2
_needed = pytest.StashKey[set]()
_timings = pytest.StashKey[dict]()  # job name -> (start, end) in seconds since the session started
_needs_model = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(config, items):
    """Notes what the selected tests need, and orders them so that they wait least: first the tests
    that need no model (they run while it is built), then those that do, then the readers of the
    background jobs, in the order the jobs start (they run while the jobs do)."""
    order = {name: rank for rank, name in enumerate(JOBS, start=2)}

    def waits_for(item) -> int:
        names = getattr(item, "fixturenames", ())
        return min((order[name] for name in names if name in order), default=1 if "tiny_model_dir" in names else 0)

    config.stash[_needed] = {name for item in items for name in getattr(item, "fixturenames", ()) if name in JOBS}
    config.stash[_needs_model] = any("tiny_model_dir" in getattr(item, "fixturenames", ()) for item in items)
    items.sort(key=waits_for)  # stable: file order within each group


def _build_tiny_model(environ: dict[str, str]) -> None:
    """The tiny model in this session's cache ($PEFTSWEEP_CACHE): copied from the user's cache where
    `make test` built it before the session (a set-up step, like the install: the build is seeded
    and versioned, and a sweep would reuse that folder too); else built here, in a process of its
    own: a build is seeded, and this process's tests use torch's global random state meanwhile."""
    from trainers.tiny_model import TINY_MODEL_VERSION, build_once

    built = USER_CACHE / f"tiny-{TINY_MODEL_VERSION}" if USER_CACHE else None
    session = Path(environ["PEFTSWEEP_CACHE"]) / f"tiny-{TINY_MODEL_VERSION}"
    if built is not None and built.is_dir() and built != session:
        build_once(session, lambda staging: [shutil.copy(file, staging) for file in built.iterdir()])
        return
    build = "from trainers.tiny_model import ensure_tiny_model; ensure_tiny_model()"
    proc = subprocess.run([sys.executable, "-c", build], cwd=REPO, env=environ, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session", autouse=True)
def background(request, model_cache, tmp_path_factory) -> dict[str, Future]:
    """Starts the tiny model's build if a selected test needs it, and every job a selected test reads,
    each once the model is built (a sweep would build it itself)."""
    needed = [name for name in JOBS if name in request.config.stash.get(_needed, set())]
    if not needed and not request.config.stash.get(_needs_model, False):
        yield {}
        return
    small = request.getfixturevalue("small_task")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model") as builder, ThreadPoolExecutor(
        max_workers=BACKGROUND_WORKERS, thread_name_prefix="background"
    ) as pool:
        # The environment as the session starts: a test may change this process's (HOME, $PEFTSWEEP_CACHE)
        # for a while, and a job's processes must not start in that.
        environ = dict(os.environ)
        began = time.monotonic()
        timings = request.config.stash.setdefault(_timings, {})

        def timed(name: str, job: Callable[[], Any]) -> Any:
            start = time.monotonic() - began
            try:
                return job()
            finally:
                timings[name] = (start, time.monotonic() - began)

        model = builder.submit(timed, "tiny_model", lambda: _build_tiny_model(environ))

        def after_the_model(name: str, work: Path) -> Any:
            model.result()
            return timed(name, lambda: JOBS[name](work, small, environ))

        futures = {name: pool.submit(after_the_model, name, tmp_path_factory.mktemp(name)) for name in needed}
        yield {"tiny_model": model, **futures}




def pytest_terminal_summary(terminalreporter, config):
    """When each background job ran, in seconds since the session started: where the suite's time goes."""
    timings = config.stash.get(_timings, {})
    if timings:
        terminalreporter.section("background jobs (seconds since the session started)")
        for name, (start, end) in sorted(timings.items(), key=lambda item: item[1]):
            terminalreporter.write_line(f"{name:<32} {start:6.1f} -> {end:6.1f}  ({end - start:5.1f} s)")


def _reader(name: str):
    @pytest.fixture(scope="session", name=name)
    def read(background):
        return background[name].result()

    read.__doc__ = JOBS[name].__doc__
    return read


for _name in JOBS:
    globals()[f"_read_{_name}"] = _reader(_name)
