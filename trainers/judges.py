"""Judges: compare a trial's answer with the base model's answer, prompt by prompt.

A judge gives one `Verdict` per prompt. `reference` scores both answers against the prompt's
reference answer; `hf` (a local causal LM) and `openai` (an OpenAI-compatible chat endpoint) are
pairwise: they are shown the question and both answers and asked which is better, once with the
trial's answer as A and once as B. When the two orders disagree the verdict is a tie, which also
cancels a judge's bias for a position; when either order's reply did not parse (no A or B in it)
it is a tie too, and no agreement. Identical answers are a tie without asking: they count toward
neither `parse_rate` nor `agreement_rate`.
`check()` is called at sweep start, before any training, so a judge that cannot work fails early.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from trainers.config import EvalConfig
from trainers.evaluate import LOSS, SIMILARITY, TIE, WIN, judge_against_reference, no_grad

if TYPE_CHECKING:  # torch loads with the hf judge's model: checking the other judges needs none
    import torch

JUDGE_PROMPT = """Two assistants answered the same question. Which answer is better: correct, helpful and to the point?

[Question]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Reply with one letter: A or B."""


class JudgeError(RuntimeError):
    """A judge that cannot be used or reached; the one-line message says what to fix."""


class JudgeUnavailable(JudgeError):
    """The judge's endpoint did not answer (refused, timed out, 429 or 5xx) after its retries and
    `eval.judge_wait_s`: an outage, not a wrong setting. A trial keeps its epoch without verdicts."""


@dataclass(frozen=True)
class Verdict:
    score: float  # the trial's answer against the baseline's: WIN 1.0, TIE 0.5, LOSS 0.0
    # Pairwise judges only (None for the reference judge and for identical answers, which are not asked):
    agreed: bool | None = None  # both orders parsed and gave the same verdict; None when either did not parse
    parsed: int | None = None  # of the two orders' replies, how many parsed


class Judge(Protocol):
    def check(self) -> None:
        """Raise JudgeError if the judge cannot be used; called once at sweep start."""

    def judge(self, prompts: list[str], answers: list[str], baseline: list[str], references: list[str]) -> list[Verdict]:
        """One verdict per prompt for the trial's `answers` against the base model's `baseline`."""


def make_judge(config: EvalConfig, *, device: torch.device | None = None) -> Judge:
    """The judge the sweep's `eval` section names."""
    if config.judge == "reference":
        return ReferenceJudge(config.metric, config.tie_margin)
    if config.judge == "hf":
        return HFJudge(config.judge_model, batch_size=config.batch_size, device=device)
    return OpenAIJudge(
        config.base_url,
        config.api_model,
        api_key_env=config.api_key_env,
        timeout_s=config.timeout_s,
        max_retries=config.max_retries,
        wait_s=config.judge_wait_s,
    )


def judge_label(config: EvalConfig) -> str:
    """Which judge gave an epoch's verdicts, in a few words (never the API key)."""
    if config.judge == "reference":
        return f"reference ({config.metric}, tie_margin {config.tie_margin:g})"
    if config.judge == "hf":
        return f"hf ({config.judge_model})"
    return f"openai ({config.api_model} at {config.base_url})"


def agreement_rate(verdicts: list[Verdict]) -> float | None:
    """Share of the prompts whose two orders both parsed that gave the same verdict; None when no
    prompt had both parse (and for the reference judge). Two non-answers are no agreement."""
    agreed = [v.agreed for v in verdicts if v.agreed is not None]
    return sum(agreed) / len(agreed) if agreed else None


def parse_rate(verdicts: list[Verdict]) -> float | None:
    """Share of a pairwise judge's replies that parsed, two per asked prompt; None when none was asked
    (identical answers only) and for the reference judge."""
    parsed = [v.parsed for v in verdicts if v.parsed is not None]
    return sum(parsed) / (2 * len(parsed)) if parsed else None


def judge_prompt(question: str, answer_a: str, answer_b: str) -> str:
    return JUDGE_PROMPT.format(question=question.strip(), answer_a=answer_a.strip(), answer_b=answer_b.strip())


def pairwise(
    prompts: list[str], answers: list[str], baseline: list[str], prefer_a: Callable[[list[str]], list[float | None]]
) -> list[Verdict]:
    """Judge both orders with `prefer_a` (1.0: A is better, 0.0: B, 0.5: undecided, None: the reply did
    not parse); a verdict stands when both orders parsed and agree, else it is a tie."""
    asked = [i for i, (a, b) in enumerate(zip(answers, baseline, strict=True)) if a.strip() != b.strip()]
    trial_first = [judge_prompt(prompts[i], answers[i], baseline[i]) for i in asked]
    trial_second = [judge_prompt(prompts[i], baseline[i], answers[i]) for i in asked]
    preferences = prefer_a(trial_first + trial_second) if asked else []
    verdicts = [Verdict(TIE)] * len(answers)
    for k, i in enumerate(asked):
        as_a, as_b = preferences[k], preferences[len(asked) + k]
        if as_a is None or as_b is None:
            verdicts[i] = Verdict(TIE, agreed=None, parsed=(as_a is not None) + (as_b is not None))
        elif as_a == 1.0 - as_b:
            verdicts[i] = Verdict(as_a, agreed=True, parsed=2)
        else:
            verdicts[i] = Verdict(TIE, agreed=False, parsed=2)
    return verdicts


# --- reference --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceJudge:
    """Scores both answers against the reference answer; the closer one wins, a tie within `tie_margin`."""

    metric: str = "keyword_f1"
    tie_margin: float = 0.0

    def check(self) -> None:
        if self.metric not in SIMILARITY:
            raise JudgeError(f"eval.metric: unknown metric '{self.metric}'; use one of {', '.join(SIMILARITY)}")

    def judge(self, prompts: list[str], answers: list[str], baseline: list[str], references: list[str]) -> list[Verdict]:
        scores = judge_against_reference(
            answers, baseline, references, metric=self.metric, tie_margin=self.tie_margin, questions=prompts
        )
        return [Verdict(s) for s in scores]


# --- hf: a local causal LM --------------------------------------------------------------------


class HFJudge:
    """A local causal LM as a pairwise judge, read from its next-token probabilities of "A" and "B".

    The judge prompt (through the tokenizer's chat template when it has one, else followed by
    "Better answer:" and a line break) ends with a line break, so the verdict letter is the token
    that follows a line break: its id is the last token of encoding "\\nA" (and "\\nB"), which is
    right for byte-level BPE (where " A" and "A" are different tokens) and for SentencePiece alike.
    Texts are batched with left padding and explicit position ids, so a batch gives the same
    logits as one text at a time. A is preferred when its logit is higher; equal logits are undecided.
    Every reply is a pair of probabilities, so every reply parses: its `parse_rate` is 1.0.
    """

    def __init__(self, model: str, *, batch_size: int = 8, device: torch.device | None = None):
        self.model_name = model
        self.batch_size = batch_size
        self.device = device
        self._location = ""  # where the model loads from, resolved by check()
        self._tokenizer: Any = None
        self._model: Any = None
        self._letter_ids: tuple[int, int] | None = None
        self._chat = False  # the tokenizer has a chat template

    def __repr__(self) -> str:
        return f"HFJudge(model={self.model_name!r})"

    def check(self) -> None:
        """Resolve the model and load its tokenizer (cheap); the weights load on first use."""
        from transformers import AutoTokenizer

        from trainers.config import ModelConfig
        from trainers.model import ModelError, resolve_model

        if self._tokenizer is not None:
            return
        try:
            self._location = resolve_model(ModelConfig(name=self.model_name))
            tokenizer = AutoTokenizer.from_pretrained(self._location)
        except ModelError as exc:
            raise JudgeError(str(exc).replace("model.name", "eval.judge_model", 1)) from None
        except OSError as exc:
            raise JudgeError(f"eval.judge_model: cannot load '{self.model_name}': {str(exc).splitlines()[0]}") from None
        ids = tuple(tokenizer.encode("\n" + letter, add_special_tokens=False)[-1] for letter in "AB")
        if ids[0] == ids[1] or [tokenizer.decode([i]).strip() for i in ids] != ["A", "B"]:
            raise JudgeError(f"eval.judge_model: the tokenizer of '{self.model_name}' has no single tokens for A and B")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self._tokenizer, self._letter_ids = tokenizer, ids
        self._chat = bool(getattr(tokenizer, "chat_template", None))

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        from trainers.model import pick_device

        self.check()
        self.device = self.device or pick_device()
        try:
            model = AutoModelForCausalLM.from_pretrained(self._location, dtype="auto")
        except OSError as exc:
            raise JudgeError(f"eval.judge_model: cannot load '{self.model_name}': {str(exc).splitlines()[0]}") from None
        self._model = model.to(self.device).eval()

    def _format(self, text: str) -> str:
        if self._chat:
            messages = [{"role": "user", "content": text}]
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + "\nBetter answer:\n"

    @no_grad
    def margins(self, texts: list[str]) -> list[float]:
        """Per judge prompt: log P(A) - log P(B) of the next token."""
        if self._model is None:
            self._load()
        a_id, b_id = self._letter_ids
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [self._format(t) for t in texts[start : start + self.batch_size]]
            # a chat template writes its own special tokens
            enc = self._tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=not self._chat).to(self.device)
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = self._model(**enc, position_ids=positions).logits[:, -1].float()
            out += (logits[:, a_id] - logits[:, b_id]).tolist()
        return out

    def prefer_a(self, texts: list[str]) -> list[float]:
        return [WIN if m > 0 else LOSS if m < 0 else TIE for m in self.margins(texts)]

    def judge(self, prompts: list[str], answers: list[str], baseline: list[str], references: list[str]) -> list[Verdict]:
        return pairwise(prompts, answers, baseline, self.prefer_a)


# --- openai: an OpenAI-compatible chat-completions endpoint -----------------------------------


def parse_verdict(reply: str) -> float | None:
    """The first standalone capital A or B in a reply: 1.0 for A, 0.0 for B; None when there is none."""
    match = re.search(r"\b([AB])\b", reply)
    return None if match is None else WIN if match.group(1) == "A" else LOSS


@dataclass(frozen=True)
class OpenAIJudge:
    """Any OpenAI-compatible /chat/completions endpoint as a pairwise judge (stdlib HTTP, no SDK).

    The API key is read from the environment variable named `api_key_env` at each request (no
    Authorization header when it is unset, for local servers that need none), and is never
    stored on the object nor put in any message. Timeouts, connection errors, 429 and 5xx are
    retried with exponential backoff (for at least `wait_s` seconds in all), then raise
    JudgeUnavailable; other 4xx fail at once. Redirects are refused: urllib would follow one to
    another origin with the Authorization header.
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 0.5  # first retry waits this long, then twice as long each time
    max_workers: int = 8  # requests in flight at once
    max_tokens: int = 16  # room for "The better answer is A." but not an essay
    wait_s: float = 0.0  # an endpoint that stays unreachable is retried this long before the judge gives up
    max_backoff_s: float = 30.0  # the longest wait between two retries
    url: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.base_url.rstrip("/") + "/chat/completions")

    def check(self) -> None:
        """One 1-token request: the endpoint is reachable, the key accepted and the model served."""
        self._complete("Reply with the letter A.", max_tokens=1)

    def judge(self, prompts: list[str], answers: list[str], baseline: list[str], references: list[str]) -> list[Verdict]:
        return pairwise(prompts, answers, baseline, self.prefer_a)

    def prefer_a(self, texts: list[str]) -> list[float | None]:
        if not texts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(texts))) as pool:
            futures = [pool.submit(self._complete, text) for text in texts]
            try:
                return [parse_verdict(future.result()) for future in futures]
            except JudgeError:
                for future in futures:  # one request gave up: the queued ones would only wait as long again
                    future.cancel()
                raise

    def _complete(self, text: str, max_tokens: int | None = None) -> str:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": 0,
        }
        reply = self._post(payload)
        try:
            return reply["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(f"eval.base_url: {self.url} replied without choices[0].message; is it a chat-completions API?") from None

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        key = os.environ.get(self.api_key_env, "")
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        opener = urllib.request.build_opener(_RefuseRedirects(self.url, key))
        deadline = time.monotonic() + self.wait_s
        attempt = 0
        while True:
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with opener.open(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                detail = _scrub(_error_detail(exc), key)
                if exc.code != 429 and exc.code < 500:
                    raise JudgeError(self._client_error(exc.code, detail, key)) from None
                problem = f"HTTP {exc.code}{detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", None) or exc
                problem = _scrub(str(reason) or type(exc).__name__, key)
            except json.JSONDecodeError:
                raise JudgeError(f"eval.base_url: {self.url} replied with something other than JSON") from None
            pause = min(self.backoff_s * 2**attempt, self.max_backoff_s)
            if attempt >= self.max_retries and time.monotonic() + pause > deadline:
                break
            time.sleep(pause)
            attempt += 1
        tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
        raise JudgeUnavailable(f"eval.base_url: no reply from {self.url} after {tries} ({problem}); start the server or fix base_url")

    def _client_error(self, code: int, detail: str, key: str) -> str:
        if code in (401, 403):
            state = "is set" if key else "is not set"
            return f"eval.api_key_env: {self.url} refused the request (HTTP {code}{detail}); ${self.api_key_env} {state}: set it to a valid key"
        if code == 404:
            return f"eval.base_url: {self.url} answered HTTP 404{detail}; check base_url (usually ending in /v1) and api_model '{self.model}'"
        return f"eval.base_url: {self.url} answered HTTP {code}{detail}; check api_model '{self.model}' and the endpoint"


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: urllib follows a 302 to any origin (turning the POST into a GET)
    with the Authorization header, which would hand the API key to whoever the server names."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url, key

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise JudgeError(
            f"eval.base_url: {self.url} redirected (HTTP {code}) to {_scrub(newurl, self.key)}; "
            "peftsweep does not follow redirects (the API key would go along): set base_url to the endpoint itself"
        )


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """': <the error message or first line of the body>', at most 200 characters, or ''."""
    try:
        text = exc.read().decode("utf-8", "replace")
    except OSError:
        return ""
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            text = str(data["error"].get("message", text))
    except ValueError:
        pass
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f": {line[:200]}" if line else ""


def _scrub(text: str, key: str) -> str:
    """The text with the API key blanked out (some servers echo the key they refused)."""
    return text.replace(key, "***") if key else text
