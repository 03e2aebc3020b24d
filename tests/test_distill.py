"""Distillation (method distill, trainers.distill): the loss against a computation by hand, the teacher's
cache, and a short training in-process on the real tiny model whose student moves toward its teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hpo.errors import SweepError
from hpo.spec import SweepSpec, load_sweep
from hpo.store import Store
from hpo.teacher import resolve_teacher
from trainers.config import EvalConfig, TrainConfig, TrialConfig
from trainers.data import batches, load_splits, tokenize
from trainers.distill import Distiller, distill_loss
from trainers.flops import FlopModel
from trainers.methods import why_alone
from trainers.model import load_base_model, pick_device
from trainers.vocabulary import TrialStatus
from trainers.worker import ADAPTER_DIR, baseline_answers, train


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def test_the_loss_is_alpha_t2_kl_of_the_renormalised_top_k_plus_the_rest_cross_entropy():
    # One row of 3 tokens over a vocabulary of 4: positions 0 and 1 predict labels 2 and 1; position 2 predicts nothing.
    student = [[1.0, 2.0, 0.5, -1.0], [0.0, 0.3, 1.5, 2.0], [9.0, 9.0, 9.0, 9.0]]
    teacher = [[3.0, 0.0, 2.0, 1.0], [0.5, 2.5, -1.0, 1.0]]  # at the two loss positions
    labels = [-100, 2, 1]
    k, t, alpha = 2, 2.0, 0.3

    kls, ces = [], []
    for position, target in ((0, 2), (1, 1)):
        top = sorted(range(4), key=lambda i: -teacher[position][i])[:k]  # ids 0, 2 then 1, 3
        p = _softmax([teacher[position][i] / t for i in top])  # renormalised over the top k
        q = _softmax([x / t for x in student[position]])  # the student's whole vocabulary
        kls.append(sum(pj * math.log(pj / q[i]) for pj, i in zip(p, top)))  # KL(teacher || student)
        ces.append(-math.log(_softmax(student[position])[target]))  # cross-entropy at temperature 1
    kl, ce = sum(kls) / 2, sum(ces) / 2
    expected = alpha * t**2 * kl + (1 - alpha) * ce

    values, ids = torch.tensor(teacher).topk(k, dim=-1)
    loss, got_kl, got_ce = distill_loss(torch.tensor([student]), torch.tensor([labels]), values, ids.int(), alpha, t)
    assert got_kl.item() == pytest.approx(kl, rel=1e-5) and got_ce.item() == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert kl > 0 and ce > 0 and expected != pytest.approx(alpha * kl + (1 - alpha) * ce)  # the T^2 factor is in


def test_alpha_zero_is_the_models_own_cross_entropy(tiny_model_dir, data):
    model, tokenizer = load_base_model(TrialConfig().model, torch.device("cpu"))
    batch = next(_eval_batches(data, tokenizer))
    distiller = Distiller(model, TrainConfig(method="distill", teacher="tiny", distill_alpha=0.0))
    with torch.no_grad():
        assert distiller.loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        assert distiller.kl(model, batch) >= 0  # the teacher is the model: only what lies outside the top k
    assert distiller.take_flops() == FlopModel.of(model).forward(*batch["input_ids"].shape)  # one teacher pass over the batch
    assert distiller.cache_bytes > 0
    with torch.no_grad():
        distiller.loss(model, batch)
    assert distiller.take_flops() == 0.0  # every row came from the cache: the teacher ran once per example


def _eval_batches(data, tokenizer):
    splits = load_splits(data, 4, tokenizer=tokenizer)
    return batches(tokenize(splits.eval, tokenizer, data.max_length), 8, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A teacher unlike the student: the tiny model with its last MLP perturbed, saved as a model folder."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for weights in (model.model.layers[-1].mlp.down_proj.weight, model.model.layers[-1].self_attn.o_proj.weight):
            weights.add_(torch.randn_like(weights) * weights.std() * 4)
    folder = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(folder)
    return folder


def test_a_student_moves_toward_its_teacher(data, teacher_dir, tmp_path):
    config = TrialConfig(
        data=data,
        train=TrainConfig(
            method="distill", teacher=str(teacher_dir), distill_alpha=1.0, distill_temperature=1.0, distill_top_k=8,
            epochs=2, learning_rate=3e-3, lora_r=8, lora_dropout=0.0, target_modules=("all-linear",),
        ),
        eval=EvalConfig(num_prompts=4, max_new_tokens=8, batch_size=8),
    )
    epochs: list[dict] = []

    def report(metrics, save) -> None:
        folder = tmp_path / str(metrics["epoch"])
        folder.mkdir()
        save(folder)
        epochs.append(metrics)

    result = train(config, baseline_answers(config).answers, report)
    assert result.status == TrialStatus.COMPLETED, result.error
    assert 0 < epochs[-1]["teacher_cache_gb"] < 0.01
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]  # at alpha 1, the KL to the teacher on the training rows
    first, second = epochs[0]["train_flops"], epochs[1]["train_flops"] - epochs[0]["train_flops"]
    assert first > 1.15 * second  # the teacher's passes, counted in the first epoch only (then cached)

    device = pick_device()
    base, tokenizer = load_base_model(config.model, device)
    distiller = Distiller.for_trial(config.train, config.model, device)

    def held_out_kl(model) -> float:
        return sum(distiller.kl(model, b) for b in _eval_batches(data, tokenizer))

    before = held_out_kl(base)
    after = held_out_kl(PeftModel.from_pretrained(base, tmp_path / "2" / ADAPTER_DIR).eval())
    assert after < 0.8 * before, (before, after)


def test_distill_parameters_belong_to_distill(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("train: {method: lora}\nsearch:\n  space:\n    distill_alpha: {grid: [0.5, 0.9]}\n")
    with pytest.raises(SweepError, match="lora does not use distill_alpha"):
        load_sweep(str(sweep))
    assert "teacher" in why_alone(TrialConfig(train=TrainConfig(method="distill", teacher="tiny")))


def test_a_teacher_named_by_an_earlier_sweep_is_its_best_kept_checkpoint(tmp_path):
    """best:<name> and <run folder>:<trial_id> resolve through a real store to the best epoch's `adapter` folder."""
    spec = SweepSpec()  # objectives: win_rate (max) first
    (tmp_path / "full").mkdir()
    store = Store.create(
        tmp_path / "full" / "results.db", name="full", sweep_file="sweeps/x.yaml", spec={**spec.model_dump(mode="json"), "overrides": []},
        searched=["learning_rate"], objectives=[o.model_dump() for o in spec.objectives], versions={}, git_commit=None,
    )  # fmt: skip
    for trial, rates in {"a": [0.4, 0.7, 0.6], "b": [0.5, 0.65, 0.9], "c": [0.95]}.items():
        store.add_trial(trial, {"learning_rate": 0.001})
        for epoch, rate in enumerate(rates, 1):
            store.add_epoch(trial, epoch, {"win_rate": rate, "eval_ppl": 2.0})
            checkpoint = tmp_path / "tune" / trial / str(epoch)
            (checkpoint / "adapter").mkdir(parents=True)
            store.set_checkpoint(trial, epoch, str(checkpoint))
        store.set_trial_status(trial, TrialStatus.COMPLETED if trial != "c" else TrialStatus.ERROR)  # c failed: never a teacher
    store.set_checkpoint("b", 3, None)  # b's best epoch was not kept: its next best that was
    store.close()

    assert resolve_teacher("best:full", str(tmp_path)).location == str(tmp_path / "tune" / "a" / "2" / "adapter")
    assert resolve_teacher(f"{tmp_path / 'full'}:b", None).location == str(tmp_path / "tune" / "b" / "2" / "adapter")
    assert resolve_teacher("best:full", str(tmp_path)).tokenizer_of == spec.model
    assert resolve_teacher("tiny").location == "tiny"


def test_an_adapter_teacher_loads_merged_into_its_base_model(tiny_model_dir, tmp_path):
    """An earlier LoRA trial's checkpoint (an adapter folder) teaches as its base model with the adapter merged."""
    from peft import LoraConfig, get_peft_model

    from trainers.distill import load_teacher

    torch.manual_seed(0)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    teacher = load_teacher(str(tmp_path / "adapter"), torch.device("cpu"))
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits, atol=1e-3)
        assert torch.allclose(teacher(input_ids=ids).logits, expected, atol=1e-4)
