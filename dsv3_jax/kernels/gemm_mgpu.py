"""Blockwise-scaled FP8 GEMM on Hopper as a Pallas Mosaic GPU kernel (warp-specialized, per-K-block promotion).

    out[m, n] = sum_kb a_scale[m, kb] * b_scale[n // b_block, kb] * sum_{k in block kb} a[m, k] * b[n, k]

The same function as `dsv3_jax.kernels.gemm.scaled_matmul` (operands, scales and layout are described
there): a [M, K], b [N, K] float8_e4m3fn, both K-major; a_scale [M, Kb]; b_scale [ceil(N / b_block), Kb].

Structure (DeepGEMM's, in `jax.experimental.pallas.mosaic_gpu`): a persistent grid of one CTA per SM walks output
tiles in a planar snake; in each CTA a memory warpgroup streams 128-wide K blocks of a, b and their scales into
shared memory with TMA (`emit_pipeline_warp_specialized`, `max_concurrent_steps` buffers), and `math_wgs` math
warpgroups (by default three; two up to 128 rows and in the grouped kernels) each own a 64 x 128 slice of the tile.
Per K block a math warpgroup issues FP8 WGMMAs into a fresh FP32 accumulator, waits for them, and adds the result
times a_scale (x) b_scale into its running FP32 sum (DeepSeek's promotion every N_C = 128). The wait stalls only
that warpgroup: the others' WGMMAs keep the tensor cores busy meanwhile. Needs K divisible by 128, M by 8 and N by
64 (`supports`; other shapes go to the Triton kernel); the last tiles along M and N may be partial: TMA reads zeros
past the operands' rows and drops the stores past the output's.

With `k_blocks` > 1 a pipeline step carries several K blocks: their WGMMAs are all in flight before the
first block's promotion, which then overlaps the later blocks' WGMMAs. When b's scale block covers a whole
warpgroup tile (b_block = 128, the weights) the promotion is one FMA per element with a per-row scale.

A CTA's consecutive tiles chain their K pipelines (`chain_tiles`, `emit_pipeline_warp_specialized`'s
`pipeline_state`): without it the memory warpgroup waits at the end of every tile until the math warpgroups
have consumed all of its blocks, and only then starts the next tile's loads, a bubble per tile that short-K
GEMMs (4-16 K blocks a tile) pay in full. Optionally (`cluster_dim`) CTA pairs share one operand's blocks
by TMA multicast.

Measured (bench/RESULTS.md) on H100: 597-843 TFLOP/s at M=4096 (2.2-2.7x the Triton kernel, whose WGMMAs the
promotion serializes). On H200, run 10, M=4096, medians of 4-5 side-by-side rounds: the default (two K blocks
a step, 2 in flight, chained) 826-1153 against cuBLAS BF16's 670-796, ahead at all six DeepGEMM shapes,
(2112, 7168) included (902 vs 785, its last 128-wide tile partial; the 64x64 tiles it took before: 623).
Chaining alone (run 9, one block a step): (7168, 2048) 721 -> 948, (32768, 512) 651 -> 870.

Three math warpgroups (run 14, H100, medians of 3 rounds at M=4096): 940-1157 TFLOP/s against two's 859-1112
and cuBLAS BF16's 725-841, ahead of both at all six shapes; (7168, 16384): 1157 (two: 1112, BF16: 725). A CTA
tile of 192 x 128 moves 17% fewer operand bytes per FLOP than 128 x 128, and while one warpgroup waits for
its WGMMAs and promotes, two others keep theirs queued. Each gets 152 registers, room for one K block a step.

At M = 4096 the 192-row tiles of three warpgroups leave the persistent grid's last wave partial: (7168, 16384)
makes 1232 tiles, 9.33 waves on 132 SMs, so 90.5% of the tile slots hold output (`wave_efficiency`). 120-wide
tiles make 10 whole waves (96.5%), but a tile that straddles b's 128-wide scale blocks promotes with one b
scale per column, two FP32 instructions per element instead of one FFMA: measured 18-33% slower than 128 wide
at all six shapes (run 16, H100, medians of 7 rounds; (7168, 16384): 918 against 1123), so tiles stay 128
wide. Any tiling of whole 192 x 128 tiles needs 10 waves there (the work is 9.05). So the last wave is split
along K (`split_tail`, `tail_split`; stream-K for the last wave only): the whole waves run as before, chained,
then each of the R tiles a partial last wave holds is cut into clusters // R K pieces, one per otherwise idle
cluster (at (7168, 16384): 44 tiles x 3 pieces of 43, 43 and 42 K blocks on the 132 SMs), whose FP32 partial
sums the kernel writes to a second output and `add_tail_partials` adds up and scatters into the tiles (XLA;
at most 132 FP32 CTA tiles, 13 MB, read). The modelled last wave drops from one tile time to 43 / 128 of one:
9.34 instead of 10 waves. Run 18 (H100, 2 side-by-side rounds): +1.6% / +9.9% there (median 1252 TFLOP/s),
+3.9% / +11.2% at (4096, 7168), 1.35-3x at M = 128; pieces of 6 K blocks ((7168, 2048)) lost 0.7% / 6.7%, so
pieces shorter than MIN_PIECE_BLOCKS behind whole waves are not split.

CTA pairs along N (`PAIRED_CONFIG`, the default at M > SMALL_M where the pairs chain): the two CTAs of a
cluster compute adjacent column tiles and each loads half of a's K block, multicast to both, so a CTA reads 30%
fewer operand bytes from L2. Run 17 (H100, M = 4096, 12 rounds of the three side by side): against unpaired
three warpgroups +5.4% +- 0.9% at (7168, 16384) (median 1200 TFLOP/s against 1147), +10% at (24576, 1536),
+2-4% (within the spread) at three more shapes, -2.3% +- 1.3% at (4096, 7168); pairs along M (multicast of
b) +4.0% at (7168, 16384), -3.9% at (4096, 7168). In 25 more rounds at (7168, 16384) alone, snake bands of 8
paired tiles instead of 16 added 2.4% (median 1206 against 1176; unpaired 1131): not yet measured at the
other shapes, so not the default.

Where the time went with two (run 12, Nsight Compute at (7168, 16384)): the tensor cores are busy 67% of the
elapsed time, L2 at 59%, issue slots at 37%, no spills; both math warpgroups wait on the same stage and promote
at the same time. In the SASS (run 14) ptxas already starts each fresh tile with a zero-accumulator QGMMA and
promotes with one FFMA per element; the math warps' sampled stalls are the WGMMA waits and the wait for the
next stage's data. Tried
and slower there: 128 x 128 or 64 x 256 warpgroup tiles promoted in 64 x 128 pieces (25% less operand traffic,
but they spill past the 232 registers a math warpgroup gets: 12-27% slower), and the promotion pipelined across
K steps with `BlockSpec.delay_release=1` (15-33% slower at all six shapes; commit 0fbc8f8).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsv3_jax.kernels.gemm import SCALE_BLOCK, check_scaled_operands

NUM_SMS = 132          # H100 SXM / H200
FP8_SWIZZLE = 128      # bytes: a 128-wide K block of FP8 is one 128-byte swizzle row
SMEM_LIMIT = 232448    # bytes of shared memory one CTA may take on H100 / H200 (227 KiB)
SMEM_SLACK = 2048      # barriers and alignment on top of `smem_bytes` (1104 bytes measured, H100)
# The shortest K piece of a split last wave behind whole waves (`tail_split`): run 18 (H100, M = 4096) split
# (7168, 16384) into pieces of 43 K blocks (+5.7%) and (4096, 7168) into 19 (+7.5%), but (7168, 2048) into 6
# (-3.6%: the pieces' pipeline fill and the partial sums' fix-up cost more than the 0.6 tile times they save)
MIN_PIECE_BLOCKS = 16
EDGE_M, EDGE_N = 8, 64  # M, N multiples that TMA copies of partial edge tiles take (`fits(..., edge_tiles=True)`)


@dataclasses.dataclass(frozen=True)
class WarpgroupTiles:
    """Per-warpgroup tile (tile_m x tile_n); the CTA holds `math_wgs` of them (one per math warpgroup), stacked
    along `wg_dim` ("m" or "n"), and keeps `max_concurrent_steps` pipeline steps of `k_blocks` 128-wide K blocks
    each in flight; CTAs walk output tiles in planar-snake bands of `grid_tile_width`."""

    tile_m: int = 64
    tile_n: int = 128
    wg_dim: str = "m"
    max_concurrent_steps: int = 5
    grid_tile_width: int = 8
    k_blocks: int = 1
    math_wgs: int = 2

    @property
    def cta_m(self) -> int:
        return self.tile_m * (self.math_wgs if self.wg_dim == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (self.math_wgs if self.wg_dim == "n" else 1)

    cluster_m = cluster_n = 1       # CTAs per cluster along M / N (the dense kernel's `cluster_dim` pairs them)

    @property
    def cluster_size(self) -> int:
        return self.cluster_m * self.cluster_n


@dataclasses.dataclass(frozen=True)
class MgpuGemmConfig(WarpgroupTiles):
    """The dense kernel's tiles, plus the snake's minor dimension and the epilogue's column tile.

    chain_tiles: a CTA's consecutive output tiles share one K pipeline (`emit_pipeline_warp_specialized`'s
    `pipeline_state`), so the memory warpgroup streams the next tile's first K blocks while the math
    warpgroups finish and store this one; needs the K steps a multiple of the stages (`config_for` picks such
    a depth). cluster_dim: "m" pairs CTAs of adjacent row tiles that share b's K blocks by TMA multicast
    (each loads half), "n" pairs column tiles that share a's; None: one CTA per cluster.
    split_tail: the tiles of a partial last wave are split along K over the otherwise idle CTAs (`tail_split`).
    """

    grid_minor_dim: str = "n"
    epi_tile_n: int = 64
    chain_tiles: bool = True
    cluster_dim: str | None = None
    split_tail: bool = True

    def __post_init__(self):
        if self.cluster_dim not in (None, "m", "n"):
            raise ValueError(f"cluster_dim must be None, 'm' or 'n'; got {self.cluster_dim!r}")

    @property
    def cluster_m(self) -> int:
        return 2 if self.cluster_dim == "m" else 1

    @property
    def cluster_n(self) -> int:
        return 2 if self.cluster_dim == "n" else 1


# Measured on H100 (bench/RESULTS.md run 14, M = 4096, medians of 3 side-by-side rounds): three math warpgroups
# of 64x128 (CTA 192x128: 17% less operand traffic per FLOP than 128x128, and while one warpgroup promotes, two
# others keep WGMMAs queued), one K block a step, 4 in flight, snake bands of 16: 940-1157 TFLOP/s, ahead of the
# previous default (two warpgroups, `TWO_BLOCK_CONFIG`: 859-1112) and of cuBLAS BF16 (725-841) at all six
# DeepGEMM shapes. Three warpgroups get 152 registers each, of which 64 + 64 hold FP32 tiles: two K blocks a step
# would need 64 more (not tried).
DEFAULT_CONFIG = MgpuGemmConfig(math_wgs=3, max_concurrent_steps=4, grid_tile_width=16)
# The same tiles in CTA pairs along N that share a's K blocks by TMA multicast (each CTA loads half of a's 192
# rows: 30% fewer operand bytes from L2 a CTA). Run 17 (H100, M = 4096, 12 paired rounds): ahead of
# DEFAULT_CONFIG by 2-10% at five of DeepGEMM's six shapes ((7168, 16384): +5.4% +- 0.9%, (24576, 1536): +10%),
# -2.3% +- 1.3% at (4096, 7168). `config_for` takes it wherever the pairs still chain their tiles.
PAIRED_CONFIG = dataclasses.replace(DEFAULT_CONFIG, cluster_dim="n")
# run 10's default on H200 (826-1153 TFLOP/s): two math warpgroups, two K blocks a step, 2 in flight; still the
# default up to SMALL_M rows, where one CTA row of tiles is all there is (run 14, H100, M = 128: 113 / 299 TFLOP/s
# at (2112, 7168) / (24576, 1536) against three warpgroups' 93 / 264)
TWO_BLOCK_CONFIG = MgpuGemmConfig(max_concurrent_steps=2, k_blocks=2)
SMALL_M = 128
ONE_BLOCK_CONFIG = MgpuGemmConfig()
# 64x64 tiles (whole tiles where N % 128 == 64): run 10, (2112, 7168): 623 TFLOP/s against the default's 805
NARROW_CONFIG = MgpuGemmConfig(tile_n=64, max_concurrent_steps=6)


def fits(m: int, n: int, k: int, config: WarpgroupTiles, edge_tiles: bool = False) -> bool:
    """Whether `config` tiles these sizes: whole 128-wide K blocks, and whole cluster tiles along M and N, or
    with `edge_tiles` (the dense kernel; the last tiles partial) any M and N that Mosaic GPU's TMA copies take:
    M % 8 (the operands' (8, 128) tiling), N % 64 (the swizzled output tiles: 64 BF16 or 32 FP32 wide)."""
    whole_k = k % (SCALE_BLOCK * config.k_blocks) == 0
    if edge_tiles:
        return whole_k and m % EDGE_M == 0 and n % EDGE_N == 0
    return whole_k and m % (config.cta_m * config.cluster_m) == 0 and n % (config.cta_n * config.cluster_n) == 0


def num_clusters(config: WarpgroupTiles) -> int:
    """Clusters of the persistent grid: one CTA per SM, `cluster_size` CTAs a cluster."""
    return NUM_SMS // config.cluster_size


def tile_counts(config: WarpgroupTiles, m: int, n: int) -> tuple[int, int]:
    """Cluster tiles along M and N covering [M, N], the last ones partial where the sizes are not multiples."""
    return -(-m // (config.cta_m * config.cluster_m)), -(-n // (config.cta_n * config.cluster_n))


def scale_width(rows: int) -> int:
    """Scales a pipeline stage loads for `rows` rows of an operand: rounded up to 32 FP32 (128 bytes), so that
    every stage's buffer starts where TMA may write (a 120- or 112-wide tile's 480 or 448 bytes would not)."""
    return -(-rows // 32) * 32


def scale_slice(rows: pl.Slice) -> pl.Slice:
    """The columns of a K-block-major scale ref [Kb, rows] that `k_pipeline` reads for an operand tile's
    `rows`: from its first row on, `scale_width(rows.size)` wide."""
    return pl.ds(rows.start, scale_width(rows.size))


def pipeline_bytes(config: WarpgroupTiles) -> int:
    """Shared memory of `k_pipeline`'s buffers: per step in flight `k_blocks` 128-wide K blocks of a and b
    (FP8) and their FP32 scales."""
    operands = (config.cta_m + config.cta_n) * SCALE_BLOCK
    scales = 4 * (scale_width(config.cta_m) + scale_width(config.cta_n))
    return config.max_concurrent_steps * config.k_blocks * (operands + scales)


def smem_bytes(config: MgpuGemmConfig, out_dtype: jnp.dtype) -> int:
    """Shared memory of the kernel's buffers: the K pipeline's, plus the double-buffered epilogue tiles of every
    math warpgroup (barriers not counted)."""
    epi_tile = min(64, config.tile_m) * epilogue_tile(config, out_dtype)[0] * jnp.dtype(out_dtype).itemsize
    epilogue = config.math_wgs * 2 * epi_tile
    return pipeline_bytes(config) + epilogue


def epilogue_tile(config: MgpuGemmConfig, out_dtype: jnp.dtype) -> tuple[int, int | None]:
    """Columns of one epilogue store and its shared-memory swizzle in bytes: the widest of epi_tile_n,
    epi_tile_n / 2, ... that divides tile_n and spans at least 32 bytes (the narrowest swizzle); else (e.g.
    tile_n = 120) the whole tile_n, unswizzled (None)."""
    itemsize = jnp.dtype(out_dtype).itemsize
    width = min(config.epi_tile_n, config.tile_n)
    while width * itemsize >= 32:
        if config.tile_n % width == 0:
            return width, plgpu.find_swizzle(width * itemsize * 8)
        width //= 2
    return config.tile_n, None


def fit_smem(config: WarpgroupTiles, out_dtype: jnp.dtype,
             smem: Callable[[Any, jnp.dtype], int] | None = None) -> Any:
    """`config` with as many of its pipeline stages as fit in shared memory next to `out_dtype`'s output tiles,
    by `smem(config, out_dtype)` (default: this kernel's `smem_bytes`; an FP32 output doubles the epilogue
    tiles: the 5-stage default then needs 4)."""
    smem = smem or smem_bytes
    while config.max_concurrent_steps > 2 and smem(config, out_dtype) + SMEM_SLACK > SMEM_LIMIT:
        config = dataclasses.replace(config, max_concurrent_steps=config.max_concurrent_steps - 1)
    return config


def k_steps(config: WarpgroupTiles, k: int) -> int:
    """Pipeline steps of a K loop over k: `config.k_blocks` 128-wide K blocks a step."""
    return k // (SCALE_BLOCK * config.k_blocks)


def chained_stages(config: MgpuGemmConfig, k: int) -> MgpuGemmConfig:
    """`config` with the deepest pipeline (at most its own, at least 2) whose stages divide the K steps, so
    that its tiles chain (`chain_tiles`); unchanged when none does or tiles do not chain."""
    steps = k_steps(config, k)
    depth = next((s for s in range(min(config.max_concurrent_steps, steps), 1, -1) if steps % s == 0), None)
    if not config.chain_tiles or depth is None:
        return config
    return dataclasses.replace(config, max_concurrent_steps=depth)


@dataclasses.dataclass(frozen=True)
class TailSplit:
    """How the persistent grid walks the cluster tiles of [M, N] (`tail_split`): the first `full` in whole
    waves, then the last `tiles` (the partial last wave) each cut along K into `pieces` pieces of `piece_steps`
    K steps (the last piece the rest), one piece per cluster; `add_tail_partials` adds up their FP32 partial
    sums. tiles = 0: no split, `full` is every tile."""

    full: int
    tiles: int = 0
    pieces: int = 1
    piece_steps: int = 0


def tail_split(config: MgpuGemmConfig, m: int, n: int, k: int) -> TailSplit:
    """Stream-K for the last wave only: where the cluster tiles leave the last wave partial (R clusters busy),
    its R tiles are cut along K into clusters // R pieces (at most one per K step), so that every cluster has
    work and the last wave takes about 1 / pieces of a tile's time. No split where the waves are whole, where
    fewer than two pieces a tile fit, where whole waves run before and a piece would be shorter than
    MIN_PIECE_BLOCKS K blocks, or with `split_tail` off."""
    clusters = num_clusters(config)
    total, steps = math.prod(tile_counts(config, m, n)), k_steps(config, k)
    rem = total % clusters
    pieces = min(clusters // rem, steps) if rem and config.split_tail else 1
    piece_steps = -(-steps // max(pieces, 1))
    if pieces < 2 or (total >= clusters and piece_steps * config.k_blocks < MIN_PIECE_BLOCKS):
        return TailSplit(total)
    return TailSplit(total - rem, rem, -(-steps // piece_steps), piece_steps)


def chains(config: MgpuGemmConfig, m: int, n: int, k: int) -> bool:
    """Whether the kernel chains its whole-wave tiles' K pipelines for [M, K] x [N, K]^T under `config`: its
    stages divide the K steps, and every cluster walks at least two of those tiles where CTA pairs or a split
    tail (`tail_split`) follow (a chained pipeline drains, waiting for every consumption, only on a CTA's last
    tile: with one tile there is no last call to drain in, and neither a CTA's peer in its cluster nor the
    tail's pipeline on the same buffers may go on before that drain)."""
    steps, clusters = k_steps(config, k), num_clusters(config)
    split = tail_split(config, m, n, k)
    return (config.chain_tiles and steps % min(config.max_concurrent_steps, steps) == 0
            and (split.full >= 2 * clusters or (config.cluster_dim is None and not split.tiles)))


def wave_efficiency(config: MgpuGemmConfig, m: int, n: int, k: int) -> float:
    """The share of the persistent grid's tile slots that hold output: M x N over waves x CTAs x CTA tile, with
    waves = ceil(whole-wave cluster tiles / clusters) plus a split tail's longest piece as its share of a tile's
    K steps (`tail_split`). A partial last wave leaves SMs idle, and partial edge tiles compute their empty rows
    and columns too."""
    clusters = num_clusters(config)
    split = tail_split(config, m, n, k)
    waves = -(-split.full // clusters) + (split.piece_steps / k_steps(config, k) if split.tiles else 0)
    return m * n / (waves * NUM_SMS * config.cta_m * config.cta_n)


def config_for(m: int, n: int, k: int, out_dtype: jnp.dtype = jnp.bfloat16) -> MgpuGemmConfig | None:
    """The default configuration that tiles [M, K] x [N, K]^T with an `out_dtype` output (its stages cut to
    fit shared memory and to divide the K steps), or None (the caller then uses the Triton kernel): three math
    warpgroups in CTA pairs along N where the pairs chain their tiles (every cluster walks two or more), else
    unpaired; up to SMALL_M rows two warpgroups (two K blocks a step where K has an even number of blocks)."""
    candidates = (TWO_BLOCK_CONFIG, ONE_BLOCK_CONFIG) if m <= SMALL_M else (PAIRED_CONFIG, DEFAULT_CONFIG)
    for candidate in candidates:
        if fits(m, n, k, candidate, edge_tiles=True):
            config = chained_stages(fit_smem(candidate, out_dtype), k)
            if config.cluster_dim is None or chains(config, m, n, k):
                return config
    return None


def supports(m: int, n: int, k: int) -> bool:
    """Whether some default configuration tiles these sizes."""
    return config_for(m, n, k) is not None


def k_pipeline(cfg: WarpgroupTiles, stages: int, body: Callable[..., Any], compute_context: Callable[..., Any],
               steps: int | jax.Array, first_block: int | jax.Array = 0, shared: str | None = None,
               state: jax.Array | None = None) -> Any:
    """The warp-specialized K pipeline over `steps` steps of `cfg.k_blocks` 128-wide K blocks from block
    `first_block` on (a multiple of k_blocks): per step and K block j a [cta_m, 128] block a_j of a and b_j of b
    [cta_n, 128] (FP8, K-major), then their FP32 scales [k_blocks, scale_width(cta_m)], [k_blocks,
    scale_width(cta_n)] (callers pass the scale refs sliced by `scale_slice`; the columns past cta_m / cta_n
    unused); `stages` steps in flight, a memory warpgroup feeding `cfg.math_wgs` math warpgroups.
    `body(idx, a_0.., b_0.., a_scale, b_scale, carry)`.
    shared: "a" or "b", that operand's blocks are multicast to the CTAs of the "cluster" axis; state: a
    `plgpu.PipelinePipeline` value chaining consecutive calls (START on a CTA's first tile, STOP, which drains
    the pipeline, on its last, STEADY between), None: each call fills and drains its own."""
    fp8_transforms = (plgpu.TilingTransform((8, FP8_SWIZZLE)), plgpu.SwizzleTransform(FP8_SWIZZLE))
    u = cfg.k_blocks

    def block(rows: int, j: int, operand: str) -> plgpu.BlockSpec:
        return plgpu.BlockSpec((rows, SCALE_BLOCK), lambda s: (0, first_block + s * u + j), transforms=fp8_transforms,
                               collective_axes=("cluster",) if operand == shared else ())

    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, wg_axis="wg", num_compute_wgs=cfg.math_wgs,
        max_concurrent_steps=stages, compute_context=compute_context, pipeline_state=state,
        in_specs=[*(block(cfg.cta_m, j, "a") for j in range(u)), *(block(cfg.cta_n, j, "b") for j in range(u)),
                  plgpu.BlockSpec((u, scale_width(cfg.cta_m)), lambda s: (first_block // u + s, 0)),
                  plgpu.BlockSpec((u, scale_width(cfg.cta_n)), lambda s: (first_block // u + s, 0))],
    )


def k_operands(cfg: WarpgroupTiles, a: Any, b: Any, a_scale: Any, b_scale: Any) -> tuple[Any, ...]:
    """`k_pipeline`'s operands in its in_specs order: a and b once per K block of a step, then the scales."""
    return (a,) * cfg.k_blocks + (b,) * cfg.k_blocks + (a_scale, b_scale)


def promote(a_blocks: Sequence[Any], b_blocks: Sequence[Any], as_smem: Any, bs_smem: Any, acc: jax.Array,
            wg_rows: pl.Slice, wg_cols: pl.Slice, tile_m: int, tile_n: int, b_uniform: bool = False) -> jax.Array:
    """acc + sum_j (a_j . b_j^T) * a_scale_j (x) b_scale_j over one pipeline step's K blocks j (DeepSeek's
    promotion every 128 of K): the FP8 WGMMAs of every block go into fresh FP32 tiles at once, and block j's
    scaled add waits only for its own, overlapping the later blocks' WGMMAs. a_j: this warpgroup's rows of the
    block in shared memory, or in registers. b_uniform: the warpgroup's columns share one b scale per K block
    (b_block a multiple of tile_n), so the scale is one FP32 per row and the add a single FMA per element."""
    shape = (tile_m, tile_n)

    def mma(*parts):
        for part, a, b in zip(parts, a_blocks, b_blocks, strict=True):
            plgpu.wgmma(part, a, b.at[wg_cols].transpose((1, 0)))
        out = acc
        for j, part in enumerate(parts):
            block = plgpu.wgmma_accumulator_load(part, wait_n=len(parts) - 1 - j)
            sa = as_smem[j, wg_rows]
            if b_uniform:
                out = out + block * lax.broadcast_in_dim(sa * bs_smem[j, wg_cols.start], shape, [0])
            else:
                sb = bs_smem[j, wg_cols]
                out = out + block * lax.broadcast_in_dim(sa, shape, [0]) * lax.broadcast_in_dim(sb, shape, [1])
        return out

    return pl.run_scoped(mma, *(plgpu.ACC(shape, jnp.float32) for _ in a_blocks))


def warpgroup_slices(cfg: WarpgroupTiles, wg: jax.Array) -> tuple[pl.Slice, pl.Slice]:
    """Warpgroup `wg`'s rows and columns of its CTA tile [cta_m, cta_n] (its tile_m x tile_n half)."""
    rows = pl.ds(wg * cfg.tile_m, cfg.tile_m) if cfg.wg_dim == "m" else pl.ds(0, cfg.tile_m)
    cols = pl.ds(wg * cfg.tile_n, cfg.tile_n) if cfg.wg_dim == "n" else pl.ds(0, cfg.tile_n)
    return rows, cols


def promote_step(cfg: WarpgroupTiles, wg_rows: pl.Slice, wg_cols: pl.Slice, b_uniform: bool) -> Callable[..., Any]:
    """`k_pipeline`'s body for the whole-tile GEMMs: the step's refs split into its K blocks of a and b and the
    scales, then `promote` on this warpgroup's rows of a and columns of b."""
    u = cfg.k_blocks

    def body(_, *refs):
        a_blocks, b_blocks, (as_smem, bs_smem, acc) = refs[:u], refs[u:2 * u], refs[2 * u:]
        return promote([a.at[wg_rows] for a in a_blocks], b_blocks, as_smem, bs_smem, acc, wg_rows, wg_cols,
                       cfg.tile_m, cfg.tile_n, b_uniform)

    return body


def wgmma_zeros(tile_m: int, tile_n: int, interpret: bool) -> jax.Array:
    """A zero FP32 accumulator tile in the WGMMA register layout."""
    zeros = jnp.zeros((tile_m, tile_n), jnp.float32)
    if not interpret:           # the interpreter has no layouts (and no lowering of layout_cast)
        zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
    return zeros


def tile_coords(cfg: MgpuGemmConfig, lin: Any, member: Any, m_iters: int, n_iters: int) -> tuple[Any, Any]:
    """Row and column tile of the `lin`-th cluster tile of the planar snake (bands of `grid_tile_width` along
    `grid_minor_dim`) for the cluster's CTA `member` (pairs along M or N take adjacent tiles). Traced in the
    kernel; with concrete values (under `jax.ensure_compile_time_eval`) where `add_tail_partials` stores."""
    mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor_dim == "n" else 0, cfg.grid_tile_width)
    if cfg.cluster_dim == "m":
        mi = 2 * mi + member
    elif cfg.cluster_dim == "n":
        ni = 2 * ni + member
    return mi, ni


def store_tile(acc: jax.Array, smem: Any, dst: Any) -> None:
    """A math warpgroup's FP32 tile `acc` [tile_m, tile_n] to `dst` (a GMEM ref of that shape, TMA dropping what
    lies past the array's edge) in pieces through its two shared-memory slots `smem` [2, epi_m, epi_n], cast to
    their dtype; the previous tile's stores must have read the slots first."""
    epi_m, epi_n = smem.shape[-2:]
    tile_m, tile_n = acc.shape
    acc = acc.astype(smem.dtype)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for ei in range(tile_m // epi_m):
        for ej in range(tile_n // epi_n):
            slot = (ei * (tile_n // epi_n) + ej) % 2
            rows, cols = slice(ei * epi_m, (ei + 1) * epi_m), slice(ej * epi_n, (ej + 1) * epi_n)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            smem[slot] = acc[rows, cols]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem.at[slot], dst.at[rows, cols])


def epilogue_smem(cfg: MgpuGemmConfig, dtype: jnp.dtype, columns: int | None = None) -> Any:
    """Every math warpgroup's two epilogue slots [math_wgs, 2, min(64, tile_m), width] of `dtype`, width the
    `epilogue_tile` of `columns` (default `epi_tile_n`) wide pieces, swizzled where that tile says."""
    width, swizzle = epilogue_tile(dataclasses.replace(cfg, epi_tile_n=columns or cfg.epi_tile_n), dtype)
    transforms = () if swizzle is None else (
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM((cfg.math_wgs, 2, min(64, cfg.tile_m), width), dtype, transforms=transforms)


def _kernel(a_gmem, b_gmem, as_gmem, bs_gmem, out_gmem, *tail_gmem, cfg: MgpuGemmConfig, b_uniform: bool,
            interpret: bool):
    """The persistent grid's walk: the whole-wave tiles (chained K pipelines) into out_gmem, then, with a split
    tail (`tail_split`), one K piece of a tail tile per cluster into its FP32 slice of tail_gmem [pieces of all
    tail tiles x cluster CTAs, cta_m, cta_n]."""
    m, k = a_gmem.shape
    n = b_gmem.shape[0]
    cta_m, cta_n = cfg.cta_m, cfg.cta_n
    m_iters, n_iters = tile_counts(cfg, m, n)
    steps, split = k_steps(cfg, k), tail_split(cfg, m, n, k)
    shared = {"m": "b", "n": "a"}.get(cfg.cluster_dim)     # CTAs paired along M share b's blocks, along N a's
    stages, chain = min(cfg.max_concurrent_steps, steps), chains(cfg, m, n, k)
    pipeline = functools.partial(k_pipeline, cfg, stages, shared=shared)

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore, steps).get_allocations(*k_operands(cfg, a_gmem, b_gmem, as_gmem, bs_gmem)),
        collective_axes="wg",
    )
    def _scope(allocs):
        wg = lax.axis_index("wg")
        member = lax.axis_index("cluster") if shared else 0
        wg_rows, wg_cols = warpgroup_slices(cfg, wg)

        def run_tile(lin, dst, smem, tile_steps, first_block=0, state=None):
            """K steps [first_block, + tile_steps) of the lin-th cluster tile; dst(cta_rows, cta_cols): the GMEM
            ref [cta_m, cta_n] its CTA tile goes to, through the epilogue slots smem."""
            mi, ni = tile_coords(cfg, lin, member, m_iters, n_iters)
            cta_rows, cta_cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)

            def compute_context(eval_pipeline):
                acc = eval_pipeline(wgmma_zeros(cfg.tile_m, cfg.tile_n, interpret))
                store_tile(acc, smem.at[wg], dst(cta_rows, cta_cols).at[wg_rows, wg_cols])

            pipeline(promote_step(cfg, wg_rows, wg_cols, b_uniform), compute_context, tile_steps, first_block,
                     state=state)(
                *k_operands(cfg, a_gmem.at[cta_rows], b_gmem.at[cta_cols], as_gmem.at[:, scale_slice(cta_rows)],
                            bs_gmem.at[:, scale_slice(cta_cols)]),
                allocations=allocs)

        def whole_waves(out_smem):
            @plgpu.nd_loop((split.full,), collective_axes="sm")
            def _tiles(info: plgpu.NDLoopInfo):
                state = None
                if chain:   # the first tile fills the pipeline, later ones continue it, the last one drains it
                    stages_of = plgpu.PipelinePipeline
                    last = jnp.where(info.local_index == info.num_local_steps - 1, stages_of.STOP, stages_of.STEADY)
                    state = jnp.where(info.local_index == 0, stages_of.START, last).astype(jnp.int32)
                run_tile(info.index[0], lambda rows, cols: out_gmem.at[rows, cols], out_smem, steps, state=state)

        def tail(tail_smem):
            @plgpu.nd_loop((split.tiles * split.pieces,), collective_axes="sm")
            def _pieces(info: plgpu.NDLoopInfo):
                (item,) = info.index
                first = item % split.pieces * split.piece_steps
                partial = tail_gmem[0].at[item * cfg.cluster_size + member]
                run_tile(split.full + item // split.pieces, lambda *_: partial, tail_smem,
                         jnp.minimum(split.piece_steps, steps - first), first * cfg.k_blocks)

        # one after the other in the same shared memory: the tail's FP32 slots take the bytes of the output's
        # (half as many columns where the output is BF16)
        if split.full:
            pl.run_scoped(whole_waves, epilogue_smem(cfg, out_gmem.dtype), collective_axes="wg")
        if split.tiles:
            columns = cfg.epi_tile_n * jnp.dtype(out_gmem.dtype).itemsize // 4
            pl.run_scoped(tail, epilogue_smem(cfg, jnp.float32, columns), collective_axes="wg")

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def add_tail_partials(out: jax.Array, partials: jax.Array, cfg: MgpuGemmConfig, k: int) -> jax.Array:
    """out [M, N] with the split tail's tiles (`tail_split`) stored: their K pieces' FP32 partial sums `partials`
    [tiles x pieces x cluster CTAs, cta_m, cta_n] added up, cast and scattered in row windows that lie wholly
    inside out or wholly past its edge (gcd(cta_n, EDGE_N) wide: N is a multiple of EDGE_N), the latter dropped."""
    (m, n), cluster = out.shape, cfg.cluster_size
    split, (m_iters, n_iters) = tail_split(cfg, m, n, k), tile_counts(cfg, m, n)
    sums = partials.reshape(split.tiles, split.pieces, cluster, cfg.cta_m, cfg.cta_n).sum(1).astype(out.dtype)
    with jax.ensure_compile_time_eval():      # one scalar tile at a time, as in the kernel (jax 0.11's snake)
        coords = np.array([[[int(x) for x in tile_coords(cfg, jnp.int32(lin), member, m_iters, n_iters)]
                            for member in range(cluster)] for lin in range(split.full, split.full + split.tiles)])
    mi, ni = coords[..., 0], coords[..., 1]                                             # [tiles, cluster]
    width = math.gcd(cfg.cta_n, EDGE_N)
    rows = (mi * cfg.cta_m)[:, :, None, None] + np.arange(cfg.cta_m)[:, None]          # [tiles, cluster, cta_m, 1]
    cols = (ni * cfg.cta_n)[:, :, None, None] + np.arange(0, cfg.cta_n, width)          # [tiles, cluster, 1, w]
    starts = np.stack(np.broadcast_arrays(rows, cols), axis=-1).reshape(-1, 2).astype(np.int32)
    windows = sums.reshape(-1, width)
    dims = lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                       scatter_dims_to_operand_dims=(0, 1))
    return lax.scatter(out, jnp.asarray(starts), windows, dims, unique_indices=True,
                       mode=lax.GatherScatterMode.FILL_OR_DROP)


@functools.partial(jax.jit, static_argnames=("b_block", "out_dtype", "config", "interpret"))
def scaled_matmul(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, *, b_block: int = 128,
                  out_dtype: jnp.dtype = jnp.bfloat16, config: MgpuGemmConfig | None = None,
                  interpret: bool = False) -> jax.Array:
    """a [M, K] fp8 with a_scale [M, Kb], b [N, K] fp8 with b_scale [ceil(N / b_block), Kb] -> [M, N] out_dtype.

    interpret=True runs Pallas' Mosaic GPU interpreter (CPU; slow: for small shapes in tests).
    """
    check_scaled_operands(a, a_scale, b, b_scale, b_block)
    (m, k), n = a.shape, b.shape[0]
    cfg = fit_smem(config or config_for(m, n, k, out_dtype) or DEFAULT_CONFIG, out_dtype)
    if not fits(m, n, k, cfg, edge_tiles=True):
        raise ValueError(f"Mosaic GPU FP8 GEMM needs M % {EDGE_M}, N % {EDGE_N} and "
                         f"K % {SCALE_BLOCK * cfg.k_blocks} == 0; got M={m}, N={n}, K={k}")
    # scales K-block-major, b's expanded to one per row of b: [Kb, M], [Kb, N] (TMA rows of one K block)
    a_s = a_scale.astype(jnp.float32).T
    b_s = jnp.repeat(b_scale.astype(jnp.float32), b_block, axis=0)[:n].T
    split, cluster = tail_split(cfg, m, n, k), cfg.cluster_size
    out_type = [jax.ShapeDtypeStruct((m, n), out_dtype)]
    if split.tiles:
        out_type.append(jax.ShapeDtypeStruct((split.tiles * split.pieces * cluster, cfg.cta_m, cfg.cta_n), jnp.float32))
    kernel = warp_specialized_kernel(
        functools.partial(_kernel, cfg=cfg, b_uniform=b_block % cfg.tile_n == 0, interpret=interpret),
        tuple(out_type), interpret, cluster=cluster, math_wgs=cfg.math_wgs)
    out, *partials = kernel(a, b, a_s, b_s)
    return add_tail_partials(out, partials[0], cfg, k) if split.tiles else out


def warp_specialized_kernel(body: Callable[..., None], out_type: Any, interpret: bool,
                            cluster: int = 1, math_wgs: int = 2) -> Callable[..., jax.Array]:
    """`plgpu.kernel` of this package's GEMMs: a persistent grid of one CTA per SM ("sm"; CTA pairs along
    "cluster" when cluster=2), `math_wgs` math warpgroups and one memory warpgroup ("wg", the last), warpgroup
    lowering semantics; interpret=True runs Pallas' Mosaic GPU interpreter, whose TMA reads past an operand's
    edge return NaN where the hardware's return zeros (its default raises, from a simulated thread whose peers
    then wait at a barrier for ever): an edge tile's stored elements may not depend on them."""
    kwargs: dict[str, Any] = {"cluster": (cluster,), "cluster_names": ("cluster",)} if cluster > 1 else {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kwargs["interpret"] = InterpretGPUParams(out_of_bounds_reads="uninitialized")
    return plgpu.kernel(
        body, out_type=out_type, grid=(NUM_SMS // cluster,), grid_names=("sm",), num_threads=math_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup), **kwargs)
