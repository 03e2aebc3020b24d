"""Perplexity against an independent direct computation on the real tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.data import IGNORE_INDEX, Example, batches, load_records, to_example, tokenize
from trainers.evaluate import perplexity


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def direct_perplexity(model, examples) -> float:
    """One example at a time, no padding: sum -log p(token | prefix) over response tokens, in float64."""
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for t in range(1, len(ex.input_ids)):
                if ex.labels[t] != IGNORE_INDEX:
                    total_nll -= log_probs[t - 1, ex.input_ids[t]].item()
                    total_tokens += 1
    return math.exp(total_nll / total_tokens)


def test_perplexity_matches_a_direct_computation(tiny):
    model, tokenizer = tiny
    examples = [to_example(r) for r in load_records("tinyworld")[:7]]
    long_response = Example(prompt=examples[0].prompt, response=" ".join([examples[0].response] * 20))
    max_length = 64
    data = tokenize([*examples, long_response], tokenizer, max_length)
    lengths = {len(t.input_ids) for t in data}
    assert len(lengths) > 1, "examples of different lengths, so batches carry padding"
    assert max(lengths) == max_length, "the long example is truncated on the right"
    assert all(any(label != IGNORE_INDEX for label in t.labels) for t in data)

    expected = direct_perplexity(model, data)
    for batch_size in (3, 8):
        got = perplexity(model, batches(data, batch_size, tokenizer.pad_token_id), torch.device("cpu"))
        assert got == pytest.approx(expected, rel=1e-4)


def test_perplexity_scores_response_tokens_only(tiny):
    model, tokenizer = tiny
    examples = [to_example(r) for r in load_records("tinyworld")[:4]]
    data = tokenize(examples, tokenizer, 128)
    # the same sequences with every token labelled: a different number, so prompt tokens were left out
    all_labelled = [type(t)(t.input_ids, list(t.input_ids)) for t in data]
    pad = tokenizer.pad_token_id
    response_only = perplexity(model, batches(data, 4, pad), torch.device("cpu"))
    everything = perplexity(model, batches(all_labelled, 4, pad), torch.device("cpu"))
    assert response_only != pytest.approx(everything, rel=1e-3)
    assert everything == pytest.approx(direct_perplexity(model, all_labelled), rel=1e-4)


def test_perplexity_refuses_when_no_response_token_fits(tiny):
    model, tokenizer = tiny
    data = tokenize([to_example(load_records("tinyworld")[0])], tokenizer, 4)
    with pytest.raises(ValueError, match="max_length"):
        perplexity(model, batches(data, 1, tokenizer.pad_token_id), torch.device("cpu"))


def test_sampled_answers_are_seeded_and_differ_from_greedy(tiny_model_dir):
    """do_sample draws answers with a per-call seed: the same seed answers the same (so the base model
    and every trial sample alike), another seed or greedy decoding answers differently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.config import DataConfig
    from trainers.data import load_splits
    from trainers.evaluate import generate_answers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [ex.prompt for ex in load_splits(DataConfig(), 8).judged]
    cpu = torch.device("cpu")

    def answers(sampling):
        return generate_answers(model, tokenizer, prompts, max_new_tokens=12, batch_size=8, device=cpu, sampling=sampling)

    hot = {"temperature": 1.5, "top_p": 1.0, "seed": 1}
    assert answers(hot) == answers(hot)
    assert answers(hot) != answers({**hot, "seed": 2})
    assert answers(hot) != answers(None)
