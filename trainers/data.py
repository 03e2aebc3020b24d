"""Fine-tuning data: load records in five formats from files, a `datasets` folder or a Hugging Face dataset, split them,
render prompts (plain, or with the model's chat template), and tokenize with a loss mask.

Formats (`data.format`, detected per record by default): Alpaca {instruction, input, output},
Dolly {instruction, context, response}, chat {messages: [{role, content}, ...]}, prompt/completion
and plain text {text}. Loading normalizes them to three shapes: instruction records
{instruction, input, output}, chat records {messages} ending with the assistant's response, and
text records {text}.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from trainers.config import DataConfig

if TYPE_CHECKING:  # torch loads where batches are made: the checks before a sweep never need it
    import torch

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_TURNS = {"system": "### System:\n{}\n\n", "user": "### Instruction:\n{}\n\n", "assistant": "### Response:\n{}\n\n"}
BUILTIN_SOURCES = ("tinyworld",)
SAVED_DATASET_FILES = ("dataset_dict.json", "dataset_info.json", "state.json")  # what save_to_disk writes beside the Arrow files
FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
REQUIRED = {  # fields each format needs; optional ones (input, context) may be absent
    "alpaca": ("instruction", "output"),
    "dolly": ("instruction", "response"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
NEEDS = {
    "alpaca": "Alpaca records need instruction and output (input optional)",
    "dolly": "Dolly records need instruction and response (context optional)",
    "chat": "chat records need messages: a list of {role, content} with a user and then an assistant message",
    "prompt_completion": "prompt/completion records need prompt and completion",
    "text": "text records need text",
}
ANY_FORMAT = (
    "instruction and output (Alpaca, input optional), instruction and response (Dolly, context optional), "
    "messages (chat), prompt and completion, or text"
)
ROLES = ("system", "user", "assistant")
_PROBE = "PEFTSWEEP-RESPONSE-PROBE"


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Example:
    prompt: str  # the rendered prompt, ending where the response starts; "" for plain text
    response: str  # the reference answer (the text itself for plain text)
    end_of_turn: str = ""  # what the chat template writes after a response, e.g. "<|im_end|>"; trained on, never shown


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    eval: list[Example]
    judged: list[Example]  # the first `num_prompts` eval examples (text: split in halves), answered and judged every epoch


# --- loading ---------------------------------------------------------------------------------------


def load_records(source: str, fmt: str = "auto", split: str = "train", key: str = "data.source") -> list[dict[str, Any]]:
    """Normalized records (format `fmt`, or detected) from a built-in set, a .jsonl/.json/.csv/.parquet file, a folder written
    by `datasets`' save_to_disk (split `split` of a DatasetDict) or a Hugging Face dataset id."""
    records = [_normalize(raw, fmt, where) for where, raw in _read(source, fmt, split, key)]
    if not records:
        raise DataError(f"{key} {source}: no records; add records with {ANY_FORMAT}")
    return records


def _read(source: str, fmt: str, split: str, key: str) -> Iterator[tuple[str, Any]]:
    """(where, raw record) pairs; `where` names the file and line or row for error messages."""
    if source in BUILTIN_SOURCES:
        from trainers.tinyworld import instruction_dataset

        for i, record in enumerate(instruction_dataset(), 1):
            yield f"{source}: record {i}", record
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in SAVED_DATASET_FILES):
            raise DataError(
                f"{key}: {path} is a folder, not a dataset saved with save_to_disk (it has no dataset_dict.json, dataset_info.json "
                "or state.json); give such a folder, or a .jsonl, .json, .csv or .parquet file"
            )
        yield from _read_saved(path, split, fmt, key)
        return
    if path.is_file():
        kind = FILE_TYPES.get(path.suffix.lower(), "jsonl")  # any other name is read as JSON Lines, as before
        if kind == "jsonl":
            yield from _read_jsonl(path)
        elif kind == "json":
            yield from _read_json(path)
        else:
            yield from _read_table(path, kind, fmt)
        return
    if path.suffix.lower() in FILE_TYPES or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise DataError(
            f"{key}: no file {path} (and not a built-in set: {', '.join(BUILTIN_SOURCES)}); "
            "give a .jsonl, .json, .csv or .parquet file, or a Hugging Face dataset id"
        )
    yield from _read_hub(source, split, fmt, key)


def _read_text(path: Path) -> str:
    """The file as text; a DataError naming the line and byte when it is not UTF-8 (a binary file, or another encoding)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError(f"{path}: UTF-16 text; save the file as UTF-8") from None
        if b"\0" in data[:8192]:  # text files hold no NUL bytes; compressed or binary files do
            raise DataError(f"{path}: a binary file, not UTF-8 text; give JSON Lines, JSON, CSV or Parquet (uncompressed)") from None
        raise DataError(
            f"{path}:{line_no}: invalid UTF-8 (byte 0x{data[exc.start]:02x} at byte {exc.start}); save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path, text: str | None = None) -> Iterator[tuple[str, Any]]:
    with io.StringIO(_read_text(path) if text is None else text, newline=None) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: malformed JSON ({exc.msg}); one JSON object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{line_no}", record


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    if not text.lstrip().startswith("["):  # many datasets ship JSON Lines under a .json name
        yield from _read_jsonl(path, text)
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); a .json file holds one list of records") from None
    for i, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(record).__name__}")
        yield f"{path}: record {i}", record


def _read_table(path: Path, kind: str, fmt: str) -> Iterator[tuple[str, Any]]:
    import pandas as pd

    try:
        if kind == "csv":  # every cell a string, an empty cell ""
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        return
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    except (ValueError, OSError) as exc:  # pandas' ParserError and pyarrow's ArrowInvalid are ValueErrors
        raise DataError(f"{path}: not a readable {'CSV' if kind == 'csv' else 'Parquet'} file: {first_line(exc)}") from None
    _check_columns(str(path), list(frame.columns), fmt)
    for i, record in enumerate(frame.to_dict("records"), 1):
        yield f"{path}: row {i}", record


def _read_saved(path: Path, split: str, fmt: str, key: str) -> Iterator[tuple[str, Any]]:
    """Rows of a folder written by `Dataset.save_to_disk`, or of split `split` of one written by `DatasetDict.save_to_disk`.

    A DatasetDict is read one split at a time, as `DatasetDict.load_from_disk` reads each: from the
    folder named after the split.
    """
    datasets = _import_datasets(f"{key}: reading the save_to_disk folder {path}")
    folder, name = path, str(path)
    if (path / "dataset_dict.json").is_file():
        splits = _saved_json(path / "dataset_dict.json", key).get("splits")
        if not isinstance(splits, list):
            raise DataError(f"{key}: {path}: damaged save_to_disk folder (dataset_dict.json lists no splits); save the dataset again")
        if split not in splits:
            split_key = "data.eval_split" if key == "data.eval_source" else "data.split"
            raise DataError(f"{key}: {path} has no split {split!r} (it has {', '.join(map(str, splits)) or 'none'}); set {split_key}")
        folder, name = path / split, f"{path} [{split}]"
    if (folder / "state.json").is_file() and _saved_json(folder / "state.json", key).get("_data_files") == []:
        return  # an empty dataset: save_to_disk writes it no Arrow file, which load_from_disk then fails on
    try:
        with _quiet_datasets(datasets):
            dataset = datasets.load_from_disk(str(folder))
    except Exception as exc:  # a missing or truncated Arrow file, a split folder gone, ...: one line, with the cause
        raise DataError(f"{key}: {path}: damaged save_to_disk folder ({first_line(exc)}); save the dataset again") from None
    if not isinstance(dataset, datasets.Dataset):  # a DatasetDict inside a DatasetDict's split folder
        raise DataError(f"{key}: {folder} holds splits of its own, not rows; give that folder as {key}")
    yield from _read_rows(dataset, name, fmt)


def _saved_json(path: Path, key: str) -> dict[str, Any]:
    """One of the JSON files save_to_disk writes, as a dict; a DataError when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{key}: {path.parent}: damaged save_to_disk folder ({path.name}: {first_line(exc)}); save the dataset again") from None
    if not isinstance(data, dict):
        raise DataError(f"{key}: {path.parent}: damaged save_to_disk folder ({path.name} is not a JSON object); save the dataset again")
    return data


def _read_hub(source: str, split: str, fmt: str, key: str) -> Iterator[tuple[str, Any]]:
    datasets = _import_datasets(f"{key}: {source} is not a file, and reading it as a Hugging Face dataset")
    try:
        with _quiet_datasets(datasets):
            dataset = datasets.load_dataset(source, split=split)
    except Exception as exc:  # hub, network and split errors alike: one line, with the cause
        raise DataError(f"{key}: cannot load Hugging Face dataset {source} (split {split}): {first_line(exc)}") from None
    yield from _read_rows(dataset, f"{source} [{split}]", fmt)


def _read_rows(dataset: Any, name: str, fmt: str) -> Iterator[tuple[str, Any]]:
    """A `datasets.Dataset`'s rows as records: its columns checked first, like a table's.

    A column a row has no value in is dropped from that row: Arrow gives every row every column
    (None where absent), and a file's records are detected one by one by the fields they have.
    """
    _check_columns(name, list(dataset.column_names), fmt)
    for i, record in enumerate(dataset, 1):
        yield f"{name}: row {i}", {k: v for k, v in record.items() if v is not None}


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:  # a dependency, so only in a broken install
        raise DataError(f"{what} needs the datasets package: pip install datasets") from None
    return datasets


@contextlib.contextmanager
def _quiet_datasets(datasets: Any) -> Iterator[None]:
    """No progress bars, and no hub retry warnings on stderr: a failure is said in one DataError line."""
    import huggingface_hub.utils.logging as hub_logging

    bars, hub_level = datasets.is_progress_bar_enabled(), hub_logging.get_verbosity()
    datasets.disable_progress_bars()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(hub_level)
        if bars:
            datasets.enable_progress_bars()


def _check_columns(name: str, columns: list[str], fmt: str) -> None:
    """A table's columns name its format: say which column is missing before reading any row."""
    fmt = _detect(columns) if fmt == "auto" else fmt
    if fmt is None:
        raise DataError(f"{name}: columns {', '.join(map(str, columns)) or '(none)'} match no data format; give {ANY_FORMAT}")
    missing = [c for c in REQUIRED[fmt] if c not in columns]
    if missing:
        raise DataError(f"{name}: no {' and no '.join(missing)} column; {NEEDS[fmt]}")


def _detect(fields: Any) -> str | None:
    """The format a record's field names point to (the most specific first)."""
    if "messages" in fields:
        return "chat"
    if "prompt" in fields or "completion" in fields:
        return "prompt_completion"
    if "instruction" in fields:
        return "dolly" if "response" in fields or "context" in fields else "alpaca"
    if "text" in fields:
        return "text"
    return None


def _normalize(record: dict[str, Any], fmt: str, where: str) -> dict[str, Any]:
    fmt = _detect(record) if fmt == "auto" else fmt
    if fmt is None:
        raise DataError(f"{where}: record has no known fields (has {', '.join(map(str, record)) or 'none'}); give {ANY_FORMAT}")
    if fmt == "chat":
        return {"messages": _messages(record.get("messages"), where)}
    missing = [k for k in REQUIRED[fmt] if _text(record.get(k)) is None]
    if missing:
        raise DataError(f"{where}: record lacks {' and '.join(missing)}; {NEEDS[fmt]}")
    if fmt == "text":
        text = _text(record["text"])
        if not text.strip():
            raise DataError(f"{where}: text is empty; give each record some text")
        return {"text": text}
    instruction, extra, output = {
        "alpaca": ("instruction", "input", "output"),
        "dolly": ("instruction", "context", "response"),
        "prompt_completion": ("prompt", None, "completion"),
    }[fmt]
    return {
        "instruction": _text(record[instruction]),
        "input": (_text(record.get(extra)) or "") if extra else "",
        "output": _text(record[output]),
    }


def _text(value: Any) -> str | None:
    """A field's value as text; None when absent or not text (null, NaN, a list)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and value == value:  # value != value: NaN, a null cell
        return str(value)
    return None


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """Chat messages up to the last assistant message: that one is the response, the rest the prompt."""
    if isinstance(value, str):  # a CSV cell holds the list as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if hasattr(value, "tolist"):  # Parquet lists arrive as numpy arrays
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES or _text(message.get("content")) is None:
            raise DataError(f"{where}: message {i} is not {{role, content}} with role {', '.join(ROLES)}")
        messages.append({"role": message["role"], "content": _text(message["content"])})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: no assistant message; the last assistant message is the response trained on")
    if not any(m["role"] == "user" for m in messages[:last]):
        raise DataError(f"{where}: no user message before the last assistant message; a chat record needs a prompt")
    return messages[: last + 1]


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- rendering -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template: renders a prompt up to the assistant's turn, and knows what ends that turn."""

    tokenizer: Any
    end_of_turn: str  # what the template writes after an assistant message (trailing whitespace dropped)
    leading_bos: str  # the BOS text to drop from a rendered prompt: the tokenizer adds BOS itself

    @classmethod
    def of(cls, tokenizer: Any) -> ChatTemplate:
        probe = [{"role": "user", "content": "?"}]
        try:
            full = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": _PROBE}], tokenize=False)
        except Exception as exc:  # a Jinja error in the model's template
            raise DataError(f"data.chat_template: the tokenizer's chat template fails: {first_line(exc)}; set it to false") from None
        _, found, after = full.partition(_PROBE)
        bos = tokenizer.bos_token or ""
        adds_bos = bool(bos) and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
        return cls(tokenizer, after.rstrip() if found else "", bos if adds_bos else "")

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # e.g. a template that refuses a system message
            raise DataError(f"data.chat_template: the tokenizer's chat template fails: {first_line(exc)}; set it to false") from None
        if self.leading_bos and text.startswith(self.leading_bos):
            text = text[len(self.leading_bos) :]  # tokenize() adds BOS; two would differ from what the model saw
        return text


def to_example(record: dict[str, Any], chat: ChatTemplate | None = None, system_prompt: str | None = None) -> Example:
    """A normalized record as a prompt and response: with `chat`'s template when given, else the plain template."""
    if "text" in record:
        return Example(prompt="", response=record["text"])
    if "messages" in record:
        *turns, answer = record["messages"]
        response = answer["content"]
    else:
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        turns, response = [{"role": "user", "content": user}], record["output"]
    if system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}, *turns]
    if chat is not None:
        return Example(chat.render(turns), response, chat.end_of_turn)
    if "messages" not in record:  # the instruction template, with an Input section when there is one
        template = PROMPT_WITH_INPUT if record.get("input") else PROMPT
        head = PLAIN_TURNS["system"].format(system_prompt) if system_prompt else ""
        return Example(head + template.format(**record), response)
    return Example("".join(PLAIN_TURNS[t["role"]].format(t["content"]) for t in turns) + "### Response:\n", response)


def judged_example(record: dict[str, Any], example: Example) -> Example:
    """The example as a judged prompt; plain text has no response, so its first half is the prompt and its second the reference."""
    if "text" not in record:
        return example
    text = record["text"].strip()
    cut = text.rfind(" ", 0, len(text) // 2 + 1)
    if cut <= 0:  # no space in the first half: cut at the next one, or mid-word
        cut = text.find(" ", len(text) // 2)
        cut = len(text) // 2 if cut == -1 else cut
    return Example(prompt=text[:cut].rstrip(), response=text[cut:].strip())


def load_splits(config: DataConfig, num_prompts: int, tokenizer: Any = None) -> Splits:
    """Train and eval examples (a separate eval set, or a seeded fraction), rendered for `tokenizer`.

    Judged prompts are the first eval examples. With a tokenizer that has a chat template (and
    data.chat_template auto or true) prompts use it; without a tokenizer, the plain template.
    """
    records = load_records(config.source, config.format, config.split)
    if config.eval_source:
        eval_records = load_records(config.eval_source, config.format, config.eval_split, key="data.eval_source")
        train_records = records
    else:
        random.Random(config.seed).shuffle(records)
        n_eval = round(len(records) * config.eval_fraction)
        if n_eval < 1 or n_eval >= len(records):
            raise DataError(
                f"data.eval_fraction {config.eval_fraction} of {len(records)} records leaves an empty split; change it or add records"
            )
        eval_records, train_records = records[:n_eval], records[n_eval:]
    chat = _chat_template(config, tokenizer)
    train = [to_example(r, chat, config.system_prompt) for r in train_records]
    eval_set = [to_example(r, chat, config.system_prompt) for r in eval_records]
    judged = [judged_example(r, ex) for r, ex in zip(eval_records[:num_prompts], eval_set)]
    return Splits(train=train, eval=eval_set, judged=judged)


def _chat_template(config: DataConfig, tokenizer: Any) -> ChatTemplate | None:
    if tokenizer is None or config.chat_template is False:
        return None
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplate.of(tokenizer)
    if config.chat_template is True:
        raise DataError("data.chat_template: true, but the model's tokenizer has no chat template; set it to auto or false")
    return None


def check_lengths(config: DataConfig, tokenizer: Any) -> None:
    """Refuse a data file none of whose records keeps a trained token within data.max_length.

    Training skips (and counts) a record whose rendered prompt fills max_length; when every record
    is such, the run would fail after the base model ran: better said before anything runs.
    """
    chat = _chat_template(config, tokenizer)
    sources = [("data.source", config.source, config.split)]
    if config.eval_source:
        sources.append(("data.eval_source", config.eval_source, config.eval_split))
    for key, source, split in sources:
        examples = [to_example(r, chat, config.system_prompt) for r in load_records(source, config.format, split, key)]
        fitted = tokenize(examples, tokenizer, config.max_length, config.response_only_loss)
        if any(label != IGNORE_INDEX for t in fitted for label in t.labels[1:]):  # the first token is never predicted
            continue
        lengths = [len(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]) for ex in examples]
        shortest = min(range(len(lengths)), key=lengths.__getitem__)
        raise DataError(
            f"{key} {source}: no response token fits in data.max_length {config.max_length} for any record "
            f"(the shortest prompt, record {shortest + 1}, is {lengths[shortest]} tokens); "
            f"raise data.max_length to at least {lengths[shortest] + 1} or shorten the prompts"
        )


# --- tokenizing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on tokens that carry no loss


def tokenize(examples: list[Example], tokenizer: Any, max_length: int, response_only_loss: bool = True) -> list[Tokenized]:
    """Prompt + response + end of turn + EOS, truncated on the right to `max_length`.

    Loss falls on the response, its end of turn and EOS (so generation learns to stop), and on
    the prompt too when `response_only_loss` is False.
    """
    out = []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(ex.response + ex.end_of_turn, add_special_tokens=False)["input_ids"]
        if response_ids[-1:] != [tokenizer.eos_token_id]:  # a template whose end of turn is EOS has it already
            response_ids.append(tokenizer.eos_token_id)
        ids = (prompt_ids + response_ids)[:max_length]
        prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if response_only_loss else list(prompt_ids)
        labels = (prompt_labels + response_ids)[:max_length]
        out.append(Tokenized(ids, labels))
    return out


def carries_loss(example: Tokenized) -> bool:
    """Whether some token of the example is trained on: a label after the first token (the first is never predicted).

    With response-only loss, an example whose prompt fills max_length has none; a batch of only such
    examples would have a loss of 0/0, NaN.
    """
    return any(label != IGNORE_INDEX for label in example.labels[1:])


def batches(
    data: list[Tokenized], batch_size: int, pad_id: int, rng: random.Random | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches; shuffled when `rng` is given."""
    import torch

    order = list(range(len(data)))
    if rng is not None:
        rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        items = [data[i] for i in order[start : start + batch_size]]
        width = max(len(t.input_ids) for t in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, t in enumerate(items):
            n = len(t.input_ids)
            ids[row, :n] = torch.tensor(t.input_ids)
            labels[row, :n] = torch.tensor(t.labels)
            mask[row, :n] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batches(data: list[Tokenized], batch_size: int, rng: random.Random | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Padding-free batches: the same examples as `batches`, concatenated into one row with
    position ids restarting at each example. Given position ids and no attention mask,
    transformers builds a block-diagonal causal mask from them, so no example attends to another
    and no compute is spent on padding. Each example's first token carries no loss, as unpacked
    (there it has nothing before it to be predicted from)."""
    import torch

    order = list(range(len(data)))
    if rng is not None:
        rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        items = [data[i] for i in order[start : start + batch_size]]
        ids = [token for t in items for token in t.input_ids]
        labels = [label for t in items for label in [IGNORE_INDEX, *t.labels[1:]]]
        positions = [p for t in items for p in range(len(t.input_ids))]
        yield {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
        }


def load_retention_texts(model_name: str, source: str | None, limit: int) -> list[str] | None:
    """Documents from the base model's own domain, for `retention_ppl`: what fine-tuning forgets.

    A .txt file holds one document per line, a JSONL file one {"text": ...} per line; the built-in
    tiny model defaults to held-out pre-training documents. None: nothing to measure retention on.
    """
    if source is None:
        if model_name != "tiny":
            return None
        from trainers.tinyworld import heldout_corpus

        return heldout_corpus()[:limit]
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"eval.retention_data: no file {path}; give a .txt (one document per line) or JSONL file with 'text'")
    texts = []
    with io.StringIO(_read_text(path), newline=None) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{line_no}: malformed JSON ({exc.msg}); one JSON object per line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{line_no}: record lacks text; each line needs a 'text' field")
                texts.append(record["text"])
            else:
                texts.append(line.strip())
    if not texts:
        raise DataError(f"{path}: no documents; add text, one document per line")
    return texts[:limit]


def tokenize_text(texts: list[str], tokenizer: Any, max_length: int) -> list[Tokenized]:
    """Plain text for language-model perplexity: every token is predicted, truncated on the right."""
    out = []
    for text in texts:
        ids = (tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
        out.append(Tokenized(ids, list(ids)))
    return out

