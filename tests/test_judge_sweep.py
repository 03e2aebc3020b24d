"""A whole sweep judged by an OpenAI-compatible endpoint: real HTTP on 127.0.0.1 from the Ray trial
workers, an outage mid-sweep that costs no training, `rejudge` filling the missing verdicts, the
judge's numbers in the store and the export, and the API key nowhere on disk or in the output."""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import sqlite3
import tempfile
from pathlib import Path

import pytest
from tests.conftest import JudgeGate, invoke, query, start, wait_for
from tests.test_judges import KEY, KEY_ENV, answer_a_of, chat_server

PROMPTS = 8  # sweeps/smoke.yaml: eval.num_prompts


def _judge_args(base_url: str) -> list[str]:
    return [
        "--set", "eval.judge=openai", "--set", f"eval.base_url={base_url}", "--set", "eval.api_model=judge-model",
        "--set", f"eval.api_key_env={KEY_ENV}", "--set", "eval.max_retries=1",
    ]  # fmt: skip


def longer_is_better(text: str) -> str:
    """A judge with a known taste: the longer answer wins, in either order (equal lengths: B both times, a tie)."""
    if "[Answer A]" not in text:
        return "A"  # the check's one-token request
    answer_b = text.split("[Answer B]\n")[1].rsplit("\n\nReply with one letter", 1)[0]
    return "A" if len(answer_a_of(text)) > len(answer_b.strip()) else "B"


def test_an_unreachable_judge_fails_the_sweep_before_training(tmp_path, tiny_model_dir):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = tmp_path / "runs"
    result = invoke("run", "smoke", "--runs-dir", str(runs), *_judge_args(f"http://127.0.0.1:{port}/v1"), env={KEY_ENV: KEY})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftsweep: error: eval.base_url: ")  # checked before the sweep starts
    assert f"127.0.0.1:{port}" in lines[-1] and KEY not in result.stdout + result.stderr
    assert not runs.exists()  # nothing written


def test_a_judge_that_goes_away_mid_sweep_costs_no_training_rejudge_fills_the_verdicts_and_the_key_stays_secret(
    tmp_path, small_task, tiny_model_dir
):
    """smoke on the small task at learning rates high enough that the first trial's answers differ
    from the base model's from its first epoch on (identical answers are not asked), one trial at a
    time, each in a fresh worker process (resources.reuse_workers: false). After the first trial's first epoch is judged and stored, the
    server goes away while that trial's second epoch is being judged (JudgeGate.drop: the requests
    lose their connection, then nothing answers): every epoch is kept, without verdicts.
    `rejudge --missing`, with the server back on another port, fills them."""
    from trainers.config import EvalConfig
    from trainers.evaluate import win_rate
    from trainers.judges import agreement_rate, make_judge

    runs = tmp_path / "runs"
    db = runs / "smoke" / "results.db"
    gate = JudgeGate(longer_is_better)
    args = [
        "run", "smoke", "--runs-dir", str(runs), "--set", "search.max_concurrent_trials=1", "--set", "resources.reuse_workers=false",
        "--set", f"data.source={small_task}", "--set", "search.space.learning_rate.grid=[3e-3, 1e-2]",
    ]  # fmt: skip
    judged = lambda: query(db, "SELECT count(*) FROM epochs WHERE win_rate IS NOT NULL")[0][0]  # noqa: E731
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's logs of this sweep alone (short: socket paths)
    with chat_server(reply=gate) as server:
        proc = start(*args, *_judge_args(server.base_url), env={KEY_ENV: KEY, "RAY_TMPDIR": str(ray_tmp)})
        wait_for(lambda: judged() == 1, proc)
        gate.close()
        gate.wait_until_held(proc)  # the first trial's second epoch, being judged
        first_url, requests = server.base_url, server.requests
    gate.drop()  # the server is gone: its held requests lose their connection, new ones are refused
    stdout, stderr = proc.communicate(timeout=600)
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
    assert stored == 4 * PROMPTS and missing == 3 * PROMPTS
    pids = {(e["trial_id"], json.loads(e["metrics_json"])["worker_pid"]) for e in epochs}
    assert len(pids) == 2 and len({pid for _, pid in pids}) == 2  # a process of its own for each trial, both its epochs
    last = {e["trial_id"]: e for e in epochs}  # each trial's latest epoch: its checkpoint, to resume from
    assert all(Path(e["checkpoint"], "state.pt").is_file() for e in last.values())
    assert "not judged" in stderr
    assert "not judged" in (runs / "smoke" / "report.html").read_text()
    # The trials' workers asked the judge, with the key; the check's one-token request came first, from the driver.
    assert requests[0]["body"]["max_tokens"] == 1 and any(r["body"]["max_tokens"] != 1 for r in requests)
    assert {r["auth"] for r in requests} == {f"Bearer {KEY}"}

    with chat_server(reply=longer_is_better) as server:  # back, on another port
        rejudged = invoke(
            "rejudge", "smoke", "--runs-dir", str(runs), "--missing", "--set", f"eval.base_url={server.base_url}",
            env={KEY_ENV: KEY},
        )  # fmt: skip
        assert rejudged.returncode == 0, rejudged.stderr[-3000:]
        assert len([line for line in rejudged.stderr.splitlines() if line.startswith("trial ")]) == 2  # one line per trial
        report = runs / "smoke" / "report.html"
        assert rejudged.stdout.strip() == str(report) and "not judged" not in report.read_text()  # rebuilt with the verdicts
        settings = EvalConfig(judge="openai", base_url=server.base_url, api_model="judge-model", api_key_env=KEY_ENV)
        with pytest.MonkeyPatch.context() as env:
            env.setenv(KEY_ENV, KEY)
            judge = make_judge(settings)
            with sqlite3.connect(db) as conn:
                conn.row_factory = sqlite3.Row
                base = conn.execute("SELECT * FROM baseline ORDER BY prompt_id").fetchall()
                # Every epoch, the one a trial worker judged and the three rejudge did, against a direct judging.
                for epoch in conn.execute("SELECT * FROM epochs").fetchall():
                    rows = conn.execute(
                        "SELECT answer, verdict FROM answers WHERE trial_id = ? AND epoch = ? ORDER BY prompt_id",
                        (epoch["trial_id"], epoch["epoch"]),
                    ).fetchall()
                    verdicts = judge.judge([b["prompt"] for b in base], [r["answer"] for r in rows], [b["answer"] for b in base],
                                           [b["reference"] for b in base])  # fmt: skip
                    assert [r["verdict"] for r in rows] == [v.score for v in verdicts]
                    expected = win_rate([v.score for v in verdicts])
                    for key, value in expected.items():
                        assert epoch[key] == pytest.approx(value), key
                    extra = json.loads(epoch["metrics_json"])
                    assert extra["order_agreement"] == pytest.approx(agreement_rate(verdicts)) and extra["judge_error"] is None
    assert "not judged" not in (runs / "smoke" / "report.html").read_text()
    export = invoke("export", "smoke", "--runs-dir", str(runs))
    rows = list(csv.DictReader(io.StringIO(export.stdout)))
    assert len(rows) == 2
    judged_first = {(e["trial_id"], e["epoch"]) for e in epochs if e["win_rate"] is not None}  # by the trial's worker
    for row in rows:  # the judge of the trial's best epoch: the first server's, or rejudge's
        judge_url = first_url if (row["trial_id"], int(row["best_epoch"])) in judged_first else server.base_url
        assert row["judge"] == f"openai (judge-model at {judge_url})"
        assert float(row["wins"]) + float(row["losses"]) + float(row["ties"]) == PROMPTS
        assert float(row["retention_ppl"]) > 1 and float(row["judge_seconds"]) > 0

    # The key was used, and written nowhere: store, Tune's experiment state, checkpoints, report, logs, output.
    ray_logs = list(ray_tmp.glob("ray/session_2*/logs"))
    assert len(ray_logs) == 1 and any(ray_logs[0].iterdir())  # Ray's own logs of the sweep
    leaks = [str(p) for folder in (runs, ray_tmp) for p in folder.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leaks
    assert KEY not in stdout + stderr + rejudged.stdout + rejudged.stderr + export.stdout
