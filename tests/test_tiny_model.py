"""The built-in tiny model and its world: deterministic data, a real pre-trained model, built once."""

from __future__ import annotations

import math
import time

import torch

from trainers import tinyworld
from trainers.tiny_model import TINY_MODEL_VERSION, ensure_tiny_model


def test_world_data_is_deterministic_and_well_formed():
    records = tinyworld.instruction_dataset()
    assert records == tinyworld.instruction_dataset()
    assert len(records) >= 300
    for r in records:
        assert set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"]
    corpus = tinyworld.pretraining_corpus()
    assert corpus == tinyworld.pretraining_corpus() and len(corpus) > 100
    sentences = {s.strip() for doc in corpus for s in doc.split(".")}
    questions = [r["input"] or r["instruction"] for r in records]
    assert sum(q.rstrip("?").strip() in sentences for q in questions) == 0  # a task the pre-training never showed


def test_built_model_is_a_real_language_model_of_its_world(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert tiny_model_dir.name == f"tiny-{TINY_MODEL_VERSION}"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    nll = tokens = 0.0
    with torch.no_grad():
        for text in tinyworld.heldout_corpus()[:40]:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]
            nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    ppl = math.exp(nll / tokens)
    # Measured 1.74 for version 6 on held-out text; an untrained model sits near the vocabulary size (1024).
    assert ppl < 5, ppl


def test_a_second_call_reuses_the_folder(tiny_model_dir, model_cache):
    started = time.monotonic()
    assert ensure_tiny_model(model_cache) == tiny_model_dir
    assert time.monotonic() - started < 5  # no rebuild (a build takes minutes)
