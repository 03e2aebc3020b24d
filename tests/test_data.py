"""Fine-tuning data: five formats from four file types, one-line errors, seeded or file splits,
chat templates, and the loss mask (decoded: exactly the response and its end carry loss)."""

from __future__ import annotations

import json
import re
import sys

import pandas as pd
import pytest

from trainers.config import DataConfig
from trainers.data import (
    IGNORE_INDEX,
    PROMPT_WITH_INPUT,
    ChatTemplate,
    DataError,
    Example,
    batches,
    load_records,
    load_splits,
    to_example,
    tokenize,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "What do foxes eat?"},
    {"role": "assistant", "content": "Berries."},
]
# format -> (a record as users write it, the record load_records gives back)
FORMATS = {
    "alpaca": ({"instruction": "Add", "input": "2 and 2", "output": "4"}, {"instruction": "Add", "input": "2 and 2", "output": "4"}),
    "dolly": (
        {"instruction": "Summarize", "context": "Foxes eat berries.", "response": "Berries", "category": "summarization"},
        {"instruction": "Summarize", "input": "Foxes eat berries.", "output": "Berries"},
    ),
    "chat": ({"messages": CHAT}, {"messages": CHAT}),
    "prompt_completion": ({"prompt": "2+2?", "completion": "4"}, {"instruction": "2+2?", "input": "", "output": "4"}),
    "text": ({"text": "The fox eats berries in the old forest."}, {"text": "The fox eats berries in the old forest."}),
}
# what carries loss for each format's record: the response alone (EOS follows it)
RESPONSES = {"alpaca": "4", "dolly": "Berries", "chat": "Berries.", "prompt_completion": "4", "text": "The fox eats berries in the old forest."}


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def write_records(path, records):
    """Records as a .jsonl, .json, .csv (chat messages as a JSON cell) or .parquet file."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, [json.dumps(r) for r in records])
    if path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2))
    elif path.suffix == ".csv":
        pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records]).to_csv(path, index=False)
    else:
        pd.DataFrame(records).to_parquet(path)
    return str(path)


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def chat_tokenizer(tiny_model_dir, folder, template, **kwargs):
    """The tiny tokenizer (which has no chat template) saved with `template` and loaded back."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = template
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def split_by_loss(tok, tokenizer):
    """(prompt ids, loss-carrying ids), checking the loss-carrying ones are one run at the end."""
    n_prompt = next(i for i, label in enumerate(tok.labels) if label != IGNORE_INDEX)
    assert tok.labels == [IGNORE_INDEX] * n_prompt + tok.input_ids[n_prompt:]
    return tok.input_ids[:n_prompt], tok.input_ids[n_prompt:]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_loads_from_every_file_type(tmp_path, fmt, suffix):
    raw, normalized = FORMATS[fmt]
    path = write_records(tmp_path / f"d{suffix}", [raw, raw])
    assert load_records(path) == [normalized, normalized]  # detected
    assert load_records(path, fmt) == [normalized, normalized]  # named


def test_formats_are_detected_per_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(raw) for raw, _ in FORMATS.values()] + [""])
    assert load_records(path) == [normalized for _, normalized in FORMATS.values()]


def test_a_named_format_reads_only_its_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"instruction": "Add", "output": "4", "text": "### Instruction: Add 4"})])
    assert load_records(path) == [{"instruction": "Add", "input": "", "output": "4"}]
    assert load_records(path, "text") == [{"text": "### Instruction: Add 4"}]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_loss_falls_on_the_response_of_every_format(tmp_path, tokenizer, fmt):
    (record,) = load_records(write_records(tmp_path / "d.jsonl", [FORMATS[fmt][0]]))
    example = to_example(record)
    (tok,) = tokenize([example], tokenizer, max_length=512)
    prompt_ids, loss_ids = split_by_loss(tok, tokenizer)
    assert tokenizer.decode(prompt_ids) == example.prompt
    assert loss_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(loss_ids[:-1]) == RESPONSES[fmt] == example.response


def test_plain_prompts():
    assert to_example(FORMATS["alpaca"][1]).prompt == PROMPT_WITH_INPUT.format(instruction="Add", input="2 and 2")
    assert to_example(FORMATS["dolly"][1]).prompt == "### Instruction:\nSummarize\n\n### Input:\nFoxes eat berries.\n\n### Response:\n"
    # chat without a template: the same plain template, turn by turn; earlier answers are prompt
    assert to_example(FORMATS["chat"][1]).prompt == (
        "### System:\nBe brief.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n"
        "### Instruction:\nWhat do foxes eat?\n\n### Response:\n"
    )
    single_turn = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    assert to_example(single_turn) == to_example(FORMATS["prompt_completion"][1])
    assert to_example(FORMATS["prompt_completion"][1], system_prompt="Be kind.").prompt == (
        "### System:\nBe kind.\n\n### Instruction:\n2+2?\n\n### Response:\n"
    )
    assert to_example(FORMATS["text"][1]) == Example(prompt="", response=FORMATS["text"][1]["text"])


def test_prompt_tokens_carry_loss_when_asked(tokenizer):
    example = to_example(FORMATS["alpaca"][1])
    (tok,) = tokenize([example], tokenizer, max_length=512, response_only_loss=False)
    assert tok.labels == tok.input_ids
    assert tokenizer.decode(tok.input_ids) == example.prompt + "4" + tokenizer.eos_token


TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}END\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.parametrize("end_of_turn", ["<|endoftext|>", "<|end|>"])  # the EOS itself, or a marker of its own
def test_chat_template_renders_prompts_and_the_response_ends_its_turn(tmp_path, tiny_model_dir, end_of_turn):
    template = TEMPLATE.replace("END", "{{ eos_token }}" if end_of_turn == "<|endoftext|>" else end_of_turn)
    tokenizer = chat_tokenizer(tiny_model_dir, tmp_path / "tok", template)
    path = write_records(tmp_path / "d.jsonl", [FORMATS["alpaca"][0], FORMATS["chat"][0]] * 5)
    config = DataConfig(source=path, eval_source=path, system_prompt="Be kind.")
    splits = load_splits(config, num_prompts=2, tokenizer=tokenizer)
    alpaca, chat = splits.judged
    assert alpaca.prompt == f"<|system|>\nBe kind.{end_of_turn}\n<|user|>\nAdd\n\n2 and 2{end_of_turn}\n<|assistant|>\n"
    assert chat.prompt == (  # the record's own system message is kept; earlier turns are prompt
        f"<|system|>\nBe brief.{end_of_turn}\n<|user|>\nHi{end_of_turn}\n<|assistant|>\nHello{end_of_turn}\n"
        f"<|user|>\nWhat do foxes eat?{end_of_turn}\n<|assistant|>\n"
    )
    assert (alpaca.response, chat.response) == ("4", "Berries.")  # references stay clean for the judges
    tokens = tokenize([alpaca, chat], tokenizer, max_length=512)
    for example, tok in zip((alpaca, chat), tokens):
        prompt_ids, loss_ids = split_by_loss(tok, tokenizer)
        assert tokenizer.decode(prompt_ids) == example.prompt
        # the response, the template's end of turn, and one EOS: generation learns to stop
        expected = example.response + end_of_turn + ("" if end_of_turn == tokenizer.eos_token else tokenizer.eos_token)
        assert tokenizer.decode(loss_ids) == expected
        assert loss_ids[-1] == tokenizer.eos_token_id and loss_ids[-2:].count(tokenizer.eos_token_id) == 1

    plain = load_splits(config.model_copy(update={"chat_template": False}), num_prompts=2, tokenizer=tokenizer)
    assert plain.judged[0].prompt.startswith("### System:\nBe kind.\n\n### Instruction:\nAdd")


def test_template_bos_is_not_doubled(tmp_path, tiny_model_dir):
    tokenizer = chat_tokenizer(tiny_model_dir, tmp_path / "tok", "{{ bos_token }}" + TEMPLATE.replace("END", "<|end|>"), add_bos_token=True)
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id  # this tokenizer adds BOS itself
    example = to_example(FORMATS["prompt_completion"][1], ChatTemplate.of(tokenizer))
    assert example.prompt == "<|user|>\n2+2?<|end|>\n<|assistant|>\n"
    (tok,) = tokenize([example], tokenizer, max_length=512)
    assert tok.input_ids[0] == tokenizer.bos_token_id != tok.input_ids[1]


def test_chat_template_true_needs_one(tmp_path, tokenizer):
    path = write_records(tmp_path / "d.jsonl", [FORMATS["alpaca"][0]] * 5)
    assert load_splits(DataConfig(source=path), 1, tokenizer=tokenizer).judged[0].prompt.startswith("### Instruction:")  # auto
    with pytest.raises(DataError, match="data.chat_template: true, but the model's tokenizer has no chat template"):
        load_splits(DataConfig(source=path, chat_template=True), 1, tokenizer=tokenizer)


def test_text_data_judges_the_second_half_from_the_first(tmp_path):
    texts = [f"Document {i}: the fox of hill {i} eats berries and sleeps in the old forest." for i in range(10)]
    path = write_records(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    splits = load_splits(DataConfig(source=path, eval_fraction=0.5), num_prompts=3)
    assert all(ex.prompt == "" and ex.response in texts for ex in splits.train + splits.eval)  # every token is a target
    assert len(splits.judged) == 3
    for judged, whole in zip(splits.judged, splits.eval):
        assert f"{judged.prompt} {judged.response}" == whole.response
        assert abs(len(judged.prompt) - len(whole.response) / 2) < 10  # cut at the space nearest the middle


def test_eval_set_from_its_own_file(tmp_path):
    train = write_records(tmp_path / "train.csv", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])
    evaluation = write_records(tmp_path / "eval.parquet", [{"instruction": f"e{i}", "output": f"r{i}"} for i in range(3)])
    splits = load_splits(DataConfig(source=train, eval_source=evaluation, eval_fraction=0.5), num_prompts=2)
    assert [ex.response for ex in splits.train] == [f"a{i}" for i in range(5)]  # all of the source trains
    assert [ex.response for ex in splits.eval] == ["r0", "r1", "r2"]  # in file order
    assert splits.judged == splits.eval[:2]


def save_dataset(path, splits):
    """`splits` ({name: records}, or records for a single Dataset) written with datasets' save_to_disk, as users write them."""
    import datasets

    def dataset(records):  # every column any record has; None where a record lacks it, as Arrow stores it
        columns = list(dict.fromkeys(k for r in records for k in r))
        return datasets.Dataset.from_dict({c: [r.get(c) for r in records] for c in columns})

    datasets.disable_progress_bars()
    saved = datasets.DatasetDict({n: dataset(r) for n, r in splits.items()}) if isinstance(splits, dict) else dataset(splits)
    saved.save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["Dataset", "DatasetDict"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_loads_from_a_save_to_disk_folder(tmp_path, fmt, kind):
    raw, normalized = FORMATS[fmt]
    other = FORMATS["alpaca" if fmt != "alpaca" else "text"][0]
    splits = {"train": [raw, raw], "test": [other]} if kind == "DatasetDict" else [raw, raw]
    path = save_dataset(tmp_path / "saved", splits)
    assert load_records(path) == [normalized, normalized]  # detected; a DatasetDict's data.split, train by default
    assert load_records(path, fmt) == [normalized, normalized]  # named


def test_a_save_to_disk_folder_detects_formats_per_row(tmp_path):
    path = save_dataset(tmp_path / "saved", [raw for raw, _ in FORMATS.values()])
    assert load_records(path) == [normalized for _, normalized in FORMATS.values()]


def test_train_and_eval_splits_of_one_datasetdict(tmp_path):
    path = save_dataset(
        tmp_path / "saved",
        {
            "train": [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)],
            "validation": [{"instruction": f"e{i}", "output": i} for i in range(3)],  # an int column: read as its text
        },
    )
    splits = load_splits(DataConfig(source=path, eval_source=path, eval_split="validation"), num_prompts=2)
    assert [ex.response for ex in splits.train] == [f"a{i}" for i in range(5)]
    assert [ex.response for ex in splits.eval] == ["0", "1", "2"]  # in saved order
    assert splits.judged == splits.eval[:2]
    with pytest.raises(DataError, match=re.escape(f"data.eval_source: {path} has no split 'test' (it has train, validation); set data.eval_split")):
        load_splits(DataConfig(source=path, eval_source=path), num_prompts=2)
    with pytest.raises(DataError, match=re.escape(f"data.source: {path} has no split 'training' (it has train, validation); set data.split")):
        load_splits(DataConfig(source=path, split="training"), num_prompts=2)


def test_bad_save_to_disk_folders_are_one_line(tmp_path):
    import datasets

    good = save_dataset(tmp_path / "good", [FORMATS["alpaca"][0]] * 2)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": []})}).save_to_disk(str(tmp_path / "empty"))
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "empty_dataset"))
    cases = {
        str(tmp_path / "empty"): "data.source {}: no records; add records with",
        str(tmp_path / "empty_dataset"): "data.source {}: no records; add records with",
        save_dataset(tmp_path / "qa", [{"question": "a", "answer": "b"}]): "{}: columns question, answer match no data format",
        save_dataset(tmp_path / "lacks", [{"instruction": "a", "output": "b"}, {"instruction": "c"}]): "{}: row 2: record lacks output",
        str(tmp_path): "data.source: {} is a folder, not a dataset saved with save_to_disk",
    }
    for arrow in (tmp_path / "good").glob("*.arrow"):
        arrow.unlink()  # a copy that lost its data
    cases[good] = "data.source: {}: damaged save_to_disk folder ([Errno 2] No such file or directory"
    (tmp_path / "state" / "train").mkdir(parents=True)
    (tmp_path / "state" / "dataset_dict.json").write_text('{"splits": ["train"]}')  # its split folder empty
    cases[str(tmp_path / "state")] = "data.source: {}: damaged save_to_disk folder (Directory"
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "state.json").write_text('{"_data_files": [')
    cases[str(tmp_path / "json")] = "data.source: {}: damaged save_to_disk folder (state.json: Expecting value"
    for path, expected in cases.items():
        with pytest.raises(DataError, match=re.escape(expected.format(path))) as error:
            load_records(path)
        assert "\n" not in str(error.value)


def test_split_is_seeded_and_disjoint():
    first = load_splits(DataConfig(seed=3), num_prompts=10)
    again = load_splits(DataConfig(seed=3), num_prompts=10)
    other = load_splits(DataConfig(seed=4), num_prompts=10)
    assert first == again and first.eval != other.eval
    assert not {e.prompt + e.response for e in first.eval} & {e.prompt + e.response for e in first.train}
    assert first.judged == first.eval[:10]


def test_a_fraction_that_leaves_an_empty_split(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [FORMATS["alpaca"][0]] * 3)
    with pytest.raises(DataError, match="data.eval_fraction 0.1 of 3 records leaves an empty split"):
        load_splits(DataConfig(source=path, eval_fraction=0.1), num_prompts=1)


def test_a_dataset_id_offline_is_one_line(monkeypatch, capfd):
    """No hub is reachable here; offline mode says so at once (unset, the same line comes after the hub client's retries)."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"^data.source: cannot load Hugging Face dataset tatsu-lab/alpaca \(split train\): .+") as error:
        load_records("tatsu-lab/alpaca")
    assert "\n" not in str(error.value)
    assert capfd.readouterr().err == ""  # no progress bars, no warnings: the one line says it


def test_a_dataset_id_without_the_datasets_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # a dependency, but a broken install still gets one line
    with pytest.raises(DataError, match=r"^data.source: tatsu-lab/alpaca is not a file, .*: pip install datasets$"):
        load_splits(DataConfig(source="tatsu-lab/alpaca"), num_prompts=1)
    path = write_records(tmp_path / "d.jsonl", [FORMATS["alpaca"][0]] * 3)
    with pytest.raises(DataError, match=r"^data.eval_source: squad is not a file, .*: pip install datasets$"):
        load_splits(DataConfig(source=path, eval_source="squad"), num_prompts=1)


CHAT_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(
    "name, content, fmt, expected",
    [
        ("d.jsonl", [json.dumps({"instruction": "a", "output": "b"}), "{not json"], "auto", "d.jsonl:2: malformed JSON"),
        ("d.jsonl", [json.dumps({"instruction": "a"})], "auto", "d.jsonl:1: record lacks output; Alpaca records need"),
        ("d.jsonl", ["[1, 2]"], "auto", "d.jsonl:1: expected a JSON object"),
        ("d.jsonl", [], "auto", "d.jsonl: no records"),
        ("d.jsonl", [json.dumps({"question": "a", "answer": "b"})], "auto", "d.jsonl:1: record has no known fields (has question, answer)"),
        ("d.jsonl", [json.dumps(FORMATS["dolly"][0])], "alpaca", "d.jsonl:1: record lacks output; Alpaca records need"),
        ("d.jsonl", [CHAT_LINE], "auto", "d.jsonl:1: no assistant message"),
        ("d.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]})], "auto",
         "d.jsonl:1: message 2 is not {role, content}"),
        ("d.jsonl", [json.dumps({"text": " "})], "auto", "d.jsonl:1: text is empty"),
        ("d.json", ['[\n  {"text": "a"},\n  {"text": }\n]'], "auto", "d.json:3: malformed JSON"),
        ("d.json", ['[{"text": "a"}, "b"]'], "auto", "d.json: record 2: expected a JSON object"),
        ("d.json", ["[]"], "auto", "d.json: no records"),
        ("d.csv", ["instruction,input", "a,b"], "auto", "d.csv: no output column; Alpaca records need instruction and output"),
        ("d.csv", ["question,answer", "a,b"], "auto", "d.csv: columns question, answer match no data format"),
        ("d.csv", ["prompt,completion", "a,b"], "chat", "d.csv: no messages column; chat records need"),
        ("d.csv", [], "auto", "d.csv: no records"),
        ("d.csv", ['text', 'a', '"b'], "auto", "d.csv: not a readable CSV file"),
        ("d.parquet", pd.DataFrame({"text": pd.Series([], dtype=str)}), "auto", "d.parquet: no records"),
        ("d.parquet", pd.DataFrame({"prompt": ["a", None], "completion": ["b", "c"]}), "auto", "d.parquet: row 2: record lacks prompt"),
        ("d.parquet", ["not parquet"], "auto", "d.parquet: not a readable Parquet file"),
    ],
)  # fmt: skip
def test_bad_data_files_name_the_file_and_line(tmp_path, name, content, fmt, expected):
    path = tmp_path / name
    if isinstance(content, pd.DataFrame):
        content.to_parquet(path)
    else:
        write_jsonl(path, content)
    with pytest.raises(DataError, match=re.escape(expected)) as error:
        load_records(str(path), fmt)
    assert "\n" not in str(error.value)


def test_missing_file_or_a_folder(tmp_path):
    with pytest.raises(DataError, match="no file"):
        load_records(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match="data.eval_source: no file .*absent.csv"):
        load_records(str(tmp_path / "absent.csv"), key="data.eval_source")
    with pytest.raises(DataError, match="is a folder, not a dataset saved with save_to_disk"):
        load_records(str(tmp_path))


def test_loss_falls_on_response_tokens_only(tokenizer):
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


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("d.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "d.jsonl:2: invalid UTF-8 (byte 0xe9 at byte 30); save the file as UTF-8"),
        ("d.json", b'[\n  {"text": "a"},\n  {"text": "\xff"}\n]', "d.json:3: invalid UTF-8 (byte 0xff at byte 31); save the file as UTF-8"),
        ("d.json", b'{"text": "a"}\n\x80\n', "d.json:2: invalid UTF-8 (byte 0x80 at byte 14)"),  # JSON Lines under a .json name
        ("d.jsonl", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\xae\x05\x00", "d.jsonl: a binary file, not UTF-8 text"),  # gzip
        ("d.jsonl", '{"text": "a"}\n'.encode("utf-16"), "d.jsonl: UTF-16 text; save the file as UTF-8"),
        ("d.csv", b"text\ncaf\xe9\n", "d.csv: not a readable CSV file"),
    ],
)
def test_data_that_is_not_utf8_names_the_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(expected)) as error:
        load_records(str(path))
    assert "\n" not in str(error.value)


def test_retention_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from trainers.data import load_retention_texts

    path = tmp_path / "docs.txt"
    path.write_bytes(b"one\ntwo \xe9\n")
    with pytest.raises(DataError, match=re.escape("docs.txt:2: invalid UTF-8 (byte 0xe9 at byte 8)")):
        load_retention_texts("tiny", str(path), 10)
