"""A sweep on a real multi-node Ray cluster: `peftsweep run --address` spreads the trials over the
nodes, one GPU each, and the store says where every trial ran.

`ray.cluster_utils.Cluster` starts real Ray nodes on this machine (each its own raylet, object
store and worker processes) and the real command line attaches to the head by address, as it
would to a cluster's head. The GPUs are the one mock: none exists here, so each node declares
`num_gpus` it does not have. Ray still schedules trials by GPU, assigns GPU ids and sets each
trial's CUDA_VISIBLE_DEVICES as on a GPU node; torch finds no CUDA, so the worker trains on CPU.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from tests.conftest import peftsweep

NODES = 2
GPUS_PER_NODE = 2
LEARNING_RATES = [3e-4, 1e-3, 3e-3, 1e-2]  # 4 trials for 4 GPUs: all run at once

SWEEP = f"""\
description: {len(LEARNING_RATES)} one-epoch trials, one GPU each, on a {NODES}-node cluster
train: {{epochs: 1, lora_r: 4, lora_alpha: 8}}
search:
  algorithm: grid
  space:
    learning_rate: {{grid: {LEARNING_RATES}}}
eval: {{num_prompts: 4, max_new_tokens: 8}}
resources: {{gpus_per_trial: 1, cpus_per_trial: 0.5}}
"""


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    """A head without CPUs or GPUs (the driver only) and NODES worker nodes of 1 CPU and GPUS_PER_NODE GPUs."""
    from ray.cluster_utils import Cluster

    # The model is built before Ray starts (tiny_model_dir), so trials only load it.
    # A private Ray temp dir holds the cluster's address file, so no `ray.init()` elsewhere on this
    # machine attaches to this cluster; short, because Ray's socket paths must fit in 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", ray_tmp)
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "num_gpus": 0})
        try:
            for _ in range(NODES):
                cluster.add_node(num_cpus=1, num_gpus=GPUS_PER_NODE)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            cluster.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster_run(cluster, tmp_path_factory) -> tuple[Path, object]:
    work = tmp_path_factory.mktemp("cluster")
    sweep = work / "on_cluster.yaml"
    sweep.write_text(SWEEP)
    proc = peftsweep("run", str(sweep), "--address", cluster.address, "--runs-dir", str(work / "runs"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "runs" / "on_cluster", proc


def _trials(run_dir: Path) -> list[dict]:
    """Each trial with its status, interval, devices and the Ray node id its first epoch reported."""
    conn = sqlite3.connect(run_dir / "results.db")
    conn.row_factory = sqlite3.Row
    trials = [dict(r) for r in conn.execute("SELECT * FROM trials ORDER BY trial_id")]
    for trial in trials:
        epochs = conn.execute(
            "SELECT epoch, eval_ppl, train_seconds, metrics_json FROM epochs WHERE trial_id = ? ORDER BY epoch",
            (trial["trial_id"],),
        ).fetchall()
        trial["epochs"] = [dict(e) for e in epochs]
        trial["node_id"] = json.loads(epochs[0]["metrics_json"]).get("node_id") if epochs else None
    conn.close()
    return trials


def _placed_trials(run_dir: Path) -> list[dict]:
    """The trials, each with the Ray node id it ran on (nodes here share one IP, so `node` cannot tell them apart)."""
    trials = _trials(run_dir)
    assert all(t["node_id"] for t in trials), "trials report no node_id (hpo/driver.py run_trial)"
    return trials


def test_the_cli_attaches_to_the_cluster(cluster_run):
    run_dir, proc = cluster_run
    assert proc.stdout.strip() == str(run_dir / "report.html")
    assert (run_dir / "report.html").is_file()
    assert f"{NODES * GPUS_PER_NODE} GPUs" in proc.stderr  # the cluster's resources: this machine has no GPU


def test_every_trial_completed_with_its_epoch_stored(cluster_run):
    run_dir, _ = cluster_run
    conn = sqlite3.connect(run_dir / "results.db")
    assert conn.execute("SELECT status FROM sweep").fetchone()[0] == "completed"
    conn.close()
    trials = _trials(run_dir)
    assert len(trials) == len(LEARNING_RATES)
    for trial in trials:
        assert trial["status"] == "completed", trial
        assert [e["epoch"] for e in trial["epochs"]] == [1]
        assert math.isfinite(trial["epochs"][0]["eval_ppl"]) and trial["epochs"][0]["train_seconds"] > 0


def test_each_trial_held_exactly_one_gpu_that_ray_assigned(cluster_run):
    run_dir, _ = cluster_run
    for trial in _trials(run_dir):
        assert trial["devices"] in {str(i) for i in range(GPUS_PER_NODE)}, trial  # CUDA_VISIBLE_DEVICES, one id


def test_trials_ran_on_every_gpu_node(cluster, cluster_run):
    run_dir, _ = cluster_run
    trials = _placed_trials(run_dir)
    gpu_nodes = {node.node_id for node in cluster.worker_nodes}
    assert {t["node_id"] for t in trials} == gpu_nodes  # both GPU nodes, never the GPU-less head


def test_concurrent_trials_never_share_a_gpu(cluster_run):
    run_dir, _ = cluster_run
    trials = _placed_trials(run_dir)
    concurrent_on_one_node = 0
    for a, b in itertools.combinations(trials, 2):
        overlap = a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]
        if overlap and a["node_id"] == b["node_id"]:
            concurrent_on_one_node += 1
            assert set(a["devices"].split(",")).isdisjoint(b["devices"].split(",")), (a, b)
    assert concurrent_on_one_node >= 1  # the check above ran: trials did share a node at the same time
