"""PEFT methods, registered by name: a sweep file names a method, never imports code.

A method says how the base model is loaded (`load_options`: QLoRA loads it in 4 bits) and how a
trainable model is made from it (`attach`), so loading stays apart from adapting, and several
adapters of one method can later share one loaded base model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from trainers.config import TrainConfig

AttachFn = Callable[[Any, TrainConfig], Any]
LoadOptionsFn = Callable[[TrainConfig], dict[str, Any]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Method:
    name: str
    attach: AttachFn  # base model -> the model to train
    load_options: LoadOptionsFn  # extra `from_pretrained` arguments for the base model
    trains: bool = True  # `none` evaluates the base model without training


METHODS: dict[str, Method] = {}

# peft imports bitsandbytes, which on CPU tries to fetch an optional faster kernel from the hub
# and warns when it cannot; its built-in CPU path works without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _no_options(train: TrainConfig) -> dict[str, Any]:
    return {}


def register_method(
    name: str, *, load_options: LoadOptionsFn = _no_options, trains: bool = True
) -> Callable[[AttachFn], AttachFn]:
    """Register `attach(base_model, train_config) -> trainable model` under `name`."""

    def decorator(attach: AttachFn) -> AttachFn:
        METHODS[name] = Method(name, attach, load_options, trains)
        return attach

    return decorator


def get_method(name: str) -> Method:
    return METHODS[name]


def attach_adapter(model: Any, train: TrainConfig) -> Any:
    """Wrap the frozen base model with the trial's adapter (or unfreeze it, for `full`)."""
    return METHODS[train.method].attach(model, train)


def _lora_config(train: TrainConfig, **extra: Any) -> Any:
    from peft import LoraConfig

    modules = list(train.target_modules)
    return LoraConfig(
        r=train.lora_r,
        lora_alpha=train.lora_alpha_per_rank * train.lora_r if train.lora_alpha_per_rank else train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules="all-linear" if modules == ["all-linear"] else modules,  # peft's keyword for every linear layer
        bias="none",
        task_type="CAUSAL_LM",
        **extra,
    )


@register_method("lora")
def attach_lora(model: Any, train: TrainConfig) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(train))


@register_method("dora")
def attach_dora(model: Any, train: TrainConfig) -> Any:
    """Weight-decomposed LoRA (peft's `use_dora`): LoRA on the direction, a learned magnitude."""
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(train, use_dora=True))


def _four_bit(train: TrainConfig) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig


    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[train.qlora_compute_dtype],
        )
    }


@register_method("qlora", load_options=_four_bit)
def attach_qlora(model: Any, train: TrainConfig) -> Any:
    """LoRA on a base model loaded in 4-bit NF4 (bitsandbytes; it runs on CPU too)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
    return get_peft_model(model, _lora_config(train))


@register_method("prefix")
def attach_prefix(model: Any, train: TrainConfig) -> Any:
    """Prefix tuning: trained key/value prefixes in every layer."""
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=train.num_virtual_tokens))


@register_method("prompt")
def attach_prompt(model: Any, train: TrainConfig) -> Any:
    """Prompt tuning: trained virtual token embeddings before the input."""
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=train.num_virtual_tokens))


@register_method("ia3")
def attach_ia3(model: Any, train: TrainConfig) -> Any:
    """IA3: learned rescaling of keys, values and feed-forward activations (peft's defaults per architecture)."""
    from peft import IA3Config, get_peft_model

    return get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))


@register_method("full")
def attach_full(model: Any, train: TrainConfig) -> Any:
    """Full fine-tuning: every weight trains (for small models)."""
    model.requires_grad_(True)
    return model


@register_method("none", trains=False)
def attach_none(model: Any, train: TrainConfig) -> Any:
    """No training: the base model as it is, evaluated once (to compare candidate base models)."""
    return model.requires_grad_(False)
