"""A model folder's tokenizer without transformers (and so without torch): for the checks made before
a sweep starts, which only count tokens and render chat templates.

It loads `tokenizer.json` with the tokenizers package and applies what transformers 5 adds when
its `TokenizersBackend` loads the same folder: the special tokens of `tokenizer_config.json` (and,
for older folders, `special_tokens_map.json`), and the chat template of `chat_template.jinja` or
the config, rendered in a Jinja environment set up as transformers sets up its own. Special tokens
(BOS) are added by the tokenizer.json's post-processor alone, as in transformers, which ignores the
config's add_bos_token/add_eos_token when a tokenizer.json is there.

Folders that transformers loads with a tokenizer class of the model's own (which may rebuild the
pipeline from the vocabulary) raise `UnsupportedTokenizer`: load those with AutoTokenizer.
It offers what the data checks use: `__call__`, the BOS and EOS tokens and ids, `chat_template`
and `apply_chat_template(..., tokenize=False)`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from trainers.data import first_line

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The tokenizer_class values for which transformers loads tokenizer.json as it is (TokenizersBackend).
BACKEND_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS (models/auto/tokenization_auto.py): for these
# model types AutoTokenizer uses the model's own class whatever tokenizer_config.json says.
# tests/test_light_tokenizer.py checks that this copy covers the installed transformers' list (5.24 and 5.25 tried).
MODEL_TYPES_WITH_OWN_CLASS = frozenset({
    "arctic", "chatlm", "ernie4_5", "ernie4_5_moe", "fuyu", "h2ovl_chat", "hyperclovax", "hyperclovax_vlm",
    "hyperclovax_vision_v2", "internlm2", "internlm3", "iquestcoder", "jamba", "llava", "llava_next", "minicpm3",
    "minicpmv", "minimax_m2", "modernbert", "modernbert-decoder", "molmo", "molmo2", "nemotron", "nvfp4", "opencua",
    "openvla", "paddleocr_vl", "phi3", "phi3_v", "phimoe", "qwen2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text",
    "qwen4_exp", "step3_vl", "vipllava", "cohere_asr", "camembertv2-base", "siglip2", "smolvlm",
})  # fmt: skip


class UnsupportedTokenizer(Exception):
    """A folder whose tokenizer transformers builds otherwise than from its tokenizer.json alone; the message says why."""


class LightTokenizer:
    """A saved tokenizer as transformers' TokenizersBackend loads it: token ids, special tokens, chat template."""

    def __init__(self, backend: Tokenizer, special_tokens: dict[str, str], chat_template: str | dict[str, str] | None):
        self.backend = backend
        self.special_tokens_map = special_tokens  # name -> text, as transformers passes them to chat templates
        self.chat_template = chat_template

    @classmethod
    def from_folder(cls, folder: str | Path) -> LightTokenizer:
        """The tokenizer saved in `folder`; UnsupportedTokenizer for one transformers would build otherwise,
        ValueError (one line) for unreadable files."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        _check_supported(folder, config)
        try:
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises plain Exceptions for a malformed file
            raise ValueError(f"{folder / 'tokenizer.json'}: {first_line(exc)}") from None
        backend.no_truncation()  # transformers encodes without them unless asked
        backend.no_padding()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        named = _special_tokens(folder, config, backend)
        return cls(backend, {name: str(token) for name, token in named.items() if token is not None}, _chat_template(folder, config))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self.eos_token)

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        found = self.backend.token_to_id(token)
        unk = self.special_tokens_map.get("unk_token")
        return found if found is not None or unk is None else self.backend.token_to_id(unk)  # as transformers: unknown is unk

    def apply_chat_template(self, messages: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool = False) -> str:
        """The conversation rendered with the chat template, as text (`tokenize` must be False)."""
        if tokenize:
            raise ValueError("LightTokenizer.apply_chat_template renders text only: pass tokenize=False")
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        chat = [{key: value for key, value in message.items() if value is not None} for message in messages]
        template = _compile(self._template())
        return template.render(messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self.special_tokens_map)

    def _template(self) -> str:
        """The template in use: the only one, or the one named "default" (transformers' choice without tools)."""
        if isinstance(self.chat_template, dict):
            if "default" in self.chat_template:
                return self.chat_template["default"]
            raise ValueError(
                "This model has multiple chat templates with no default specified! Please either pass a chat template or the name of "
                f"the template you wish to use to the `chat_template` argument. Available template names are {sorted(self.chat_template)}."
            )
        if self.chat_template is None:
            raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set")
        return self.chat_template


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _check_supported(folder: Path, config: dict[str, Any]) -> None:
    """Refuse what AutoTokenizer would load with another class or other files than tokenizer.json."""
    declared = config.get("tokenizer_class")
    if declared not in BACKEND_CLASSES:
        raise UnsupportedTokenizer(f"tokenizer_class {declared!r}: transformers loads it with a class of its own")
    if "auto_map" in config:
        raise UnsupportedTokenizer("auto_map: the model ships its own tokenizer code")
    if "fast_tokenizer_files" in config or config.get("fix_mistral_regex"):
        raise UnsupportedTokenizer("versioned tokenizer files or a patched regex: left to transformers")
    if (folder / "tekken.json").exists() or (folder / "added_tokens.json").exists():
        raise UnsupportedTokenizer("a Mistral tekken.json or a legacy added_tokens.json: left to transformers")
    model_type = _read_json(folder / "config.json").get("model_type")
    if model_type in MODEL_TYPES_WITH_OWN_CLASS:
        raise UnsupportedTokenizer(f"model_type {model_type!r}: transformers loads its tokenizer with the model's own class")


def _added_token(value: Any, **defaults: Any) -> Any:
    """A serialized AddedToken (a dict) as one; anything else as it is."""
    if isinstance(value, dict) and "content" in value:
        fields = {k: v for k, v in value.items() if k not in ("__type", "id")}
        return AddedToken(**{**fields, **defaults})
    return value


def _special_tokens(folder: Path, config: dict[str, Any], backend: Tokenizer) -> dict[str, Any]:
    """The named special tokens (standard and model-specific), after adding them and the extra ones to `backend`
    the way transformers' TokenizersBackend does when it loads the folder (same tokens, same order, same flags)."""
    config = dict(config)
    if "added_tokens_decoder" in config:
        decoder = {int(i): _added_token(token) for i, token in config["added_tokens_decoder"].items()}
    else:  # older folders: special_tokens_map.json overrides the config; tokenizer.json's added tokens are the decoder
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            if key == "extra_special_tokens" and isinstance(value, list):
                existing = list(config.get("extra_special_tokens") or [])
                value = existing + [t for t in (_added_token(v, special=True) for v in value) if t not in existing]
            elif isinstance(value, dict) and key != "extra_special_tokens":
                value = _added_token({k: v for k, v in value.items() if k != "special"}, special=True)
            config[key] = value
        decoder = backend.get_added_tokens_decoder()
    if "additional_special_tokens" in config and not config.get("extra_special_tokens"):
        config["extra_special_tokens"] = config.pop("additional_special_tokens")
    by_content = {str(token): token for token in decoder.values()}

    named: dict[str, Any] = {}
    for key, value in config.items():
        value = _added_token(value)
        if key in SPECIAL_TOKEN_NAMES:
            named[key] = by_content.get(str(value), value) if value is not None else None
        elif key.endswith("_token") and isinstance(value, (str, AddedToken)):
            named[key] = value  # model-specific, e.g. image_token: chat templates see these too
    extra_value = config.get("extra_special_tokens")
    if isinstance(extra_value, dict):
        named.update({key: _added_token(value) for key, value in extra_value.items()})
        extra_value = None
    extra = [_added_token(token) for token in extra_value or []]
    named = {key: named[key] for key in [*SPECIAL_TOKEN_NAMES, *named] if key in named}  # standard names first, as transformers
    for key, value in named.items():
        if value is not None and not isinstance(value, (str, AddedToken)):
            raise UnsupportedTokenizer(f"{key}: a value transformers does not take ({type(value).__name__})")

    # transformers re-adds every added token of the decoder (sorted by id), then the special tokens it lacks.
    to_add = [decoder[i] for i in sorted(decoder)]
    known = {token.content for token in backend.get_added_tokens_decoder().values()} | {str(t) for t in to_add}
    for token in [*named.values(), *extra]:
        if token is not None and str(token) not in known and token not in to_add:
            to_add.append(token)
    named_texts = {str(token) for token in named.values() if token}
    tokens = []
    for token in to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and str(token) in named_texts:
            token.special = True
        tokens.append(token)
    if tokens:
        backend.add_tokens(tokens)
    return named


def _chat_template(folder: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """chat_template.jinja and additional_chat_templates/*.jinja when present (they win), else the config's chat_template."""
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for path in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = config.get("chat_template")
    if isinstance(template, list):  # several, saved as [{name, template}, ...]
        return {entry["name"]: entry["template"] for entry in template}
    return template


@lru_cache
def _compile(template: str) -> Any:
    """The template compiled in the environment transformers renders chat templates in
    (transformers.utils.chat_template_utils: sandboxed, the same options, filters and globals)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit()) < (3, 1, 6):
        raise ImportError(f"apply_chat_template requires jinja2>=3.1.6 (chat templates are untrusted code); found {jinja2.__version__}")

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's text with it; rendered as its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:  # dict() for templates, without attribute access to the type
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # namespace() that refuses underscore names
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    environment.globals["dict"] = TemplateDict()
    environment.globals["namespace"] = TemplateNamespace
    return environment.from_string(template)
