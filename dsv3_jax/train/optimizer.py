"""AdamW as DeepSeek-V3 trains with it: BF16 moments, FP32 master weights, global-norm clipping (sec. 3.3, 4.2).

    optimizer = make_optimizer(recipe)
    updates, opt_state = optimizer.update(grads, opt_state, params, learning_rate=lr)   # lr: f32 scalar
    params = optax.apply_updates(params, updates)

The learning rate is an argument of every `update` (an optax extra argument), not optimizer state: the
schedule is a function of tokens seen, which the loop knows and the optimizer does not, and the state
stays free of hyperparameters (checkpoints do not depend on the schedule).

Per leaf, by its name (the last key of its path) so scanned [layers, ...] stacks are handled alike:
- `e_score_correction_bias`: frozen, update exactly 0 (the balance rule moves it, `balance.py`);
- norm scales (`scale`), biases (`bias`, `*_bias`) and any leaf of ndim <= 1: AdamW without weight decay;
- everything else: AdamW with decoupled weight decay (added to the Adam direction before the LR, as optax.adamw).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.train.recipe import Recipe

FROZEN_NAMES = frozenset({"e_score_correction_bias"})
NO_DECAY_NAMES = frozenset({"scale", "bias"})

FROZEN, NO_DECAY, DECAY = "frozen", "no_decay", "decay"


def _leaf_name(path: tuple[Any, ...]) -> str:
    key = path[-1] if path else None
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_labels(params: Any) -> Any:
    """A pytree like `params` labelling each leaf "frozen", "no_decay" or "decay" (see the module docstring)."""

    def label(path: tuple[Any, ...], leaf: Any) -> str:
        name = _leaf_name(path)
        if name in FROZEN_NAMES:
            return FROZEN
        if name in NO_DECAY_NAMES or name.endswith("_bias") or jnp.ndim(leaf) <= 1:
            return NO_DECAY
        return DECAY

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay."""
    return jax.tree.map(lambda label: label == DECAY, param_labels(params))


def frozen_mask(params: Any) -> Any:
    """True for the leaves that get no update at all."""
    return jax.tree.map(lambda label: label == FROZEN, param_labels(params))


def scale_by_adam_lowp(b1: float, b2: float, eps: float,
                       moment_dtype: jnp.dtype = jnp.bfloat16) -> optax.GradientTransformation:
    """optax.scale_by_adam with both moments *stored* in `moment_dtype`.

    Each step reads the moments into float32, updates them and computes mu_hat / (sqrt(nu_hat) + eps)
    in float32 (the math of optax.scale_by_adam), then rounds the new moments back for storage.
    State: optax.ScaleByAdamState(count int32 [], mu, nu like params in `moment_dtype`).
    """

    def init_fn(params: Any) -> optax.ScaleByAdamState:
        zeros = lambda p: jnp.zeros(jnp.shape(p), moment_dtype)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                                      nu=jax.tree.map(zeros, params))

    def update_fn(updates: Any, state: optax.ScaleByAdamState, params: Any = None):
        del params
        count = optax.safe_increment(state.count)
        f32 = lambda x: x.astype(jnp.float32)
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates, state.nu)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        out = jax.tree.map(lambda m, v, g: (m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu_hat, nu_hat, updates)
        store = lambda tree: jax.tree.map(lambda x: x.astype(moment_dtype), tree)
        return out, optax.ScaleByAdamState(count=count, mu=store(mu), nu=store(nu))

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate_arg() -> optax.GradientTransformationExtraArgs:
    """Multiply updates by -learning_rate, taken from `update(..., learning_rate=lr)` at every step."""

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None, *, learning_rate: jax.Array,
                  **extra_args: Any):
        del params, extra_args
        lr = jnp.asarray(learning_rate, jnp.float32)
        return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(recipe: Recipe, moment_dtype: jnp.dtype = jnp.bfloat16) -> optax.GradientTransformationExtraArgs:
    """AdamW(beta1, beta2, eps, weight_decay) after global-norm clipping; the LR comes with each update call.

    Order: zero the frozen leaves' gradients, clip the global norm to grad_clip_norm, Adam direction
    (moments in `moment_dtype`), + weight_decay * param on the "decay" leaves, times -learning_rate.
    The optimizer state mirrors the params tree (mu, nu per leaf), ready for ZeRO-1 sharding like them.
    """
    return optax.chain(
        optax.masked(optax.set_to_zero(), frozen_mask),
        optax.clip_by_global_norm(recipe.grad_clip_norm),
        scale_by_adam_lowp(recipe.adam_beta1, recipe.adam_beta2, recipe.adam_eps, moment_dtype),
        optax.add_decayed_weights(recipe.weight_decay, mask=decay_mask),
        scale_by_learning_rate_arg(),
    )
