"""PEFT methods, registered by name: a sweep file names a method, never imports code."""

from __future__ import annotations

from typing import Any, Callable

from trainers.config import TrainConfig

AttachFn = Callable[[Any, TrainConfig], Any]
METHODS: dict[str, AttachFn] = {}


def register_method(name: str) -> Callable[[AttachFn], AttachFn]:
    """Register `fn(base_model, train_config) -> trainable model` under `name`."""

    def decorator(fn: AttachFn) -> AttachFn:
        METHODS[name] = fn
        return fn

    return decorator


def attach_adapter(model: Any, train: TrainConfig) -> Any:
    """Wrap the frozen base model with the trial's adapter."""
    return METHODS[train.method](model, train)


@register_method("lora")
def attach_lora(model: Any, train: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=train.lora_r,
        lora_alpha=train.lora_alpha_per_rank * train.lora_r if train.lora_alpha_per_rank else train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules=list(train.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
