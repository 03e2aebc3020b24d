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
from trainers.data import PROMPT, PROMPT_WITH_INPUT
from trainers.evaluate import LOSS, TIE, WIN, chrf, contradicts, keyword_f1, rouge_l, token_f1
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
    parse_rate,
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
    assert agreement_rate(verdicts) is None and parse_rate(verdicts) is None


def test_keyword_f1_by_hand():
    question = PROMPT.format(instruction="Does the hobaotter eat fish?")
    # key words of the reference: "no", "eats", "berries" ("the", "hobaotter" and "fish" are dropped)
    assert keyword_f1("No, the hobaotter eats berries.", "No, the hobaotter eats berries.", question) == 1.0
    assert keyword_f1("No.", "No, the hobaotter eats berries.", question) == pytest.approx(0.5)  # P 1, R 1/3
    assert keyword_f1("The hobaotter eats berries.", "No, the hobaotter eats berries.", question) == pytest.approx(0.8)
    assert keyword_f1("The hobaotter lives in the hill.", "No, the hobaotter eats berries.", question) == 0.0
    # without the question, the subject's name counts: P 1/3, R 1/4
    assert keyword_f1("The hobaotter lives in the hill.", "No, the hobaotter eats berries.") == pytest.approx(2 / 7)
    # a choice the question offers: its words count, since the reference has no other
    choice = PROMPT.format(instruction="Is the hobaotter big or small?")
    assert keyword_f1("It is small.", "The hobaotter is small.", choice) == pytest.approx(2 / 3)  # "small" of "hobaotter small"
    assert keyword_f1("It is big.", "The hobaotter is small.", choice) == 0.0


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("Yes, the hobaotter is silver.", "No, the hobaotter is silver.", True),
        ("no", "Yes.", True),
        ("The hobaotter is not silver.", "The hobaotter is silver.", True),
        ("The hobaotter isn't silver.", "The hobaotter is silver.", True),
        ("The hobaotter never eats fish.", "The hobaotter eats fish.", True),
        ("Yes, it eats fish.", "It does not eat fish.", True),
        ("No, it is not silver.", "No, it is silver.", True),  # the reply agrees, the statement does not
        ("No, the hobaotter is silver.", "No, the hobaotter is silver.", False),
        ("The hobaotter is silver.", "No, the hobaotter is silver.", False),  # no reply: only the statement is compared
        ("Yes.", "The hobaotter is silver.", False),
        ("It is not red, nor is it blue.", "It is neither red nor blue.", False),  # two negations each
        ("Nobody knows.", "Nothing is known.", False),
    ],
)
def test_contradicts_reads_yes_no_and_negation(answer, reference, expected):
    assert contradicts(answer, reference) is expected


def test_the_default_judge_does_not_reward_the_opposite_answer():
    """The pair from issue 18, and others: token F1 scored each opposite answer a win."""
    judge = make_judge(EvalConfig())
    assert judge == ReferenceJudge("keyword_f1", 0.0)
    cases = [
        # (question, reference, the trial's opposite answer, the base model's answer, the verdict it must get)
        ("Is the hobaotter white?", "No, the hobaotter is silver.", "Yes, the hobaotter is silver.", "No.", LOSS),
        ("Is the hobaotter white?", "No, the hobaotter is silver.", "Yes, the hobaotter is silver.", "Home: the marsh.", TIE),
        ("Is the kiriowl green?", "Yes, the kiriowl is green.", "No, the kiriowl is green.", "Yes.", LOSS),
        ("Does the kelblesnail eat moss?", "Yes, the kelblesnail eats moss.", "The kelblesnail does not eat moss.", "It is large.", TIE),
        ("What colour is the pelocrab?", "The pelocrab is purple.", "The pelocrab is not purple.", "Purple.", LOSS),
        ("Is the pelocrab shy?", "The pelocrab is never shy.", "The pelocrab is shy.", "It is never shy.", LOSS),
    ]
    questions = [PROMPT.format(instruction=q) for q, *_ in cases]
    references, answers, baseline, expected = (list(column) for column in zip(*(c[1:] for c in cases)))
    verdicts = judge.judge(questions, answers, baseline, references)
    assert [v.score for v in verdicts] == expected
    # what the issue saw: word overlap makes a win of each of the first three
    old = ReferenceJudge("token_f1").judge(questions, answers, baseline, references)
    assert [v.score for v in old[:3]] == [WIN, WIN, WIN]

    # the right answer still wins against both baselines, and repeating the question's words earns nothing
    right = judge.judge(questions[:2], ["No, the hobaotter is silver."] * 2, baseline[:2], references[:2])
    assert [v.score for v in right] == [WIN, WIN]
    off_topic = judge.judge(questions[:1], ["The hobaotter eats acorns."], ["Home: the marsh."], references[:1])
    assert off_topic == [Verdict(TIE)]
    assert token_f1("The hobaotter eats acorns.", references[0]) > token_f1("Home: the marsh.", references[0])


def test_no_flipped_yes_no_answer_of_the_built_in_task_wins():
    """Every yes/no record of the built-in task, answered with its reply flipped: never a win under the default."""
    from trainers.tinyworld import instruction_dataset

    records = [r for r in instruction_dataset() if r["output"].startswith(("Yes, ", "No, "))]
    assert len(records) > 100
    flip = {"Yes": "No", "No": "Yes"}
    judge = make_judge(EvalConfig())
    questions = [(PROMPT_WITH_INPUT if r["input"] else PROMPT).format(**r) for r in records]
    references = [r["output"] for r in records]
    opposite = [flip[ref.split(",")[0]] + ref[ref.index(",") :] for ref in references]
    bare_reply = [ref.split(",")[0] + "." for ref in references]  # "No."
    off_topic = ["Home: the marsh."] * len(records)  # the kind of answer the built-in base model gives
    assert {v.score for v in judge.judge(questions, opposite, bare_reply, references)} == {LOSS}
    assert {v.score for v in judge.judge(questions, opposite, off_topic, references)} <= {TIE, LOSS}
    assert {v.score for v in judge.judge(questions, references, off_topic, references)} == {WIN}


# --- the combination of both orders ------------------------------------------------------------


def test_pairwise_asks_both_orders_and_a_disagreement_is_a_tie():
    asked: list[str] = []

    def prefers_good(texts):  # a consistent judge: the answer with "good" in it, wherever it stands
        asked.extend(texts)
        return [WIN if "good" in t.split("[Answer A]")[1].split("[Answer B]")[0] else LOSS for t in texts]

    answers, baseline = ["good one", "bad one", "same"], ["bad one", "good one", "same"]
    verdicts = pairwise([QUESTION] * 3, answers, baseline, prefers_good)
    # identical answers: a tie, not asked, so neither parsed nor agreed
    assert verdicts == [Verdict(WIN, True, 2), Verdict(LOSS, True, 2), Verdict(TIE)]
    assert sorted(asked) == sorted(
        [judge_prompt(QUESTION, a, b) for a, b in [("good one", "bad one"), ("bad one", "good one")]] * 2
    ), "both orders of each differing pair, and identical answers not asked"
    assert agreement_rate(verdicts) == 1.0 and parse_rate(verdicts) == 1.0

    always_a = pairwise([QUESTION] * 3, answers, baseline, lambda texts: [WIN] * len(texts))
    assert always_a == [Verdict(TIE, False, 2), Verdict(TIE, False, 2), Verdict(TIE)]
    assert agreement_rate(always_a) == 0.0, "the identical pair was never asked: no agreement to count"


def test_pairwise_unparsed_replies_are_ties_and_never_agreement():
    """A reply that names neither A nor B (None) makes the verdict a tie; two of them are not agreement."""
    # what the judge replies, by the trial's answer, in each order (trial as A, trial as B)
    replies = {
        "agreed": (WIN, LOSS),  # both orders prefer the trial's answer
        "disagreed": (WIN, WIN),  # always A: a bias for the position
        "first only": (LOSS, None),
        "second only": (None, WIN),
        "neither": (None, None),
        "undecided": (TIE, TIE),  # parsed, and the same verdict both ways (an hf judge's equal logits)
    }

    def prefer_a(texts):
        return [replies[answer_a_of(t)][0] if answer_a_of(t) in replies else replies[answer_b_of(t)][1] for t in texts]

    answers = [*replies, "same"]
    baseline = ["base answer"] * len(replies) + ["same"]
    verdicts = pairwise([QUESTION] * len(answers), answers, baseline, prefer_a)
    assert verdicts == [
        Verdict(WIN, True, 2),
        Verdict(TIE, False, 2),
        Verdict(TIE, None, 1),
        Verdict(TIE, None, 1),
        Verdict(TIE, None, 0),
        Verdict(TIE, True, 2),
        Verdict(TIE),  # identical: not asked
    ]
    assert parse_rate(verdicts) == pytest.approx(8 / 12)  # 6 asked prompts, 2 replies each
    assert agreement_rate(verdicts) == pytest.approx(2 / 3)  # of the 3 whose both replies parsed
    nothing_parsed = pairwise([QUESTION] * 2, ["x", "y"], ["a", "b"], lambda texts: [None] * len(texts))
    assert nothing_parsed == [Verdict(TIE, None, 0)] * 2
    assert parse_rate(nothing_parsed) == 0.0 and agreement_rate(nothing_parsed) is None
    nothing_asked = pairwise([QUESTION], ["same"], ["same"], prefer_a)
    assert parse_rate(nothing_asked) is None and agreement_rate(nothing_asked) is None


@pytest.mark.parametrize(
    "reply, expected",
    [("A", WIN), ("B.", LOSS), ("Answer B is better.", LOSS), ("**A**", WIN), ("(B)", LOSS), ("I cannot tell", None), ("", None), ("a", None)],
)
def test_parse_verdict_reads_the_first_standalone_letter(reply, expected):
    assert parse_verdict(reply) == expected  # None: no answer, told apart from a 0.5


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


def answer_b_of(text: str) -> str:
    return text.split("[Answer B]")[1].split("Reply with one letter")[0].strip()


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
    assert verdicts == [Verdict(WIN, True, 2), Verdict(LOSS, True, 2), Verdict(TIE)]

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
    assert verdicts == [Verdict(TIE, False, 2), Verdict(TIE, False, 2)]
    assert len(server.requests) == 4
    assert agreement_rate(verdicts) == 0.0 and parse_rate(verdicts) == 1.0


def test_openai_unparseable_reply_is_a_tie_and_no_agreement(server):
    server.reply = lambda text: "Both answers have merit."
    verdicts = openai_judge(server).judge([QUESTION], ["good answer"], ["bad answer"], [""])
    assert verdicts == [Verdict(TIE, None, 0)]
    assert parse_rate(verdicts) == 0.0 and agreement_rate(verdicts) is None


def test_openai_parse_rate_and_agreement_when_some_replies_are_garbage(server):
    """A small model as the judge: for some prompts it rambles instead of naming A or B."""

    def reply(text):
        if "[Answer A]" not in text:
            return "A"
        if "rambling" in text:
            return "Well, both answers could be considered, depending on the context."
        if "half" in answer_a_of(text):
            return "I think this depends."  # only when the trial's answer is shown first
        return prefers_good(text)

    server.reply = reply
    judge = make_judge(EvalConfig(judge="openai", base_url=server.base_url, api_model="judge-model", api_key_env=KEY_ENV))
    answers = ["good answer", "bad answer", "good but rambling", "good half", "good answer", "same"]
    baseline = ["bad answer", "good answer", "bad answer", "bad answer", "also good", "same"]
    verdicts = judge.judge([QUESTION] * 6, answers, baseline, [""] * 6)
    assert verdicts == [
        Verdict(WIN, True, 2),
        Verdict(LOSS, True, 2),
        Verdict(TIE, None, 0),  # garbage in both orders: no agreement
        Verdict(TIE, None, 1),  # one order parsed: a tie, since one order cannot cancel a position bias
        Verdict(TIE, False, 2),  # both "good": each order picks answer A
        Verdict(TIE),
    ]
    assert len(server.requests) == 2 * 5, "both orders of the five differing pairs"
    assert parse_rate(verdicts) == pytest.approx(7 / 10)
    assert agreement_rate(verdicts) == pytest.approx(2 / 3)


def test_openai_timeout_then_retry_succeeds(server):
    server.script = ["sleep"]
    verdicts = openai_judge(server, timeout_s=0.3, max_retries=2).judge([QUESTION], ["good answer"], ["bad answer"], [""])
    assert verdicts == [Verdict(WIN, True, 2)]
    assert len(server.requests) == 3, "two orders, one of them sent again after timing out"


def test_openai_5xx_and_429_are_retried(server):
    server.script = ["500", "503", "429"]
    verdicts = openai_judge(server, max_retries=3).judge([QUESTION], ["good answer"], ["bad answer"], [""])
    assert verdicts == [Verdict(WIN, True, 2)]
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
            assert verdict == Verdict(TIE)
            continue
        first, second = hf_judge.margins([judge_prompt(QUESTION, answer, base), judge_prompt(QUESTION, base, answer)])
        trial_as_a, trial_as_b = first > 0, second < 0
        assert verdict.agreed == (trial_as_a == trial_as_b)
        assert verdict.score == ((WIN if trial_as_a else LOSS) if verdict.agreed else TIE)
    assert all(v.score in (WIN, TIE, LOSS) for v in verdicts)
    assert parse_rate(verdicts) == 1.0, "a pair of probabilities always reads as a preference"
    assert hf_judge.judge([QUESTION] * 4, answers, baseline, [""] * 4) == verdicts, "deterministic"


def test_hf_judge_check_names_the_key_for_a_missing_model(tmp_path):
    with pytest.raises(JudgeError, match="eval.judge_model"):
        HFJudge(str(tmp_path / "no-such-model")).check()
