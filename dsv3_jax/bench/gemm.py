"""`dsv3-bench gemm`: blockwise-scaled FP8 GEMM against its XLA peers, at DeepGEMM's published shapes.

For each (M, N, K), out [M, N] = x [M, K] . w [N, K]^T (w in HF's [out, in] layout), side by side:

- `bf16`: XLA dot on BF16 operands (cuBLAS);
- `fp8_tensor`: XLA dot on FP8 E4M3 operands with one scale per tensor (cuBLASLt FP8);
- `fp8_block_jnp`: DeepSeek's 1x128 / 128x128 scaling written in jnp: dequantize to BF16, then dot;
- `fp8_block_pallas`: the Pallas-Triton kernel of `dsv3_jax.kernels.gemm` on FP8 operands and block scales,
  once per tile configuration of a small sweep (the best one is what a user would pick);
- `fp8_block_mgpu`: the Pallas Mosaic GPU kernel of `dsv3_jax.kernels.gemm_mgpu`, likewise swept.

Each line carries the median time, TFLOP/s (2MNK / time) and the relative error against a BF16-operand,
FP32-accumulated product of the same (dequantized) operands, so a fast but wrong variant shows; the Mosaic GPU
lines also carry `wave_efficiency`, the share of the persistent grid's tile slots that hold output
(`gemm_mgpu.wave_efficiency`: a partial last wave of tiles idles SMs).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp

from dsv3_jax.bench.timing import Deadline, Reporter, measure
from dsv3_jax.kernels import gemm, gemm_mgpu
from dsv3_jax.kernels.gemm import GemmConfig
from dsv3_jax.kernels.gemm_mgpu import MgpuGemmConfig
from dsv3_jax.ops import fp8

# DeepGEMM's table (REFERENCE.md): (N, K) at M in {128, 4096}
SHAPES_NK = ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
MS = (4096, 128)
# Measured on H100 (RESULTS.md, run 1): 128x128x128/w8/s4 beat 128x256 / 256x128 (register spills of the
# second FP32 tile that the per-128-K promotion needs) and 4 warps at every M=4096 shape it ran on.
CONFIGS_LARGE_M = (
    GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=4),
    GemmConfig(128, 128, 128, group_m=16, num_warps=8, num_stages=3),
    GemmConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=5),
)
CONFIGS_SMALL_M = (
    GemmConfig(64, 128, 128, group_m=1, num_warps=4, num_stages=5),
    GemmConfig(128, 128, 128, group_m=1, num_warps=4, num_stages=4),
)
# Mosaic GPU kernel: per-warpgroup tile, warpgroups stacked along M or N, pipeline depth, K blocks per step,
# chained tiles (`chain_tiles`, the depth cut to divide the K steps), CTA pairs sharing an operand (`cluster_dim`)
# (run 2 also had 64x128/n/s4 and 128x128/n/s3: slower everywhere at M=4096; /m/s6 overflows shared memory)
CONFIGS_MGPU = (
    gemm_mgpu.PAIRED_CONFIG,
    dataclasses.replace(gemm_mgpu.PAIRED_CONFIG, split_tail=False),      # the last wave's tiles whole (run 17)
    dataclasses.replace(gemm_mgpu.PAIRED_CONFIG, grid_tile_width=8),     # run 17: +2.4% at (7168, 16384)
    gemm_mgpu.DEFAULT_CONFIG,
    gemm_mgpu.TWO_BLOCK_CONFIG,
    dataclasses.replace(gemm_mgpu.TWO_BLOCK_CONFIG, split_tail=False),
    gemm_mgpu.ONE_BLOCK_CONFIG,
    MgpuGemmConfig(64, 128, "m", max_concurrent_steps=5, chain_tiles=False),
    MgpuGemmConfig(64, 128, "m", max_concurrent_steps=2, k_blocks=2, cluster_dim="m"),
    MgpuGemmConfig(64, 128, "m", max_concurrent_steps=5, cluster_dim="m"),
    MgpuGemmConfig(64, 128, "m", max_concurrent_steps=5, grid_tile_width=16),
    gemm_mgpu.NARROW_CONFIG,
)
DIMS = (((1,), (1,)), ((), ()))   # contract the K axes of [M, K] and [N, K]
L2_BYTES = 50 * 2 ** 20


def _inputs(m: int, n: int, k: int, calls: int, seed: int = 0) -> tuple[list[jax.Array], list[jax.Array]]:
    """`calls` distinct activations x [M, K] and enough weight copies w [N, K] that they overflow L2 (BF16)."""
    keys = jax.random.split(jax.random.key(seed), calls + 1)
    xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in keys[:calls]]
    n_w = min(calls, max(1, -(-3 * L2_BYTES // (n * k))))
    ws = [(jax.random.normal(kk, (n, k), jnp.bfloat16) * 0.02).astype(jnp.bfloat16)
          for kk in jax.random.split(keys[-1], n_w)]
    return xs, [ws[i % n_w] for i in range(calls)]


def _per_tensor(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = jnp.max(jnp.abs(x.astype(jnp.float32))) / fp8.FP8_MAX
    return (x.astype(jnp.float32) / s).astype(fp8.FP8_DTYPE), s


def mgpu_configs(text: str) -> tuple[MgpuGemmConfig, ...]:
    """A JSON list of `MgpuGemmConfig` keyword dicts (e.g. '[{"k_blocks": 1, "max_concurrent_steps": 4}]') -> the
    configurations, with a ValueError that names the bad entry."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--mgpu_configs is not JSON: {err}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"--mgpu_configs must be a JSON list of objects, got {text!r}")
    configs = []
    for entry in entries:
        try:
            configs.append(MgpuGemmConfig(**entry))
        except (TypeError, ValueError) as err:
            raise ValueError(f"--mgpu_configs entry {entry}: {err}") from None
    return tuple(configs)


def run(out: str | None = None, shapes: str = "all", repeats: int = 4, iters: int = 7,
        budget_s: float | None = None, impls: str = "all",
        configs_mgpu: tuple[MgpuGemmConfig, ...] = CONFIGS_MGPU) -> Reporter:
    """Every shape (or `shapes`, comma-separated MxNxK) through every variant (or `impls`, comma-separated), the
    Mosaic GPU kernel under each of `configs_mgpu`."""
    rep = Reporter("gemm", out)
    deadline = Deadline(budget_s)
    wanted = [(m, n, k) for m in MS for n, k in SHAPES_NK]
    if shapes != "all":
        wanted = [tuple(int(v) for v in s.split("x")) for s in shapes.split(",")]
    for m, n, k in wanted:
        if deadline.left() < 0:
            rep.emit(m=m, n=n, k=k, skipped="time budget")
            continue
        _bench_shape(rep, deadline, m, n, k, repeats, iters, None if impls == "all" else impls.split(","),
                     configs_mgpu)
    _summary(rep)
    return rep


@jax.jit
def _quantize_blockwise(x: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
    return (*fp8.quantize(x, fp8.ACT_BLOCK), *fp8.quantize(w, fp8.WEIGHT_BLOCK))


@jax.jit
def _quantize_per_tensor(x: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
    return (*_per_tensor(x), *_per_tensor(w))


@jax.jit
def _ref(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] . w [N, K]^T with FP32 accumulation: the check each variant is compared with (relative error).

    For FP8 variants the operands are dequantized to BF16 (exact up to the 2^-9 rounding of fp8 x scale)."""
    return jax.lax.dot_general(x, w, DIMS, preferred_element_type=jnp.float32)


def _bf16(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, w, DIMS)


def _fp8_tensor(x8: jax.Array, sx: jax.Array, w8: jax.Array, sw: jax.Array) -> jax.Array:
    y = jax.lax.dot_general(x8, w8, DIMS, preferred_element_type=jnp.float32)
    return (y * (sx * sw)).astype(jnp.bfloat16)


def _fp8_block_jnp(x8: jax.Array, sx: jax.Array, w8: jax.Array, sw: jax.Array) -> jax.Array:
    return _bf16(fp8.dequantize(x8, sx, fp8.ACT_BLOCK, jnp.bfloat16), fp8.dequantize(w8, sw, fp8.WEIGHT_BLOCK,
                                                                                      jnp.bfloat16))


def _bench_shape(rep: Reporter, deadline: Deadline, m: int, n: int, k: int, repeats: int, iters: int,
                 impls: list[str] | None, configs_mgpu: tuple[MgpuGemmConfig, ...]) -> None:
    base, flops = dict(m=m, n=n, k=k), 2.0 * m * n * k
    timing = dict(repeats=repeats, iters=iters)
    want = lambda impl: impls is None or impl in impls
    xs, ws = _inputs(m, n, k, 2 * repeats)
    if want("bf16"):
        ref_bf16 = _ref(xs[0], ws[0])
        measure(rep, deadline, base, "bf16", _bf16, list(zip(xs, ws, strict=True)), ref_bf16, flops, **timing)
        del ref_bf16
    if want("fp8_tensor"):
        tensor = [_quantize_per_tensor(x, w) for x, w in zip(xs, ws, strict=True)]
        x8, sx, w8, sw = tensor[0]
        ref = _ref(x8.astype(jnp.bfloat16), w8.astype(jnp.bfloat16)) * (sx * sw)
        measure(rep, deadline, base, "fp8_tensor", _fp8_tensor, tensor, ref, flops, **timing)
        del tensor

    block = [_quantize_blockwise(x, w) for x, w in zip(xs, ws, strict=True)]         # (x8, sx, w8, sw)
    del xs, ws
    x8, sx, w8, sw = block[0]
    ref = _ref(fp8.dequantize(x8, sx, fp8.ACT_BLOCK, jnp.bfloat16), fp8.dequantize(w8, sw, fp8.WEIGHT_BLOCK,
                                                                                    jnp.bfloat16))
    if want("fp8_block_jnp"):
        measure(rep, deadline, base, "fp8_block_jnp", _fp8_block_jnp, block, ref, flops, **timing)
    for cfg in (CONFIGS_SMALL_M if m <= 256 else CONFIGS_LARGE_M) if want("fp8_block_pallas") else ():
        op = functools.partial(gemm.scaled_matmul, b_block=128, config=cfg)
        measure(rep, deadline, base, "fp8_block_pallas", op, block, ref, flops, _cfg_name(cfg), **timing)
    for cfg in configs_mgpu if want("fp8_block_mgpu") and jax.default_backend() == "gpu" else ():
        cfg = gemm_mgpu.chained_stages(cfg, k)
        if gemm_mgpu.fits(m, n, k, cfg, edge_tiles=True):
            op = functools.partial(gemm_mgpu.scaled_matmul, b_block=128, config=cfg)
            waves = round(gemm_mgpu.wave_efficiency(cfg, m, n, k), 4)       # the grid's useful share of tile slots
            measure(rep, deadline, {**base, "wave_efficiency": waves}, "fp8_block_mgpu", op, block, ref, flops,
                    _mgpu_name(cfg, m, n, k), **timing)


def _cfg_name(cfg: GemmConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/w{cfg.num_warps}/s{cfg.num_stages}/g{cfg.group_m}"


def _mgpu_name(cfg: MgpuGemmConfig, m: int, n: int, k: int) -> str:
    chained = "/chain" if gemm_mgpu.chains(cfg, m, n, k) else ""
    split = gemm_mgpu.tail_split(cfg, m, n, k)
    tail = f"/split{split.pieces}" if split.tiles else ""          # the last wave's tiles cut into K pieces
    cluster = f"/cluster{cfg.cluster_dim}" if cfg.cluster_dim else ""
    # the math warpgroups, the snake's minor dimension and the epilogue's width, where not the dataclass defaults
    minor = "" if cfg.grid_minor_dim == MgpuGemmConfig.grid_minor_dim else f"/minor{cfg.grid_minor_dim}"
    epilogue = "" if cfg.epi_tile_n == MgpuGemmConfig.epi_tile_n else f"/epi{cfg.epi_tile_n}"
    wgs = "" if cfg.math_wgs == MgpuGemmConfig.math_wgs else f"{cfg.math_wgs}x"
    return (f"{wgs}wg{cfg.tile_m}x{cfg.tile_n}/{cfg.wg_dim}/s{cfg.max_concurrent_steps}/t{cfg.grid_tile_width}"
            f"/k{cfg.k_blocks}{chained}{cluster}{minor}{epilogue}{tail}")


def _summary(rep: Reporter) -> None:
    """Best Pallas configuration per shape against the peers; the issue's targets checked at M=4096."""
    rows: dict[tuple[int, int, int], dict[str, float]] = {}
    for r in rep.records:
        if "tflops" in r:
            best = rows.setdefault((r["m"], r["n"], r["k"]), {})
            best[r["impl"]] = max(best.get(r["impl"], 0.0), r["tflops"])
    for (m, n, k), best in rows.items():
        pallas = max(best.get("fp8_block_pallas", 0.0), best.get("fp8_block_mgpu", 0.0))
        rep.emit(kind="summary", m=m, n=n, k=k, **{f"{impl}_tflops": v for impl, v in best.items()},
                 pallas_over_bf16=pallas / best["bf16"] if best.get("bf16") else None,
                 faster_than_bf16=pallas > best.get("bf16", float("inf")))
    rep.table(["kind", "m", "n", "k", "impl", "config", "tflops", "rel_err", "bf16_tflops", "fp8_tensor_tflops",
               "fp8_block_jnp_tflops", "fp8_block_pallas_tflops", "fp8_block_mgpu_tflops", "max_err", "error"])
