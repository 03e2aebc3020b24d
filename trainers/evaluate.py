"""Per-epoch evaluation, kept cheap: perplexity, greedy answers, reference metrics and win-rate counts.

The judges that compare a trial's answers with the base model's are in `trainers.judges`.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable

from trainers.data import IGNORE_INDEX
from trainers.stats import wilson_interval

if TYPE_CHECKING:  # torch loads with the model: the reference judge's scoring below needs none
    import torch

WIN, TIE, LOSS = 1.0, 0.5, 0.0


def no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.no_grad()` as a decorator that imports torch when `fn` runs, not when its module loads."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


@no_grad
def perplexity(model: Any, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> float:
    """exp(total NLL / total predicted tokens): token-weighted, over labelled tokens only.

    Labelled tokens are the response tokens (and EOS) of instruction data; padding and prompt
    tokens carry IGNORE_INDEX. Examples longer than the max length were truncated from the right
    by `trainers.data.tokenize`, so only the response tokens that fit are scored.
    """
    import torch

    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, -batch["labels"].size(1) :]  # prompt tuning prepends virtual tokens' positions
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((labels != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError("perplexity: no response token fits in max_length; raise data.max_length")
    return math.exp(total_nll / total_tokens)


@no_grad
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    sampling: dict[str, float] | None = None,
    passes: list[tuple[int, int, int, bool]] | None = None,
) -> list[str]:
    """Answers, batched with left padding, cut at the end-of-sequence token or the chat template's end of turn.

    Greedy by default; `sampling` ({"temperature", "top_p", "seed"}) samples instead, seeded per
    call, so the base model and every trial answer under the same settings and the same seed.
    `passes`, when given, gets (rows, prompt length, new tokens, with a KV cache) of each generation
    (what `trainers.flops.FlopModel.generation` counts).
    """
    import torch

    answers: list[str] = []
    tokenizer.padding_side = "left"
    stop_ids, end_of_turn = _stop_tokens(tokenizer)
    decoding: dict[str, Any] = {"do_sample": False}
    if sampling is not None:
        torch.manual_seed(int(sampling["seed"]))
        decoding = {"do_sample": True, "temperature": sampling["temperature"], "top_p": sampling["top_p"]}
    for start in range(0, len(prompts), batch_size):
        if _has_virtual_tokens(model):  # greedy only: the sweep's validation refuses sampling for these methods
            answers += [
                greedy_without_cache(model, tokenizer, prompt, max_new_tokens, device, stops=(stop_ids, end_of_turn), passes=passes)
                for prompt in prompts[start : start + batch_size]
            ]
            continue
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids,
            **decoding,
        )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        if passes is not None:
            passes.append((*enc["input_ids"].shape, new_tokens.shape[1], True))
        answers += [_cut(a, end_of_turn) for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def _cut(decoded: str, end_of_turn: str) -> str:
    """The answer in decoded text: an end of turn that is not a special token survives decoding, so cut there."""
    return (decoded.partition(end_of_turn)[0] if end_of_turn else decoded).strip()


def _stop_tokens(tokenizer: Any) -> tuple[list[int], str]:
    """Token ids that end an answer (EOS, and the chat template's end of turn when it is one token), and the end-of-turn text.

    Chat models end their turn with the template's marker (e.g. "<|im_end|>"), which need not be EOS.
    """
    from trainers.data import ChatTemplate, DataError

    stop_ids = [tokenizer.eos_token_id]
    if not getattr(tokenizer, "chat_template", None):
        return stop_ids, ""
    try:
        end_of_turn = ChatTemplate.of(tokenizer).end_of_turn
    except DataError:  # a template that fails to render: training would have said so already
        return stop_ids, ""
    ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"] if end_of_turn else []
    if len(ids) == 1 and ids[0] not in stop_ids:  # a longer marker cannot stop generate; its text is still cut
        stop_ids.append(ids[0])
    return stop_ids, end_of_turn


def _has_virtual_tokens(model: Any) -> bool:
    """Prefix and prompt tuning (peft's prompt learning) add virtual tokens to every forward pass."""
    config = getattr(model, "peft_config", {}).get("default")
    return bool(getattr(config, "is_prompt_learning", False))


def greedy_without_cache(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    device: torch.device,
    stops: tuple[list[int], str] | None = None,
    passes: list[tuple[int, int, int, bool]] | None = None,
) -> str:
    """One greedy answer by full forward passes, the path training and perplexity use.

    With transformers 5.24 and peft 0.21, `generate` drops the virtual tokens of prefix and prompt
    tuning (its cache replaces peft's past_key_values), so their answers would not be the trained
    model's. One prompt at a time, so no padding shifts positions (peft ignores position ids for
    these methods); each token costs a pass over the sequence: fine for short answers. It stops and
    cuts where `generate_answers` does: `stops` is `_stop_tokens(tokenizer)`, computed when not given;
    `passes` as in `generate_answers`.
    """
    import torch

    stop_ids, end_of_turn = stops if stops is not None else _stop_tokens(tokenizer)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    start = ids.size(1)
    for _ in range(max_new_tokens):
        token = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if token.item() in stop_ids:
            break
    if passes is not None:
        passes.append((1, start, ids.size(1) - start, False))
    return _cut(tokenizer.decode(ids[0, start:], skip_special_tokens=True), end_of_turn)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _f1(answer_words: list[str], reference_words: list[str]) -> float:
    common = sum((Counter(answer_words) & Counter(reference_words)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(answer_words), common / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style F1 of word overlap between an answer and the reference."""
    return _f1(_words(answer), _words(reference))


# Words that carry no answer; never a negation, never yes or no.
_STOP_WORDS = frozenset(
    "a an the is are was were be been being am it its this that these those there here s "
    "of in on at to into onto from by with for and or as "
    "i me my you your he him his she her they them their we us our do does did has have had".split()
)
_NEGATION = re.compile(r"\b(?:no|not|never|none|nothing|nobody|nowhere|neither|nor|cannot)\b|n['’]t")


def _stance(text: str) -> tuple[str | None, bool]:
    """A text's reply to a yes/no question (its first word, when that is yes or no) and whether the
    rest of it is negated (an odd number of negations: no, not, never, n't, ...)."""
    words = _words(text)
    reply = words[0] if words and words[0] in ("yes", "no") else None
    rest = text.lower().split(reply, 1)[1] if reply else text.lower()
    return reply, len(_NEGATION.findall(rest)) % 2 == 1


def contradicts(answer: str, reference: str) -> bool:
    """The answer replies yes where the reference replies no (or no where yes), or one of them negates
    its statement where the other does not ("is not silver" against "is silver")."""
    (reply, negated), (ref_reply, ref_negated) = _stance(answer), _stance(reference)
    return (reply is not None and ref_reply is not None and reply != ref_reply) or negated != ref_negated


def keyword_f1(answer: str, reference: str, question: str = "") -> float:
    """F1 of the words that carry the answer, and 0 for an answer that `contradicts` the reference.

    Key words are those left after dropping stop words ("the", "is", "in", ...) and the question's
    own words, so repeating the question's subject earns nothing; yes and no are key words. When
    every key word of the reference is in the question (a choice it offers: "big or small?"), the
    question's words count.
    """
    if contradicts(answer, reference):
        return 0.0
    asked = set(_words(question))
    answer_words = [w for w in _words(answer) if w not in _STOP_WORDS]
    reference_words = [w for w in _words(reference) if w not in _STOP_WORDS]
    if any(w not in asked for w in reference_words):
        answer_words = [w for w in answer_words if w not in asked]
        reference_words = [w for w in reference_words if w not in asked]
    return _f1(answer_words, reference_words)


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the answer's words equal the reference's (case and punctuation ignored), else 0.0."""
    return float(_words(answer) == _words(reference))


def chrf(answer: str, reference: str) -> float:
    """sacrebleu's sentence-level chrF (character n-gram F-score, beta 2), scaled to 0..1."""
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(answer, [reference]).score / 100


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words, as precision over the answer and recall over the reference."""
    a, r = _words(answer), _words(reference)
    if not a or not r:
        return 0.0
    previous = [0] * (len(r) + 1)  # previous[j]: LCS of the answer's words so far and r[:j]
    for word in a:
        row = [0]
        for j, ref_word in enumerate(r, 1):
            row.append(previous[j - 1] + 1 if word == ref_word else max(previous[j], row[j - 1]))
        previous = row
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _ignoring_question(metric: Callable[[str, str], float]) -> Callable[[str, str, str], float]:
    return lambda answer, reference, question: metric(answer, reference)


# Each metric scores (answer, reference, question); the first is eval.metric's default.
SIMILARITY: dict[str, Callable[[str, str, str], float]] = {
    "keyword_f1": keyword_f1,
    "token_f1": _ignoring_question(token_f1),
    "exact_match": _ignoring_question(exact_match),
    "chrf": _ignoring_question(chrf),
    "rouge_l": _ignoring_question(rouge_l),
}


def judge_against_reference(
    answers: list[str], baseline: list[str], references: list[str], *, metric: str, tie_margin: float, questions: list[str] | None = None
) -> list[float]:
    """Per prompt: WIN if the trial's answer is closer to the reference than the base model's, TIE within the margin.

    `questions` are the judged prompts, which keyword_f1 reads (no question: every word can count).
    """
    score = SIMILARITY[metric]
    verdicts = []
    for answer, base, ref, question in zip(answers, baseline, references, questions or [""] * len(answers), strict=True):
        diff = score(answer, ref, question) - score(base, ref, question)
        verdicts.append(WIN if diff > tie_margin else LOSS if diff < -tie_margin else TIE)
    return verdicts


def win_rate(verdicts: list[float]) -> dict[str, float]:
    """Wins, losses, ties, the win rate (a tie counts one half) and its 95% Wilson interval."""
    wins, losses, ties = (sum(v == outcome for v in verdicts) for outcome in (WIN, LOSS, TIE))
    low, high = wilson_interval(wins, losses, ties)
    return {
        "win_rate": sum(verdicts) / len(verdicts),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate_low": low,
        "win_rate_high": high,
    }
