"""Auxiliary-loss-free load balancing (paper sec. 2.1.2) and the MaxVio metric (sec. 4.5.2).

After each step, every routed expert's bias b_i (added to its affinity for top-k *selection* only, eq. 16)
moves by gamma against its load: b_i -= gamma if the expert got more than the mean load of its layer,
b_i += gamma if less, unchanged if exactly the mean. Loads are global token counts per expert (the caller
sums them over the batch and over data-parallel devices; inside jit on a sharded batch a plain sum does).

Bias leaves are found by name (`e_score_correction_bias`), loads by the top-level params entry holding
them: `loads = {"moe_layers": [L_moe, E], "mtp_0": [E], ...}`, the keys of the model's `ModelOutput.moe`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

BIAS_NAME = "e_score_correction_bias"


def bias_update(bias: jax.Array, load: jax.Array, gamma: jax.Array | float) -> jax.Array:
    """b - gamma * sign(load - mean load) over the last (expert) axis. bias, load [..., E] -> [..., E]."""
    load = load.astype(jnp.float32)
    excess = load - jnp.mean(load, axis=-1, keepdims=True)
    return (bias - gamma * jnp.sign(excess)).astype(bias.dtype)


def max_vio(load: jax.Array) -> jax.Array:
    """MaxVio = max_i load_i / mean load - 1 per layer: load [L, E] -> [L] f32 (0 when balanced or empty)."""
    load = load.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1)
    return jnp.where(mean > 0, jnp.max(load, axis=-1) / jnp.where(mean > 0, mean, 1.0) - 1.0, 0.0)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def update_router_biases(params: Any, loads: Mapping[str, jax.Array], gamma: jax.Array | float) -> Any:
    """Apply `bias_update` to every `e_score_correction_bias` leaf of params; other leaves are returned as is.

    loads[name] is the expert load of the MoE layer(s) under params[name], of the bias leaf's shape
    ([L_moe, E] for the scanned stack, [E] for one MTP block). Each top-level entry may hold one bias leaf.
    Loads of entries without a bias (softmax routing of DeepSeek-V2 configs) are ignored; a bias without
    a load, two biases under one entry, or a shape mismatch raise ValueError (at trace time).
    """
    seen: dict[str, str] = {}

    def update(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        if not path or _key_name(path[-1]) != BIAS_NAME:
            return leaf
        where, top = jax.tree_util.keystr(path), _key_name(path[0])
        if top in seen:
            raise ValueError(f"two routing biases under params[{top!r}] ({seen[top]} and {where}): "
                             "give each its own top-level entry")
        seen[top] = where
        if top not in loads:
            raise ValueError(f"no expert load for the routing bias {where}: loads has {sorted(loads)}")
        load = loads[top]
        if load.shape != leaf.shape:
            raise ValueError(f"load {top!r} has shape {load.shape} but the bias {where} has {leaf.shape}")
        return bias_update(leaf, load, gamma)

    return jax.tree_util.tree_map_with_path(update, params)
