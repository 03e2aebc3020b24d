"""A whole sweep judged by an OpenAI-compatible endpoint: real HTTP on 127.0.0.1 from the Ray trial
workers, the judge's numbers in the export, and the API key nowhere on disk or in the output."""

from __future__ import annotations

import csv
import io
import json
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
    assert len(lines) == 1 and lines[0].startswith("peftsweep: error: eval.base_url: ")  # checked before the sweep starts
    assert f"127.0.0.1:{port}" in lines[-1] and KEY not in proc.stderr
    assert not runs.exists()  # nothing written


def test_a_judge_that_goes_away_mid_sweep_costs_no_training_and_rejudge_fills_the_verdicts(tmp_path, tiny_model_dir):
    import sqlite3
    import subprocess
    import sys
    import time

    from tests.conftest import REPO
    from trainers.config import EvalConfig
    from trainers.evaluate import win_rate
    from trainers.judges import agreement_rate, make_judge

    runs = tmp_path / "runs"
    db = runs / "smoke" / "results.db"
    args = ["run", "smoke", "--runs-dir", str(runs), "--set", "search.max_concurrent_trials=1"]
    with chat_server() as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hpo.cli", *args, *_judge_args(server.base_url)], cwd=REPO,
            env={**__import__("os").environ, KEY_ENV: KEY}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:  # until the first epoch is judged and stored
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                    if conn.execute("SELECT count(*) FROM epochs WHERE win_rate IS NOT NULL").fetchone()[0]:
                        break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        first_url = server.base_url
    # the judge is gone from here on
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]

    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        trials = conn.execute("SELECT * FROM trials").fetchall()
        epochs = conn.execute("SELECT * FROM epochs ORDER BY trial_id, epoch").fetchall()
        unjudged = [e for e in epochs if e["win_rate"] is None]
        missing = conn.execute("SELECT count(*) FROM answers WHERE verdict IS NULL").fetchone()[0]
        stored = conn.execute("SELECT count(*) FROM answers").fetchone()[0]
    assert [t["status"] for t in trials] == ["completed", "completed"]
    assert len(epochs) == 4  # every trial kept both its epochs
    assert len(unjudged) == 3  # the first trial's first epoch was judged; the server was gone after it
    for epoch in unjudged:
        extra = json.loads(epoch["metrics_json"])
        assert first_url in extra["judge_error"] and epoch["eval_ppl"] > 1 and epoch["train_loss"] is not None
        assert all(epoch[c] is None for c in ("wins", "losses", "ties", "win_rate_low", "win_rate_high"))
        assert extra["order_agreement"] is None
    assert stored == 4 * 8 and missing == 3 * 8
    last = {e["trial_id"]: e for e in epochs}  # each trial's latest epoch: its checkpoint, to resume from
    assert all(Path(e["checkpoint"], "state.pt").is_file() for e in last.values())
    assert "not judged" in stderr and KEY not in stdout + stderr
    assert "not judged" in (runs / "smoke" / "report.html").read_text()

    with chat_server() as server:  # back, on another port
        rejudged = peftsweep(
            "rejudge", "smoke", "--runs-dir", str(runs), "--missing", "--set", f"eval.base_url={server.base_url}",
            env={KEY_ENV: KEY},
        )  # fmt: skip
        assert rejudged.returncode == 0, rejudged.stderr[-3000:]
        assert len([line for line in rejudged.stderr.splitlines() if line.startswith("trial ")]) == 2  # one line per trial
        report = runs / "smoke" / "report.html"
        assert rejudged.stdout.strip() == str(report) and "not judged" not in report.read_text()  # rebuilt with the verdicts
        settings = EvalConfig(judge="openai", base_url=server.base_url, api_model="judge-model", api_key_env=KEY_ENV)
        import os

        os.environ[KEY_ENV] = KEY
        try:
            judge = make_judge(settings)
            with sqlite3.connect(db) as conn:
                conn.row_factory = sqlite3.Row
                base = conn.execute("SELECT * FROM baseline ORDER BY prompt_id").fetchall()
                for epoch in conn.execute("SELECT * FROM epochs").fetchall():
                    rows = conn.execute(
                        "SELECT answer, verdict FROM answers WHERE trial_id = ? AND epoch = ? ORDER BY prompt_id",
                        (epoch["trial_id"], epoch["epoch"]),
                    ).fetchall()
                    verdicts = judge.judge([b["prompt"] for b in base], [r["answer"] for r in rows], [b["answer"] for b in base],
                                           [b["reference"] for b in base])  # fmt: skip
                    assert [r["verdict"] for r in rows] == [v.score for v in verdicts]  # a direct judging of the stored answers
                    expected = win_rate([v.score for v in verdicts])
                    for key, value in expected.items():
                        assert epoch[key] == pytest.approx(value), key
                    extra = json.loads(epoch["metrics_json"])
                    assert extra["order_agreement"] == pytest.approx(agreement_rate(verdicts)) and extra["judge_error"] is None
        finally:
            del os.environ[KEY_ENV]
    assert "not judged" not in (runs / "smoke" / "report.html").read_text()
    export = peftsweep("export", "smoke", "--runs-dir", str(runs))
    assert all(row["judge"] for row in csv.DictReader(io.StringIO(export.stdout)))
