"""Judges: reference metrics by hand, the openai judge over real HTTP on 127.0.0.1, the hf judge on the tiny model."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from pydantic import ValidationError

from trainers.config import EvalConfig
from trainers.evaluate import LOSS, TIE, WIN, chrf, rouge_l
from trainers.judges import (
    HFJudge,
    JudgeError,
    OpenAIJudge,
    ReferenceJudge,
    Verdict,
    agreement_rate,
    judge_prompt,
    make_judge,
    pairwise,
    parse_verdict,
)

KEY_ENV = "PEFTSWEEP_TEST_JUDGE_KEY"
KEY = "sk-planted-3f9a7c1e"
QUESTION = "### Instruction:\nWhich city is the capital of Ferro?\n\n### Response:\n"


# --- reference --------------------------------------------------------------------------------


def test_chrf_is_one_for_identical_strings_and_zero_without_shared_characters():
    assert chrf("the river runs north", "the river runs north") == pytest.approx(1.0)
    assert chrf("xyz", "abc") == 0.0
    assert 0 < chrf("the river runs south", "the river runs north") < 1


def test_rouge_l_by_hand():
    # LCS of words "the cat on mat" = 4 of 6 and 6: P = R = F = 2/3
    assert rouge_l("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(2 / 3)
    # LCS "a c" = 2: P = 2/4, R = 2/3, F = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    # a subsequence, not a bag of words: reversed order keeps one word of two
    assert rouge_l("b a", "a b") == pytest.approx(0.5)
    assert rouge_l("", "a b") == 0.0


def test_reference_judge_prefers_the_closer_answer_with_a_tie_margin():
    judge = make_judge(EvalConfig(metric="rouge_l", tie_margin=0.1))
    assert isinstance(judge, ReferenceJudge)
    judge.check()
    refs = ["the capital is iron hill", "the capital is iron hill", "the capital is iron hill"]
    answers = ["the capital is iron hill", "iron", "the capital is iron"]
    baseline = ["a hill", "the capital is iron hill", "the capital is iron hill"]
    verdicts = judge.judge([QUESTION] * 3, answers, baseline, refs)
    # third: 8/9 against 1.0, a difference of 0.11 > 0.1 is a loss; a wider margin makes it a tie
    assert verdicts == [Verdict(WIN), Verdict(LOSS), Verdict(LOSS)]
    wide = ReferenceJudge("rouge_l", tie_margin=0.2).judge([QUESTION] * 3, answers, baseline, refs)
    assert [v.score for v in wide] == [WIN, LOSS, TIE]
    assert agreement_rate(verdicts) is None


# --- the combination of both orders ------------------------------------------------------------


def test_pairwise_asks_both_orders_and_a_disagreement_is_a_tie():
    asked: list[str] = []

    def prefers_good(texts):  # a consistent judge: the answer with "good" in it, wherever it stands
        asked.extend(texts)
        return [WIN if "good" in t.split("[Answer A]")[1].split("[Answer B]")[0] else LOSS for t in texts]

    answers, baseline = ["good one", "bad one", "same"], ["bad one", "good one", "same"]
    verdicts = pairwise([QUESTION] * 3, answers, baseline, prefers_good)
    assert verdicts == [Verdict(WIN, True), Verdict(LOSS, True), Verdict(TIE, True)]
    assert sorted(asked) == sorted(
        [judge_prompt(QUESTION, a, b) for a, b in [("good one", "bad one"), ("bad one", "good one")]] * 2
    ), "both orders of each differing pair, and identical answers not asked"

    always_a = pairwise([QUESTION] * 3, answers, baseline, lambda texts: [WIN] * len(texts))
    assert always_a == [Verdict(TIE, False), Verdict(TIE, False), Verdict(TIE, True)]
    assert agreement_rate(always_a) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "reply, expected",
    [("A", WIN), ("B.", LOSS), ("Answer B is better.", LOSS), ("**A**", WIN), ("(B)", LOSS), ("I cannot tell", TIE), ("", TIE), ("a", TIE)],
)
def test_parse_verdict_reads_the_first_standalone_letter(reply, expected):
    assert parse_verdict(reply) == expected


# --- openai: a real OpenAI-compatible server on 127.0.0.1 --------------------------------------


class FakeChatServer(ThreadingHTTPServer):
    """/v1/chat/completions over real HTTP; records requests; `script` queues failures for the next requests."""

    daemon_threads = True

    def __init__(self, reply, port: int = 0):
        super().__init__(("127.0.0.1", port), ChatHandler)
        self.reply = reply  # judge prompt text -> reply text
        self.script: list[str] = []  # "sleep", or an HTTP status such as "503", one per request in arrival order
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.sleep_s = 1.5

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            action = self.server.script.pop(0) if self.server.script else None
        try:
            if action == "sleep":
                time.sleep(self.server.sleep_s)
            elif action is not None:
                # like some hosted APIs, echo the key in the error
                self._send(int(action), {"error": {"message": f"refused {self.headers.get('Authorization')}"}})
                return
            text = self.server.reply(body["messages"][0]["content"])
            self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting: that is the timeout under test

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def answer_a_of(text: str) -> str:
    return text.split("[Answer A]")[1].split("[Answer B]")[0].strip()


def prefers_good(text: str) -> str:
    if "[Answer A]" not in text:
        return "A"  # the check's one-token request
    return "The better answer is A." if "good" in answer_a_of(text) else "B"


@contextlib.contextmanager
def chat_server(reply=prefers_good, port: int = 0):
    """A FakeChatServer answering on 127.0.0.1 (on `port`, 0: any free one) for the duration of the block."""
    srv = FakeChatServer(reply, port)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with chat_server() as srv:
        yield srv


def openai_judge(server, **kw) -> OpenAIJudge:
    return OpenAIJudge(server.base_url, "judge-model", api_key_env=KEY_ENV, backoff_s=0.05, **{"timeout_s": 5.0, **kw})


def test_openai_judge_asks_both_orders_with_the_key_from_the_environment(server):
    config = EvalConfig(judge="openai", base_url=server.base_url, api_model="judge-model", api_key_env=KEY_ENV)
    judge = make_judge(config)
    judge.check()
    verdicts = judge.judge([QUESTION] * 3, ["good answer", "bad answer", "same"], ["bad answer", "good answer", "same"], [""] * 3)
    assert verdicts == [Verdict(WIN, True), Verdict(LOSS, True), Verdict(TIE, True)]

    check, *asked = server.requests
    assert check["body"]["max_tokens"] == 1
    assert len(asked) == 4, "two orders for each of the two differing pairs; identical answers are not sent"
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in server.requests} == {f"Bearer {KEY}"}
    assert {r["body"]["model"] for r in asked} == {"judge-model"}
    shown_as_a = sorted(answer_a_of(r["body"]["messages"][0]["content"]) for r in asked)
    assert shown_as_a == ["bad answer", "bad answer", "good answer", "good answer"]
    assert KEY not in repr(judge) and KEY not in repr(verdicts)


def test_openai_disagreement_between_orders_is_a_tie(server):
    server.reply = lambda text: "A"  # a judge that always picks the first answer
    verdicts = openai_judge(server).judge([QUESTION] * 2, ["good answer", "x"], ["bad answer", "y"], [""] * 2)
    assert verdicts == [Verdict(TIE, False), Verdict(TIE, False)]
    assert len(server.requests) == 4
    assert agreement_rate(verdicts) == 0.0


def test_openai_unparseable_reply_is_undecided(server):
    server.reply = lambda text: "Both answers have merit."
    assert openai_judge(server).judge([QUESTION], ["good answer"], ["bad answer"], [""]) == [Verdict(TIE, True)]


def test_openai_timeout_then_retry_succeeds(server):
    server.script = ["sleep"]
    verdicts = openai_judge(server, timeout_s=0.3, max_retries=2).judge([QUESTION], ["good answer"], ["bad answer"], [""])
    assert verdicts == [Verdict(WIN, True)]
    assert len(server.requests) == 3, "two orders, one of them sent again after timing out"


def test_openai_5xx_and_429_are_retried(server):
    server.script = ["500", "503", "429"]
    verdicts = openai_judge(server, max_retries=3).judge([QUESTION], ["good answer"], ["bad answer"], [""])
    assert verdicts == [Verdict(WIN, True)]
    assert len(server.requests) == 5


def test_openai_gives_up_after_max_retries_naming_the_url(server):
    server.script = ["502"] * 3
    judge = openai_judge(server, max_retries=2)
    with pytest.raises(JudgeError) as err:
        judge.check()
    assert len(server.requests) == 3
    assert f"{server.base_url}/chat/completions" in str(err.value) and "HTTP 502" in str(err.value)
    assert KEY not in str(err.value), "the server echoed the key; the message must not"


def test_openai_4xx_is_not_retried_and_the_echoed_key_is_scrubbed(server):
    server.script = ["401"]
    with pytest.raises(JudgeError) as err:
        openai_judge(server, max_retries=3).check()
    assert len(server.requests) == 1
    message = str(err.value)
    assert "HTTP 401" in message and f"${KEY_ENV}" in message
    assert KEY not in message and "***" in message


def test_openai_unreachable_server_fails_check_naming_the_url_not_the_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = OpenAIJudge(url, "judge-model", api_key_env=KEY_ENV, timeout_s=1.0, max_retries=1, backoff_s=0.01)
    with pytest.raises(JudgeError) as err:
        judge.check()
    message = str(err.value)
    assert f"{url}/chat/completions" in message and "eval.base_url" in message
    assert KEY not in message and KEY not in repr(err.value)
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


def test_openai_config_names_the_missing_key():
    with pytest.raises(ValidationError, match="needs base_url"):
        EvalConfig(judge="openai", api_model="m")
    with pytest.raises(ValidationError, match="needs api_model"):
        EvalConfig(judge="openai", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ValidationError, match="needs judge_model"):
        EvalConfig(judge="hf")


# --- hf: the tiny model as a pairwise judge ----------------------------------------------------


@pytest.fixture(scope="module")
def hf_judge(tiny_model_dir):
    judge = make_judge(EvalConfig(judge="hf", judge_model=str(tiny_model_dir), batch_size=4), device=torch.device("cpu"))
    assert isinstance(judge, HFJudge)
    judge.check()
    return judge


def test_hf_judge_reads_a_and_b_as_single_tokens(hf_judge):
    a_id, b_id = hf_judge._letter_ids
    assert a_id != b_id
    assert [hf_judge._tokenizer.decode([i]) for i in (a_id, b_id)] == ["A", "B"]


def test_hf_judge_batches_give_the_same_margins_as_one_at_a_time(hf_judge):
    texts = [judge_prompt(QUESTION, a, b) for a, b in [("Iron Hill.", "no"), ("The capital of Ferro is Iron Hill, by the sea.", "x")]]
    batched = hf_judge.margins(texts)
    single = [hf_judge.margins([t])[0] for t in texts]
    assert batched == pytest.approx(single, abs=1e-4)


def test_hf_judge_judges_both_orders_and_ties_a_disagreement(hf_judge):
    answers = ["Iron Hill.", "The capital is Copper Bay.", "same answer", "It is Iron Hill, on the coast."]
    baseline = ["Copper Bay.", "Iron Hill", "same answer", "no idea"]
    rows: list[int] = []
    hf_judge.margins([judge_prompt(QUESTION, "a", "b")])  # loads the weights, so the hook can go on the model
    hook = hf_judge._model.register_forward_hook(
        lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        verdicts = hf_judge.judge([QUESTION] * 4, answers, baseline, [""] * 4)
    finally:
        hook.remove()
    assert sum(rows) == 2 * 3, "both orders of the three differing pairs; identical answers are not judged"

    for answer, base, verdict in zip(answers, baseline, verdicts):
        if answer == base:
            assert verdict == Verdict(TIE, True)
            continue
        first, second = hf_judge.margins([judge_prompt(QUESTION, answer, base), judge_prompt(QUESTION, base, answer)])
        trial_as_a, trial_as_b = first > 0, second < 0
        assert verdict.agreed == (trial_as_a == trial_as_b)
        assert verdict.score == ((WIN if trial_as_a else LOSS) if verdict.agreed else TIE)
    assert all(v.score in (WIN, TIE, LOSS) for v in verdicts)
    assert hf_judge.judge([QUESTION] * 4, answers, baseline, [""] * 4) == verdicts, "deterministic"


def test_hf_judge_check_names_the_key_for_a_missing_model(tmp_path):
    with pytest.raises(JudgeError, match="eval.judge_model"):
        HFJudge(str(tmp_path / "no-such-model")).check()
