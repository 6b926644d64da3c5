"""Training recipe: the paper's pre-training numbers (sec. 4.2 of arXiv 2412.19437) as one frozen dataclass.

A recipe says *how long and how* to train, independent of the model's shape: sequence length, batch-size
ramp, learning-rate schedule, AdamW, MTP weight, balancing speeds, data transforms, and the loop's cadence
(eval / checkpoint / log). Schedules are written in tokens seen, as the paper states them; only the LR
warmup counts steps. Shipped recipes live in `dsv3_jax/configs/recipes/NAME.json`; keys starting with
"_" (e.g. "_comment") are comments. Every other key must be a field below, or `RecipeError` names it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from dsv3_jax.named_json import read_named_json, shipped_names
from dsv3_jax.train import schedules

RECIPE_DIR = Path(__file__).parent.parent / "configs" / "recipes"


class RecipeError(ValueError):
    """A recipe field is unknown, missing, of the wrong type or out of range (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Pre-training recipe. Token counts are tokens seen (batch x seq_len summed over steps); batches in sequences.

    LR (tokens t, step s): peak_lr * min(1, s / warmup_steps) while t < lr_decay_start_tokens; cosine from
    peak_lr to min_lr over the next lr_decay_tokens; min_lr for min_lr_tokens; final_lr up to total_tokens.
    """

    # --- data and batch ---
    seq_len: int                      # tokens per packed sequence
    total_tokens: int                 # length of the run (paper: 14.8T)
    batch_size_start: int             # sequences per step at token 0 (paper: 3072)
    batch_size_end: int               # sequences per step after the ramp (paper: 15360)
    batch_ramp_tokens: int            # the ramp spans the first this-many tokens (paper: 469B)
    batch_size_quantum: int           # the ramp moves in steps of this many sequences
    fim_rate: float                   # share of documents rearranged by Fill-in-Middle (PSM)
    split_rate: float                 # probability of splitting a merged punctuation+line-break token

    # --- learning rate ---
    warmup_steps: int                 # linear warmup from 0, in optimizer steps (paper: 2000)
    peak_lr: float                    # paper: 2.2e-4
    lr_decay_start_tokens: int        # constant peak_lr until here (paper: 10T)
    lr_decay_tokens: int              # cosine decay length (paper: 4.3T)
    min_lr: float                     # cosine end and the next plateau (paper: 2.2e-5)
    min_lr_tokens: int                # plateau at min_lr (paper: 333B)
    final_lr: float                   # for the rest of the run (paper: 7.3e-6 for the last 167B)

    # --- AdamW (decoupled weight decay) and clipping ---
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    weight_decay: float
    grad_clip_norm: float             # global L2 norm

    # --- losses and load balancing ---
    mtp_weight: float                 # lambda of eq. 25 before mtp_weight_switch_tokens (paper: 0.3)
    mtp_weight_late: float            # lambda afterwards (paper: 0.1)
    mtp_weight_switch_tokens: int     # paper: 10T
    bias_update_speed: float          # gamma of sec. 2.1.2 (paper: 0.001)
    bias_update_stop_tokens: int      # gamma is 0 from here on (paper: 14.3T)
    balance_alpha: float              # alpha of the sequence-wise balance loss, eq. 17 (paper: 1e-4)

    # --- loop cadence (in steps) ---
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8             # held-out batches per evaluation
    eval_batch_size: int = 16         # sequences per held-out batch
    checkpoint_every: int = 100
    keep_checkpoints: int = 3         # the newest N checkpoints are kept

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = int if f.type == "int" else float
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or (expected is int and not float(value).is_integer()):
                raise RecipeError(f"field {f.name!r}: expected {f.type}, got {value!r}")
            object.__setattr__(self, f.name, expected(value))   # 1.48e13 -> 14800000000000
        positive = ("seq_len", "total_tokens", "batch_size_start", "batch_size_end", "batch_size_quantum",
                    "peak_lr", "lr_decay_tokens", "adam_eps", "grad_clip_norm", "log_every", "eval_every",
                    "eval_batches", "eval_batch_size", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise RecipeError(f"field {name!r}: must be > 0, got {getattr(self, name)}")
        non_negative = ("batch_ramp_tokens", "warmup_steps", "lr_decay_start_tokens", "min_lr", "min_lr_tokens",
                        "final_lr", "weight_decay", "mtp_weight", "mtp_weight_late", "mtp_weight_switch_tokens",
                        "bias_update_speed", "bias_update_stop_tokens", "balance_alpha")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise RecipeError(f"field {name!r}: must be >= 0, got {getattr(self, name)}")
        for name in ("fim_rate", "split_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise RecipeError(f"field {name!r}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise RecipeError(f"field {name!r}: must be in [0, 1), got {getattr(self, name)}")
        if self.batch_size_end < self.batch_size_start:
            raise RecipeError(f"field 'batch_size_end': {self.batch_size_end} is below batch_size_start "
                              f"{self.batch_size_start}")
        if (self.batch_size_end - self.batch_size_start) % self.batch_size_quantum:
            raise RecipeError(f"field 'batch_size_quantum': {self.batch_size_quantum} does not divide the ramp "
                              f"{self.batch_size_start} -> {self.batch_size_end}")
        if self.min_lr > self.peak_lr:
            raise RecipeError(f"field 'min_lr': {self.min_lr} is above peak_lr {self.peak_lr}")
        schedule_end = self.lr_decay_start_tokens + self.lr_decay_tokens + self.min_lr_tokens
        if schedule_end > self.total_tokens:
            raise RecipeError(f"field 'total_tokens': {self.total_tokens:,} is shorter than the LR schedule "
                              f"(lr_decay_start_tokens + lr_decay_tokens + min_lr_tokens = {schedule_end:,})")

    @property
    def total_steps(self) -> int:
        """Optimizer steps needed to see total_tokens under the batch-size ramp."""
        return schedules.steps_for_tokens(self, self.total_tokens)


def recipe_names() -> list[str]:
    """Names of the shipped recipes."""
    return shipped_names(RECIPE_DIR)


def recipe_from_dict(raw: dict[str, Any], source: str = "<dict>", **overrides: Any) -> Recipe:
    """A validated Recipe from a JSON object; keys starting with "_" are comments."""
    values = {k: v for k, v in raw.items() if not k.startswith("_")}
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeError(f"{source}: unknown field {unknown[0]!r} (known fields: {', '.join(sorted(known))})")
    required = [f.name for f in dataclasses.fields(Recipe) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise RecipeError(f"{source}: missing field(s) {', '.join(repr(m) for m in missing)}")
    try:
        return Recipe(**values)
    except RecipeError as err:
        raise RecipeError(f"{source}: {err}") from None


def load_recipe(name_or_path: str | os.PathLike, **overrides: Any) -> Recipe:
    """Load a shipped recipe by name (`tiny-cpu`, `deepseek-v3-pretrain`) or a JSON file; `overrides` replace fields."""
    raw, path = read_named_json(name_or_path, RECIPE_DIR, "recipe", RecipeError)
    return recipe_from_dict(raw, source=str(path), **overrides)
