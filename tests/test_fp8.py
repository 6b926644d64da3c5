"""FP8 numerics (dsv3_jax.ops.fp8): quantization by definition, tile orientation, FP8 linears and their
gradients against FP32, and the model with fp8=True against fp8=False."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.ops import fp8
from dsv3_jax.ops.grouped_matmul import grouped_matmul

FP8_MAX = 448.0


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def spread(key, shape):
    """Normal entries whose rows span a few orders of magnitude (so per-tile scales matter)."""
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, shape) * jnp.exp(2 * jax.random.normal(k2, shape[:-1] + (1,)))


@pytest.mark.parametrize("block", [(1, 128), (128, 128), (128, 1)])
@pytest.mark.parametrize("shape", [(130, 257), (2, 64, 300)])
def test_quantization_follows_the_definition(block, shape):
    x = np.asarray(spread(jax.random.key(0), shape))
    q, s = fp8.quantize(jnp.asarray(x), block)
    assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
    assert s.shape == fp8.scale_shape(shape, block)
    q, s = np.asarray(q).astype(np.float32), np.asarray(s)
    for idx in np.ndindex(*s.shape):
        *lead, bi, bj = idx
        sl = (*lead, slice(block[0] * bi, block[0] * (bi + 1)), slice(block[1] * bj, block[1] * (bj + 1)))
        amax = np.abs(x[sl]).max()
        np.testing.assert_allclose(s[idx], max(amax, fp8.SCALE_EPS) / FP8_MAX, rtol=1e-6)   # s = max(amax, eps) / 448
        if amax > 0:
            assert np.abs(q[sl]).max() == FP8_MAX                                   # the amax lands on +-448
    deq = np.asarray(fp8.dequantize(jnp.asarray(q).astype(jnp.float8_e4m3fn), jnp.asarray(s), block))
    scale = np.asarray(fp8.expand_scales(jnp.asarray(s), shape, block))
    # E4M3: 3 mantissa bits, relative error <= 2^-4, plus half the subnormal step 2^-9 near zero
    assert np.all(np.abs(deq - x) <= 2.0 ** -4 * np.abs(x) + 2.0 ** -10 * scale)


def test_ue8m0_scales_are_powers_of_two_rounded_up():
    x = spread(jax.random.key(1), (64, 384))
    _, s = fp8.quantize(x)
    q2, s2 = fp8.quantize(x, ue8m0=True)
    s, s2 = np.asarray(s), np.asarray(s2)
    assert np.all(np.log2(s2) == np.round(np.log2(s2)))
    assert np.all((s2 >= s) & (s2 < 2 * s))
    assert np.abs(np.asarray(q2.astype(jnp.float32))).max() <= FP8_MAX
    assert rel(fp8.dequantize(q2, jnp.asarray(s2)), x) < 0.05


def test_zero_tiles_and_the_checkpoint_convention():
    x = jnp.zeros((2, 256)).at[1, 200].set(3.0)
    q, s = fp8.quantize(x)
    eps = fp8.SCALE_EPS / FP8_MAX
    np.testing.assert_allclose(np.asarray(s), [[eps] * 2, [eps, 3.0 / FP8_MAX]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fp8.dequantize(q, s)), np.asarray(x), rtol=1e-6)
    _, s0 = fp8.quantize(np.asarray(x), eps=0.0, xp=np)          # checkpoint weights: amax / 448, zero tiles at 1
    np.testing.assert_allclose(s0, [[1.0, 1.0], [1.0, 3.0 / FP8_MAX]], rtol=1e-6)


def test_small_gradients_keep_their_precision():
    """A token-mean loss gives gradients of 1e-6 and below: the amax floor must not flush them (a 1e-4 floor, as in
    DeepGEMM's activation quantizer, made FP8 train 1.44% worse than BF16, bench/RESULTS.md run 7)."""
    x = jax.random.normal(jax.random.key(12), (64, 256))
    for size in (1.0, 1e-7, 1e-9):
        assert rel(fp8.dequantize(*fp8.quantize(x * size)), x * size) < 0.05
    w = jax.random.normal(jax.random.key(13), (256, 128)) * 0.02
    dy = jax.random.normal(jax.random.key(14), (64, 128)) * 1e-8
    _, vjp = jax.vjp(lambda x, w: fp8.fp8_matmul(x, w, jnp.float32, False, "xla"), x, w)
    _, ref = jax.vjp(lambda x, w: jnp.dot(x, w, precision="highest"), x, w)
    for g, r in zip(vjp(dy), ref(dy), strict=True):
        assert rel(g, r) < 0.06


def test_tile_orientation():
    """An outlier changes only the scale of its own tile: 1x128 along K, 128x128, or 1x128 along tokens (x^T)."""
    x = jax.random.normal(jax.random.key(2), (256, 384)).at[130, 260].set(1000.0)
    _, s_act = fp8.quantize(x, fp8.ACT_BLOCK)                   # [256 tokens, 3 K tiles]
    _, s_w = fp8.quantize(x, fp8.WEIGHT_BLOCK)                  # [2, 3]
    _, s_tok = fp8.quantize(x.T, fp8.ACT_BLOCK)                 # [384 channels, 2 token tiles]
    for s, hot in ((s_act, (130, 2)), (s_w, (1, 2)), (s_tok, (260, 1))):
        s = np.asarray(s)
        assert s[hot] == np.float32(1000.0 / FP8_MAX)
        assert np.all(np.delete(s.ravel(), np.ravel_multi_index(hot, s.shape)) < 10.0 / FP8_MAX)


def test_fp8_matmul_is_the_dequantized_product():
    """Each GEMM of the FP8 linear equals an FP32 product of operands quantized in its own orientation."""
    m, k, n = 200, 300, 160
    x, w = spread(jax.random.key(3), (m, k)), jax.random.normal(jax.random.key(4), (k, n)) * 0.02
    dy = jax.random.normal(jax.random.key(5), (m, n))
    y, vjp = jax.vjp(lambda x, w: fp8.fp8_matmul(x, w, jnp.float32, False, "xla"), x, w)
    dx, dw = vjp(dy)
    qd = lambda a, block: fp8.dequantize(*fp8.quantize(a, block), block)
    dot = lambda a, b: jnp.dot(a, b, precision="highest")
    np.testing.assert_allclose(y, dot(qd(x, (1, 128)), qd(w, (128, 128))), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dot(qd(dy, (1, 128)), qd(w, (128, 128)).T), rtol=1e-5, atol=1e-5)
    # wgrad: x^T quantized once along the tokens from x itself (no re-quantization of the fprop's FP8 x)
    np.testing.assert_allclose(dw, dot(qd(x.T, (1, 128)), qd(dy.T, (1, 128)).T), rtol=1e-5, atol=1e-5)
    double = dot(qd(qd(x, (1, 128)).T, (1, 128)), qd(dy.T, (1, 128)).T)
    assert not np.allclose(dw, double, rtol=1e-5, atol=1e-5)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype


def test_fp8_matmul_gradients_close_to_fp32():
    m, k, n = 256, 384, 256
    x, w = spread(jax.random.key(6), (m, k)), jax.random.normal(jax.random.key(7), (k, n)) * 0.02
    dy = jax.random.normal(jax.random.key(8), (m, n))
    ref = jax.vjp(lambda x, w: jnp.dot(x, w, precision="highest"), x, w)
    got = jax.vjp(lambda x, w: fp8.fp8_matmul(x, w, jnp.float32, False, "xla"), x, w)
    assert 0 < rel(got[0], ref[0]) < 0.05
    for g, r in zip(got[1](dy), ref[1](dy), strict=True):
        assert 0 < rel(g, r) < 0.06


def test_fp8_grouped_matmul_gradients_close_to_ragged_dot():
    m, k, n = 300, 256, 192
    sizes = jnp.array([100, 0, 77, 123], jnp.int32)
    x, w = spread(jax.random.key(9), (m, k)), jax.random.normal(jax.random.key(10), (4, k, n)) * 0.02
    dy = jax.random.normal(jax.random.key(11), (m, n))
    ref = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes, precision="highest"), x, w)
    got = jax.vjp(lambda x, w: grouped_matmul(x, w, sizes, jnp.float32, fp8=True, backend="xla"), x, w)
    assert 0 < rel(got[0], ref[0]) < 0.05
    (gx, gw), (rx, rw) = got[1](dy), ref[1](dy)
    assert 0 < rel(gx, rx) < 0.06 and 0 < rel(gw, rw) < 0.06
    assert float(jnp.abs(gw[1]).max()) == 0.0                   # the empty group gets no gradient


def test_tiny_model_fp8_close_to_bf16_path():
    """fp8=True quantizes every eligible linear and the expert GEMMs; loss and gradients stay close."""
    cfg = dsv3_jax.load_config("tiny", dtype="float32", num_hidden_layers=2)
    cfg8 = cfg.replace(fp8=True)
    params = dsv3_jax.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)

    def loss(cfg, p):
        logits = dsv3_jax.apply(cfg, p, tokens).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    l32, g32 = jax.value_and_grad(lambda p: loss(cfg, p))(params)
    l8, g8 = jax.value_and_grad(lambda p: loss(cfg8, p))(params)
    assert l8 != l32 and abs(float(l8 - l32)) / float(l32) < 1e-3
    flat32, flat8 = jax.tree_util.tree_leaves_with_path(g32), jax.tree_util.tree_leaves(g8)
    for (path, a), b in zip(flat32, flat8, strict=True):       # FP8 errors of ~4% per GEMM compound over layers
        if float(jnp.linalg.norm(a)) > 0:
            assert rel(b, a) < 0.2, jax.tree_util.keystr(path)
