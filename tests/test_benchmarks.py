"""Every benchmark runs at its --quick size and prints its table; speed is never asserted here.

Each runs as `make bench` runs it, `python -m benchmarks.NAME`, in a subprocess, with `--quick` and
`--json PATH` (tests/conftest.py starts them in the background, beside the other tests, so the
numbers they measure mean nothing here); the tests check the printed tables and the plain values in
the JSON (counts, that both sides did the same work, sane ranges), never how fast anything was. The
GPU benchmark is checked where it runs: skipped without CUDA, its table with one.
"""

from __future__ import annotations

import math
import re

import pytest


def check_tables(run) -> tuple[dict, str]:
    """The machine is described, and every headline ratio is a printed row, against its target, that
    says met or missed as its value and target decide."""
    result, stdout = run.result, run.stdout
    assert "machine: " in stdout and result["machine"]["cpu"] in stdout
    for package in ("torch", "ray"):
        assert f"{package} {result['machine']['versions'][package]}" in stdout
    for ratio in result["ratios"]:
        [row] = [cells for cells in _rows(stdout) if cells[0] == ratio["name"] and cells[2:3] == [ratio["target_text"]]]
        assert row[1] == f"{ratio['value']:.3f}"
        value, target = ratio["value"], ratio["target"]
        # a ratio is positive; a difference in seconds (overhead's fixed cost) can fall below 0 in a loaded quick run,
        # and a largest difference (packing's eval_ppl drift) is 0 where both sides computed the same bits
        assert math.isfinite(value) and (value > 0 or ratio["name"].endswith(", seconds") or (value == 0 and "difference" in ratio["name"])), ratio
        if ratio["op"] == "within":
            tolerance = float(re.match(r"within ([\d.]+) %", ratio["target_text"]).group(1)) / 100
            met = abs(value / target - 1) <= tolerance
        else:
            met = value <= target if ratio["op"] == "<=" else value >= target
        assert ratio["met"] is met and row[3] == ("**met**" if met else "**missed**")
    return result, stdout


def _rows(stdout: str) -> list[list[str]]:
    """The cells of every row of the printed Markdown tables."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in stdout.splitlines() if line.startswith("| ")]


def test_overhead(benchmark_overhead):
    result, stdout = check_tables(benchmark_overhead)
    assert [r["trials"] for r in result["runs"]["peftsweep"]] == [2] and [r["trials"] for r in result["runs"]["plain"]] == [2]
    phases = {r["key"]: r for r in result["rows"]}
    sweep = phases["makespan"]["peftsweep"]
    assert 0 < phases["startup"]["peftsweep"] < phases["to_first_training"]["peftsweep"] < sweep
    assert phases["trainings"]["peftsweep"] < sweep and phases["trainings"]["plain"] < phases["makespan"]["plain"]
    assert result["ratios"][0]["value"] == pytest.approx(sweep / phases["makespan"]["plain"])
    [a], [b] = result["runs"]["peftsweep"], result["runs"]["plain"]
    per_trial = (a["held_beyond_training"] - b["held_beyond_training"]) * 2 / 2  # 2 trials, 2 at a time
    assert result["ratios"][1]["name"] == "fixed cost per sweep, seconds"
    assert result["ratios"][1]["value"] == pytest.approx(a["makespan"] - b["makespan"] - per_trial)
    assert "| makespan, launch to exit" in stdout


def test_throughput(benchmark_throughput):
    result, stdout = check_tables(benchmark_throughput)
    sides = {r["side"]: r for r in result["rows"]}
    assert set(sides) == {"hf_trainer", "peftsweep", "peftsweep_packed"}
    assert result["tokens_equal"] and sides["peftsweep"]["tokens"] > 0  # every side trained on the very same tokens
    assert [r["name"] for r in result["ratios"]] == ["throughput, peftsweep_packed / HF Trainer", "throughput, peftsweep / HF Trainer"]
    for row in sides.values():
        assert row["tokens_per_second"] > 0 and math.isfinite(row["final_train_loss"]) and row["eval_ppl"] > 1
    assert 0 < result["padding_share"] < 1 and "padding" in stdout


def test_search_efficiency(benchmark_search_efficiency):
    result, stdout = check_tables(benchmark_search_efficiency)
    grid = result["grid"]
    assert grid["configurations"] == 2 and grid["epochs"] == 2
    assert f"best win rate {grid['best_win_rate']:.2f}" in stdout
    assert {(s["objective"], s["seed"]) for s in result["seeds"]} == {(o, s) for o in ("win_rate", "eval_ppl") for s in (0, 1)}
    for seed in result["seeds"]:
        assert 1 <= seed["trials"] <= 3 and seed["epochs"] >= seed["trials"]
        assert seed["compute_to_target"] == math.inf or 0 < seed["compute_to_target"] <= seed["search_compute"]
        # 3 trials of a 2-configuration grid: at most 3 configurations trained in full (about 1.5 grids)
        assert seed["search_share_of_grid"] <= 2.0
        # in FLOPs too, reached at the same result: a share of the grid's FLOPs (counted by the workers), or never
        assert math.isinf(seed["flops_share_of_grid"]) == math.isinf(seed["compute_to_target"])
        assert seed["flops_share_of_grid"] == math.inf or 0 < seed["flops_share_of_grid"] <= 2.0
    assert grid["flops"] > 0
    # the random-order reference, printed beside the searches' figures, for both objectives and both stopping rules
    assert set(result["random_order"]) == {"win_rate", "eval_ppl"}
    for reference in result["random_order"].values():
        assert set(reference) == {"asha", "perfect"} and all(v == math.inf or 0 < v <= 2.0 for v in reference.values())
        assert f"{reference['asha']:.3f} with ASHA's rule, {reference['perfect']:.3f} with perfect early stopping" in stdout
    assert [r["name"] for r in result["ratios"]] == [
        "search efficiency, win rate", "search efficiency, win rate, FLOPs",
        "search efficiency, perplexity", "search efficiency, perplexity, FLOPs",
    ]  # fmt: skip


def test_the_random_order_reference_stops_as_ashas_rule_or_a_perfect_one_would():
    """Three configurations of two 1-s epochs, proposed A, B, C, two at a time (no Ray: a pure simulation)."""
    from benchmarks.search_efficiency import random_order_trace

    def epochs(ppl):
        return [{"epoch": e, "eval_ppl": p, "win_rate": 0.5, "epoch_compute": 1.0, "compute": float(e), "flops": float(e)}
                for e, p in enumerate(ppl, 1)]

    table = {"A": epochs([3.0, 2.0]), "B": epochs([4.0, 3.5]), "C": epochs([1.0, 0.5])}
    order = ["A", "B", "C"]

    def seen(trace):
        return [(r["trial_id"], r["epoch"]) for r in trace]

    # perfect: A and B stop after their first epoch, C (kept) runs both, on the slot A freed at 1 s
    assert seen(random_order_trace(table, order, "eval_ppl", keep={"C"})) == [("A", 1), ("B", 1), ("C", 1), ("C", 2)]
    # Ray Tune's ASHA rule (its _Bracket), factor 2: A is the rung's first (continues); B is worse than A (stops); C beats the median of A, B
    assert seen(random_order_trace(table, order, "eval_ppl", reduction_factor=2)) == [("A", 1), ("B", 1), ("A", 2), ("C", 1), ("C", 2)]
    # on the win rate (all equal here) nobody is worse than the rung's cut: every trial runs both epochs
    assert len(random_order_trace(table, order, "win_rate", reduction_factor=2)) == 6


def test_epoch_folding(benchmark_epoch_folding):
    result, stdout = check_tables(benchmark_epoch_folding)
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["trials"]["folded"] == 1 and rows["trials"]["unfolded"] == 2  # epochs grid {1, 2}
    assert rows["epochs_trained"]["folded"] == 2 and rows["epochs_trained"]["unfolded"] == 3
    assert result["ideal"] == pytest.approx(2 / 3)
    # Folding answers the same question: epoch 1 of the 2-epoch training is the 1-epoch training.
    assert result["max_ppl_difference"] < 1e-3


def test_cluster_sim(benchmark_cluster_sim):
    result, stdout = check_tables(benchmark_cluster_sim)
    assert result["trials_completed"] == 8 and result["trials_stored"] == 8
    assert 0 < result["ratios"][0]["value"] <= 1.0 + 1e-6
    assert result["ratios"][0]["value"] == pytest.approx(result["busy_slot_seconds"] / result["slot_seconds"])
    # every idle slot-second is accounted for, in one of the named parts (each a printed row)
    assert result["busy_slot_seconds"] + sum(result["idle_slot_seconds"].values()) == pytest.approx(result["slot_seconds"], rel=0.01)
    assert all(seconds >= 0 for seconds in result["idle_slot_seconds"].values()) and "| idle before each worker's first trial" in stdout
    assert 0 < result["machine_cpu_busy"] <= 1
    assert result["driver_peak_rss_mib"] >= result["driver_rss_before_fit_mib"] > 0


def test_gpu_throughput(benchmark_gpu_throughput):
    import torch

    result, stdout = check_tables(benchmark_gpu_throughput)
    if not torch.cuda.is_available():
        assert result["skipped"] and "skipped: no CUDA GPU" in stdout and result["ratios"] == []
        return
    assert not result["skipped"] and result["tokens_equal"]
    for row in result["rows"]:
        assert row["tokens_per_second"] > 0 and (row["mfu"] is None or 0 < row["mfu"] < 1)


def test_packing(benchmark_packing):
    result, stdout = check_tables(benchmark_packing)
    [packed], [separate] = result["runs"]["packed"], result["runs"]["separate"]
    assert len(packed["eval_ppl"]) == len(separate["eval_ppl"]) == result["configurations"] == 2
    assert packed["eval_ppl"].keys() == separate["eval_ppl"].keys()
    assert all(len(packed["eval_ppl"][c]) == len(separate["eval_ppl"][c]) == 1 for c in packed["eval_ppl"])
    # the one ratio that is correctness, not speed: a packed trial trains as it would alone
    drift = result["ratios"][1]
    assert drift["name"].startswith("eval_ppl of a packed trial") and drift["met"], drift
    assert 0 < packed["peak_memory_gb"] and 0 < separate["peak_memory_gb"]
    assert "| makespan, launch to exit (s)" in stdout


def test_packing_gpu_side(benchmark_packing_gpu):
    """Without CUDA, `--gpu --quick` measures a CPU miniature (so the GPU script is known to run)."""
    result, stdout = check_tables(benchmark_packing_gpu)
    assert [r["side"] for r in result["step_rows"]] == ["packed", "one at a time"]
    assert all(r["seconds_per_step"] > 0 and r["tokens_per_second"] > 0 for r in result["step_rows"])
    assert result["device"] == ("cpu" if result["machine"]["gpu"] == "no GPU" else "cuda")
    assert "seconds per step" in stdout
