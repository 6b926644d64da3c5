"""Blockwise-scaled FP8 GEMM (DeepSeek-V3 fine-grained quantization, paper sec. 3.3.2) as a Pallas kernel.

    out[m, n] = sum_kb a_scale[m, kb] * b_scale[n // b_block, kb] * sum_{k in block kb} a[m, k] * b[n, k]

a [M, K] float8_e4m3fn and b [N, K] float8_e4m3fn are both K-major (b is HF's [out, in] weight layout):
Hopper's FP8 WGMMA reads both operands K-major only, so a GEMM whose contraction is not the last axis
of an operand takes a transposed copy quantized in that orientation (see `dsv3_jax.ops.fp8`).
a_scale [M, Kb] holds one float32 per row per 128-wide K block (1x128 activation tiles); b_scale
[ceil(N / b_block), Kb] one per `b_block` rows of b per K block: b_block=128 for 128x128 weight blocks
(fprop, dgrad), b_block=1 for 1x128 tiles (wgrad, both operands quantized along the token axis).
Kb = ceil(K / 128). Each K step's partial product leaves the tensor cores in FP32 and is scaled and
added to an FP32 accumulator (DeepSeek's promotion to CUDA cores every N_C = 128 elements).

Backend: Pallas on Triton (`jax.experimental.pallas.triton`), chosen because (1) the same kernel runs on
CPU in Pallas interpret mode, so the tests check this very code against the jnp reference on ragged and
unaligned shapes, which Mosaic GPU kernels (TMA, barriers, WGMMA primitives) cannot do on jax 0.10/0.11;
(2) Triton lowers `dot` on FP8 to Hopper's FP8 WGMMA and software-pipelines the K loop (`num_stages`).
Measured on H100 (dsv3_jax/bench/RESULTS.md, 2026-11-24) this kernel is correct but slow: 278-338 TFLOP/s
at M=4096, below cuBLAS BF16 (735-810). The FP32 promotion after every 128-wide K step needs the WGMMA
result in registers, so Triton waits for each WGMMA before the scale-multiply-add and the tensor cores
idle in between. The Mosaic GPU kernel of `gemm_mgpu` hides that with warp specialization (a TMA
warpgroup and two math warpgroups taking turns, DeepGEMM's structure) and runs 593-835 TFLOP/s at the
same shapes: `dsv3_jax.ops.fp8` uses it where its tiles fit and this kernel elsewhere (and in CPU tests
on jax < 0.11, whose Mosaic GPU interpreter cannot run that kernel).
Any M, N, K are accepted: partial tiles are masked (the mask is dropped where a size divides the tile).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

SCALE_BLOCK = 128  # K elements per scale: DeepSeek's 1x128 / 128x128 quantization granularity


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile shape and Triton launch parameters. block_k must divide 128 (one scale per K step or fewer)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8        # programs walk GROUP_M row tiles before the next column tile (L2 reuse)
    num_warps: int = 8
    num_stages: int = 4


SMALL_M_CONFIG = GemmConfig(block_m=64, block_n=128, block_k=128, group_m=1, num_warps=4, num_stages=5)


def default_config(m: int) -> GemmConfig:
    """The tile measured fastest on H100 (bench/RESULTS.md): 128x128x128 / 8 warps, 64-row tiles for M <= 256."""
    return SMALL_M_CONFIG if m <= 256 else GemmConfig()


def swizzle(pid: jax.Array, grid_m: int, grid_n: int, group_m: int) -> tuple[jax.Array, jax.Array]:
    """Map a linear program id to (row tile, column tile), `group_m` row tiles at a time (grouped ordering)."""
    width = group_m * grid_n
    first_m = (pid // width) * group_m
    size_m = jnp.minimum(grid_m - first_m, group_m)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


def tile_mask(row_ok: jax.Array | None, col_ok: jax.Array | None) -> jax.Array | None:
    """[rows, cols] mask from per-row and per-column masks [rows], [cols]; None where all is in range."""
    if row_ok is None and col_ok is None:
        return None
    return (True if row_ok is None else row_ok[:, None]) & (True if col_ok is None else col_ok[None, :])


def masked_load(ref, idx: tuple, row_ok: jax.Array | None, col_ok: jax.Array | None):
    """ref[idx], a 2-D tile (idx ends with its row and column slices), where out-of-range rows/columns
    (mask False) read as zero; None means all in range. One indexer: Triton lowering takes no stacked views."""
    mask = tile_mask(row_ok, col_ok)
    if mask is None:
        return pltr.load(ref.at[idx])
    return pltr.load(ref.at[idx], mask=mask, other=jnp.zeros((), ref.dtype))


def masked_load_1d(ref, ok: jax.Array | None):
    """A 1-D ref (view) where entries with ok False read as zero; ok None means all in range."""
    if ok is None:
        return pltr.load(ref)
    return pltr.load(ref, mask=ok, other=jnp.zeros((), ref.dtype))


def scaled_dot_step(a: jax.Array, b: jax.Array, a_scale: jax.Array, b_scale: jax.Array) -> jax.Array:
    """(a [bm, bk] . b [bn, bk]^T) in FP32, times a_scale [bm] (x) b_scale [bn]: one K step of the promotion."""
    part = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return part * (a_scale[:, None] * b_scale[None, :])


def _gemm_kernel(a_ref, a_scale_ref, b_ref, b_scale_ref, o_ref, *, m: int, n: int, k: int, b_block: int,
                 cfg: GemmConfig):
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    pid_m, pid_n = swizzle(pl.program_id(0), pl.cdiv(m, bm), pl.cdiv(n, bn), cfg.group_m)
    rows = pid_m * bm + jnp.arange(bm)
    cols = pid_n * bn + jnp.arange(bn)
    row_ok = None if m % bm == 0 else rows < m
    col_ok = None if n % bn == 0 else cols < n
    b_scale_rows = jnp.minimum(cols, n - 1) // b_block

    def body(step, acc):
        kb = step * bk // SCALE_BLOCK
        k_ok = None if k % bk == 0 else step * bk + jnp.arange(bk) < k
        a = masked_load(a_ref, (pl.ds(pid_m * bm, bm), pl.ds(step * bk, bk)), row_ok, k_ok)
        b = masked_load(b_ref, (pl.ds(pid_n * bn, bn), pl.ds(step * bk, bk)), col_ok, k_ok)
        a_s = masked_load_1d(a_scale_ref.at[kb, pl.ds(pid_m * bm, bm)], row_ok)
        b_s = pltr.load(b_scale_ref.at[kb, b_scale_rows])
        return acc + scaled_dot_step(a, b, a_s, b_s)

    acc = jax.lax.fori_loop(0, pl.cdiv(k, bk), body, jnp.zeros((bm, bn), jnp.float32))
    pltr.store(o_ref.at[pl.ds(pid_m * bm, bm), pl.ds(pid_n * bn, bn)], acc.astype(o_ref.dtype),
               mask=tile_mask(row_ok, col_ok))


def check_scaled_operands(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, b_block: int) -> None:
    """Raise ValueError naming the operand whose dtype or shape does not fit [M, K] x [N, K]^T with its scales."""
    for name, x in (("a", a), ("b", b)):
        if x.dtype != jnp.float8_e4m3fn:
            raise ValueError(f"{name} must be float8_e4m3fn, got {x.dtype}")
    (m, k), (n, k2) = a.shape[-2:], b.shape[-2:]
    if k != k2:
        raise ValueError(f"contraction sizes differ: a {a.shape} vs b {b.shape} (both K-major)")
    kb = pl.cdiv(k, SCALE_BLOCK)
    if a_scale.shape[-2:] != (m, kb):
        raise ValueError(f"a_scale shape {a_scale.shape} does not fit a {a.shape}: expected [..., {m}, {kb}]")
    if b_scale.shape[-2:] != (pl.cdiv(n, b_block), kb):
        raise ValueError(f"b_scale shape {b_scale.shape} does not fit b {b.shape} with b_block={b_block}: "
                         f"expected [..., {pl.cdiv(n, b_block)}, {kb}]")


@functools.partial(jax.jit, static_argnames=("b_block", "out_dtype", "config", "interpret"))
def scaled_matmul(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, *, b_block: int = 128,
                  out_dtype: jnp.dtype = jnp.bfloat16, config: GemmConfig | None = None,
                  interpret: bool = False) -> jax.Array:
    """a [M, K] fp8 with a_scale [M, Kb], b [N, K] fp8 with b_scale [ceil(N / b_block), Kb] -> [M, N] out_dtype."""
    check_scaled_operands(a, a_scale, b, b_scale, b_block)
    cfg = config or default_config(a.shape[0])
    if SCALE_BLOCK % cfg.block_k:
        raise ValueError(f"block_k={cfg.block_k} must divide {SCALE_BLOCK}")
    (m, k), n = a.shape, b.shape[0]
    grid = pl.cdiv(m, cfg.block_m) * pl.cdiv(n, cfg.block_n)
    kernel = functools.partial(_gemm_kernel, m=m, n=n, k=k, b_block=b_block, cfg=cfg)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(grid,),
        compiler_params=pltr.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret, name="fp8_blockwise_gemm",
    )(a, a_scale.astype(jnp.float32).T, b, b_scale.astype(jnp.float32).T)  # scales K-block-major: rows contiguous
