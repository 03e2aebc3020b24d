"""Packed trials (trainers.packed): configurations that share one base model train as they would alone.

In-process, on the real tiny model and the small task; then a packed sweep through Ray Tune: ASHA,
the store, checkpoints, and a pack worker killed with -9.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hpo.spec import SweepSpec
from tests.conftest import PACKED_EPOCHS, PACKED_LEARNING_RATES
from trainers.config import DataConfig, EvalConfig, TrainConfig, TrialConfig
from trainers.methods import pack_key, why_alone
from trainers.packed import Pack, routed, train_packed
from trainers.vocabulary import TrialStatus
from trainers.worker import ADAPTER_DIR, STATE_FILE, baseline_answers, load_state, train

# Members that differ in everything a pack lets differ: learning rate, rank, alpha, weight decay,
# schedule and warmup, batch size, seed, epochs; dropout 0, so that a member's training is deterministic.
# a, the pack's first adapter (peft's active one), leaves after its one epoch: the others train on.
MEMBERS = {
    "a": {"learning_rate": 3e-3, "lora_r": 4, "lora_alpha": 8, "epochs": 1},
    "b": {"learning_rate": 1e-3, "lora_r": 8, "lora_alpha": 32, "weight_decay": 0.1, "lr_schedule": "cosine", "warmup_steps": 3},
    "c": {"learning_rate": 5e-3, "lora_r": 2, "lora_alpha": 4, "batch_size": 4, "seed": 7, "max_grad_norm": 0.5},
}


def _config(data: DataConfig, **train: object) -> TrialConfig:
    return TrialConfig(
        data=data,
        train=TrainConfig(**{"epochs": 2, "lora_dropout": 0.0, **train}),
        eval=EvalConfig(num_prompts=4, max_new_tokens=8, batch_size=3),
    )


@pytest.fixture(scope="module")
def baseline(data, tiny_model_dir) -> list[str]:
    return baseline_answers(_config(data)).answers


def _run(tmp: Path, trainer) -> tuple[dict, dict]:
    """member -> list of epoch metrics, member -> {epoch: checkpoint folder}."""
    metrics: dict[str, list] = {}
    folders: dict[str, dict[int, Path]] = {}

    def report(member: str, epoch_metrics, save) -> None:
        folder = tmp / member / str(epoch_metrics["epoch"])
        folder.mkdir(parents=True)
        save(folder)
        metrics.setdefault(member, []).append(epoch_metrics)
        folders.setdefault(member, {})[epoch_metrics["epoch"]] = folder

    return trainer(report), metrics, folders


@pytest.fixture(scope="module")
def solo(data, baseline, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("solo")

    def trainer(report):
        return {
            member: train(_config(data, **values), baseline, lambda m, save, member=member: report(member, m, save))
            for member, values in MEMBERS.items()
        }

    return _run(tmp, trainer)


@pytest.fixture(scope="module")
def packed(data, baseline, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    configs = {member: _config(data, **values) for member, values in MEMBERS.items()}
    return _run(tmp, lambda report: train_packed(configs, baseline, report))


def test_every_member_completes_with_its_own_epochs(packed):
    results, metrics, _ = packed
    assert {m: r.status for m, r in results.items()} == dict.fromkeys(MEMBERS, TrialStatus.COMPLETED)
    assert [m["epoch"] for m in metrics["a"]] == [1]
    for member in ("b", "c"):
        assert [m["epoch"] for m in metrics[member]] == [1, 2]
        assert metrics[member][0]["trainable_params"] == metrics[member][1]["trainable_params"] > 0
    # c takes batches of 4, so twice the steps per epoch: a and b have left the pack when c's first epoch ends.
    assert [m["pack_size"] for m in metrics["a"]] == [3] and [m["pack_size"] for m in metrics["b"]] == [2, 2]
    assert [m["pack_size"] for m in metrics["c"]] == [1, 1]
    assert metrics["b"][0]["trainable_params"] == 2 * metrics["a"][0]["trainable_params"]  # rank 8 against rank 4


def test_a_packed_member_trains_exactly_as_it_would_alone(solo, packed):
    _, solo_metrics, solo_folders = solo
    _, packed_metrics, packed_folders = packed
    for member in MEMBERS:
        last = max(solo_folders[member])
        assert max(packed_folders[member]) == last
        alone = load_state(solo_folders[member][last] / STATE_FILE)["trainable"]
        together = load_state(packed_folders[member][last] / STATE_FILE)["trainable"]
        assert alone.keys() == together.keys() and alone
        for name in alone:  # relative to the tensor: elements near 0 differ by float rounding (padding widths differ in a pack)
            error = float((together[name] - alone[name]).norm() / alone[name].norm())
            assert error <= 1e-5, f"{member}: {name}: relative difference {error:.2e}"
        for epoch in range(last):
            a, b = solo_metrics[member][epoch], packed_metrics[member][epoch]
            assert b["eval_ppl"] == pytest.approx(a["eval_ppl"], rel=1e-4)
            assert b["retention_ppl"] == pytest.approx(a["retention_ppl"], rel=1e-4)
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
            assert b["answers"] == a["answers"]  # greedy: the same answers as alone
            assert b["tokens_trained"] == a["tokens_trained"]
            assert b["train_flops"] == a["train_flops"] > 0  # charged its own batches, as alone
            assert b["eval_flops"] >= a["eval_flops"] > 0  # a shared answer batch runs until its longest answer ends
            assert b["judge_parse_rate"] is a["judge_parse_rate"] is None  # reported, and None: the reference judge parses no reply
    # The members really differ: each trained its own configuration.
    assert len({round(packed_metrics[m][-1]["eval_ppl"], 6) for m in MEMBERS}) == len(MEMBERS)


def test_a_packed_checkpoint_loads_with_peft_and_resumes_alone(packed, data, baseline, tiny_model_dir):
    _, metrics, folders = packed
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, folders["b"][2] / ADAPTER_DIR)
    assert model.peft_config["default"].r == MEMBERS["b"]["lora_r"]
    # Epoch 1's checkpoint of a packed member resumes in a solo trial to the packed run's epoch 2.
    resumed: list = []
    result = train(_config(data, **MEMBERS["b"]), baseline, lambda m, save: resumed.append(m), folders["b"][1])
    assert result.status == TrialStatus.COMPLETED
    assert [m["epoch"] for m in resumed] == [2]
    assert resumed[0]["eval_ppl"] == pytest.approx(metrics["b"][1]["eval_ppl"], rel=1e-4)


def test_members_without_routing_would_mix(packed, data, tiny_model_dir):
    """The check the routing exists for: a row routed to one adapter sees that adapter alone."""
    pack = Pack(_config(data, **MEMBERS["a"]), 2)
    ended = []
    for member in ("a", "b"):
        pack.add(member, _config(data, **MEMBERS[member]), [], lambda *_: None, ended.append)
    with torch.no_grad():
        for layer in pack.peft_model.modules():
            if hasattr(layer, "lora_B") and "member2" in layer.lora_B:
                layer.lora_B["member2"].weight.fill_(1.0)  # only b's adapter changes anything
        ids = torch.tensor([[1, 2, 3, 4]])
        pack.peft_model.eval()
        with routed(pack.peft_model, "member1"):
            first = pack.peft_model(input_ids=ids).logits
        with routed(pack.peft_model, ["member1", "member2"]):
            both = pack.peft_model(input_ids=ids.repeat(2, 1)).logits
    torch.testing.assert_close(both[0], first[0])
    assert not torch.allclose(both[1], first[0])


def test_a_diverging_member_ends_alone_and_the_others_go_on(data, baseline):
    """With gradient checkpointing too: the backward's recomputation still sees the diverged member's adapter."""
    sane = _config(data, **{**MEMBERS["a"], "epochs": 1, "gradient_checkpointing": True})
    wild = _config(data, **{**MEMBERS["a"], "epochs": 2, "learning_rate": 0.9, "lora_alpha": 1e9, "gradient_checkpointing": True})
    epochs: list = []
    results = train_packed({"sane": sane, "wild": wild}, baseline, lambda member, metrics, save: epochs.append(member))
    assert results["sane"].status == TrialStatus.COMPLETED
    assert results["wild"].status == TrialStatus.DIVERGED
    assert "training loss" in results["wild"].error
    assert epochs == ["sane"]  # the sane member's epoch was evaluated after the wild one left


def test_over_the_memory_cap_the_largest_member_leaves_first(data, baseline):
    """resources.max_memory_gb on a CPU: after a step over the cap, the member with the most tokens in
    it ends as oom, then the next; none fails with an error."""
    def capped(**train):
        config = _config(data, **{**MEMBERS["a"], **train})
        return config.model_copy(update={"resources": config.resources.model_copy(update={"max_memory_gb": 0.001})})

    results = train_packed({"small": capped(batch_size=2), "large": capped(batch_size=8)}, baseline, lambda *_: None)
    assert {m: r.status for m, r in results.items()} == {"small": TrialStatus.OOM, "large": TrialStatus.OOM}
    assert "max_memory_gb" in results["large"].error and "in a pack of 2" in results["large"].error
    assert "in a pack of 1" in results["small"].error  # the large one, with 4x the tokens, left first


def test_a_member_trains_on_only_once_its_last_report_was_taken(data, baseline):
    pack = Pack(_config(data, **MEMBERS["a"]), 1)
    reports: list = []
    pack.add("a", _config(data, **{**MEMBERS["a"], "epochs": 2}), baseline, lambda m, save: reports.append(m["epoch"]), lambda r: None)
    while not reports:
        pack.step()
    assert pack.training == []  # paused at its report of epoch 1
    pack.proceed("a", 0)  # an acknowledgement sent before epoch 1 was reported
    assert pack.training == []
    pack.proceed("a", 1)
    assert [m.id for m in pack.training] == ["a"]


def test_which_configurations_run_alone(data):
    assert why_alone(_config(data)) is None
    assert "not of the LoRA family" in why_alone(_config(data, method="dora"))
    assert "not of the LoRA family" in why_alone(_config(data, method="prefix", num_virtual_tokens=4))
    assert "train.packing" in why_alone(_config(data, packing=True))
    assert pack_key(_config(data, learning_rate=1e-3, lora_r=32)) == pack_key(_config(data))
    assert pack_key(_config(data, target_modules=["q_proj"])) != pack_key(_config(data))


# --- a packed sweep through Ray Tune (tests/conftest.py: _packed_run) -------------------------------


def _store(run):
    from hpo.store import Store

    store = Store.open(run.db)
    try:
        trials = {t["trial_id"]: t for t in store.trials()}
        epochs: dict[str, list] = {}
        for epoch in store.epochs():
            epochs.setdefault(epoch["trial_id"], []).append(epoch)
        return trials, epochs
    finally:
        store.close()


def test_a_packed_sweep_keeps_each_configuration_its_own_trial(packed_run):
    """Each configuration is a trial of its own: its status, epochs, checkpoint. ASHA decides for each
    at its rungs: the one that learns nothing (it reports last at the first rung) stops there, the
    best (1e-2, first at every rung) trains to the end, and every epoch is in the store once."""
    trials, epochs = _store(packed_run)
    by_rate = {t["params"]["learning_rate"]: t for t in trials.values()}
    assert sorted(by_rate) == sorted(PACKED_LEARNING_RATES)
    assert by_rate[1e-9]["status"] == TrialStatus.EARLY_STOPPED and len(epochs[by_rate[1e-9]["trial_id"]]) == 1
    assert by_rate[1e-2]["status"] == TrialStatus.COMPLETED and len(epochs[by_rate[1e-2]["trial_id"]]) == PACKED_EPOCHS
    for trial_id, rows in epochs.items():
        assert [e["epoch"] for e in rows] == list(range(1, len(rows) + 1)), trial_id  # each epoch once
    first = [e for rows in epochs.values() for e in rows if e["epoch"] == 1]
    assert {e["pack_size"] for e in first} == {len(PACKED_LEARNING_RATES)}  # all three trained in one pack
    assert {e["worker_pid"] for e in first} == {packed_run.killed_pid}  # the pack's process, not the members'
    assert "packed trials: up to 4 configurations" in packed_run.proc.stderr


def test_a_pack_worker_without_qlora_never_imports_bitsandbytes(packed_run):
    """Its members' answers are generated in the pack worker, whose process skipped bitsandbytes
    (hpo.packs: trainers.methods.without_bitsandbytes), as the base model's task did."""
    assert "trial:absent" in packed_run.bitsandbytes and "base:absent" in packed_run.bitsandbytes
    assert not [line for line in packed_run.bitsandbytes if line.endswith(":imported")], packed_run.bitsandbytes


def test_a_killed_pack_worker_resumes_each_member_from_its_own_checkpoint(packed_run, tiny_model_dir):
    """After kill -9 of the pack worker, Tune restarted the members from their checkpoints in a new
    pack: later epochs ran in another process and say which epoch they resumed from; each epoch's
    perplexity is the one an unpacked, uninterrupted training of that configuration gives."""
    from hpo.store import Store

    trials, epochs = _store(packed_run)
    store = Store.open(packed_run.db)
    spec = SweepSpec.from_store(store.sweep()["spec"], store.path)
    store.close()
    resumed = 0
    for trial in trials.values():
        rows = epochs[trial["trial_id"]]
        if len(rows) > 2:  # it trained on after the kill
            assert rows[-1]["worker_pid"] != packed_run.killed_pid
            assert rows[-1]["resumed_from_epoch"] >= 1  # from its own checkpoint, not from scratch
            resumed += 1
        alone: list = []
        config = spec.trial_config(trial["params"])
        # an early-stopped trial: its first epochs (the learning rate is constant: they do not depend on the total)
        config = config.model_copy(update={"train": config.train.model_copy(update={"epochs": len(rows)})})
        train(config, [""] * 4, lambda metrics, save: alone.append(metrics["eval_ppl"]))
        assert [e["eval_ppl"] for e in rows] == pytest.approx(alone, rel=1e-4), trial["params"]
    assert resumed >= 1


def test_a_packed_trials_best_adapter_loads_with_peft(packed_run, tiny_model_dir):
    trials, epochs = _store(packed_run)
    checkpoints = [e["checkpoint"] for rows in epochs.values() for e in rows if e["checkpoint"]]
    assert checkpoints
    for folder in checkpoints:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), Path(folder) / ADAPTER_DIR)
        assert model.peft_config["default"].r == 4


def test_a_model_whose_logits_change_after_the_output_layer_trains_on_the_whole_forward(solo, data, baseline, monkeypatch):
    """Where the output layer alone does not give the model's logits (soft-capping, scaling: checked as
    the pack starts), the pack takes each member's loss from the whole model's logits instead; the
    same training."""
    import trainers.packed

    monkeypatch.setattr(trainers.packed, "_head_gives_the_logits", lambda model, device: False)
    _, solo_metrics, _ = solo
    metrics: dict[str, list] = {}
    configs = {m: _config(data, **MEMBERS[m]) for m in ("a", "b")}
    results = train_packed(configs, baseline, lambda member, m, save: metrics.setdefault(member, []).append(m))
    assert {r.status for r in results.values()} == {TrialStatus.COMPLETED}
    for member in configs:
        assert [m["eval_ppl"] for m in metrics[member]] == pytest.approx([m["eval_ppl"] for m in solo_metrics[member]], rel=1e-4)
        assert [m["answers"] for m in metrics[member]] == [m["answers"] for m in solo_metrics[member]]
