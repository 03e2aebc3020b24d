"""Distillation (method `distill`): a LoRA student learns from a teacher's top-k next-token distribution.

At every position that carries a loss (the response tokens, as for cross-entropy), with temperature T
and the teacher's k largest logits z_1..z_k at token ids i_1..i_k:

    p_j  = softmax(z / T)_j                        the teacher's top k, renormalised over those k
    q    = softmax(student logits / T)             the student's whole vocabulary
    KL   = sum_j p_j (log p_j - log q_{i_j})       KL(teacher top-k || student), >= 0
    loss = distill_alpha x T^2 x mean KL + (1 - distill_alpha) x mean cross-entropy

The T^2 factor (Hinton et al. 2015, "Distilling the knowledge in a neural network") keeps the KL
term's gradients the same size whatever the temperature, so that distill_alpha means the same at
every T. Means are over the positions that carry a loss in the batch (cross-entropy as
`model(**batch).loss` computes it).

The teacher runs once per training example: its top-k values and ids at the example's loss positions
are cached for the trial (keyed by the example's tokens), within MAX_CACHE_BYTES; an example past
that bound is not cached, and the teacher runs on it again each epoch. Each teacher pass is counted
in the training FLOPs (`take_flops`). No Ray, Optuna or store here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainers.config import ModelConfig, TrainConfig
from trainers.data import IGNORE_INDEX
from trainers.flops import FlopModel

MAX_CACHE_BYTES = 2 * 1024**3  # the teacher's cached top-k of one trial; past it, the teacher runs again per epoch


def distill_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher_values: torch.Tensor, teacher_ids: torch.Tensor, alpha: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean KL, mean cross-entropy) of a batch, by the formula in the module's docstring.

    `student_logits` [rows, length, vocab] and `labels` [rows, length] as a causal LM's (the logits at
    position t predict the label at t + 1); `teacher_values` and `teacher_ids` [positions, k]: the
    teacher's top-k at each position that carries a loss, in row-major order.
    """
    shifted = labels[:, 1:]
    carries = shifted != IGNORE_INDEX
    logits = student_logits[:, :-1][carries].float()  # [positions, vocab]
    ce = F.cross_entropy(logits, shifted[carries])
    teacher_log_p = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    student_log_q = F.log_softmax(logits / temperature, dim=-1).gather(-1, teacher_ids.long())
    kl = (teacher_log_p.exp() * (teacher_log_p - student_log_q)).sum(-1).mean()
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def load_teacher(name: str, device: torch.device, dtype: str = "float32") -> Any:
    """The teacher, frozen, in eval mode on `device`: a model ('tiny', a folder, a hub id), or a peft
    adapter folder (an earlier trial's best checkpoint), merged into its base model."""
    from transformers import AutoModelForCausalLM

    from trainers.model import resolve_model, torch_dtype

    folder = Path(name).expanduser()
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(ModelConfig(name=name)), dtype=torch_dtype(dtype))
    return model.to(device).eval().requires_grad_(False)


class Distiller:
    """The teacher of one trial, its cache of top-k logits per training example, and the loss."""

    def __init__(self, teacher: Any, train: TrainConfig, max_cache_bytes: int = MAX_CACHE_BYTES):
        self.teacher = teacher
        self.top_k = train.distill_top_k
        self.alpha = train.distill_alpha
        self.temperature = train.distill_temperature
        self.max_cache_bytes = max_cache_bytes
        self.cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # example tokens -> top-k values [positions, k], ids
        self.cache_bytes = 0
        self.teacher_flops = 0.0  # teacher passes not yet taken by `take_flops`
        self.flop_model = FlopModel.of(teacher)

    @classmethod
    def for_trial(cls, train: TrainConfig, model: ModelConfig, device: torch.device) -> "Distiller":
        """The trial's teacher, loaded in the student's dtype."""
        return cls(load_teacher(train.teacher, device, model.dtype), train)

    @property
    def weights_gb(self) -> float:
        return sum(p.numel() * p.element_size() for p in self.teacher.parameters()) / 1024**3

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The distillation loss of `model` (the student) on a training batch."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return distill_loss(logits, batch["labels"], *self.teacher_top_k(batch), self.alpha, self.temperature)[0]

    def kl(self, model: Any, batch: dict[str, torch.Tensor]) -> float:
        """Mean KL(teacher top-k || `model`) over the batch's loss positions, at the trial's temperature (no cache)."""
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            values, ids = self._run_teacher(batch["input_ids"], batch["attention_mask"], batch["labels"])
            return distill_loss(logits, batch["labels"], torch.cat(values), torch.cat(ids), 1.0, self.temperature)[1].item()

    def teacher_top_k(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k values and ids at the batch's loss positions, row by row: from the cache,
        the teacher running on the rows it has not seen."""
        rows_on_cpu = (batch[k].cpu() for k in ("input_ids", "attention_mask", "labels"))  # one copy, not one sync per row
        keys = [self._key(*row) for row in zip(*rows_on_cpu)]
        missing = [row for row, key in enumerate(keys) if key not in self.cache]
        fresh = {}
        if missing:
            rows = torch.tensor(missing, device=batch["input_ids"].device)
            width = int(batch["attention_mask"][rows].sum(-1).max())
            found = self._run_teacher(*(batch[k][rows, :width] for k in ("input_ids", "attention_mask", "labels")))
            self.teacher_flops += self.flop_model.forward(len(missing), width)
            for row, values, ids in zip(missing, *found):
                fresh[row] = (values, ids)
                size = values.numel() * values.element_size() + ids.numel() * ids.element_size() + len(keys[row])
                if self.cache_bytes + size <= self.max_cache_bytes:
                    self.cache[keys[row]] = (values, ids)
                    self.cache_bytes += size
        parts = [fresh.get(row) or self.cache[key] for row, key in enumerate(keys)]
        return torch.cat([values for values, _ in parts]), torch.cat([ids for _, ids in parts])

    def take_flops(self) -> float:
        """The teacher's FLOPs since the last call (training FLOPs of the trial)."""
        flops, self.teacher_flops = self.teacher_flops, 0.0
        return flops

    def _run_teacher(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[list, list]:
        """The teacher's top-k (values, int32 ids) at each row's loss positions: one tensor per row."""
        with torch.no_grad():
            logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        carries = labels[:, 1:] != IGNORE_INDEX
        values, ids = [], []
        for row in range(len(input_ids)):
            top = logits[row][carries[row]].float().topk(min(self.top_k, logits.shape[-1]), dim=-1)
            values.append(top.values)
            ids.append(top.indices.to(torch.int32))
        return values, ids

    @staticmethod
    def _key(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> bytes:
        """An example's identity: its tokens and which of them carry a loss (equal examples share an entry)."""
        kept = attention_mask.bool()
        return torch.cat([input_ids[kept], labels[kept]]).to(torch.int32).cpu().numpy().tobytes()
