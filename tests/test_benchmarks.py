"""Every benchmark runs at its --quick size and prints its table; speed is never asserted here.

Each runs as `make bench` runs it, `python -m benchmarks.NAME`, in a subprocess, with `--quick` and
`--json PATH`; the tests check the printed tables and the plain values in the JSON (counts, that
both sides did the same work, sane ranges), never how fast anything was. The GPU benchmark is
checked where it runs: skipped without CUDA, its table with one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def run_benchmark(name: str, tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    stdout = proc.stdout
    # The machine is described, and every headline ratio is a printed row against its target.
    assert "machine: " in stdout and result["machine"]["cpu"] in stdout
    for package in ("torch", "ray"):
        assert f"{package} {result['machine']['versions'][package]}" in stdout
    for ratio in result["ratios"]:
        assert ratio["name"] in stdout and ratio["target_text"] in stdout
        assert ratio["value"] > 0 and ratio["met"] in (True, False)
    return result, stdout


@pytest.fixture(scope="module", autouse=True)
def built_model(tiny_model_dir):
    """The subprocesses inherit the session's model cache ($PEFTSWEEP_CACHE); built once, before any timing."""
    return tiny_model_dir


def test_overhead(tmp_path):
    result, stdout = run_benchmark("overhead", tmp_path)
    assert [r["trials"] for r in result["runs"]["peftsweep"]] == [2] and [r["trials"] for r in result["runs"]["plain"]] == [2]
    phases = {r["key"]: r for r in result["rows"]}
    sweep = phases["makespan"]["peftsweep"]
    assert 0 < phases["startup"]["peftsweep"] < phases["to_first_training"]["peftsweep"] < sweep
    assert phases["trainings"]["peftsweep"] < sweep and phases["trainings"]["plain"] < phases["makespan"]["plain"]
    assert result["ratios"][0]["value"] == pytest.approx(sweep / phases["makespan"]["plain"])
    assert "| makespan, launch to exit" in stdout


def test_throughput(tmp_path):
    result, stdout = run_benchmark("throughput", tmp_path)
    sides = {r["side"]: r for r in result["rows"]}
    assert set(sides) == {"hf_trainer", "peftsweep", "peftsweep_packed"}
    assert result["tokens_equal"] and sides["peftsweep"]["tokens"] > 0  # every side trained on the very same tokens
    assert [r["name"] for r in result["ratios"]] == ["throughput, peftsweep_packed / HF Trainer", "throughput, peftsweep / HF Trainer"]
    for row in sides.values():
        assert row["tokens_per_second"] > 0 and math.isfinite(row["final_train_loss"]) and row["eval_ppl"] > 1
    assert 0 < result["padding_share"] < 1 and "padding" in stdout


def test_search_efficiency(tmp_path):
    result, stdout = run_benchmark("search_efficiency", tmp_path)
    grid = result["grid"]
    assert grid["configurations"] == 2 and grid["epochs"] == 2 and 0 <= grid["best_win_rate"] <= 1
    assert {(s["objective"], s["seed"]) for s in result["seeds"]} == {(o, s) for o in ("win_rate", "eval_ppl") for s in (0, 1)}
    for seed in result["seeds"]:
        assert 1 <= seed["trials"] <= 3 and seed["epochs"] >= seed["trials"]
        assert seed["compute_to_target"] == math.inf or 0 < seed["compute_to_target"] <= seed["search_compute"]
        # 3 trials of a 2-configuration grid: at most 3 configurations trained in full (about 1.5 grids)
        assert seed["search_share_of_grid"] <= 2.0
    assert [r["name"] for r in result["ratios"]] == ["search efficiency, win rate", "search efficiency, perplexity"]


def test_epoch_folding(tmp_path):
    result, stdout = run_benchmark("epoch_folding", tmp_path)
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["trials"]["folded"] == 1 and rows["trials"]["unfolded"] == 2  # epochs grid {1, 2}
    assert rows["epochs_trained"]["folded"] == 2 and rows["epochs_trained"]["unfolded"] == 3
    assert result["ideal"] == pytest.approx(2 / 3)
    # Folding answers the same question: epoch 1 of the 2-epoch training is the 1-epoch training.
    assert result["max_ppl_difference"] < 1e-3


def test_cluster_sim(tmp_path):
    result, stdout = run_benchmark("cluster_sim", tmp_path)
    assert result["trials_completed"] == 8 and result["trials_stored"] == 8
    assert 0 < result["ratios"][0]["value"] <= 1.0 + 1e-6
    assert result["driver_peak_rss_mib"] >= result["driver_rss_before_fit_mib"] > 0


def test_gpu_throughput(tmp_path):
    import torch

    result, stdout = run_benchmark("gpu_throughput", tmp_path)
    if not torch.cuda.is_available():
        assert result["skipped"] and "skipped: no CUDA GPU" in stdout and result["ratios"] == []
        return
    assert not result["skipped"] and result["tokens_equal"]
    for row in result["rows"]:
        assert row["tokens_per_second"] > 0 and (row["mfu"] is None or 0 < row["mfu"] < 1)
