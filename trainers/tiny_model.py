"""The tiny base model every default sweep and test fine-tunes: built here, cached on disk.

`ensure_tiny_model()` returns a folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load. The first call builds it (about a minute on two idle
CPU cores): a byte-level BPE tokenizer and a 1.3M-parameter Llama pre-trained on
`tinyworld.pretraining_corpus()`, so the model knows the world's facts but has never seen
the instruction format. Later calls, from any process, reuse the folder.

The build is seeded and runs on a fixed number of threads, so it is bit-identical from run
to run on one machine; another CPU may round differently and give slightly other weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainers import tinyworld
from trainers.progress import Progress, duration, no_progress_bars

if TYPE_CHECKING:  # torch and transformers' model classes load only for a build: finding the built model stays quick
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Bump whenever anything below (or in tinyworld) that changes the saved files changes.
TINY_MODEL_VERSION = "8"

SEED = 0
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 1024
BLOCK_SIZE = 128  # tokens per pre-training sequence; documents are packed across blocks
BATCH_SIZE = 16
# The model learns the sentence templates within ~100 steps and the creature facts in a
# sudden drop of the loss at about step 150-250 (seed-dependent); 400 steps leave a margin.
PRETRAIN_STEPS = 400
PEAK_LEARNING_RATE = 3e-3
WARMUP_STEPS = 20
DECAY_FRACTION = 0.25  # the learning rate decays linearly over the last quarter of the steps
BUILD_THREADS = 2
LOG_EVERY_SECONDS = 10.0


def default_cache_dir() -> Path:
    """`$PEFTSWEEP_CACHE`, else `$XDG_CACHE_HOME/peftsweep`, else `~/.cache/peftsweep`."""
    if os.environ.get("PEFTSWEEP_CACHE"):
        return Path(os.environ["PEFTSWEEP_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "peftsweep"
    return Path.home() / ".cache" / "peftsweep"


def ensure_tiny_model(cache_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Return the folder of the tiny base model, building it first if it is not there yet."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(cache_dir / f"tiny-{TINY_MODEL_VERSION}", lambda staging: _build(staging, log))


def build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """Return `folder`, building it first with `build(staging)` if it is not there yet.

    A file lock makes concurrent callers (trials starting together) build once; the others wait.
    The folder only ever appears through an atomic rename of the staging folder, so if it exists
    it is complete.
    """
    if folder.is_dir():
        return folder
    from filelock import FileLock  # only a build needs it

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f"{folder.name}.lock")):
        if folder.is_dir():  # another process built it while we waited
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            build(staging)
            staging.chmod(0o755)  # mkdtemp makes it private; a shared cache must be readable
            for file in staging.iterdir():
                file.chmod(0o644)
            os.rename(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _build(folder: Path, log: Callable[[str], None]) -> None:
    """Build tokenizer and pre-trained model from the seed-0 world and save both into `folder`."""
    import torch
    from transformers import LlamaForCausalLM

    started = time.monotonic()
    log(f"building the built-in tiny model v{TINY_MODEL_VERSION} (once; later runs reuse it from {folder.parent})")
    documents = tinyworld.pretraining_corpus(SEED)
    tokenizer = _train_tokenizer(documents + _instruction_texts())
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(_model_config(tokenizer))
    blocks = _pack(tokenizer, documents)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        final_loss = _pretrain(model, blocks, log)
    finally:
        torch.set_num_threads(previous_threads)
    with no_progress_bars():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    build = {
        "version": TINY_MODEL_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_tokens": PRETRAIN_STEPS * BATCH_SIZE * BLOCK_SIZE,
        "final_train_loss": round(final_loss, 4),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (folder / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    log(f"built the tiny model in {duration(build['build_seconds'])} (final loss {final_loss:.3f})")


def _instruction_texts() -> list[str]:
    """Instruction records as plain text, so the vocabulary also covers the fine-tuning task."""
    return [
        " ".join(filter(None, (r["instruction"], r["input"], r["output"])))
        for r in tinyworld.instruction_dataset(SEED)
    ]


def _train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with one special token that is bos, eos and pad."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=256,
    )


def _model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    from transformers import LlamaConfig

    end_of_text = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        # Wide and shallow with narrow attention: of the shapes tried, this one learned the
        # creature facts (not just the sentence templates) in the fewest CPU seconds.
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
    )


def _pack(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
    """All documents, each followed by end-of-text, cut into rows of BLOCK_SIZE tokens."""
    import torch

    ids: list[int] = []
    for document_ids in tokenizer(documents)["input_ids"]:
        ids += document_ids + [tokenizer.eos_token_id]
    usable = len(ids) // BLOCK_SIZE * BLOCK_SIZE
    return torch.tensor(ids[:usable]).view(-1, BLOCK_SIZE)


def _pretrain(model: LlamaForCausalLM, blocks: torch.Tensor, log: Callable[[str], None]) -> float:
    """Plain causal-LM training with AdamW (warmup, constant, then linear decay); returns the last loss."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LEARNING_RATE, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _learning_rate_factor)
    order = torch.Generator().manual_seed(SEED)
    model.train()
    batches = _batches(blocks, order)
    progress = Progress("pre-training the tiny model: step", PRETRAIN_STEPS, log, LOG_EVERY_SECONDS)
    loss_value = float("nan")
    for step in range(1, PRETRAIN_STEPS + 1):
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        progress.update(step, loss=loss_value)
    model.eval()
    return loss_value


def _batches(blocks: torch.Tensor, order: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of rows, reshuffled every pass over the data."""
    import torch

    while True:
        permutation = torch.randperm(len(blocks), generator=order)
        for start in range(0, len(permutation) - BATCH_SIZE + 1, BATCH_SIZE):
            yield blocks[permutation[start : start + BATCH_SIZE]]


def _learning_rate_factor(step: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    steps_left = PRETRAIN_STEPS - step
    return max(0.05, min(1.0, steps_left / (DECAY_FRACTION * PRETRAIN_STEPS)))
