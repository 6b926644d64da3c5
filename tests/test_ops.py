"""dsv3_jax.ops.permute (gather-only MoE row moves) and dsv3_jax.ops.matmul (BF16 GEMMs in both passes)
against the plain jnp forms they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.ops.matmul import matmul
from dsv3_jax.ops.permute import dispatch_rows, inverse_permutation, permute_rows


def normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_inverse_permutation():
    perm = jax.random.permutation(jax.random.key(0), 257).astype(jnp.int32)
    inv = inverse_permutation(perm)
    np.testing.assert_array_equal(inv[perm], np.arange(257))
    np.testing.assert_array_equal(perm[inv], np.arange(257))


def test_permute_rows_matches_take_and_scatter():
    x = normal(1, (96, 24), jnp.bfloat16)
    perm = jax.random.permutation(jax.random.key(2), 96).astype(jnp.int32)
    inv = inverse_permutation(perm)
    np.testing.assert_array_equal(permute_rows(x, perm, inv), jnp.take(x, perm, axis=0))
    np.testing.assert_array_equal(permute_rows(x, inv, perm), jnp.zeros_like(x).at[perm].set(x))
    g = normal(3, (96, 24), jnp.bfloat16)
    got = jax.vjp(lambda x: permute_rows(x, perm, inv), x)[1](g)[0]
    want = jax.vjp(lambda x: jnp.take(x, perm, axis=0), x)[1](g)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dispatch_rows_matches_take(dtype):
    n, k, d = 40, 4, 16
    experts = jax.random.randint(jax.random.key(4), (n, k), 0, 8)
    order = jnp.argsort(experts.reshape(-1), stable=True).astype(jnp.int32)
    inv = inverse_permutation(order)
    x = normal(5, (n, d), dtype)
    np.testing.assert_array_equal(dispatch_rows(x, order, inv, k), jnp.take(x, order // k, axis=0))
    g = normal(6, (n * k, d), dtype)
    got = jax.vjp(lambda x: dispatch_rows(x, order, inv, k), x)[1](g)[0]
    exact = jax.vjp(lambda x: jnp.take(x, order // k, axis=0), x.astype(jnp.float32))[1](g.astype(jnp.float32))[0]
    assert got.dtype == dtype
    assert rel(got, exact) < (1e-6 if dtype == jnp.float32 else 4e-3)   # one BF16 rounding of the f32 sum


def test_matmul_forward_and_grads():
    x, w = normal(7, (64, 96), jnp.bfloat16), normal(8, (96, 48), jnp.float32)
    y = matmul(x, w, jnp.bfloat16)
    plain = jax.lax.dot_general(x, w.astype(jnp.bfloat16), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, plain.astype(jnp.bfloat16))
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w).astype(jnp.float32)))
    dx, dw = jax.grad(loss(lambda x, w: matmul(x, w, jnp.bfloat16)), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(loss(lambda x, w: (x.astype(jnp.float32) @ w.astype(jnp.bfloat16).astype(jnp.float32))
                           .astype(jnp.bfloat16)), argnums=(0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert rel(dx, rx) < 1e-2 and rel(dw, rw) < 1e-2          # BF16 operands (dy rounded), FP32 accumulation
