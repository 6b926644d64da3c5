"""Blockwise-FP8 grouped GEMMs for MoE experts as Pallas Mosaic GPU kernels (warp-specialized, Hopper).

Two kernels, the FP8 cases of `grouped_gemm`'s two (tokens sorted by group, group sizes known only at run time):

- `scaled_grouped_matmul` (fprop, and dgrad on the weights read K-major): lhs [M, K] and rhs [G, N, K]
  float8_e4m3fn, lhs_scale [M, Kb] (1x128 tiles), rhs_scale [G, ceil(N / b_block), Kb] ->
  out[rows of g] = sum_kb lhs_scale[row, kb] rhs_scale[g, n // b_block, kb] (lhs[rows of g] . rhs[g]^T)_kb,
  rows past sum(group_sizes) zero;
- `scaled_grouped_wgrad`: token-last a_t [Ka, M], b_t [Nb, M] with 1x128 scales along the tokens
  [Ka, Mb], [Nb, Mb] -> out[g] = a_g^T b_g [G, Ka, Nb] in FP32, empty groups zero.

Structure: `gemm_mgpu`'s (a persistent grid of one CTA per SM; per CTA a memory warpgroup streaming 128-wide
K blocks of both operands and their scales with TMA, two math warpgroups each promoting their half of the tile
into an FP32 sum once per K block), with a K loop of run-time length. fprop walks the row tiles of
`grouped_gemm.tile_table` (a tile that straddles a group boundary is computed once per group; the tail past
the groups runs no K step and stores zeros) and stores only the group's rows, by TMA from an unswizzled
shared-memory tile in power-of-two row slices (`store_segments`, as jax's `ragged_dot_mgpu`: a TMA box has a
static shape, a group's rows in a tile do not). wgrad walks (group, output tile) and runs its K loop over
the 128-token quantization blocks the group touches; in the first and last, which may hold other groups'
tokens, the math warpgroup loads its rows of a into registers, zeroes those tokens (a bitwise AND: 8-bit
registers allow no arithmetic) and issues the WGMMA with A from registers; the blocks between take A from
shared memory.

Needs M % cta_m == 0, N % cta_n == 0, K % 128 == 0 (`supports`), and for wgrad Ka % cta_m, Nb % cta_n,
M % 128 == 0 with 64-row warpgroup tiles (`supports_wgrad`); `grouped_gemm` sends other shapes, and
everything off GPU, to its Triton kernels. The Mosaic GPU interpreter (jax >= 0.11) runs the fprop kernel
on CPU; it has no WGMMA with A in registers, so the wgrad kernel is tested compiled only.

Measured on H100 (bench/RESULTS.md run 5, 32768 tokens, DeepGEMM's shapes): fprop 714-993 TFLOP/s (best
configuration; 2.5-3.3x the Triton FP8 kernel, ahead of the best Triton BF16 tile at every shape); wgrad
740 TFLOP/s on 8 x 4096 tokens (Triton FP8 285, Triton BF16 544), 514 on the skewed 32-expert load, 634-656
at the proxy's 65536 tokens over 32 experts (Triton FP8 241-242; masking every block in registers: 463-468).
On H200 (run 6, 8 x 4096 tokens, two K blocks per step): fprop 1051-1105, wgrad 752-908.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsv3_jax.kernels import gemm_mgpu
from dsv3_jax.kernels.gemm import SCALE_BLOCK
from dsv3_jax.kernels.gemm_mgpu import (
    WarpgroupTiles,
    k_operands,
    k_pipeline,
    promote,
    promote_step,
    scale_slice,
    warp_specialized_kernel,
    warpgroup_slices,
    wgmma_zeros,
)


@dataclasses.dataclass(frozen=True)
class MgpuGroupedConfig(WarpgroupTiles):
    """The grouped kernels' tiles (`gemm_mgpu.WarpgroupTiles`; tile_m a power of two, two math warpgroups)."""

    def __post_init__(self):
        if self.math_wgs != 2:
            raise ValueError(f"the grouped kernels run two math warpgroups; got math_wgs={self.math_wgs}")


# Measured on H200 (bench/RESULTS.md run 6, 8 x 4096 tokens): two 128-wide K blocks per pipeline step (both
# blocks' WGMMAs in flight, the first block's promotion overlapping the second's WGMMAs), 2 steps in flight,
# 1051-1105 TFLOP/s against 815-934 for one block per step (5 in flight).
DEFAULT_CONFIG = MgpuGroupedConfig(max_concurrent_steps=2, k_blocks=2)
ONE_BLOCK_CONFIG = MgpuGroupedConfig()     # K an odd number of 128-wide blocks
WGRAD_CONFIG = MgpuGroupedConfig()         # wgrad: its masked boundary blocks are one 128-token block a step


def smem_bytes(config: MgpuGroupedConfig, out_dtype: jnp.dtype) -> int:
    """Shared memory of the buffers: the K pipeline's (`gemm_mgpu.pipeline_bytes`), plus one output tile per
    math warpgroup (barriers not counted)."""
    return gemm_mgpu.pipeline_bytes(config) + 2 * config.tile_m * config.tile_n * jnp.dtype(out_dtype).itemsize


def fit_smem(config: MgpuGroupedConfig, out_dtype: jnp.dtype) -> MgpuGroupedConfig:
    """`config` with as many pipeline stages as fit next to `out_dtype`'s output tiles (FP32 out: 4 of 5)."""
    return gemm_mgpu.fit_smem(config, out_dtype, smem_bytes)


def supports(m: int, n: int, k: int, config: MgpuGroupedConfig) -> bool:
    """Whether `config` tiles lhs [M, K] x rhs [G, N, K] (whole CTA row and column tiles, whole K steps)."""
    return gemm_mgpu.fits(m, n, k, config)


def config_for(m: int, n: int, k: int) -> MgpuGroupedConfig | None:
    """The default configuration that tiles lhs [M, K] x rhs [G, N, K], or None (then the Triton kernel runs)."""
    return next((c for c in (DEFAULT_CONFIG, ONE_BLOCK_CONFIG) if supports(m, n, k, c)), None)


def store_segments(start: jax.Array, count: jax.Array, rows: int) -> list[tuple[int, jax.Array, jax.Array]]:
    """Rows [start, start + count) of a `rows`-row tile (count <= rows, `rows` a power of two) as power-of-two
    slices: (size, offset, on) for size = rows, rows / 2, ..., 1; the slices with `on` cover each row once."""
    if rows & (rows - 1):
        raise ValueError(f"tile rows must be a power of two, got {rows}")
    segments, offset, size = [], start, rows
    while size:
        on = (count & size) != 0
        segments.append((size, offset, on))
        offset = offset + (count & size)
        size //= 2
    return segments


def _kernel(group_gmem, lo_gmem, hi_gmem, a_gmem, b_gmem, as_gmem, bs_gmem, out_gmem, *, cfg: MgpuGroupedConfig,
            b_uniform: bool, interpret: bool):
    k = a_gmem.shape[1]
    n_groups, n = b_gmem.shape[:2]
    n_tiles = group_gmem.shape[0]
    tile_m, tile_n, cta_m, cta_n = cfg.tile_m, cfg.tile_n, cfg.cta_m, cfg.cta_n
    n_iters, k_steps = n // cta_n, k // (SCALE_BLOCK * cfg.k_blocks)
    stages = min(cfg.max_concurrent_steps, k_steps)      # the dynamic-length pipeline keeps every slot it is given
    pipeline = functools.partial(k_pipeline, cfg, stages)
    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore, k_steps).get_allocations(*k_operands(cfg, a_gmem, b_gmem.at[0], as_gmem,
                                                                              bs_gmem.at[0])),
        out_smem=plgpu.SMEM((2, tile_m, tile_n), out_gmem.dtype),
        collective_axes="wg",
    )
    def _scope(allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((n_tiles * n_iters,), collective_axes="sm")
        def _tiles(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            ti, ni = plgpu.planar_snake(lin, (n_tiles, n_iters), 1, cfg.grid_tile_width)
            group, lo, hi = group_gmem[ti], lo_gmem[ti], hi_gmem[ti]
            g = jnp.minimum(group, n_groups - 1)
            # K steps: none for an unused entry and for the tail past the groups (whose rows get zeros)
            steps = k_steps * ((hi > lo) & (group < n_groups)).astype(jnp.int32)
            row0 = lo // cta_m * cta_m
            cta_rows, cta_cols = pl.ds(row0, cta_m), pl.ds(ni * cta_n, cta_n)
            wg_rows, wg_cols = warpgroup_slices(cfg, wg)

            def compute_context(eval_pipeline):
                acc = eval_pipeline(wgmma_zeros(tile_m, tile_n, interpret)).astype(out_gmem.dtype)
                first = row0 + wg_rows.start                                     # this warpgroup's first row
                start = jnp.clip(lo - first, 0, tile_m)
                count = jnp.clip(hi - first, 0, tile_m) - start
                cols = pl.ds(ni * cta_n + wg_cols.start, tile_n)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)          # the last tile's stores have read out_smem
                out_smem[wg] = acc
                plgpu.commit_smem()
                for size, offset, on in store_segments(start, count, tile_m):
                    pl.when(on)(functools.partial(plgpu.copy_smem_to_gmem, out_smem.at[wg, pl.ds(offset, size)],
                                                  out_gmem.at[pl.ds(first + offset, size), cols]))

            pipeline(promote_step(cfg, wg_rows, wg_cols, b_uniform), compute_context, steps)(
                *k_operands(cfg, a_gmem.at[cta_rows], b_gmem.at[g].at[cta_cols], as_gmem.at[:, scale_slice(cta_rows)],
                            bs_gmem.at[g].at[:, scale_slice(cta_cols)]),
                allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("b_block", "out_dtype", "config", "interpret"))
def scaled_grouped_matmul(table: tuple[jax.Array, jax.Array, jax.Array], lhs: jax.Array, lhs_scale: jax.Array,
                          rhs: jax.Array, rhs_scale: jax.Array, *, b_block: int = 128,
                          out_dtype: jnp.dtype = jnp.bfloat16, config: MgpuGroupedConfig | None = None,
                          interpret: bool = False) -> jax.Array:
    """lhs [M, K] fp8 with lhs_scale [M, Kb], rhs [G, N, K] fp8 with rhs_scale [G, ceil(N / b_block), Kb] -> [M, N].

    `table` = `grouped_gemm.tile_table(group_sizes, M, config.cta_m)`: group [T], first row [T], end row [T];
    config None: `config_for`'s.
    interpret=True runs Pallas' Mosaic GPU interpreter (CPU, jax >= 0.11; slow: small shapes only).
    """
    (m, k), (n_groups, n, k2) = lhs.shape, rhs.shape
    config = config or config_for(m, n, k) or DEFAULT_CONFIG
    if not supports(m, n, k, config) or k != k2:
        raise ValueError(f"Mosaic GPU grouped GEMM needs M % {config.cta_m}, N % {config.cta_n}, "
                         f"K % {SCALE_BLOCK * config.k_blocks} == 0 and equal K; got lhs {lhs.shape}, rhs {rhs.shape}")
    kb = k // SCALE_BLOCK
    if lhs_scale.shape != (m, kb) or rhs_scale.shape != (n_groups, pl.cdiv(n, b_block), kb):
        raise ValueError(f"scale shapes {lhs_scale.shape}, {rhs_scale.shape} do not fit lhs {lhs.shape}, rhs "
                         f"{rhs.shape} with b_block={b_block}")
    cfg = fit_smem(config, out_dtype)
    # scales K-block-major, rhs's expanded to one per row of rhs[g]: [Kb, M], [G, Kb, N] (TMA rows of one K block)
    a_s = lhs_scale.astype(jnp.float32).T
    b_s = jnp.swapaxes(jnp.repeat(rhs_scale.astype(jnp.float32), b_block, axis=1)[:, :n], 1, 2)
    kernel = warp_specialized_kernel(
        functools.partial(_kernel, cfg=cfg, b_uniform=b_block % cfg.tile_n == 0, interpret=interpret),
        jax.ShapeDtypeStruct((m, n), out_dtype), interpret)
    return kernel(*table, lhs, rhs, a_s, b_s)


def _wgrad_kernel(start_gmem, end_gmem, a_gmem, b_gmem, as_gmem, bs_gmem, out_gmem, *, cfg: MgpuGroupedConfig,
                  interpret: bool):
    n_groups, ka, nb = out_gmem.shape
    tile_m, tile_n, cta_m, cta_n = cfg.tile_m, cfg.tile_n, cfg.cta_m, cfg.cta_n
    m_iters, n_iters = ka // cta_m, nb // cta_n
    pipeline = functools.partial(k_pipeline, cfg, cfg.max_concurrent_steps)
    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore, cfg.max_concurrent_steps).get_allocations(a_gmem, b_gmem, as_gmem, bs_gmem),
        out_smem=plgpu.SMEM((2, tile_m, tile_n), jnp.float32),
        collective_axes="wg",
    )
    def _scope(allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((n_groups * m_iters * n_iters,), collective_axes="sm")
        def _tiles(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            g = lin // (m_iters * n_iters)
            mi, ni = plgpu.planar_snake(lin % (m_iters * n_iters), (m_iters, n_iters), 1, cfg.grid_tile_width)
            start, end = start_gmem[g], end_gmem[g]
            first_block = start // SCALE_BLOCK
            steps = (pl.cdiv(end, SCALE_BLOCK) - first_block) * (end > start).astype(jnp.int32)
            cta_rows, cta_cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
            wg_rows, wg_cols = warpgroup_slices(cfg, wg)

            def body(idx, a_smem, b_smem, as_smem, bs_smem, acc):
                t0 = (first_block + idx[0]) * SCALE_BLOCK
                def promote_block(a):
                    return promote([a], [b_smem], as_smem, bs_smem, acc, wg_rows, wg_cols, tile_m, tile_n)

                def masked():   # tokens of other groups in this block: a from registers with their columns zeroed
                    a = a_smem[wg_rows]
                    tokens = t0 + lax.broadcasted_iota(jnp.int32, a.shape, 1)
                    keep = jnp.where((tokens >= start) & (tokens < end), -1, 0).astype(jnp.int8)  # 8-bit: bitwise only
                    kept = lax.bitcast_convert_type(lax.bitcast_convert_type(a, jnp.int8) & keep, a.dtype)
                    return promote_block(kept)

                interior = (t0 >= start) & (t0 + SCALE_BLOCK <= end)
                return lax.cond(interior, lambda: promote_block(a_smem.at[wg_rows]), masked)

            def compute_context(eval_pipeline):
                acc = eval_pipeline(wgmma_zeros(tile_m, tile_n, interpret))
                rows = pl.ds(mi * cta_m + wg_rows.start, tile_m)
                cols = pl.ds(ni * cta_n + wg_cols.start, tile_n)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)          # the last tile's store has read out_smem
                out_smem[wg] = acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[g, rows, cols])

            pipeline(body, compute_context, steps, first_block)(
                a_gmem.at[cta_rows], b_gmem.at[cta_cols], as_gmem.at[:, scale_slice(cta_rows)],
                bs_gmem.at[:, scale_slice(cta_cols)],
                allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def supports_wgrad(m: int, ka: int, nb: int, config: MgpuGroupedConfig = WGRAD_CONFIG) -> bool:
    """Whether `config` tiles the wgrad out [G, Ka, Nb] over M tokens (whole tiles, whole 128-token blocks;
    the masked K blocks take a from registers, which needs 64-row warpgroup tiles)."""
    return (ka % config.cta_m == 0 and nb % config.cta_n == 0 and m % SCALE_BLOCK == 0 and config.tile_m == 64
            and config.k_blocks == 1)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def scaled_grouped_wgrad(group_sizes: jax.Array, a_t: jax.Array, a_scale: jax.Array, b_t: jax.Array,
                         b_scale: jax.Array, *, config: MgpuGroupedConfig = WGRAD_CONFIG,
                         interpret: bool = False) -> jax.Array:
    """out[g] = a_g^T b_g [G, Ka, Nb] in FP32 over the tokens of group g, from token-last (K-major) FP8
    a_t [Ka, M], b_t [Nb, M] with 1x128 scales along the tokens a_scale [Ka, Mb], b_scale [Nb, Mb].

    Per group, the K loop runs over the 128-token blocks its tokens touch; a block shared with another group
    (at most the first and the last) has the other group's tokens zeroed in a (in registers). Empty groups
    give zeros.
    """
    (ka, m), (nb, m2) = a_t.shape, b_t.shape
    mb = pl.cdiv(m, SCALE_BLOCK)
    if m != m2 or not supports_wgrad(m, ka, nb, config):
        raise ValueError(f"Mosaic GPU grouped wgrad needs Ka % {config.cta_m}, Nb % {config.cta_n}, M % "
                         f"{SCALE_BLOCK} == 0 and equal M; got a_t {a_t.shape}, b_t {b_t.shape}")
    if a_scale.shape != (ka, mb) or b_scale.shape != (nb, mb):
        raise ValueError(f"scale shapes {a_scale.shape}, {b_scale.shape} do not fit a_t {a_t.shape}, b_t {b_t.shape}")
    cfg = fit_smem(config, jnp.float32)
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    kernel = warp_specialized_kernel(functools.partial(_wgrad_kernel, cfg=cfg, interpret=interpret),
                                     jax.ShapeDtypeStruct((group_sizes.shape[0], ka, nb), jnp.float32), interpret)
    return kernel(starts, ends, a_t, b_t, a_scale.astype(jnp.float32).T, b_scale.astype(jnp.float32).T)
