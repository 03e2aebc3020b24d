"""Every registered PEFT method trains on the tiny base model on CPU (QLoRA through bitsandbytes'
CPU path), the training knobs work, and a saved adapter loads back with peft and reproduces the
trial's perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from trainers.config import DataConfig, EvalConfig, TrainConfig, TrialConfig
from trainers.data import batches, load_splits, tokenize
from trainers.evaluate import perplexity
from trainers.methods import METHODS
from trainers.vocabulary import EpochMetrics, TrialStatus
from trainers.worker import baseline_answers, lr_lambda, train


def _config(data: DataConfig, **train: object) -> TrialConfig:
    return TrialConfig(
        data=data,
        train=TrainConfig(**{"epochs": 1, "learning_rate": 3e-3, "lora_r": 4, "num_virtual_tokens": 4, "teacher": "tiny", **train}),
        eval=EvalConfig(num_prompts=2, max_new_tokens=4),
    )


@pytest.fixture(scope="module")
def baseline(data, tiny_model_dir) -> list[str]:
    return baseline_answers(_config(data)).answers


def test_the_registry_names_the_methods_a_config_takes():
    for name in METHODS:
        assert TrainConfig(method=name, teacher="tiny").method == name  # distill needs a teacher; the others ignore it
    with pytest.raises(ValueError, match="not a method; did you mean 'lora'"):
        TrainConfig(method="lroa")
    with pytest.raises(ValueError, match="method distill needs train.teacher"):
        TrainConfig(method="distill")


def test_the_registry_owns_each_methods_parameters():
    """A conditional parameter the method does not read is refused in one line, naming the method's own."""
    from hpo.errors import SweepError
    from hpo.spec import load_sweep

    assert METHODS["lora"].uses("lora_r") and not METHODS["lora"].uses("num_virtual_tokens")
    assert METHODS["prefix"].uses("num_virtual_tokens") and METHODS["prefix"].uses("learning_rate")
    assert not METHODS["none"].uses("learning_rate") and not METHODS["ia3"].uses("lora_r")
    with pytest.raises(SweepError) as err:
        load_sweep("methods", ["search.conditional={lora: {num_virtual_tokens: {grid: [4]}}}"])
    assert "search.conditional.lora.num_virtual_tokens: lora does not use num_virtual_tokens (its own parameters: lora_r" in str(err.value)
    load_sweep("methods", ["search.conditional={prefix: {num_virtual_tokens: {grid: [4, 8]}}}"])  # prefix does


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_one_epoch(data, method, baseline):
    reported = []
    result = train(_config(data, method=method), baseline, lambda m, save: reported.append(m))
    assert result.status is TrialStatus.COMPLETED, result.error
    [metrics] = reported
    assert set(metrics) <= set(EpochMetrics.__annotations__), set(metrics) - set(EpochMetrics.__annotations__)  # each named once
    assert math.isfinite(metrics["eval_ppl"]) and metrics["eval_ppl"] > 1
    assert len(metrics["verdicts"]) == 2 and metrics["win_rate"] == pytest.approx(sum(metrics["verdicts"]) / 2)
    if method == "none":
        assert metrics["trainable_params"] == 0 and metrics["tokens_trained"] == 0
        assert metrics["answers"] == baseline and metrics["win_rate"] == 0.5  # the base model's own answers: ties
    elif method == "full":
        assert metrics["trainable_params"] == metrics["total_params"]
    else:
        assert 0 < metrics["trainable_params"] < metrics["total_params"]
        assert metrics["tokens_per_second"] > 0


def test_training_lowers_perplexity_below_the_untrained_base(data, baseline):
    untrained = []
    train(_config(data, method="none"), baseline, lambda m, save: untrained.append(m))
    trained = []
    train(_config(data, method="lora", learning_rate=1e-2), baseline, lambda m, save: trained.append(m))
    assert trained[0]["eval_ppl"] < untrained[0]["eval_ppl"]


def test_knobs_bf16_accumulation_checkpointing_and_cosine(data, baseline):
    reported = []
    config = _config(data, precision="bf16", grad_accumulation_steps=2, gradient_checkpointing=True, lr_schedule="cosine", warmup_steps=2)
    result = train(config, baseline, lambda m, save: reported.append(m))
    assert result.status is TrialStatus.COMPLETED, result.error
    assert math.isfinite(reported[0]["train_loss"]) and math.isfinite(reported[0]["eval_ppl"])


def test_learning_rate_schedules():
    assert [round(lr_lambda("constant", 2, 10)(s), 3) for s in (0, 1, 2, 9)] == [0.333, 0.667, 1.0, 1.0]
    linear = lr_lambda("linear", 0, 10)
    assert [linear(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    cosine = lr_lambda("cosine", 0, 10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)


def test_a_saved_adapter_loads_back_and_reproduces_the_perplexity(data, baseline, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reported = []

    def keep(metrics, save):
        reported.append(metrics)
        save(tmp_path)

    train(_config(data), baseline, keep)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = _config(data)
    eval_set = tokenize(load_splits(config.data, 2).eval, tokenizer, config.data.max_length)
    ppl = perplexity(model, batches(eval_set, config.eval.batch_size, tokenizer.pad_token_id), torch.device("cpu"))
    assert ppl == pytest.approx(reported[0]["eval_ppl"], rel=1e-5)


def test_cache_free_greedy_decoding_matches_generate(data, tiny_model_dir):
    """Prefix and prompt tuning answer through a cache-free greedy loop (generate drops their virtual
    tokens); on a plain model, where generate is right, the loop gives generate's answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.evaluate import generate_answers, greedy_without_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [ex.prompt for ex in load_splits(_config(data).data, 4).judged]
    cpu = torch.device("cpu")
    expected = [generate_answers(model, tokenizer, [p], max_new_tokens=12, batch_size=1, device=cpu)[0] for p in prompts]
    with torch.no_grad():
        assert [greedy_without_cache(model, tokenizer, p, 12, cpu) for p in prompts] == expected


def test_cache_free_greedy_decoding_stops_at_the_end_of_turn_as_generate_does(data, tiny_model_dir, tmp_path):
    """With a chat template, an answer ends at the template's end of turn, not only at EOS, on both paths.

    The tiny tokenizer gets a template whose end of turn is "." (one token the tiny model writes
    early), so the end of turn comes well before max_new_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.evaluate import _stop_tokens, generate_answers, greedy_without_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}.\n{% endfor %}" \
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"  # fmt: skip
    tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    stop_ids, end_of_turn = _stop_tokens(tokenizer)
    assert end_of_turn == "." and len(stop_ids) == 2
    prompts = [ex.prompt for ex in load_splits(_config(data).data, 4).judged]
    cpu = torch.device("cpu")
    expected = [generate_answers(model, tokenizer, [p], max_new_tokens=24, batch_size=1, device=cpu)[0] for p in prompts]
    assert all(a and "." not in a for a in expected)  # cut at the end of turn
    with torch.no_grad():
        assert [greedy_without_cache(model, tokenizer, p, 24, cpu) for p in prompts] == expected



def test_a_packed_batch_gives_the_padded_batch_loss(data, tiny_model_dir):
    """Packing changes how a batch is laid out, not what is learned: the same examples give the
    same loss, because the block-diagonal mask keeps each example's attention to itself."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.data import packed_batches

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = _config(data)
    examples = tokenize(load_splits(config.data, 2).train[:8], tokenizer, config.data.max_length)
    padded = next(batches(examples, 8, tokenizer.pad_token_id, random.Random(1)))
    packed = next(packed_batches(examples, 8, random.Random(1)))
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))  # no padding at all
    with torch.no_grad():
        padded_loss = model(**padded, use_cache=False).loss
        packed_loss = model(**packed, use_cache=False).loss
        crossed = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss  # one long causal row
    assert packed_loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    assert abs(crossed.item() - padded_loss.item()) > 1e-3  # without the position ids, examples would see each other


def test_training_with_packing(data, baseline):
    reported = []
    assert train(_config(data, packing=True), baseline, lambda m, save: reported.append(m)).status is TrialStatus.COMPLETED
    assert math.isfinite(reported[0]["eval_ppl"]) and reported[0]["tokens_per_second"] > 0
    with pytest.raises(ValueError, match="packing does not work with prefix tuning"):
        TrainConfig(method="prefix", packing=True)
