"""PEFT methods, registered by name: a sweep file names a method, never imports code.

A method says how the base model is loaded (`load_options`: QLoRA loads it in 4 bits), how a
trainable model is made from it (`attach`), and which of the train fields are its own
(`params`: lora_r for LoRA, num_virtual_tokens for prefix tuning), so that a sweep cannot search a
parameter its method ignores. Loading stays apart from adapting, so that the configurations of a
`packable` method can share one loaded base model (resources.pack: trainers.packed). Importing this module loads neither torch nor peft.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from trainers.config import TrainConfig, TrialConfig

AttachFn = Callable[[Any, "TrainConfig"], Any]
LoadOptionsFn = Callable[["TrainConfig"], dict[str, Any]]

# Train fields that belong to some methods only; every other train field applies to every method that trains.
LORA_PARAMS = ("lora_r", "lora_alpha", "lora_alpha_per_rank", "lora_dropout", "target_modules")
VIRTUAL_TOKEN_PARAMS = ("num_virtual_tokens",)
QLORA_PARAMS = (*LORA_PARAMS, "qlora_compute_dtype")
DISTILL_PARAMS = (*LORA_PARAMS, "teacher", "distill_alpha", "distill_temperature", "distill_top_k")
METHOD_PARAMS = frozenset({*QLORA_PARAMS, *VIRTUAL_TOKEN_PARAMS, *DISTILL_PARAMS})


@dataclass(frozen=True)
class Method:
    name: str
    attach: AttachFn  # base model -> the model to train
    load_options: LoadOptionsFn  # extra `from_pretrained` arguments for the base model
    trains: bool = True  # `none` evaluates the base model without training
    params: tuple[str, ...] = ()  # its own train fields (of METHOD_PARAMS)
    packable: bool = False  # its configurations can share one base model (resources.pack; trainers.packed)
    alone: str | None = None  # why its configurations never share a pack, where "not of the LoRA family" would mislead

    @property
    def quantized(self) -> bool:
        """Whether its base model loads with options of its own: quantized, through bitsandbytes (QLoRA's 4 bits)."""
        return self.load_options is not _no_options

    def uses(self, field: str) -> bool:
        """Whether this method reads the train field `field`: its own, or one every training method shares."""
        if field in METHOD_PARAMS:
            return field in self.params
        return self.trains or field in ("method", "epochs", "seed")


METHODS: dict[str, Method] = {}

# peft imports bitsandbytes, which on CPU tries to fetch an optional faster kernel from the hub
# and warns when it cannot; its built-in CPU path works without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _no_options(train: TrainConfig) -> dict[str, Any]:
    return {}


def without_bitsandbytes() -> None:
    """For a process whose trials never quantize, called before peft is imported: peft imports
    bitsandbytes at its own import wherever it is installed, which costs about 1.5 s of CPU (it
    loads torch's inductor) in every worker. Marked absent in `sys.modules`, it is skipped:
    `importlib.util.find_spec` then answers None, so peft and transformers see no bitsandbytes, as
    on a machine without it. Once peft or bitsandbytes is imported, this does nothing."""
    if "peft" not in sys.modules and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None


def register_method(
    name: str,
    *,
    params: tuple[str, ...] = (),
    load_options: LoadOptionsFn = _no_options,
    trains: bool = True,
    packable: bool = False,
    alone: str | None = None,
) -> Callable[[AttachFn], AttachFn]:
    """Register `attach(base_model, train_config) -> trainable model` under `name`, with the train fields it reads besides the shared ones."""

    def decorator(attach: AttachFn) -> AttachFn:
        METHODS[name] = Method(name, attach, load_options, trains, params, packable, alone)
        return attach

    return decorator


def get_method(name: str) -> Method:
    return METHODS[name]


def why_alone(config: TrialConfig) -> str | None:
    """Why this configuration cannot share a pack (resources.pack), or None when it can."""
    method = METHODS[config.train.method]
    if method.alone:
        return f"method {method.name} {method.alone}"
    if not method.packable:
        packable = ", ".join(name for name, method in METHODS.items() if method.packable)
        return f"method {config.train.method} is not of the LoRA family ({packable})"
    if config.train.packing:
        return "train.packing (several examples in one row) does not combine with packed trials yet"
    return None


def pack_key(config: TrialConfig) -> str:
    """Configurations with equal keys can share a pack: the same base model (and 4-bit base, for
    qlora), data, evaluation, target modules, precision and resources. Everything else of the LoRA
    family may differ: learning rate, rank, alpha, dropout, weight decay, schedule, epochs, batch size, seed."""
    train = config.train
    shared = {
        "model": config.model.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "eval": config.eval.model_dump(mode="json"),
        "resources": config.resources.model_dump(mode="json"),
        "base": METHODS[train.method].quantized and (train.method, train.qlora_compute_dtype),
        "target_modules": list(train.target_modules),
        "precision": train.precision,
        "gradient_checkpointing": train.gradient_checkpointing,
    }
    return json.dumps(shared, sort_keys=True)


def attach_adapter(model: Any, train: TrainConfig) -> Any:
    """Wrap the frozen base model with the trial's adapter (or unfreeze it, for `full`)."""
    return METHODS[train.method].attach(model, train)


def lora_config(train: TrainConfig, **extra: Any) -> Any:
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


@register_method("lora", params=LORA_PARAMS, packable=True)
def attach_lora(model: Any, train: TrainConfig) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(train))


@register_method(
    "distill", params=DISTILL_PARAMS, alone="trains against a teacher model of its own, which a pack's shared base model does not hold"
)
def attach_distill(model: Any, train: TrainConfig) -> Any:
    """Distillation: a LoRA student trained to match train.teacher's top-k distribution (trainers.distill)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(train))


@register_method("dora", params=LORA_PARAMS)
def attach_dora(model: Any, train: TrainConfig) -> Any:
    """Weight-decomposed LoRA (peft's `use_dora`): LoRA on the direction, a learned magnitude."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(train, use_dora=True))


def _four_bit(train: TrainConfig) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    from trainers.model import torch_dtype

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(train.qlora_compute_dtype),
        )
    }


@register_method("qlora", params=QLORA_PARAMS, load_options=_four_bit, packable=True)
def attach_qlora(model: Any, train: TrainConfig) -> Any:
    """LoRA on a base model loaded in 4-bit NF4 (bitsandbytes; it runs on CPU too)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
    return get_peft_model(model, lora_config(train))


@register_method("prefix", params=VIRTUAL_TOKEN_PARAMS)
def attach_prefix(model: Any, train: TrainConfig) -> Any:
    """Prefix tuning: trained key/value prefixes in every layer."""
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=train.num_virtual_tokens))


@register_method("prompt", params=VIRTUAL_TOKEN_PARAMS)
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
