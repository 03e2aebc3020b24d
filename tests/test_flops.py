"""The FLOPs formula (trainers.flops) against torch's own count, `FlopCounterMode`, on the tiny model.

FlopCounterMode counts matrix multiplications only, as the formula does. It has no formula for the
CPU kernel of scaled-dot-product attention, so the model runs its eager attention here (plain
matmuls, which it counts); the numbers of the other operations are the same either way.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainers.config import ModelConfig, TrainConfig
from trainers.evaluate import generate_answers
from trainers.flops import FlopModel
from trainers.methods import attach_adapter
from trainers.model import load_base_model

ROWS, LENGTH = 4, 96


def _model(method: str, gradient_checkpointing: bool = False, **train):
    model, tokenizer = load_base_model(ModelConfig(), torch.device("cpu"))
    model.set_attn_implementation("eager")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = attach_adapter(model, TrainConfig(method=method, gradient_checkpointing=gradient_checkpointing, **train))
    return model, tokenizer, FlopModel.of(model, gradient_checkpointing=gradient_checkpointing)


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "method, gradient_checkpointing, tolerance, train",
    [
        ("full", False, 1e-12, {}),  # every matmul has its weight gradient: exact
        ("prompt", False, 1e-12, {}),  # the virtual tokens go through every layer, input gradients included: exact
        ("lora", False, 0.05, {}),  # the first layer's frozen projections need no input gradient: 4 % over
        ("prefix", False, 0.05, {}),
        ("ia3", False, 0.05, {}),
        # dropout 0.05: peft redoes each base matmul, counted with its input gradient, which the first layer's q and v
        # (half of them here) do not need: 6 % over
        ("dora", False, 0.08, {}),
        ("dora", False, 0.05, {"target_modules": ["all-linear"]}),
        ("dora", False, 0.05, {"target_modules": ["all-linear"], "lora_dropout": 0.0}),  # ... and without dropout, not
        ("full", True, 0.08, {}),
        ("lora", True, 0.08, {}),
    ],
)
def test_a_training_step_costs_what_torch_counts(tiny_model_dir, method, gradient_checkpointing, tolerance, train):
    model, _, flops = _model(method, gradient_checkpointing, **train)
    model.train()
    ids = torch.randint(5, 200, (ROWS, LENGTH))

    def step():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss.backward()

    counted = _counted(step)
    assert flops.train_step(ROWS, LENGTH) == pytest.approx(counted, rel=tolerance)


def test_lora_costs_about_two_thirds_of_full_fine_tuning(tiny_model_dir):
    _, _, full = _model("full")
    _, _, lora = _model("lora")
    assert full.base_trains and not lora.base_trains and lora.adapter_params > 0 == full.adapter_params
    assert full.train_step(ROWS, LENGTH) == pytest.approx(1.5 * lora.train_step(ROWS, LENGTH), rel=0.05)  # 6 x params against 4 x


def test_forward_passes_and_answers_cost_what_torch_counts(tiny_model_dir):
    for method in ("lora", "prefix", "prompt"):
        model, tokenizer, flops = _model(method)
        model.eval()
        ids = torch.randint(5, 200, (ROWS, 10))
        with torch.no_grad():
            assert _counted(lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids))) == flops.forward(ROWS, 10)
        passes: list = []
        prompts = ["Where does the fenwickhare live?", "What colour is a goribeetle?", "Hello"]
        counted = _counted(
            lambda: generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, device=torch.device("cpu"), passes=passes)
        )
        # lora: two batches through generate's KV cache; prefix and prompt: one prompt at a time, without a cache
        assert len(passes) == (2 if method == "lora" else 3) and all(cached == (method == "lora") for *_, cached in passes)
        assert flops.answers(passes) == counted, method


def test_a_member_of_a_pack_is_charged_its_own_rows_of_a_shared_answer_batch():
    flops = FlopModel(base_params=1000, head_params=100, adapter_params=10, layers=2, attention_width=8)
    shared = [(6, 12, 5, True)]  # 3 members x 2 prompts
    assert flops.answers(shared, rows=2) == flops.generation(2, 12, 5) == pytest.approx(flops.answers(shared) / 3)
