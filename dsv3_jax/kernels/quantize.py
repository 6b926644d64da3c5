"""Fused FP8 quantization as a Pallas kernel: one read of x, both tile orientations written (cast + transpose).

Every FP8 GEMM reads its operands K-major, so each activation and gradient of an FP8 linear is needed twice:
in 1x128 tiles along its channels (fprop, dgrad) and transposed in 1x128 tiles along its tokens (wgrad);
each weight as 128x128 blocks in [K, N] (dgrad) and in [N, K] (fprop). XLA computes the two as separate
reduce-and-convert fusions, the transposed one through a transpose, each reading x. This kernel reads each
128x128 tile of x once and writes both (Transformer Engine's `cast_transpose`, DeepGEMM's per-token-group
quantization with its transposed twin):

    activations x [B, R, C]:  q [B, R, C] with s [B, R, Cb] (1x128 along C), q_t [B, C, R] with s_t [B, C, Rb]
    weights     w [B, R, C]:  q [B, R, C], q_t [B, C, R] = q transposed, s [B, Rb, Cb] (one per 128x128 block)

The scale of a tile comes from its amax through `scale_fn` (`dsv3_jax.ops.fp8.scales_from_amax`: the kernel
computes what that module defines); values are divided by it, clipped to +-448 and rounded to float8_e4m3fn.
Edge tiles are masked: out-of-range elements read as zero (their amax is unchanged) and are not written.
Backend: Pallas on Triton, so the same kernel runs on CPU in interpret mode in the tests; a 128x128 tile per
program, grid (B, Rb, Cb), 4 warps. Measured on H200 (`dsv3-bench quantize`, bench/RESULTS.md run 8): BF16
activations 0.96-1.47 TB/s against XLA's 0.70-1.35, BF16 weights 2.4-3.1 TB/s against 1.8-2.0, codes and scales
identical to XLA's at every shape; in the proxy-1gpu FP8 step it saves 36 ms of 427. FP32 weights (run 9,
the weight branch's transposed codes going through BF16): 7168x18432 0.25 ms and 32x7168x2048 0.87 ms against
XLA's 0.57 and 1.96 (run 8), BF16 weights 0.17 / 0.58 ms (0.21 / 0.66 with the direct 8-bit transpose).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from dsv3_jax.kernels.gemm import SCALE_BLOCK, masked_load, tile_mask

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)
ScaleFn = Callable[[jax.Array], jax.Array]


def _to_fp8(x: jax.Array) -> jax.Array:
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)


def _quantize_kernel(x_ref, *out_refs, rows: int, cols: int, weight: bool, scale_fn: ScaleFn):
    t = SCALE_BLOCK
    b, rb, cb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_ok = None if rows % t == 0 else rb * t + jnp.arange(t) < rows
    col_ok = None if cols % t == 0 else cb * t + jnp.arange(t) < cols
    r_slice, c_slice = pl.ds(rb * t, t), pl.ds(cb * t, t)
    tile = masked_load(x_ref, (b, r_slice, c_slice), row_ok, col_ok).astype(jnp.float32)   # [t, t]
    magnitude = jnp.abs(tile)
    if weight:
        q_ref, q_t_ref, s_ref = out_refs
        s = scale_fn(jnp.max(magnitude))
        q = _to_fp8(tile / s)
        # transposed through BF16 (exact: every E4M3 value is one): ptxas (jax 0.11.2) crashes (exit code 11)
        # on the 8-bit transpose of codes converted from FP32, and the BF16 route is also faster from BF16
        q_t = q.astype(jnp.bfloat16).T.astype(FP8)
        pltr.store(s_ref.at[b, rb, cb], s)
    else:
        q_ref, s_ref, q_t_ref, s_t_ref = out_refs
        s_row = scale_fn(jnp.max(magnitude, axis=1))                 # [t]: one per row (token), along C
        s_col = scale_fn(jnp.max(magnitude, axis=0))                 # [t]: one per column (channel), along R
        q = _to_fp8(tile / s_row[:, None])
        q_t = _to_fp8(tile / s_col[None, :]).T
        pltr.store(s_ref.at[b, cb, r_slice], s_row, mask=row_ok)     # scales block-major: rows contiguous
        pltr.store(s_t_ref.at[b, rb, c_slice], s_col, mask=col_ok)
    pltr.store(q_ref.at[b, r_slice, c_slice], q, mask=tile_mask(row_ok, col_ok))
    pltr.store(q_t_ref.at[b, c_slice, r_slice], q_t, mask=tile_mask(col_ok, row_ok))


def quantize_pair(x: jax.Array, scale_fn: ScaleFn, *, weight: bool = False, interpret: bool = False,
                  num_warps: int = 4) -> tuple[jax.Array, ...]:
    """Both FP8 orientations of x [..., R, C] in one pass (module docstring).

    weight=False: (q [..., R, C], s [..., R, Cb], q_t [..., C, R], s_t [..., C, Rb]);
    weight=True: (q [..., R, C], q_t [..., C, R], s [..., Rb, Cb]). Scales are float32.
    """
    if x.size >= 2 ** 31:
        raise ValueError(f"quantize_pair: x {x.shape} holds {x.size} elements; the kernel's offsets are int32 (< 2^31)")
    *lead, rows, cols = x.shape
    x3 = x.reshape(-1, rows, cols)
    batch, t = x3.shape[0], SCALE_BLOCK
    n_r, n_c = pl.cdiv(rows, t), pl.cdiv(cols, t)
    q_shapes = [jax.ShapeDtypeStruct((batch, rows, cols), FP8), jax.ShapeDtypeStruct((batch, cols, rows), FP8)]
    if weight:
        out_shape = [*q_shapes, jax.ShapeDtypeStruct((batch, n_r, n_c), jnp.float32)]
    else:
        out_shape = [q_shapes[0], jax.ShapeDtypeStruct((batch, n_c, rows), jnp.float32),
                     q_shapes[1], jax.ShapeDtypeStruct((batch, n_r, cols), jnp.float32)]
    kernel = functools.partial(_quantize_kernel, rows=rows, cols=cols, weight=weight, scale_fn=scale_fn)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(batch, n_r, n_c),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="fp8_quantize_weight" if weight else "fp8_quantize_pair",
    )(x3)
    if weight:
        q, q_t, s = outs
        return q.reshape(x.shape), q_t.reshape(*lead, cols, rows), s.reshape(*lead, n_r, n_c)
    q, s_blocks, q_t, s_t_blocks = outs
    return (q.reshape(x.shape), jnp.swapaxes(s_blocks, 1, 2).reshape(*lead, rows, n_c),
            q_t.reshape(*lead, cols, rows), jnp.swapaxes(s_t_blocks, 1, 2).reshape(*lead, cols, n_r))
