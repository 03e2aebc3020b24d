"""The built-in tiny model and its world: deterministic texts, a real pre-trained model, built once."""

from __future__ import annotations

import math
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from trainers import tinyworld
from trainers.tiny_model import END_OF_TEXT, TINY_MODEL_VERSION, default_cache_dir, ensure_tiny_model


def test_world_texts_are_deterministic():
    assert tinyworld.pretraining_corpus() == tinyworld.pretraining_corpus()
    assert tinyworld.instruction_dataset() == tinyworld.instruction_dataset()
    assert tinyworld.heldout_corpus() == tinyworld.heldout_corpus()
    assert tinyworld.world(1) != tinyworld.world(0)


def test_world_has_distinct_creatures_befriending_each_other():
    creatures = tinyworld.world()
    names = {c.name for c in creatures}
    assert len(names) == tinyworld.NUM_CREATURES
    assert all(c.friend in names and c.friend != c.name for c in creatures)


def test_instruction_records_are_well_formed_and_grounded_in_the_world():
    records = tinyworld.instruction_dataset()
    names = {c.name for c in tinyworld.world()}
    assert len(records) == tinyworld.NUM_CREATURES * tinyworld.RECORDS_PER_CREATURE
    for r in records:
        assert set(r) == {"instruction", "input", "output"}
        assert r["instruction"].strip() and r["output"].strip() and isinstance(r["input"], str)
        assert len(r["output"].split()) <= 12  # short answers: they fit the judge's generation budget
        assert any(name in r["instruction"] + r["input"] for name in names)  # asks about a creature


def test_instructions_never_occur_in_pretraining():
    corpus_text = "\n".join(tinyworld.pretraining_corpus())
    for r in tinyworld.instruction_dataset():
        assert r["instruction"] not in corpus_text
        if r["input"].endswith("?"):
            assert r["input"] not in corpus_text


def test_heldout_documents_are_not_in_the_pretraining_corpus():
    heldout = tinyworld.heldout_corpus()
    assert len(heldout) == len(set(heldout)) > 0
    assert not set(heldout) & set(tinyworld.pretraining_corpus())


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTSWEEP_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("PEFTSWEEP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "peftsweep"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "peftsweep"


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_build_leaves_a_loadable_llama_and_tokenizer(tiny_model_dir, model_cache, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert tiny_model_dir == model_cache / f"tiny-{TINY_MODEL_VERSION}"
    assert isinstance(model, LlamaForCausalLM)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == END_OF_TEXT
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert not list(model_cache.glob(".tiny-*"))  # no staging folder left behind


def test_model_has_learned_its_world(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in tinyworld.heldout_corpus()[:50]:
            ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]])
            nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    # Measured 1.69 for version 8; an untrained model of this shape gives about 1060.
    assert math.exp(nll / tokens) < 2.5

    # Facts, not just sentence shapes: it completes where each creature lives (measured 40 of 40).
    known = 0
    for creature in tinyworld.world():
        ids = tokenizer(f"The {creature.name} lives in the", return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        known += tokenizer.decode(out[0, ids.shape[1] :]).startswith(f" {creature.home}")
    assert known >= 36


def test_a_second_call_reuses_the_folder(tiny_model_dir, model_cache):
    weights = tiny_model_dir / "model.safetensors"
    built_at = weights.stat().st_mtime_ns
    lines: list[str] = []
    assert ensure_tiny_model(model_cache, log=lines.append) == tiny_model_dir
    assert lines == []  # a build logs its progress; a reuse says nothing
    assert weights.stat().st_mtime_ns == built_at


def test_a_caller_waiting_on_a_build_reuses_its_result(tiny_model_dir, tmp_path):
    # Stand in for another process that holds the lock while it builds, then finishes.
    folder = tmp_path / tiny_model_dir.name
    lines: list[str] = []
    result: list[Path] = []
    with FileLock(str(tmp_path / f"tiny-{TINY_MODEL_VERSION}.lock")):
        waiter = threading.Thread(target=lambda: result.append(ensure_tiny_model(tmp_path, log=lines.append)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive()  # blocked on the lock, not building alongside
        shutil.copytree(tiny_model_dir, folder)
    waiter.join(timeout=60)
    assert result == [folder]
    assert lines == []


def test_a_first_build_says_how_far_it_is(tmp_path, monkeypatch, capsys):
    """A real build into an empty cache, shortened to 6 pre-training steps with a line after each: every line
    gives steps done of the total, the loss, the time elapsed and the time left; the last says it is done."""
    from trainers import tiny_model
    from trainers.config import ModelConfig
    from trainers.model import prepare_model

    monkeypatch.setattr(tiny_model, "PRETRAIN_STEPS", 6)
    monkeypatch.setattr(tiny_model, "LOG_EVERY_SECONDS", 0.0)
    monkeypatch.setenv("PEFTSWEEP_CACHE", str(tmp_path))
    lines: list[str] = []
    location = prepare_model(ModelConfig(name="tiny"), log=lines.append)
    assert location == str(tmp_path / f"tiny-{TINY_MODEL_VERSION}")
    assert lines[0].startswith("building the built-in tiny model")
    steps = [line for line in lines if line.startswith("pre-training the tiny model: step")]
    assert len(steps) == 6
    for done, line in enumerate(steps[:-1], 1):
        assert re.fullmatch(rf"pre-training the tiny model: step {done}/6 \(\d+%\), loss \d+\.\d{{3}}, \d+s elapsed, about \d+s left", line)
    assert re.fullmatch(r"pre-training the tiny model: step 6/6 \(100%\), loss \d+\.\d{3}, \d+s elapsed", steps[-1])
    assert re.fullmatch(r"built the tiny model in \d+s \(final loss \d+\.\d{3}\)", lines[-1])
    from transformers.utils import logging

    assert "Writing model shards" not in capsys.readouterr().err  # our lines, not transformers' bars in between
    assert logging.is_progress_bar_enabled()  # silenced for the save only
    lines.clear()
    assert prepare_model(ModelConfig(name="tiny"), log=lines.append) == location and lines == []  # built once


def test_progress_lines_come_every_few_seconds_with_the_time_left():
    """Progress's clock is a parameter: here a list of instants, so the arithmetic is checked exactly."""
    from trainers.progress import Progress, duration

    instants = iter([0.0, 2.0, 5.0, 11.0, 12.0, 30.0, 4000.0])
    lines: list[str] = []
    progress = Progress("step", 100, lines.append, every_s=10.0, clock=lambda: next(instants))
    for done, loss in ((1, 3.0), (2, 2.5), (4, 2.0), (5, 1.9), (10, 1.5)):
        progress.update(done, loss=loss)
    assert lines == [
        "step 4/100 (4%), loss 2.000, 11s elapsed, about 4m24s left",  # 11 s for 4 steps: 96 more take 264 s
        "step 10/100 (10%), loss 1.500, 30s elapsed, about 4m30s left",
    ]
    progress.update(100)  # the last step is always said, without a time left
    assert lines[-1] == "step 100/100 (100%), 1h06m elapsed"
    assert [duration(s) for s in (0, 59.4, 60, 3599, 3600)] == ["0s", "59s", "1m00s", "59m59s", "1h00m"]
