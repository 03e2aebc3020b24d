"""A sweep on a real multi-node Ray cluster: `peftsweep run --address` spreads the trials over the
nodes, one GPU each, and the store says where every trial ran.

`ray.cluster_utils.Cluster` starts real Ray nodes on this machine (each its own raylet, object
store and worker processes) and the real command line attaches to the head by address, as it
would to a cluster's head (tests/conftest.py: the cluster and its run). The GPUs are the one mock:
none exists here, so each node declares `num_gpus` it does not have. Ray still schedules trials by
GPU, assigns GPU ids and sets each trial's CUDA_VISIBLE_DEVICES as on a GPU node; torch finds no
CUDA, so the worker trains on CPU. The trials' judging is held until all of them have started,
so all of them run at once: two on each node.
"""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
from pathlib import Path

from tests.conftest import CLUSTER_GPUS_PER_NODE, CLUSTER_LEARNING_RATES, CLUSTER_NODES


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
    assert cluster_run.proc.stdout.strip() == str(cluster_run.run_dir / "report.html")
    assert (cluster_run.run_dir / "report.html").is_file()
    assert f"{CLUSTER_NODES * CLUSTER_GPUS_PER_NODE} GPUs" in cluster_run.proc.stderr  # the cluster's: this machine has none


def test_every_trial_completed_with_its_epoch_stored(cluster_run):
    conn = sqlite3.connect(cluster_run.db)
    assert conn.execute("SELECT status FROM sweep").fetchone()[0] == "completed"
    conn.close()
    trials = _trials(cluster_run.run_dir)
    assert len(trials) == len(CLUSTER_LEARNING_RATES)
    for trial in trials:
        assert trial["status"] == "completed", trial
        assert [e["epoch"] for e in trial["epochs"]] == [1]
        assert math.isfinite(trial["epochs"][0]["eval_ppl"]) and trial["epochs"][0]["train_seconds"] > 0


def test_each_trial_held_exactly_one_gpu_that_ray_assigned(cluster_run):
    for trial in _trials(cluster_run.run_dir):
        assert trial["devices"] in {str(i) for i in range(CLUSTER_GPUS_PER_NODE)}, trial  # CUDA_VISIBLE_DEVICES, one id


def test_trials_ran_on_every_gpu_node(cluster_run):
    trials = _placed_trials(cluster_run.run_dir)
    assert {t["node_id"] for t in trials} == set(cluster_run.gpu_nodes)  # both GPU nodes, never the GPU-less head


def test_concurrent_trials_never_share_a_gpu(cluster_run):
    trials = _placed_trials(cluster_run.run_dir)
    for a, b in itertools.combinations(trials, 2):  # the judge held every trial until all had started
        assert a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"], (a, b)
    same_node = [(a, b) for a, b in itertools.combinations(trials, 2) if a["node_id"] == b["node_id"]]
    assert len(same_node) == CLUSTER_NODES  # two trials at once on each node
    for a, b in same_node:
        assert set(a["devices"].split(",")).isdisjoint(b["devices"].split(",")), (a, b)
