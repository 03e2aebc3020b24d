"""Instruction data: JSONL loading with line-numbered errors, seeded splits, and the loss mask."""

from __future__ import annotations

import json

import pytest

from trainers.config import DataConfig
from trainers.data import IGNORE_INDEX, DataError, Example, batches, load_records, load_splits, tokenize


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_alpaca_and_prompt_completion_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "Say hi", "input": "", "output": "Hi"}),
        "",
        json.dumps({"prompt": "2+2?", "completion": "4"}),
    ])  # fmt: skip
    assert load_records(path) == [
        {"instruction": "Say hi", "input": "", "output": "Hi"},
        {"instruction": "2+2?", "input": "", "output": "4"},
    ]


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([json.dumps({"instruction": "a", "output": "b"}), "{not json"], "d.jsonl:2: malformed JSON"),
        ([json.dumps({"instruction": "a"})], "d.jsonl:1: record lacks output"),
        (["[1, 2]"], "d.jsonl:1: expected a JSON object"),
        ([], "d.jsonl: no records"),
    ],
)
def test_bad_data_files_name_the_line(tmp_path, lines, expected):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=expected.replace("[", r"\[")):
        load_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no file"):
        load_records(str(tmp_path / "absent.jsonl"))


def test_split_is_seeded_and_disjoint():
    first = load_splits(DataConfig(seed=3), num_prompts=10)
    again = load_splits(DataConfig(seed=3), num_prompts=10)
    other = load_splits(DataConfig(seed=4), num_prompts=10)
    assert first == again and first.eval != other.eval
    assert not {e.prompt + e.response for e in first.eval} & {e.prompt + e.response for e in first.train}
    assert first.judged == first.eval[:10]


def test_loss_falls_on_response_tokens_only(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    example = Example(prompt="### Instruction:\nWhat does the fox eat?\n\n### Response:\n", response="Berries.")
    (tok,) = tokenize([example], tokenizer, max_length=128)
    labelled = [t for t, label in zip(tok.input_ids, tok.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled[:-1]) == "Berries."
    assert labelled[-1] == tokenizer.eos_token_id
    n_prompt = len(tokenizer(example.prompt)["input_ids"])
    assert tok.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    (short,) = tokenize([example], tokenizer, max_length=n_prompt + 1)  # truncated on the right
    assert len(short.input_ids) == n_prompt + 1
    (batch,) = batches([tok, short], 2, tokenizer.pad_token_id)
    assert batch["labels"][1, n_prompt + 1 :].eq(IGNORE_INDEX).all()  # padding carries no loss
    assert batch["attention_mask"][1].sum() == n_prompt + 1
