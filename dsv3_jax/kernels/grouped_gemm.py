"""Grouped GEMMs for MoE experts as Pallas kernels: tokens sorted by expert, contiguous groups of run-time sizes.

Two kernels, each in BF16 or blockwise FP8 (DeepSeek-V3's 1x128 / 128x128 scaling, see `gemm.py`):

- `grouped_matmul`: out[rows of g] = lhs[rows of g] @ rhs[g]  (fprop, and dgrad with the weights read
  transposed). lhs [M, K], rhs [G, K, N] (`transpose_rhs=False`) or [G, N, K] (`transpose_rhs=True`,
  K-major: required for FP8). Rows past sum(group_sizes) come out zero, as in `jax.lax.ragged_dot`.
- `transposed_grouped_matmul`: out[g] = a[rows of g]^T @ b[rows of g]  (wgrad). Token-major operands
  a [M, Ka], b [M, Nb] (BF16), or token-last a [Ka, M], b [Nb, M] (FP8: K-major, each quantized in 1x128
  tiles along the tokens). Empty groups give zero gradients.

Scheduling: a host-side (XLA) table assigns each program of `grouped_matmul` one row tile of one group
(a tile that straddles a group boundary is computed once per group and each stores its own rows), as the
Mosaic GPU `ragged_dot_mgpu` kernel of jax does with its unrolled group loop; the table handles any number
of groups and empty ones. At most cdiv(M, block_m) + G row tiles exist; surplus programs do no K steps.
FP8 token tiles of `transposed_grouped_matmul` are the global 128-row tiles of the quantization, masked to
the group's rows.

Backends: Pallas on Triton, for the reasons given in `gemm.py` (interpretable on CPU; Triton emits WGMMA
for BF16 and FP8), and for FP8 on a GPU the warp-specialized Mosaic GPU kernels of `grouped_gemm_mgpu`
(`default_config`, `default_wgrad_config`: where their tiles fit; a `config` picks either explicitly).
Measured on H100 (bench/RESULTS.md run 5, 32768 tokens): BF16 (Triton) 513-614 TFLOP/s forward (best tile),
430-544 wgrad, 603 for forward + dgrad + wgrad on 8 x 4096 tokens (4096 x 7168), ahead of jax's Mosaic GPU
`ragged_dot_mgpu` (405-514, untuned) and 3-41x `jax.lax.ragged_dot`. FP8: Triton 271-330 forward and
194-285 wgrad, held back by the per-128-K promotion as in `gemm.py`; Mosaic 714-993 forward and 514-740
wgrad, so that FP8 forward + dgrad + wgrad (with its quantizations) runs at 566 TFLOP/s against BF16's 603
(run 1, all Triton: 183). On H200 (run 6, 8 x 4096 tokens): BF16 Triton 572-619 forward, 529-530 wgrad;
Mosaic FP8 with two K blocks per step 1051-1105 forward, 752-908 wgrad. Offsets are int32: every operand
must hold fewer than 2^31 elements.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from dsv3_jax.kernels import grouped_gemm_mgpu
from dsv3_jax.kernels.gemm import (
    SCALE_BLOCK,
    GemmConfig,
    masked_load,
    masked_load_1d,
    scaled_dot_step,
    swizzle,
    tile_mask,
)
from dsv3_jax.kernels.grouped_gemm_mgpu import MgpuGroupedConfig

# Defaults: the fastest tiles measured on H100 (dsv3_jax/bench/RESULTS.md): BF16 128x256x64 / 8 warps / 3
# stages (597 TFLOP/s on 8 x 4096 tokens, 7168 -> 4096, against 527 for 128x128x64); FP8 128x128x128 / 8 warps
# / 4 stages (the FP32 promotion tile next to the accumulator makes wider FP8 tiles spill registers).
DEFAULT_BF16 = GemmConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
DEFAULT_FP8 = GemmConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=4)
# FP32 operands (e.g. a float32 model on the "pallas" backend): the BF16 tile at half the K depth, so its three
# stages take the same 144 KiB of shared memory (at block_k=64 they ask 288 KiB, past H100/H200's 227 KiB).
DEFAULT_FP32 = dataclasses.replace(DEFAULT_BF16, block_k=DEFAULT_BF16.block_k // 2)


def _triton_default(scaled: bool, itemsize: int) -> GemmConfig:
    """The Triton tile for FP8 (scaled), 2-byte or 4-byte operands."""
    if scaled:
        return DEFAULT_FP8
    return DEFAULT_FP32 if itemsize > 2 else DEFAULT_BF16


def tile_table(group_sizes: jax.Array, m: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row-tile program: group id [T], first row [T], end row [T] (int32), T = cdiv(m, block_m) + G.

    Group G (one past the last) is the tail of rows past sum(group_sizes), which is written with zeros;
    unused programs get an empty row range.
    """
    n_groups = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    starts = jnp.concatenate([starts, ends[-1:]])                       # + the zero tail [total, m)
    ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    first = starts // block_m
    n_tiles = jnp.where(ends > starts, (ends - 1) // block_m - first + 1, 0)
    tile_end = jnp.cumsum(n_tiles)
    t = jnp.arange(pl.cdiv(m, block_m) + n_groups, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), n_groups).astype(jnp.int32)
    valid = t < tile_end[-1]
    block = first[group] + t - (tile_end[group] - n_tiles[group])
    lo = jnp.where(valid, jnp.maximum(starts[group], block * block_m), 0)
    hi = jnp.where(valid, jnp.minimum(ends[group], block * block_m + block_m), 0)
    return group, lo.astype(jnp.int32), hi.astype(jnp.int32)


def _grouped_kernel(group_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, *refs, m: int, n: int, k: int, n_groups: int,
                    n_tiles: int, transpose_rhs: bool, b_block: int, cfg: GemmConfig):
    scaled = len(refs) == 3
    lhs_scale_ref, rhs_scale_ref, o_ref = refs if scaled else (None, None, refs[0])
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    tile, pid_n = swizzle(pl.program_id(0), n_tiles, pl.cdiv(n, bn), cfg.group_m)
    group, lo, hi = group_ref[tile], lo_ref[tile], hi_ref[tile]
    row0 = (lo // bm) * bm
    rows = row0 + jnp.arange(bm)
    cols = pid_n * bn + jnp.arange(bn)
    row_ok = None if m % bm == 0 else rows < m
    col_ok = None if n % bn == 0 else cols < n
    g = jnp.minimum(group, n_groups - 1)
    # K steps, or none for an empty tile / the zero tail (an i32 product: Pallas-Triton lowers a select
    # between two literal ints to i1 constants, which broke the loop bound)
    steps = pl.cdiv(k, bk) * ((hi > lo) & (group < n_groups)).astype(jnp.int32)
    b_scale_rows = jnp.minimum(cols, n - 1) // b_block

    def body(step, acc):
        k_ok = None if k % bk == 0 else step * bk + jnp.arange(bk) < k
        a = masked_load(lhs_ref, (pl.ds(row0, bm), pl.ds(step * bk, bk)), row_ok, k_ok)
        if transpose_rhs:
            b = masked_load(rhs_ref, (g, pl.ds(pid_n * bn, bn), pl.ds(step * bk, bk)), col_ok, k_ok)
        else:
            b = masked_load(rhs_ref, (g, pl.ds(step * bk, bk), pl.ds(pid_n * bn, bn)), k_ok, col_ok)
        if scaled:
            kb = step * bk // SCALE_BLOCK
            a_s = masked_load_1d(lhs_scale_ref.at[kb, pl.ds(row0, bm)], row_ok)
            b_s = pltr.load(rhs_scale_ref.at[g, kb, b_scale_rows])
            return acc + scaled_dot_step(a, b, a_s, b_s)
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    mine = (rows >= lo) & (rows < hi)
    pltr.store(o_ref.at[pl.ds(row0, bm), pl.ds(pid_n * bn, bn)], acc.astype(o_ref.dtype), mask=tile_mask(mine, col_ok))


def default_config(scaled: bool, m: int, n: int, k: int, interpret: bool = False,
                   itemsize: int = 2) -> GemmConfig | MgpuGroupedConfig:
    """The kernel and tile `grouped_matmul` uses when given no config: FP8 on a GPU takes the Mosaic GPU kernel
    where its tiles fit (measured faster on H100, bench/RESULTS.md run 5), everything else the Triton kernel
    with the tile for its operands' `itemsize` in bytes."""
    mosaic = grouped_gemm_mgpu.config_for(m, n, k)
    if scaled and not interpret and jax.default_backend() == "gpu" and mosaic is not None:
        return mosaic
    return _triton_default(scaled, itemsize)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "b_block", "out_dtype", "config", "interpret"))
def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, lhs_scale: jax.Array | None = None,
                   rhs_scale: jax.Array | None = None, *, transpose_rhs: bool = False, b_block: int = 128,
                   out_dtype: jnp.dtype = jnp.bfloat16, config: GemmConfig | MgpuGroupedConfig | None = None,
                   interpret: bool = False) -> jax.Array:
    """lhs [M, K] rows sorted by group, rhs [G, K, N] or [G, N, K] (transpose_rhs), group_sizes [G] -> [M, N].

    FP8 (lhs and rhs float8_e4m3fn, transpose_rhs=True): lhs_scale [M, Kb] per row per 128 K, rhs_scale
    [G, ceil(N / b_block), Kb] per `b_block` rows of each rhs[g] [N, K] per 128 K. `config`: a GemmConfig
    runs the Triton kernel, an MgpuGroupedConfig (FP8 only) the Mosaic GPU one, None `default_config`'s.
    """
    scaled = lhs_scale is not None
    if scaled != (rhs_scale is not None):
        raise ValueError("give both lhs_scale and rhs_scale (FP8) or neither (BF16)")
    if scaled and not transpose_rhs:
        raise ValueError("FP8 grouped_matmul needs rhs K-major: [G, N, K] with transpose_rhs=True")
    m, k = lhs.shape
    n_groups = rhs.shape[0]
    n, k2 = rhs.shape[1:] if transpose_rhs else rhs.shape[:0:-1]
    if k != k2 or group_sizes.shape != (n_groups,):
        raise ValueError(f"shapes do not fit: lhs {lhs.shape}, rhs {rhs.shape} (transpose_rhs={transpose_rhs}), "
                         f"group_sizes {group_sizes.shape}")
    cfg = config or default_config(scaled, m, n, k, interpret, max(lhs.dtype.itemsize, rhs.dtype.itemsize))
    if isinstance(cfg, MgpuGroupedConfig):
        if not scaled:
            raise ValueError("the Mosaic GPU grouped GEMM is FP8 only")
        return grouped_gemm_mgpu.scaled_grouped_matmul(
            tile_table(group_sizes, m, cfg.cta_m), lhs, lhs_scale, rhs, rhs_scale, b_block=b_block,
            out_dtype=out_dtype, config=cfg, interpret=interpret)
    if SCALE_BLOCK % cfg.block_k:
        raise ValueError(f"block_k={cfg.block_k} must divide {SCALE_BLOCK}")
    table = tile_table(group_sizes, m, cfg.block_m)
    n_tiles = table[0].shape[0]
    operands = [*table, lhs, rhs]
    if scaled:
        operands += [lhs_scale.astype(jnp.float32).T, jnp.swapaxes(rhs_scale.astype(jnp.float32), 1, 2)]
    kernel = functools.partial(_grouped_kernel, m=m, n=n, k=k, n_groups=n_groups, n_tiles=n_tiles,
                               transpose_rhs=transpose_rhs, b_block=b_block, cfg=cfg)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(n_tiles * pl.cdiv(n, cfg.block_n),),
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret, name="fp8_grouped_gemm" if scaled else "grouped_gemm",
    )(*operands)


def _transposed_kernel(start_ref, end_ref, a_ref, b_ref, *refs, ka: int, nb: int, tokens_last: bool,
                       cfg: GemmConfig):
    scaled = len(refs) == 3
    a_scale_ref, b_scale_ref, o_ref = refs if scaled else (None, None, refs[0])
    bm, bn, bt = cfg.block_m, cfg.block_n, cfg.block_k
    grid_m, grid_n = pl.cdiv(ka, bm), pl.cdiv(nb, bn)
    pid = pl.program_id(0)
    group = pid // (grid_m * grid_n)
    pid_m, pid_n = swizzle(pid % (grid_m * grid_n), grid_m, grid_n, cfg.group_m)
    start, end = start_ref[group], end_ref[group]
    first = start // bt
    steps = (pl.cdiv(end, bt) - first) * (end > start).astype(jnp.int32)
    rows = pid_m * bm + jnp.arange(bm)
    cols = pid_n * bn + jnp.arange(bn)
    row_ok = None if ka % bm == 0 else rows < ka
    col_ok = None if nb % bn == 0 else cols < nb

    def body(step, acc, masked: bool):
        t0 = (first + step) * bt
        tokens = t0 + jnp.arange(bt)
        t_ok = (tokens >= start) & (tokens < end) if masked else None
        if tokens_last:
            a = masked_load(a_ref, (pl.ds(pid_m * bm, bm), pl.ds(t0, bt)), row_ok, t_ok)    # [bm, bt]
            b = masked_load(b_ref, (pl.ds(pid_n * bn, bn), pl.ds(t0, bt)), col_ok, t_ok)    # [bn, bt]
        else:
            a = masked_load(a_ref, (pl.ds(t0, bt), pl.ds(pid_m * bm, bm)), t_ok, row_ok)    # [bt, bm]
            b = masked_load(b_ref, (pl.ds(t0, bt), pl.ds(pid_n * bn, bn)), t_ok, col_ok)    # [bt, bn]
        if scaled:
            tb = t0 // SCALE_BLOCK
            a_s = masked_load_1d(a_scale_ref.at[tb, pl.ds(pid_m * bm, bm)], row_ok)
            b_s = masked_load_1d(b_scale_ref.at[tb, pl.ds(pid_n * bn, bn)], col_ok)
            return acc + scaled_dot_step(a, b, a_s, b_s)
        dims = (((1,), (1,)), ((), ())) if tokens_last else (((0,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

    masked, acc = functools.partial(body, masked=True), jnp.zeros((bm, bn), jnp.float32)
    if tokens_last:
        # Only a group's first and last token tiles can hold other groups' tokens: they load masked, the
        # tiles between (the software-pipelined loop) unmasked. A mask along the contiguous token axis
        # splits the FP8 loads into single bytes: 1.75-1.85x faster wgrad on H100 (bench/RESULTS.md).
        # (Token-major BF16 masks whole rows; splitting its loop measured 8-11% slower.)
        acc = jax.lax.fori_loop(0, jnp.minimum(steps, 1), masked, acc)
        acc = jax.lax.fori_loop(1, steps - 1, functools.partial(body, masked=False), acc)
        acc = jax.lax.fori_loop(jnp.maximum(steps - 1, 1), steps, masked, acc)
    else:
        acc = jax.lax.fori_loop(0, steps, masked, acc)
    pltr.store(o_ref.at[group, pl.ds(pid_m * bm, bm), pl.ds(pid_n * bn, bn)], acc.astype(o_ref.dtype),
               mask=tile_mask(row_ok, col_ok))


def default_wgrad_config(scaled: bool, m: int, ka: int, nb: int, interpret: bool = False,
                         itemsize: int = 2) -> GemmConfig | MgpuGroupedConfig:
    """The kernel and tile `transposed_grouped_matmul` uses when given no config: FP8 on a GPU takes the Mosaic
    GPU kernel where its tiles fit (measured faster on H100, bench/RESULTS.md run 5), the rest the Triton one
    with the tile for its operands' `itemsize` in bytes."""
    if scaled and not interpret and jax.default_backend() == "gpu" and grouped_gemm_mgpu.supports_wgrad(m, ka, nb):
        return grouped_gemm_mgpu.WGRAD_CONFIG
    return _triton_default(scaled, itemsize)


@functools.partial(jax.jit, static_argnames=("tokens_last", "out_dtype", "config", "interpret"))
def transposed_grouped_matmul(a: jax.Array, b: jax.Array, group_sizes: jax.Array, a_scale: jax.Array | None = None,
                              b_scale: jax.Array | None = None, *, tokens_last: bool = False,
                              out_dtype: jnp.dtype = jnp.float32,
                              config: GemmConfig | MgpuGroupedConfig | None = None,
                              interpret: bool = False) -> jax.Array:
    """out[g] = a_g^T b_g [G, Ka, Nb] over the rows of group g.

    a [M, Ka], b [M, Nb] (token-major), or with tokens_last a [Ka, M], b [Nb, M].

    FP8 (tokens_last=True): a_scale [Ka, Mb], b_scale [Nb, Mb], one float32 per 128 tokens, Mb = ceil(M / 128).
    `config`: a GemmConfig runs the Triton kernel, an MgpuGroupedConfig (FP8 only) the Mosaic GPU one, None
    `default_wgrad_config`'s.
    """
    scaled = a_scale is not None
    if scaled != (b_scale is not None):
        raise ValueError("give both a_scale and b_scale (FP8) or neither (BF16)")
    if scaled and not tokens_last:
        raise ValueError("FP8 transposed_grouped_matmul needs K-major (tokens_last) operands [Ka, M], [Nb, M]")
    (ka, m), (nb, m2) = (a.shape, b.shape) if tokens_last else (a.shape[::-1], b.shape[::-1])
    if m != m2:
        raise ValueError(f"token counts differ: a {a.shape} vs b {b.shape} (tokens_last={tokens_last})")
    cfg = config or default_wgrad_config(scaled, m, ka, nb, interpret, max(a.dtype.itemsize, b.dtype.itemsize))
    if isinstance(cfg, MgpuGroupedConfig):
        if not scaled:
            raise ValueError("the Mosaic GPU grouped wgrad is FP8 only")
        return grouped_gemm_mgpu.scaled_grouped_wgrad(group_sizes, a, a_scale, b, b_scale, config=cfg,
                                                      interpret=interpret).astype(out_dtype)
    if scaled and cfg.block_k != SCALE_BLOCK:
        raise ValueError(f"FP8 wgrad steps over whole {SCALE_BLOCK}-token scale tiles: block_k must be {SCALE_BLOCK}")
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    n_groups = group_sizes.shape[0]
    operands = [starts, ends, a, b]
    if scaled:
        operands += [a_scale.astype(jnp.float32).T, b_scale.astype(jnp.float32).T]
    kernel = functools.partial(_transposed_kernel, ka=ka, nb=nb, tokens_last=tokens_last, cfg=cfg)
    grid = n_groups * pl.cdiv(ka, cfg.block_m) * pl.cdiv(nb, cfg.block_n)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_groups, ka, nb), out_dtype), grid=(grid,),
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret, name="fp8_grouped_wgrad" if scaled else "grouped_wgrad",
    )(*operands)
