"""Low-precision matmul with FP32 accumulation whose backward GEMMs stay in the low precision too.

    y [M, N] = matmul(x [M, K], w [K, N], dtype)     operands cast to `dtype` (BF16), FP32 accumulation,
                                                      y in `dtype`
    dx = dy . w^T   (dtype operands, FP32 accumulation, dx in x's dtype)
    dw = x^T . dy   (dtype operands, FP32 accumulation, dw in w's dtype: FP32 master weights get FP32 grads)

`jax.lax.dot_general(x, w, preferred_element_type=float32).astype(bf16)`, the plain way to write the
forward, differentiates into FP32 GEMMs: the cast's transpose turns dy into FP32, and the transposed dots
then promote the BF16 operand to FP32 (on H100: TF32 cuBLAS kernels at half the BF16 rate, plus the
converts). Here the three GEMMs run on BF16 operands as in the paper's mixed-precision recipe, and dw
keeps FP32 (the cotangent dy is BF16 either way, so dgrad sees the same operand values).
Measured on H100 (bench/RESULTS.md, 2026-11-24): proxy-1gpu forward + backward spent 223 of 606 ms in
TF32 GEMMs of the dense layers and the output head; with every `Dense` on this op (and the gather-only MoE
of `dsv3_jax.ops.permute`) the step took 0.429-0.438 s instead of 0.620 s.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, dtype: Any = jnp.bfloat16) -> jax.Array:
    """x [M, K] . w [K, N] -> [M, N] in `dtype`, on `dtype` operands with FP32 accumulation."""
    return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=F32).astype(dtype)


def _matmul_fwd(x, w, dtype):
    xl, wl = x.astype(dtype), w.astype(dtype)
    # zero-size arrays carry the primal dtypes into the backward pass (the gradients come back in them)
    return matmul(xl, wl, dtype), (xl, wl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _matmul_bwd(dtype, res, dy):
    xl, wl, x_like, w_like = res
    dy = dy.astype(dtype)
    dx = jnp.dot(dy, wl.T, preferred_element_type=F32).astype(x_like.dtype)
    dw = jnp.dot(xl.T, dy, preferred_element_type=F32).astype(w_like.dtype)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)
