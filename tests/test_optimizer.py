"""AdamW with BF16 moments: labels, frozen routing bias, masked weight decay, clipping, parity with optax.adamw."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dsv3_jax
from dsv3_jax.train.optimizer import (
    DECAY,
    FROZEN,
    NO_DECAY,
    decay_mask,
    make_optimizer,
    param_labels,
    scale_by_adam_lowp,
)
from dsv3_jax.train.recipe import load_recipe

RECIPE = load_recipe("deepseek-v3-pretrain")


def _toy_params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "layers": {"kernel": jax.random.normal(k[0], (2, 5, 3)),          # scanned stack [L, in, out]
                   "norm": {"scale": 1.0 + 0.1 * jax.random.normal(k[1], (2, 5))},
                   "mlp": {"e_score_correction_bias": jax.random.normal(k[2], (2, 4))}},
        "head": {"kernel": jax.random.normal(k[3], (3, 2)), "bias": jnp.full((2,), 0.5)},
        "mtp_0": {"mlp": {"e_score_correction_bias": jnp.ones((4,))}},
    }


def _loss(params, x, y):
    h = jnp.einsum("bi,lio->blo", x, params["layers"]["kernel"]) * params["layers"]["norm"]["scale"].mean()
    out = jnp.einsum("blo,op->bp", jnp.tanh(h), params["head"]["kernel"]) + params["head"]["bias"]
    return jnp.mean((out - y) ** 2)


def _data(seed):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (16, 5)), jax.random.normal(ky, (16, 2))


def test_labels_on_the_model():
    """Scanned norm scales [L, d] are no_decay although 2-D; both routing biases are frozen."""
    labels = param_labels(dsv3_jax.param_shapes(dsv3_jax.load_config("tiny")))
    assert labels["moe_layers"]["mlp"]["e_score_correction_bias"] == FROZEN
    assert labels["mtp_0"]["block"]["mlp"]["e_score_correction_bias"] == FROZEN
    assert labels["moe_layers"]["input_layernorm"]["scale"] == NO_DECAY
    assert labels["norm"]["scale"] == NO_DECAY
    assert labels["moe_layers"]["mlp"]["w_gate"] == DECAY
    assert labels["embed_tokens"] == DECAY and labels["lm_head"]["kernel"] == DECAY
    flat = jax.tree.leaves(labels)
    assert flat.count(FROZEN) == 2 and set(flat) == {FROZEN, NO_DECAY, DECAY}


def test_state_dtypes_and_update_rules():
    params = _toy_params()
    opt = make_optimizer(RECIPE)
    state = opt.init(params)
    adam = state[2]
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(adam.mu))
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(adam.nu))

    # Zero gradients except on the routing biases: decayed leaves shrink by lr * wd * p, the rest stay.
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["layers"]["mlp"]["e_score_correction_bias"] = jnp.ones((2, 4))
    grads["mtp_0"]["mlp"]["e_score_correction_bias"] = jnp.ones((4,))
    lr = 1e-2
    updates, state = jax.jit(lambda g, s, p: opt.update(g, s, p, learning_rate=lr))(grads, state, params)
    new = optax.apply_updates(params, updates)
    labels = param_labels(params)
    for label, p, u, n in zip(jax.tree.leaves(labels), jax.tree.leaves(params), jax.tree.leaves(updates),
                              jax.tree.leaves(new), strict=True):
        assert n.dtype == jnp.float32
        expected = -lr * RECIPE.weight_decay * p if label == DECAY else jnp.zeros_like(p)
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=0)
    assert not jnp.any(state[2].mu["layers"]["mlp"]["e_score_correction_bias"])


def test_frozen_leaf_never_moves():
    params = _toy_params()
    opt = make_optimizer(RECIPE)
    state = opt.init(params)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, learning_rate=0.1))
    for value in (3.0, -4.0, 5.0):
        grads = jax.tree.map(lambda p, v=value: jnp.full_like(p, v), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["layers"]["mlp"]["e_score_correction_bias"],
                                  _toy_params()["layers"]["mlp"]["e_score_correction_bias"])
    np.testing.assert_array_equal(params["mtp_0"]["mlp"]["e_score_correction_bias"], jnp.ones((4,)))


def _train(opt, steps=20, lr=3e-2, **update_kwargs):
    params = _toy_params()
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(_loss)(params, x, y)
        updates, state = opt.update(grads, state, params, **update_kwargs)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, *_data(i))
    return params


@pytest.fixture(scope="module")
def reference():
    """Params after 20 steps of optax's AdamW (fp32 moments) behind the same clipping, masks and frozen leaves."""
    frozen = lambda p: jax.tree.map(lambda label: label == FROZEN, param_labels(p))
    return _train(optax.chain(optax.masked(optax.set_to_zero(), frozen),
                              optax.clip_by_global_norm(RECIPE.grad_clip_norm),
                              optax.adamw(3e-2, RECIPE.adam_beta1, RECIPE.adam_beta2, RECIPE.adam_eps,
                                          weight_decay=RECIPE.weight_decay, mask=decay_mask)))


def test_fp32_moments_match_optax_adamw(reference):
    ours = _train(make_optimizer(RECIPE, moment_dtype=jnp.float32), learning_rate=jnp.float32(3e-2))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_moments_close_to_optax_adamw(reference):
    start, ref = _toy_params(), reference
    ours = _train(make_optimizer(RECIPE), learning_rate=jnp.float32(3e-2))
    for a, b, p0 in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), jax.tree.leaves(start), strict=True):
        moved = np.abs(np.asarray(b) - np.asarray(p0)).max()
        np.testing.assert_allclose(a, b, atol=0.02 * moved + 1e-7)      # bf16 moments: ~1% of the distance moved


def test_bf16_adam_matches_fp32_math_one_step():
    """One step from zero state: identical to optax.scale_by_adam (rounding happens on storage only)."""
    grads = jax.tree.map(lambda p: p * 0.37, _toy_params())
    one_step = jax.jit(lambda tx: tx.update(grads, tx.init(grads)), static_argnums=0)
    ours, state = one_step(scale_by_adam_lowp(0.9, 0.95, 1e-8))
    ref, _ = one_step(optax.scale_by_adam(0.9, 0.95, 1e-8))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert int(state.count) == 1


def test_learning_rate_is_an_update_argument():
    params, opt = _toy_params(), make_optimizer(RECIPE)
    grads = jax.jit(jax.grad(_loss))(params, *_data(0))
    state = opt.init(params)
    update = jax.jit(lambda lr: opt.update(grads, state, params, learning_rate=lr)[0])
    small, large = update(1e-3), update(4e-3)
    for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(large), strict=True):
        np.testing.assert_allclose(4 * a, b, rtol=1e-6)
    with pytest.raises(TypeError, match="learning_rate"):
        jax.eval_shape(lambda: opt.update(grads, state, params))


@pytest.mark.parametrize("scale", [1e-3, 100.0])
def test_global_norm_clipping(scale):
    """The first moment after one step is (1 - beta1) * clipped gradient; clipping uses the global norm."""
    recipe = dataclasses.replace(RECIPE, grad_clip_norm=1.0)
    params, opt = _toy_params(), make_optimizer(recipe, moment_dtype=jnp.float32)
    grads = jax.tree.map(lambda p, label: jnp.zeros_like(p) if label == FROZEN else scale * jnp.cos(p),
                         params, param_labels(params))
    norm = float(optax.tree.norm(grads))
    _, state = jax.jit(lambda: opt.update(grads, opt.init(params), params, learning_rate=1e-3))()
    factor = min(1.0, 1.0 / norm)
    for mu, g in zip(jax.tree.leaves(state[2].mu), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(mu, (1 - recipe.adam_beta1) * g * factor, rtol=1e-5, atol=1e-12)
    assert (norm > 1.0) == (scale == 100.0)
