"""Instruction data: load records, split them, tokenize with a loss mask over response tokens."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from trainers.config import DataConfig

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
BUILTIN_SOURCES = ("tinyworld",)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Example:
    prompt: str  # the formatted instruction, ending where the response starts
    response: str  # the reference answer


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    eval: list[Example]
    judged: list[Example]  # the first `num_prompts` eval examples, answered and judged every epoch


def load_records(source: str) -> list[dict[str, Any]]:
    """Records with `instruction`, `output` and optional `input`, from a built-in set or a JSONL file."""
    if source == "tinyworld":
        from trainers.tinyworld import instruction_dataset

        return instruction_dataset()
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.source: no file {path} (and not a built-in set: {', '.join(BUILTIN_SOURCES)}); give a JSONL file path"
        )
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: malformed JSON ({exc.msg}); one JSON object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            records.append(_normalize(record, path, line_no))
    if not records:
        raise DataError(f"{path}: no records; add JSON lines with instruction and output fields")
    return records


def _normalize(record: dict[str, Any], path: Path, line_no: int) -> dict[str, str]:
    if "prompt" in record and "completion" in record:
        return {"instruction": str(record["prompt"]), "input": "", "output": str(record["completion"])}
    missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
    if missing:
        raise DataError(
            f"{path}:{line_no}: record lacks {' and '.join(missing)}; each line needs instruction and output"
            " (input optional), or prompt and completion"
        )
    return {"instruction": record["instruction"], "input": str(record.get("input") or ""), "output": record["output"]}


def to_example(record: dict[str, str]) -> Example:
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT
    return Example(prompt=template.format(**record), response=record["output"])


def load_splits(config: DataConfig, num_prompts: int) -> Splits:
    """A seeded train/eval split; judged prompts are the first eval examples."""
    examples = [to_example(r) for r in load_records(config.source)]
    random.Random(config.seed).shuffle(examples)
    n_eval = max(1, round(len(examples) * config.eval_fraction))
    if n_eval >= len(examples):
        raise DataError(f"data.source {config.source}: {len(examples)} records leave nothing to train on; add records")
    eval_set = examples[:n_eval]
    return Splits(train=examples[n_eval:], eval=eval_set, judged=eval_set[:num_prompts])


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens


def tokenize(examples: list[Example], tokenizer: Any, max_length: int) -> list[Tokenized]:
    """Prompt + response + EOS, truncated on the right to `max_length`; loss on response tokens only."""
    out = []
    for ex in examples:
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        out.append(Tokenized(ids, labels))
    return out


def batches(
    data: list[Tokenized], batch_size: int, pad_id: int, rng: random.Random | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches; shuffled when `rng` is given."""
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
    with path.open(encoding="utf-8") as f:
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

