"""Schedules of the paper's pre-training (sec. 4.2) as functions of tokens seen.

`learning_rate`, `mtp_weight` and `bias_update_speed` are written in jnp without Python branching, so they
run on the host or inside jit. Tokens are handled as float32 there (exact to ~1M tokens at 14.8T, far
finer than any boundary); pass a Python int or a float32 array (an int32 array overflows past 2^31 tokens).
`batch_size` and `steps_for_tokens` are host-side Python: they decide array shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from dsv3_jax.train.recipe import Recipe

Scalar = int | float | jax.Array


def _f32(x: Scalar) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def learning_rate(recipe: Recipe, step: Scalar, tokens: Scalar) -> jax.Array:
    """LR (float32 scalar) for the optimizer step `step` (0-based) taken after `tokens` tokens.

    Linear warmup step / warmup_steps (so step 0 has LR 0), times the token schedule: peak_lr until
    lr_decay_start_tokens, cosine to min_lr over lr_decay_tokens, min_lr for min_lr_tokens, then final_lr.
    """
    step, tokens = _f32(step), _f32(tokens)
    warmup = jnp.minimum(step / recipe.warmup_steps, 1.0) if recipe.warmup_steps else 1.0
    # token boundaries as Python floats: Python ints past 2^31 would overflow as jnp int32 constants
    decay_start, decay_len = float(recipe.lr_decay_start_tokens), float(recipe.lr_decay_tokens)
    decay_end = decay_start + decay_len
    plateau_end = decay_end + float(recipe.min_lr_tokens)
    progress = jnp.clip((tokens - decay_start) / decay_len, 0.0, 1.0)
    cosine = recipe.min_lr + (recipe.peak_lr - recipe.min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    lr = jnp.where(tokens < decay_end, cosine, jnp.where(tokens < plateau_end, recipe.min_lr, recipe.final_lr))
    return (warmup * lr).astype(jnp.float32)


def mtp_weight(recipe: Recipe, tokens: Scalar) -> jax.Array:
    """lambda of eq. 25: mtp_weight before mtp_weight_switch_tokens, mtp_weight_late after (paper: 0.3 / 0.1)."""
    late = _f32(tokens) >= float(recipe.mtp_weight_switch_tokens)
    return jnp.where(late, recipe.mtp_weight_late, recipe.mtp_weight).astype(jnp.float32)


def bias_update_speed(recipe: Recipe, tokens: Scalar) -> jax.Array:
    """gamma of sec. 2.1.2: bias_update_speed before bias_update_stop_tokens, 0 after (paper: 0.001 / 0)."""
    stopped = _f32(tokens) >= float(recipe.bias_update_stop_tokens)
    return jnp.where(stopped, 0.0, recipe.bias_update_speed).astype(jnp.float32)


def batch_size(recipe: Recipe, tokens: int) -> int:
    """Sequences per step after `tokens` tokens: linear in tokens from batch_size_start to batch_size_end
    over batch_ramp_tokens, rounded down to a multiple of batch_size_quantum above the start (host-side).
    """
    span = recipe.batch_size_end - recipe.batch_size_start
    if tokens >= recipe.batch_ramp_tokens:
        return recipe.batch_size_end
    grown = span * int(tokens) // recipe.batch_ramp_tokens
    return recipe.batch_size_start + grown // recipe.batch_size_quantum * recipe.batch_size_quantum


def batch_sizes(recipe: Recipe) -> list[int]:
    """Every batch size `batch_size` can return over the run, smallest first."""
    span, quantum = recipe.batch_size_end - recipe.batch_size_start, recipe.batch_size_quantum
    ramp = {recipe.batch_size_start + k * quantum for k in range(span // quantum + 1)} if span > 0 else set()
    return sorted(ramp | {recipe.batch_size_start, recipe.batch_size_end})


def steps_for_tokens(recipe: Recipe, tokens: int) -> int:
    """Optimizer steps until at least `tokens` tokens are seen under the batch-size ramp (host-side)."""
    steps, seen = 0, 0
    while seen < tokens and seen < recipe.batch_ramp_tokens:
        seen += batch_size(recipe, seen) * recipe.seq_len
        steps += 1
    per_step = recipe.batch_size_end * recipe.seq_len
    return steps + max(0, -(-(tokens - seen) // per_step))
