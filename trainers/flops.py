"""Compute cost in floating-point operations, from what a trial processed: deterministic, unlike seconds.

Only matrix multiplications are counted (as `torch.utils.flop_counter.FlopCounterMode` does), 2 FLOPs
per multiply-add. Per token of a forward pass, the model's linear layers cost 2 x their weights
(the output layer included); attention costs 4 x layers x attention width x the keys each query sees.
A training step adds the backward pass:

- gradients with respect to the inputs of every layer, as much as the forward (every method that
  trains needs them to reach its trainable weights, even through a frozen base);
- gradients with respect to the weights, as much as the forward again, but only for the weights that
  train: all of them for `full` (so full fine-tuning is about 6 x params x tokens), the adapter's
  for the LoRA family (so LoRA costs about 4 x base params x tokens plus 6 x adapter params x tokens);
- attention's backward, twice its forward;
- with gradient checkpointing, the forward once more, but for the output layer;
- DoRA with dropout: its layers' base matmul once more, forward and input gradient (peft runs it
  again on the dropped-out input).

Approximations, checked against FlopCounterMode on the tiny model (tests/test_flops.py: full and
prompt exact, lora, prefix and IA3 within 5 %, DoRA and gradient checkpointing within 8 %):
element-wise work (norms, activations, softmax, the loss, IA3's rescaling, DoRA's weight norm) is
left out; the first layer's projections of frozen embeddings need no input gradient, which the
count includes anyway; a quantized base (qlora) counts as its unquantized matmuls. Padding tokens
count: they go through every matmul. So does the masked part of a `train.packing` row: its
examples are kept apart by the attention mask, and the count is that of a kernel that computes the
whole masked square (as SDPA does), (sum of lengths)^2 per row, not the sum of squares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FlopModel:
    """What a model costs per token and per attention pair, and what its training computes gradients for."""

    base_params: int  # weights of the base model's linear layers (the output layer included)
    head_params: int  # of those, the output layer's (gradient checkpointing does not recompute it)
    adapter_params: int  # weights of an adapter's linear layers (LoRA's A and B)
    layers: int
    attention_width: int  # query heads x head size
    prefix_tokens: int = 0  # prefix tuning: keys every query also sees, in every layer
    prompt_tokens: int = 0  # prompt tuning: virtual tokens before every input row
    base_trains: bool = False  # full fine-tuning: the base weights get gradients
    redone_params: int = 0  # base weights whose matmul training runs twice (DoRA with dropout: peft recomputes it)
    recompute: bool = False  # gradient checkpointing: the forward runs again in the backward

    @classmethod
    def of(cls, model: Any, *, gradient_checkpointing: bool = False) -> "FlopModel":
        """Read the sizes off a (peft-wrapped) causal LM, after its method was attached."""
        import torch

        base = adapter = redone = 0
        base_trains = False
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if _dora_with_dropout(module):
                redone += module.base_layer.in_features * module.base_layer.out_features
            if not isinstance(module, torch.nn.Linear):  # bitsandbytes' 4-bit layers are Linear too
                continue
            weights = module.in_features * module.out_features  # a 4-bit weight's numel is packed: use the shape
            if ".lora_" in f".{name}":
                adapter += weights
            else:
                base += weights
                base_trains = base_trains or module.weight.requires_grad
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _first(config, "num_attention_heads", "n_head")
        hidden = _first(config, "hidden_size", "n_embd", "d_model")
        head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
        prefix = prompt = 0
        peft_config = getattr(model, "peft_config", {}).get("default")
        kind = str(getattr(peft_config, "peft_type", ""))
        if kind.endswith("PREFIX_TUNING"):
            prefix = peft_config.num_virtual_tokens
        elif kind.endswith("PROMPT_TUNING"):
            prompt = peft_config.num_virtual_tokens
        return cls(
            base_params=base,
            head_params=head.in_features * head.out_features if isinstance(head, torch.nn.Linear) else 0,
            adapter_params=adapter,
            layers=layers,
            attention_width=heads * head_dim,
            prefix_tokens=prefix,
            prompt_tokens=prompt,
            base_trains=base_trains,
            redone_params=redone,
            recompute=gradient_checkpointing,
        )

    def forward(self, rows: int, length: int, cached: int = 0) -> float:
        """A forward pass of `rows` x `length` new tokens, each also attending to `cached` earlier ones."""
        length += self.prompt_tokens if not cached else 0  # virtual tokens come with the first pass only
        keys = cached + length + self.prefix_tokens
        linear = 2.0 * (self.base_params + self.adapter_params) * rows * length
        return linear + self._attention(rows, length, keys)

    def train_step(self, rows: int, length: int) -> float:
        """One micro-batch of training: forward, backward, and the recomputed forward if any."""
        tokens = rows * (length + self.prompt_tokens)
        keys = length + self.prompt_tokens + self.prefix_tokens
        forward = self.forward(rows, length)
        input_grads = 2.0 * (self.base_params + self.adapter_params) * tokens
        weight_grads = 2.0 * (self.adapter_params + (self.base_params if self.base_trains else 0)) * tokens
        backward = input_grads + weight_grads + 2 * self._attention(rows, length + self.prompt_tokens, keys)
        backward += 4.0 * self.redone_params * tokens  # the repeated matmul, forward and input gradient
        recomputed = forward - 2.0 * self.head_params * tokens if self.recompute else 0.0
        return forward + backward + recomputed

    def generation(self, rows: int, prompt_length: int, new_tokens: int, cached: bool = True) -> float:
        """Answering `rows` prompts of `prompt_length` (padded) with `new_tokens` steps: with a KV cache,
        one pass over the prompts, then one token per step; without (prefix and prompt tuning), every
        step runs the whole sequence so far."""
        if new_tokens <= 0:
            return 0.0
        if not cached:
            return sum(self.forward(rows, prompt_length + step) for step in range(new_tokens))
        # `generate` computes the prompt pass's logits at its last position only.
        prompt_pass = self.forward(rows, prompt_length) - 2.0 * self.head_params * rows * (prompt_length + self.prompt_tokens - 1)
        return prompt_pass + sum(
            self.forward(rows, 1, cached=prompt_length + self.prompt_tokens + step) for step in range(new_tokens - 1)
        )

    def over(self, batches: Any) -> float:
        """Forward passes over `batches` (dicts with `input_ids`), as perplexity runs them."""
        return sum(self.forward(*batch["input_ids"].shape) for batch in batches)

    def answers(self, passes: list[tuple[int, int, int, bool]], rows: int | None = None) -> float:
        """The generations `trainers.evaluate.generate_answers` recorded in `passes`; `rows`: count
        that many rows of each (a packed member's share of a shared generation)."""
        return sum(self.generation(rows or n, length, new, cached) for n, length, new, cached in passes)

    def _attention(self, rows: int, queries: int, keys: int) -> float:
        return 4.0 * self.layers * self.attention_width * rows * queries * keys


def _dora_with_dropout(module: Any) -> bool:
    """A peft LoRA layer with DoRA and dropout: in training, peft 0.21 runs its base layer's matmul again
    on the dropped-out input (peft/tuners/lora/variants.py), since the base result of the undropped one cannot serve."""
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    dropouts = getattr(module, "lora_dropout", None)
    if not magnitudes or dropouts is None or not hasattr(module, "base_layer"):
        return False
    return any(getattr(d, "p", 0) > 0 for d in dropouts.values())


def _first(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 0
