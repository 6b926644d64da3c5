import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.model.moe import route
from dsv3_jax.model.rope import apply_rope, rope_angles


def _tokens(cfg, batch=2, seq=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size)


def test_forward_shapes_and_dtype(tiny_cfg, tiny_params):
    logits = dsv3_jax.forward(tiny_cfg, tiny_params, _tokens(tiny_cfg))
    assert logits.shape == (2, 12, tiny_cfg.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())


def test_dense_and_ragged_moe_paths_agree(tiny_cfg, tiny_params):
    tokens = _tokens(tiny_cfg)
    dense = dsv3_jax.apply(tiny_cfg.replace(moe_impl="dense"), tiny_params, tokens)
    ragged = dsv3_jax.apply(tiny_cfg.replace(moe_impl="ragged"), tiny_params, tokens)
    np.testing.assert_allclose(dense.logits, ragged.logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(dense.mtp_logits, ragged.mtp_logits, atol=1e-5, rtol=1e-5)


def test_dense_and_ragged_gradients_agree(tiny_cfg, tiny_params):
    tokens = _tokens(tiny_cfg)

    def loss(params, impl):
        return dsv3_jax.apply(tiny_cfg.replace(moe_impl=impl), params, tokens).logits.std()

    g_dense = jax.grad(loss)(tiny_params, "dense")
    g_ragged = jax.grad(loss)(tiny_params, "ragged")
    for a, b in zip(jax.tree_util.tree_leaves(g_dense), jax.tree_util.tree_leaves(g_ragged), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_changing_a_future_token_never_changes_earlier_logits(tiny_cfg, tiny_params):
    tokens = _tokens(tiny_cfg, batch=1, seq=10)
    changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % tiny_cfg.vocab_size)
    a = dsv3_jax.apply(tiny_cfg, tiny_params, tokens)
    b = dsv3_jax.apply(tiny_cfg, tiny_params, changed)
    np.testing.assert_array_equal(a.logits[0, :6], b.logits[0, :6])
    assert not np.allclose(a.logits[0, 6:], b.logits[0, 6:])


def test_mtp_uses_the_shifted_embeddings(tiny_cfg, tiny_params):
    """MTP depth 1 at position i combines h_i with Emb(t_{i+1}) (eq. 21): token 6 reaches position 5, not 4."""
    tokens = _tokens(tiny_cfg, batch=1, seq=10)
    changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % tiny_cfg.vocab_size)
    a = dsv3_jax.apply(tiny_cfg, tiny_params, tokens).mtp_logits
    b = dsv3_jax.apply(tiny_cfg, tiny_params, changed).mtp_logits
    np.testing.assert_array_equal(a[0, 0, :5], b[0, 0, :5])
    assert not np.allclose(a[0, 0, 5], b[0, 0, 5])


def test_group_limited_routing_stays_inside_top_groups():
    cfg = dsv3_jax.load_config("deepseek-v3-671b")
    logits = jax.random.normal(jax.random.key(3), (512, cfg.n_routed_experts))
    bias = 0.1 * jax.random.normal(jax.random.key(4), (cfg.n_routed_experts,))
    routing = route(cfg, logits, bias)
    choice = np.asarray(jax.nn.sigmoid(logits) + bias).reshape(512, cfg.n_group, -1)
    group_score = np.sort(choice, axis=-1)[..., -2:].sum(-1)
    top_groups = np.argsort(-group_score, axis=-1)[:, :cfg.topk_group]
    chosen_groups = np.asarray(routing.experts) // (cfg.n_routed_experts // cfg.n_group)
    for row in range(512):
        assert set(chosen_groups[row]) <= set(top_groups[row])
    # weights: unbiased affinities of the chosen experts, normalized, times 2.5
    np.testing.assert_allclose(np.asarray(routing.weights).sum(-1), cfg.routed_scaling_factor, rtol=1e-5)
    # the bias changes the selection but not the weights' source
    plain = route(cfg, logits, None)
    assert (np.asarray(plain.experts) != np.asarray(routing.experts)).any()


def test_group_limiting_changes_choices_against_plain_topk():
    cfg = dsv3_jax.load_config("deepseek-v3-671b")
    logits = jax.random.normal(jax.random.key(5), (256, cfg.n_routed_experts))
    limited = route(cfg, logits, None).experts
    plain = route(cfg.replace(topk_method="greedy"), logits, None).experts
    assert (np.sort(limited, -1) != np.sort(plain, -1)).any()


def test_moe_stats_count_every_token_copy(tiny_cfg, tiny_params):
    out = dsv3_jax.apply(tiny_cfg, tiny_params, _tokens(tiny_cfg, batch=3, seq=7))
    counts = out.moe["moe_layers"].counts
    assert counts.shape == (tiny_cfg.n_moe_layers, 3, tiny_cfg.n_routed_experts)
    np.testing.assert_array_equal(counts.sum(-1), 7 * tiny_cfg.num_experts_per_tok)
    np.testing.assert_allclose(out.moe["moe_layers"].mean_probs.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_is_a_relative_rotation(tiny_cfg, interleaved):
    """q.k after RoPE depends only on the position difference."""
    d = tiny_cfg.qk_rope_head_dim
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, d))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, d))

    def dot(pq, pk):
        cq, sq = rope_angles(tiny_cfg, jnp.array([[pq]]))
        ck, sk = rope_angles(tiny_cfg, jnp.array([[pk]]))
        return float((apply_rope(q, cq, sq, interleaved) * apply_rope(k, ck, sk, interleaved)).sum())

    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-5)
    assert dot(5, 2) != pytest.approx(dot(5, 4), rel=1e-3)


def test_yarn_frequencies_follow_deepseek_reference():
    """freqs = freqs/40 (1 - smooth) + freqs smooth, ramp over dims (10, 23) (REFERENCE.md)."""
    from dsv3_jax.model.rope import rope_frequencies

    cfg = dsv3_jax.load_config("deepseek-v3-671b")
    inv_freq, factor = rope_frequencies(cfg)
    base = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    smooth = 1 - np.clip((np.arange(32) - 10) / (23 - 10), 0, 1)
    np.testing.assert_allclose(inv_freq, base / 40 * (1 - smooth) + base * smooth, rtol=1e-6)
    assert factor == 1.0


def test_remat_policies_give_the_same_gradients(tiny_cfg, tiny_params):
    tokens = _tokens(tiny_cfg)

    def loss(params, policy):
        return dsv3_jax.apply(tiny_cfg.replace(remat_policy=policy), params, tokens).logits.std()

    base = jax.grad(loss)(tiny_params, "none")
    for policy in ("full", "dots"):
        other = jax.grad(loss)(tiny_params, policy)
        for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(other), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
