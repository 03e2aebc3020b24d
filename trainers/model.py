"""Loading the frozen base model, kept apart from attaching an adapter to it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from trainers.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model that cannot be loaded; the message says what to fix."""


def resolve_model(config: ModelConfig) -> str:
    """A loadable location: the built-in tiny model's cache folder, a local folder, or a hub id."""
    if config.name == "tiny":
        from trainers.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model())
    path = Path(config.name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name: {path} has no config.json; point it at a saved Hugging Face model folder")
        return str(path)
    if config.name.startswith((".", "/", "~")) or config.name.count("/") > 1:
        raise ModelError(f"model.name: no folder {path}; give 'tiny', an existing model folder, or a hub id")
    return config.name


def pick_device() -> torch.device:
    """The trial's device: Ray pins a GPU trial via CUDA_VISIBLE_DEVICES, so cuda:0 is its own GPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def load_base_model(config: ModelConfig, device: torch.device, options: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The base model (eval mode, on `device`) and its tokenizer, with a pad token.

    `options` are extra `from_pretrained` arguments a method asks for (QLoRA: a 4-bit quantization config).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model(config)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    options = dict(options or {})
    quantized = "quantization_config" in options
    if quantized:
        options["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}  # quantized weights cannot be moved
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=config.revision)
        model = AutoModelForCausalLM.from_pretrained(location, revision=config.revision, dtype=DTYPES[config.dtype], **options)
    except OSError as exc:
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise ModelError(f"model.name: cannot load '{config.name}'{hint}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not quantized:
        model.to(device)
    model.eval()
    return model, tokenizer
