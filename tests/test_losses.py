"""Losses (CE, MTP eq. 24-25, sequence-wise balance eq. 17-20) against numpy, and the bias-update rule (sec. 2.1.2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.train.balance import bias_update, max_vio, update_router_biases
from dsv3_jax.train.losses import cross_entropy, mtp_loss, sequence_balance_loss

RNG = np.random.default_rng(0)


def _np_nll(logits, target):
    logits = np.asarray(logits, np.float64)
    m = logits.max()
    return m + np.log(np.exp(logits - m).sum()) - logits[target]


def test_cross_entropy_matches_numpy():
    b, t, v = 3, 7, 13
    logits = RNG.normal(size=(b, t, v)) * 3 + 1e4          # large offset: logsumexp must be stable
    targets = RNG.integers(0, v, size=(b, t))
    mask = RNG.random((b, t)) < 0.7
    nll = np.array([[_np_nll(logits[i, j], targets[i, j]) for j in range(t)] for i in range(b)])
    loss, n = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
    np.testing.assert_allclose(loss, nll.mean(), rtol=1e-5)
    assert int(n) == b * t and n.dtype == jnp.int32
    loss, n = jax.jit(cross_entropy)(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-5)
    assert int(n) == mask.sum()
    loss16, _ = cross_entropy(jnp.asarray(logits - 1e4, jnp.bfloat16), jnp.asarray(targets))
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(loss16, nll.mean(), rtol=2e-2)


@pytest.mark.parametrize("with_mask", [False, True])
def test_mtp_loss_matches_numpy(with_mask):
    """Depth k at position i predicts tokens[i + 1 + k]; positions i >= T - k have no target."""
    depth, b, t, v = 3, 2, 6, 11
    logits = RNG.normal(size=(depth, b, t, v))
    tokens = RNG.integers(0, v, size=(b, t + 1))
    mask = RNG.random((b, t)) < 0.6 if with_mask else np.ones((b, t), bool)
    mask[:, 0] = True                                  # every depth keeps at least one prediction
    per_depth = []
    for k in range(1, depth + 1):
        terms = [_np_nll(logits[k - 1, i, j], tokens[i, j + 1 + k])
                 for i in range(b) for j in range(t - k) if mask[i, j + k]]
        per_depth.append(np.mean(terms))
    got = jax.jit(mtp_loss)(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens),
                            jnp.asarray(mask) if with_mask else None)
    np.testing.assert_allclose(got, np.mean(per_depth), rtol=1e-5)


def test_mtp_depth_one_is_the_main_loss_shifted():
    """With D = 1, logits that equal the main logits shifted by one position give the next-next-token CE."""
    b, t, v = 2, 8, 5
    logits = jnp.asarray(RNG.normal(size=(b, t, v)), jnp.float32)
    tokens = jnp.asarray(RNG.integers(0, v, size=(b, t + 1)))
    main, _ = jax.jit(cross_entropy)(logits[:, : t - 1], tokens[:, 2:])
    np.testing.assert_allclose(jax.jit(mtp_loss)(logits[None], tokens), main, rtol=1e-6)


def _np_balance(scores, bias, top_k):
    """Eq. 17-20 written out with loops: scores [L, B, T, E] sigmoid affinities, bias [L, E]."""
    n_layers, b, t, e = scores.shape
    total = 0.0
    for l in range(n_layers):
        per_seq = []
        for s in range(b):
            counts = np.zeros(e)
            for i in range(t):
                chosen = np.argsort(-(scores[l, s, i] + bias[l]), kind="stable")[:top_k]
                counts[chosen] += 1
            f = e / (top_k * t) * counts                                       # eq. 18
            p = (scores[l, s] / scores[l, s].sum(-1, keepdims=True)).mean(0)  # eq. 19-20
            per_seq.append((f * p).sum())                                      # eq. 17 without alpha
        total += np.mean(per_seq)
    return total


def test_sequence_balance_loss_matches_numpy():
    n_layers, b, t, e, k = 2, 3, 16, 8, 2
    scores = 1 / (1 + np.exp(-RNG.normal(size=(n_layers, b, t, e))))
    bias = RNG.normal(size=(n_layers, e)) * 0.3
    # the statistics as the model computes them (MoEStats)
    _, top = jax.lax.top_k(jnp.asarray(scores + bias[:, None, None]), k)            # [L, B, T, K]
    counts = jax.nn.one_hot(top, e, dtype=jnp.int32).sum((2, 3))                     # [L, B, E]
    mean_probs = jnp.asarray(scores / scores.sum(-1, keepdims=True)).mean(2)         # [L, B, E]
    got = sequence_balance_loss(counts, mean_probs.astype(jnp.float32), k, t)
    np.testing.assert_allclose(got, _np_balance(scores, bias, k), rtol=1e-5)
    # gradients reach the affinities only; perfectly uniform routing gives exactly 1 per layer
    grad = jax.grad(lambda p: sequence_balance_loss(counts, p, k, t))(mean_probs)
    np.testing.assert_allclose(grad, counts * e / (k * t) / b, rtol=1e-6)
    uniform = sequence_balance_loss(jnp.full((n_layers, b, e), k * t // e), jnp.full((n_layers, b, e), 1 / e), k, t)
    np.testing.assert_allclose(uniform, n_layers, rtol=1e-6)


def test_bias_update_sign_and_max_vio():
    load = jnp.array([[10, 10, 10, 10], [1, 2, 3, 6], [0, 0, 0, 8]])
    bias = jnp.zeros((3, 4))
    np.testing.assert_allclose(bias_update(bias, load, 0.001),
                               [[0, 0, 0, 0], [0.001, 0.001, 0, -0.001], [0.001, 0.001, 0.001, -0.001]])
    np.testing.assert_allclose(max_vio(load), [0.0, 1.0, 3.0])
    np.testing.assert_allclose(max_vio(jnp.zeros((1, 4))), [0.0])
    np.testing.assert_array_equal(bias_update(bias, load, 0.0), bias)


def test_update_router_biases_on_model_params():
    cfg = dsv3_jax.load_config("tiny")
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dsv3_jax.param_shapes(cfg))
    n_moe, e = params["moe_layers"]["mlp"]["e_score_correction_bias"].shape
    loads = {"moe_layers": jnp.tile(jnp.arange(e), (n_moe, 1)), "mtp_0": jnp.arange(e)[::-1]}
    new = jax.jit(update_router_biases)(params, loads, 0.01)
    expected = -0.01 * np.sign(np.arange(e) - (e - 1) / 2)
    np.testing.assert_allclose(new["moe_layers"]["mlp"]["e_score_correction_bias"], np.tile(expected, (n_moe, 1)))
    np.testing.assert_allclose(new["mtp_0"]["block"]["mlp"]["e_score_correction_bias"], expected[::-1])
    np.testing.assert_array_equal(new["moe_layers"]["mlp"]["gate"], params["moe_layers"]["mlp"]["gate"])
    with pytest.raises(ValueError, match="no expert load"):
        jax.eval_shape(update_router_biases, params, {"moe_layers": loads["moe_layers"]}, 0.01)
    with pytest.raises(ValueError, match="shape"):
        jax.eval_shape(update_router_biases, params, {**loads, "mtp_0": jnp.zeros((2, e))}, 0.01)
    no_bias = {"layers": {"w": jnp.ones(3)}}                 # softmax routing (V2): its loads are ignored
    np.testing.assert_array_equal(update_router_biases(no_bias, {"layers": jnp.arange(3)}, 0.01)["layers"]["w"], 1)


def test_bias_rule_balances_a_skewed_router():
    """Fixed affinities skewed towards high-index experts: repeated updates bring MaxVio down (sec. 2.1.2)."""
    n_layers, n_tokens, e, k = 2, 1024, 16, 4
    kx, kw = jax.random.split(jax.random.key(0))
    logits = jnp.einsum("lnd,lde->lne", jax.random.normal(kx, (n_layers, n_tokens, 32)),
                        0.3 * jax.random.normal(kw, (n_layers, 32, e)))
    scores = jax.nn.sigmoid(logits + jnp.linspace(-2.0, 2.0, e))

    def step(bias, _):
        _, top = jax.lax.top_k(scores + bias[:, None], k)                            # selection uses the bias
        load = jax.vmap(lambda t: jnp.bincount(t.reshape(-1), length=e))(top)         # [L, E]
        return bias_update(bias, load, 0.01), max_vio(load)

    _, vio = jax.jit(lambda b: jax.lax.scan(step, b, length=200))(jnp.zeros((n_layers, e)))
    start, end = np.asarray(vio[0]), np.asarray(vio[-20:]).mean(0)
    assert (start > 1.0).all()
    assert (end < 0.2).all() and (end < 0.15 * start).all()
