"""A judge that goes away: an outage is told apart from a wrong setting, the judge can wait for its
endpoint to come back, redirects never carry the API key away, and a trial keeps its epochs
without verdicts. Real HTTP servers on 127.0.0.1, the real tiny model."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from trainers.config import ConstraintConfig, DataConfig, EvalConfig, TrainConfig, TrialConfig
from trainers.evaluate import WIN
from trainers.judges import JudgeError, JudgeUnavailable, OpenAIJudge, Verdict
from trainers.vocabulary import TrialStatus
from trainers.worker import baseline_answers, train
from tests.test_judges import KEY, KEY_ENV, QUESTION, chat_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_is_an_outage_and_a_refused_key_is_not(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    down = OpenAIJudge(f"http://127.0.0.1:{_free_port()}/v1", "m", api_key_env=KEY_ENV, max_retries=1, backoff_s=0.01)
    with pytest.raises(JudgeUnavailable, match="no reply from"):
        down.check()
    with chat_server() as server:
        server.script = ["401"]
        with pytest.raises(JudgeError) as err:
            OpenAIJudge(server.base_url, "m", api_key_env=KEY_ENV, backoff_s=0.01).check()
    assert not isinstance(err.value, JudgeUnavailable) and "HTTP 401" in str(err.value)


def test_the_judge_waits_judge_wait_s_for_its_endpoint_to_come_back(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    port = _free_port()
    judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", api_key_env=KEY_ENV, max_retries=0, backoff_s=0.05, wait_s=20)
    came_back = threading.Event()

    def start_later():
        time.sleep(1.0)
        with chat_server(port=port):
            came_back.set()
            time.sleep(10)

    threading.Thread(target=start_later, daemon=True).start()
    assert judge.judge([QUESTION], ["good answer"], ["bad answer"], [""]) == [Verdict(WIN, True, parsed=2)]
    assert came_back.is_set()  # it did wait: the server it got its answer from started a second later

    quick = OpenAIJudge(f"http://127.0.0.1:{_free_port()}/v1", "m", max_retries=0, backoff_s=0.05, wait_s=0.3)
    outcome: list[BaseException] = []

    def check() -> None:
        try:
            quick.check()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    checker.join(timeout=120)  # a liveness bound, not a speed: a judge that never gives up would still be retrying
    assert not checker.is_alive() and len(outcome) == 1 and isinstance(outcome[0], JudgeUnavailable)  # it gave up


class _Recorder(ThreadingHTTPServer):
    """Another origin (another port): records what it is sent, answers like a chat endpoint."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.seen: list[dict] = []


class _RecordingHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _record_and_answer(self):
        self.server.seen.append({"method": self.command, "headers": dict(self.headers)})
        data = json.dumps({"choices": [{"message": {"content": "A"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _record_and_answer


class _Redirector(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target: str, code: int):
        super().__init__(("127.0.0.1", 0), _RedirectHandler)
        self.target, self.code = target, code


class _RedirectHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(self.server.code)
        self.send_header("Location", self.server.target)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _serve(server):
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_the_openai_judge_never_sends_its_key_to_a_redirect_target(monkeypatch, code):
    monkeypatch.setenv(KEY_ENV, KEY)
    recorder = _serve(_Recorder())
    target = f"http://127.0.0.1:{recorder.server_address[1]}/steal"
    redirector = _serve(_Redirector(target, code))
    try:
        judge = OpenAIJudge(f"http://127.0.0.1:{redirector.server_address[1]}/v1", "m", api_key_env=KEY_ENV, backoff_s=0.01)
        with pytest.raises(JudgeError) as err:
            judge.check()
    finally:
        for server in (recorder, redirector):
            server.shutdown()
            server.server_close()
    message = str(err.value)
    assert target in message and "redirect" in message and len(message.splitlines()) == 1
    assert not isinstance(err.value, JudgeUnavailable)  # a setting to fix, not an outage to wait out
    assert recorder.seen == []  # the other origin was never contacted, so it never saw the key
    assert KEY not in message


# --- the worker: an outage mid-trial keeps the epoch ----------------------------------------------


def _config(data: DataConfig, base_url: str, **evaluation) -> TrialConfig:
    return TrialConfig(
        data=data,
        train=TrainConfig(epochs=2, learning_rate=3e-3, lora_r=4),
        eval=EvalConfig(
            num_prompts=4, max_new_tokens=6, judge="openai", base_url=base_url, api_model="m", api_key_env=KEY_ENV,
            max_retries=1, **evaluation,
        ),
    )  # fmt: skip


def test_a_judge_outage_after_the_first_epoch_keeps_every_epoch_without_verdicts(data, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with chat_server(reply=lambda text: "A" if "[Answer A]" not in text else "B") as server:
        config = _config(data, server.base_url)
        baseline = [a + " x" for a in baseline_answers(config).answers]  # differs from every trial answer: all are asked
        reported = []

        def report(metrics, save):
            reported.append(metrics)
            if len(reported) == 1:  # the endpoint goes away after the first epoch's judging
                server.shutdown()
                server.server_close()

        result = train(config, baseline, report)
    assert result.status is TrialStatus.COMPLETED and result.epochs_completed == 2
    first, second = reported
    assert first["judge_error"] is None and first["win_rate"] is not None and None not in first["verdicts"]
    assert first["judge"] == f"openai (m at {server.base_url})"
    assert first["judge_parse_rate"] == 1.0 and first["order_agreement"] == 0.0  # "B" in both orders: parsed, disagreeing
    assert second["epoch"] == 2 and second["eval_ppl"] > 1 and second["train_loss"] is not None
    assert len(second["answers"]) == 4 and second["verdicts"] == [None] * 4
    for key in ("win_rate", "win_rate_low", "win_rate_high", "wins", "losses", "ties", "order_agreement", "judge_parse_rate", "judge"):
        assert second[key] is None, key
    assert server.base_url in second["judge_error"] and KEY not in second["judge_error"]


def test_a_wrong_judge_setting_still_fails_the_trial(data, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with chat_server() as server:
        server.script = ["404"] * 100
        config = _config(data, server.base_url)
        with pytest.raises(JudgeError, match="HTTP 404"):
            train(config, [a + " x" for a in baseline_answers(config).answers], lambda m, save: None)


class _BigJudge:
    """Stands in for an hf judge as large as a hub model (none can be downloaded here): its weights,
    512 MB, load lazily on first use, as HFJudge's do."""

    weights = None

    def check(self):
        pass

    def judge(self, prompts, answers, baseline, references):
        _BigJudge.weights = torch.ones(128 * 1024 * 1024)  # 512 MB, touched
        return [Verdict(WIN, True) for _ in answers]


def test_inference_memory_leaves_out_the_judges_weights(data, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("trainers.worker.make_judge", lambda config, device=None: _BigJudge())
    config = TrialConfig(
        data=data,
        train=TrainConfig(epochs=1, learning_rate=3e-3, lora_r=4),
        eval=EvalConfig(num_prompts=2, max_new_tokens=4),
    )
    baseline = baseline_answers(config).answers
    reported = []
    result = train(config, baseline, lambda m, save: reported.append(m))
    (metrics,) = reported
    assert _BigJudge.weights is not None  # the judge did load its weights
    assert metrics["peak_memory_gb"] - metrics["inference_memory_gb"] > 0.4  # the process peak has them...
    assert result.status is TrialStatus.COMPLETED
    # ...the trained model's inference peak does not, so a constraint just above it keeps the trial feasible
    limit = ConstraintConfig(inference_memory_gb=metrics["inference_memory_gb"] + 0.2)
    _BigJudge.weights = None  # freed, as a judge of an earlier trial would be
    reported.clear()
    result = train(config.model_copy(update={"constraints": limit}), baseline, lambda m, save: reported.append(m))
    assert result.status is TrialStatus.COMPLETED, result.error
    assert reported[0]["peak_memory_gb"] > limit.inference_memory_gb  # the judge's weights would have made it infeasible
    _BigJudge.weights = None
