"""How the report names and draws things: trial statuses, metric labels, numbers as short text."""

from __future__ import annotations

import math
import numbers
from typing import Any

import pandas as pd

from trainers.vocabulary import TrialStatus

# status: (label, plotly marker symbol, colour, line dash in the epoch curves)
STATUS_STYLE = {
    TrialStatus.COMPLETED: ("completed", "circle", "#1f77b4", "solid"),
    TrialStatus.EARLY_STOPPED: ("early stopped", "triangle-down", "#ff7f0e", "dash"),
    TrialStatus.ERROR: ("error", "x", "#d62728", "dot"),
    TrialStatus.DIVERGED: ("diverged", "star-triangle-up", "#8c564b", "dot"),
    TrialStatus.OOM: ("out of memory", "square-x", "#e377c2", "dot"),
    TrialStatus.INFEASIBLE: ("infeasible", "hexagon-open", "#17becf", "dot"),
    TrialStatus.RUNNING: ("running", "circle-open", "#7f7f7f", "dashdot"),
    TrialStatus.PENDING: ("pending", "circle-open", "#bbbbbb", "dashdot"),
}
_OTHER_STYLE = ("other", "diamond", "#9467bd", "dashdot")


METRIC_LABELS = {
    "win_rate": "win rate",
    "eval_ppl": "eval perplexity",
    "retention_ppl": "retention perplexity",
    "train_flops": "training compute (FLOPs)",
    "eval_flops": "evaluation compute (FLOPs)",
    "train_seconds": "training time (measured)",
    "gpu_hours": "GPU-hours",
    "cost_usd": "cost",
    "peak_memory_gb": "peak memory",
}


def label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


# Searched parameters as trial names write them ("lr 1e-3 · r 16"); "" writes the value alone ("prefix · lr 1e-3").
PARAM_SHORT = {
    "method": "",
    "learning_rate": "lr",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_alpha_per_rank": "alpha/r",
    "lora_dropout": "dropout",
    "num_virtual_tokens": "tokens",
    "target_modules": "modules",
    "batch_size": "batch",
    "grad_accumulation_steps": "accum",
    "lr_schedule": "schedule",
    "weight_decay": "wd",
    "warmup_steps": "warmup",
    "max_grad_norm": "clip",
}
NAME_SEPARATOR = " · "


def short(param: str) -> str:
    return PARAM_SHORT.get(param, param)


def compact(value: Any, scientific: bool = False) -> str:
    """A parameter value in few characters: 1e-3, 2.5e-4, 0.05, 16, on; lists joined with "+".

    `scientific` writes every float as 1e-2 (not 0.01), to match other values of the same parameter.
    """
    if isinstance(value, (list, tuple)):
        return "+".join(compact(v, scientific) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "–"
        if value.is_integer() and abs(value) < 1e6 and not scientific:
            return str(int(value))
        if value != 0 and (scientific or abs(value) < 0.01 or abs(value) >= 1e6):
            mantissa, exponent = f"{value:.2e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        text = f"{value:.3g}"
        return f"{value:.0f}" if "e" in text else text  # 1234.5 reads "1234", not "1.23e+03"
    return str(value)


def plural(n: int, word: str) -> str:
    """"1 trial", "2 trials", "3 cheaper trials", "2 errors"."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def num(value: float) -> str:
    """Three significant digits like "{:.3g}", but 1234.5 reads "1,234" rather than "1.23e+03"."""
    if pd.isna(value):
        return "–"
    if value == 0 or abs(value) < 1:
        return f"{value:.3g}"
    text = f"{value:,.{max(0, 2 - int(math.floor(math.log10(abs(value)))))}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def flops(value: float) -> str:
    """"3.2 TFLOPs", "41 GFLOPs": floating-point operations with an SI prefix."""
    if pd.isna(value):
        return "unknown FLOPs"
    for power, prefix in ((18, "E"), (15, "P"), (12, "T"), (9, "G"), (6, "M"), (3, "k")):
        if abs(value) >= 10**power:
            return f"{num(value / 10**power)} {prefix}FLOPs"
    return f"{num(value)} FLOPs"


def duration(seconds: float) -> str:
    if pd.isna(seconds):
        return "unknown time"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def style(status: str) -> tuple[str, str, str, str]:
    return STATUS_STYLE.get(status, (status, *_OTHER_STYLE[1:]))


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cell(value: Any) -> str:
    """A parameter or other value as short text."""
    if isinstance(value, (list, tuple)):
        return ", ".join(map(cell, value))
    if missing(value):
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# How the report marks the trials it recommends, on every plot and in the table: (label, marker symbol, colour).
# The keys are the values of the `recommendation` column of `peftsweep export`.
RECOMMENDATION_STYLE = {
    "best": ("best", "star", "#111111"),
    "sweet_spot": ("sweet spot", "diamond", "#b8860b"),
}


NOT_JUDGED = "not judged"  # a verdict or win rate the judge did not give (it was unavailable)


def verdict_word(value: float | None) -> str:
    """A verdict against the base model as a word: 1 win, 0.5 tie, 0 loss; missing: not judged."""
    if missing(value):
        return NOT_JUDGED
    return {1.0: "win", 0.5: "tie", 0.0: "loss"}.get(float(value), num(value))


def sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]
