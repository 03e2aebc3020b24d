"""A whole sweep judged by an OpenAI-compatible endpoint: real HTTP on 127.0.0.1 from the Ray trial
workers, the judge's numbers in the export, and the API key nowhere on disk or in the output."""

from __future__ import annotations

import csv
import io
import socket
from pathlib import Path

import pytest

from tests.conftest import peftsweep
from tests.test_judges import KEY, KEY_ENV, chat_server


@pytest.fixture
def judge_server():
    with chat_server() as server:
        yield server


def _judge_args(base_url: str) -> list[str]:
    return [
        "--set", "eval.judge=openai", "--set", f"eval.base_url={base_url}", "--set", "eval.api_model=judge-model",
        "--set", f"eval.api_key_env={KEY_ENV}", "--set", "eval.max_retries=1",
    ]  # fmt: skip


def test_an_openai_judged_sweep_keeps_its_key_secret(tmp_path, tiny_model_dir, judge_server):
    runs = tmp_path / "runs"
    proc = peftsweep(
        "run", "smoke", "--runs-dir", str(runs), "--set", "train.epochs=1", *_judge_args(judge_server.base_url),
        env={KEY_ENV: KEY},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trial_requests = [r for r in judge_server.requests if r["body"].get("max_tokens") != 1]
    assert trial_requests, "the trials asked the judge"
    assert {r["auth"] for r in judge_server.requests} == {f"Bearer {KEY}"}  # the key was used...

    leaks = [str(p) for p in (runs / "smoke").rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    ray_logs = Path("/tmp/ray/session_latest/logs")
    if ray_logs.is_dir():  # Ray's own logs of this machine's latest session
        leaks += [str(p) for p in ray_logs.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert not leaks  # ...and written nowhere: store, Tune's experiment state, checkpoints, report, logs
    assert KEY not in proc.stdout + proc.stderr

    export = peftsweep("export", "smoke", "--runs-dir", str(runs))
    rows = list(csv.DictReader(io.StringIO(export.stdout)))
    assert len(rows) == 2
    for row in rows:
        low, rate, high = float(row["win_rate_low"]), float(row["win_rate"]), float(row["win_rate_high"])
        assert 0 <= low <= rate <= high <= 1
        assert float(row["wins"]) + float(row["losses"]) + float(row["ties"]) == 8
        assert 0 <= float(row["order_agreement"]) <= 1  # a pairwise judge: both orders were asked
        assert float(row["retention_ppl"]) > 1
        assert float(row["judge_seconds"]) > 0


def test_an_unreachable_judge_fails_the_sweep_before_training(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = tmp_path / "runs"
    proc = peftsweep("run", "smoke", "--runs-dir", str(runs), *_judge_args(f"http://127.0.0.1:{port}/v1"), env={KEY_ENV: KEY})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("peftsweep: error: ")  # the sweep's summary line, then the error
    assert f"127.0.0.1:{port}" in lines[-1] and KEY not in proc.stderr
    assert not runs.exists()  # nothing written
