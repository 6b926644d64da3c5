"""Blockwise-scaled FP8 GEMM on Hopper as a Pallas Mosaic GPU kernel (warp-specialized, per-K-block promotion).

    out[m, n] = sum_kb a_scale[m, kb] * b_scale[n // b_block, kb] * sum_{k in block kb} a[m, k] * b[n, k]

The same function as `dsv3_jax.kernels.gemm.scaled_matmul` (operands, scales and layout are described
there): a [M, K], b [N, K] float8_e4m3fn, both K-major; a_scale [M, Kb]; b_scale [ceil(N / b_block), Kb].

Structure (DeepGEMM's, in `jax.experimental.pallas.mosaic_gpu`): a persistent grid of one CTA per SM walks
output tiles in a planar snake; in each CTA a memory warpgroup streams 128-wide K blocks of a, b and
their scales into shared memory with TMA (`emit_pipeline_warp_specialized`, `max_concurrent_steps`
buffers), and two math warpgroups each own half of the tile. Per K block a math warpgroup issues FP8
WGMMAs into a fresh FP32 accumulator, waits for them, and adds the result times a_scale (x) b_scale
into its running FP32 sum (DeepSeek's promotion every N_C = 128). The wait stalls only that warpgroup:
the other one's WGMMAs keep the tensor cores busy meanwhile. Needs M, N divisible by the CTA tile and
K by 128 (`supports`); other shapes go to the Triton kernel.

Measured on H100 (bench/RESULTS.md): 597-843 TFLOP/s at M=4096 (2.2-2.7x the Triton kernel, whose
WGMMAs the promotion serializes), ahead of cuBLAS BF16 at (7168, 16384) and (4096, 7168), behind it at
the shapes with short K (512-2048), where the per-tile epilogue is not overlapped with the next tile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsv3_jax.kernels.gemm import SCALE_BLOCK, check_scaled_operands

NUM_SMS = 132          # H100 SXM / H200
FP8_SWIZZLE = 128      # bytes: a 128-wide K block of FP8 is one 128-byte swizzle row
SMEM_LIMIT = 232448    # bytes of shared memory one CTA may take on H100 / H200 (227 KiB)
SMEM_SLACK = 2048      # barriers and alignment on top of `smem_bytes` (1104 bytes measured, H100)


@dataclasses.dataclass(frozen=True)
class WarpgroupTiles:
    """Per-warpgroup tile (tile_m x tile_n); the CTA holds two, stacked along `wg_dim` ("m" or "n"), and keeps
    `max_concurrent_steps` 128-wide K blocks in flight; CTAs walk output tiles in planar-snake bands of
    `grid_tile_width`."""

    tile_m: int = 64
    tile_n: int = 128
    wg_dim: str = "m"
    max_concurrent_steps: int = 5
    grid_tile_width: int = 8

    @property
    def cta_m(self) -> int:
        return self.tile_m * (2 if self.wg_dim == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_dim == "n" else 1)


@dataclasses.dataclass(frozen=True)
class MgpuGemmConfig(WarpgroupTiles):
    """The dense kernel's tiles, plus the snake's minor dimension and the epilogue's column tile."""

    grid_minor_dim: str = "n"
    epi_tile_n: int = 64


# Measured fastest on H100 (bench/RESULTS.md): 64x128 per warpgroup, CTA 128x128, 5 pipeline stages; wider
# per-warpgroup tiles (128x128) need a second 128-register FP32 tile for the promotion and spill.
DEFAULT_CONFIG = MgpuGemmConfig()
NARROW_CONFIG = MgpuGemmConfig(tile_n=64, max_concurrent_steps=6)    # N a multiple of 64 but not of 128 (e.g. 2112)


def fits(m: int, n: int, k: int, config: WarpgroupTiles) -> bool:
    """Whether `config` tiles these sizes (whole CTA tiles along M and N, whole 128-wide K blocks)."""
    return m % config.cta_m == 0 and n % config.cta_n == 0 and k % SCALE_BLOCK == 0


def smem_bytes(config: MgpuGemmConfig, out_dtype: jnp.dtype) -> int:
    """Shared memory of the kernel's buffers: per pipeline stage a 128-wide K block of a and b (FP8) and
    their FP32 scales, plus the double-buffered epilogue tiles of both warpgroups (barriers not counted)."""
    stage = (config.cta_m + config.cta_n) * (SCALE_BLOCK + 4)
    epilogue = 2 * 2 * min(64, config.tile_m) * min(config.epi_tile_n, config.tile_n) * jnp.dtype(out_dtype).itemsize
    return config.max_concurrent_steps * stage + epilogue


def fit_smem(config: WarpgroupTiles, out_dtype: jnp.dtype,
             smem: Callable[[Any, jnp.dtype], int] | None = None) -> Any:
    """`config` with as many of its pipeline stages as fit in shared memory next to `out_dtype`'s output tiles,
    by `smem(config, out_dtype)` (default: this kernel's `smem_bytes`; an FP32 output doubles the epilogue
    tiles: the 5-stage default then needs 4)."""
    smem = smem or smem_bytes
    while config.max_concurrent_steps > 2 and smem(config, out_dtype) + SMEM_SLACK > SMEM_LIMIT:
        config = dataclasses.replace(config, max_concurrent_steps=config.max_concurrent_steps - 1)
    return config


def config_for(m: int, n: int, k: int, out_dtype: jnp.dtype = jnp.bfloat16) -> MgpuGemmConfig | None:
    """The default configuration that tiles [M, K] x [N, K]^T with an `out_dtype` output (its stages cut to
    fit shared memory), or None (the caller then uses the Triton kernel)."""
    config = next((c for c in (DEFAULT_CONFIG, NARROW_CONFIG) if fits(m, n, k, c)), None)
    return None if config is None else fit_smem(config, out_dtype)


def supports(m: int, n: int, k: int) -> bool:
    """Whether some default configuration tiles these sizes."""
    return config_for(m, n, k) is not None


def k_pipeline(cfg: WarpgroupTiles, stages: int, body: Callable[..., Any], compute_context: Callable[..., Any],
               steps: int | jax.Array, first_block: int | jax.Array = 0) -> Any:
    """The warp-specialized K pipeline over `steps` 128-wide K blocks from block `first_block` on: per step
    a [cta_m, 128] block of a, [cta_n, 128] of b (FP8, K-major) and their FP32 scales [1, cta_m], [1, cta_n],
    `stages` steps in flight, a memory warpgroup feeding two math warpgroups."""
    fp8_transforms = (plgpu.TilingTransform((8, FP8_SWIZZLE)), plgpu.SwizzleTransform(FP8_SWIZZLE))
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=stages, compute_context=compute_context,
        in_specs=[
            plgpu.BlockSpec((cfg.cta_m, SCALE_BLOCK), lambda kb: (0, first_block + kb), transforms=fp8_transforms),
            plgpu.BlockSpec((cfg.cta_n, SCALE_BLOCK), lambda kb: (0, first_block + kb), transforms=fp8_transforms),
            plgpu.BlockSpec((1, cfg.cta_m), lambda kb: (first_block + kb, 0)),
            plgpu.BlockSpec((1, cfg.cta_n), lambda kb: (first_block + kb, 0)),
        ],
    )


def promote(a: Any, b_smem: Any, as_smem: Any, bs_smem: Any, acc: jax.Array, wg_rows: pl.Slice, wg_cols: pl.Slice,
            tile_m: int, tile_n: int) -> jax.Array:
    """acc + (a . b^T) * a_scale (x) b_scale for one K block: FP8 WGMMAs into a fresh FP32 tile, then the scaled
    add (a: this warpgroup's rows of the a block in shared memory, or in registers)."""
    def mma(part_ref):
        plgpu.wgmma(part_ref, a, plgpu.transpose_ref(b_smem.at[wg_cols], (1, 0)))
        return part_ref[...]

    part = pl.run_scoped(mma, plgpu.ACC((tile_m, tile_n), jnp.float32))
    sa, sb = as_smem[0, wg_rows], bs_smem[0, wg_cols]
    shape = (tile_m, tile_n)
    return acc + part * lax.broadcast_in_dim(sa, shape, [0]) * lax.broadcast_in_dim(sb, shape, [1])


def wgmma_zeros(tile_m: int, tile_n: int, interpret: bool) -> jax.Array:
    """A zero FP32 accumulator tile in the WGMMA register layout."""
    zeros = jnp.zeros((tile_m, tile_n), jnp.float32)
    if not interpret:           # the interpreter has no layouts (and no lowering of layout_cast)
        zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
    return zeros


def _kernel(a_gmem, b_gmem, as_gmem, bs_gmem, out_gmem, *, cfg: MgpuGemmConfig, interpret: bool):
    m, k = a_gmem.shape
    n = b_gmem.shape[0]
    out_dtype = out_gmem.dtype
    tile_m, tile_n, cta_m, cta_n = cfg.tile_m, cfg.tile_n, cfg.cta_m, cfg.cta_n
    m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // SCALE_BLOCK
    epi_n = min(cfg.epi_tile_n, tile_n)
    out_swizzle = plgpu.find_swizzle(epi_n * jnp.dtype(out_dtype).itemsize * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_dtype).itemsize)),
                      plgpu.SwizzleTransform(out_swizzle))
    epi_m = min(64, tile_m)

    pipeline = functools.partial(k_pipeline, cfg, cfg.max_concurrent_steps, steps=k_iters)

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, as_gmem, bs_gmem),
        out_smem=plgpu.SMEM((2, 2, epi_m, epi_n), out_dtype, transforms=out_transforms),
        collective_axes="wg",
    )
    def _scope(allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tiles(info: plgpu.NDLoopInfo):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor_dim == "n" else 0,
                                        cfg.grid_tile_width)
            cta_rows, cta_cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
            wg_rows = pl.ds(wg * tile_m, tile_m) if cfg.wg_dim == "m" else pl.ds(0, tile_m)
            wg_cols = pl.ds(wg * tile_n, tile_n) if cfg.wg_dim == "n" else pl.ds(0, tile_n)

            def body(_, a_smem, b_smem, as_smem, bs_smem, acc):
                return promote(a_smem.at[wg_rows], b_smem, as_smem, bs_smem, acc, wg_rows, wg_cols, tile_m, tile_n)

            def compute_context(eval_pipeline):
                acc = eval_pipeline(wgmma_zeros(tile_m, tile_n, interpret)).astype(out_dtype)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for ei in range(tile_m // epi_m):
                    for ej in range(tile_n // epi_n):
                        slot = (ei * (tile_n // epi_n) + ej) % 2
                        rows, cols = slice(ei * epi_m, (ei + 1) * epi_m), slice(ej * epi_n, (ej + 1) * epi_n)
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                        out_smem[wg, slot] = acc[rows, cols]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg, slot],
                            out_gmem.at[cta_rows, cta_cols].at[wg_rows, wg_cols].at[rows, cols])

            pipeline(body, compute_context)(
                a_gmem.at[cta_rows], b_gmem.at[cta_cols], as_gmem.at[:, cta_rows], bs_gmem.at[:, cta_cols],
                allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("b_block", "out_dtype", "config", "interpret"))
def scaled_matmul(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, *, b_block: int = 128,
                  out_dtype: jnp.dtype = jnp.bfloat16, config: MgpuGemmConfig | None = None,
                  interpret: bool = False) -> jax.Array:
    """a [M, K] fp8 with a_scale [M, Kb], b [N, K] fp8 with b_scale [ceil(N / b_block), Kb] -> [M, N] out_dtype.

    interpret=True runs Pallas' Mosaic GPU interpreter (CPU; slow: for small shapes in tests).
    """
    check_scaled_operands(a, a_scale, b, b_scale, b_block)
    (m, k), n = a.shape, b.shape[0]
    cfg = config or config_for(m, n, k, out_dtype) or DEFAULT_CONFIG
    if not fits(m, n, k, cfg):
        raise ValueError(f"Mosaic GPU FP8 GEMM needs M % {cfg.cta_m}, N % {cfg.cta_n}, K % {SCALE_BLOCK} == 0; "
                         f"got M={m}, N={n}, K={k}")
    # scales K-block-major, b's expanded to one per row of b: [Kb, M], [Kb, N] (TMA rows of one K block)
    a_s = a_scale.astype(jnp.float32).T
    b_s = jnp.repeat(b_scale.astype(jnp.float32), b_block, axis=0)[:n].T
    kernel = plgpu.kernel(
        functools.partial(_kernel, cfg=cfg, interpret=interpret), out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(NUM_SMS,), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **_interpret_kwargs(interpret))
    return kernel(a, b, a_s, b_s)


def _interpret_kwargs(interpret: bool) -> dict:
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return {"interpret": InterpretGPUParams()}
