"""`dsv3-bench grouped_gemm`: MoE grouped GEMMs (tokens sorted by expert, contiguous groups) against peers.

Problems: 8 groups x 4096 tokens and 4 x 8192 (DeepGEMM's contiguous layout), plus 32 experts with a
skewed, seeded load (log-normal shares, two empty experts) over 32768 tokens; (N, K) in {(4096, 7168),
(7168, 2048)}. out [M, N] = rows of group g of x [M, K] times w[g] [K, N]. Side by side:

- `ragged_dot`: `jax.lax.ragged_dot` in BF16 (XLA's grouped GEMM);
- `mgpu_ragged_dot`: jax's own Pallas Mosaic GPU `ragged_dot_mgpu` kernel (BF16, block 64x256x64, 4 stages);
- `pallas_bf16`, `pallas_fp8`: the Triton-backend kernels of `dsv3_jax.kernels.grouped_gemm` (FP8: 1x128
  activation tiles, 128x128 weight blocks, weights K-major [G, N, K]), over a few tile configurations;
- `mosaic_fp8`: the warp-specialized Mosaic GPU FP8 kernel of `dsv3_jax.kernels.grouped_gemm_mgpu` (the
  default for FP8 on GPU where its tiles fit), same operands, over a few configurations;
- `*_wgrad`: the per-group weight gradient alone, out[g] = x_g^T dy_g [G, K, N] (2MNK FLOPs): Triton BF16
  (token-major) and FP8 (token-last, 1x128 scales along the tokens), and the Mosaic GPU FP8 kernel;
- `*_fwd_bwd`: forward + dgrad + per-group wgrad through each path's VJP (3 x the forward FLOPs), the cost
  an MoE layer pays in training; the FP8 path includes quantizing activations, gradients and weights, and
  runs the default kernels (on GPU: the Mosaic ones where their tiles fit).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.bench.timing import Deadline, Reporter, measure
from dsv3_jax.kernels import grouped_gemm, grouped_gemm_mgpu
from dsv3_jax.kernels.gemm import GemmConfig
from dsv3_jax.kernels.grouped_gemm_mgpu import MgpuGroupedConfig
from dsv3_jax.ops import fp8
from dsv3_jax.ops.grouped_matmul import grouped_matmul

NK = ((4096, 7168), (7168, 2048))
BF16_CONFIGS = (
    GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4),
    GemmConfig(128, 256, 64, group_m=8, num_warps=8, num_stages=3),
)
FP8_CONFIGS = (GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=4),)
MOSAIC_FP8_CONFIGS = (grouped_gemm_mgpu.DEFAULT_CONFIG, grouped_gemm_mgpu.ONE_BLOCK_CONFIG,
                      MgpuGroupedConfig(wg_dim="n", max_concurrent_steps=4))


def group_layouts(seed: int = 0) -> dict[str, np.ndarray]:
    """Group sizes of the benchmark problems (each sums to 32768 tokens)."""
    rng = np.random.default_rng(seed)
    shares = rng.lognormal(0.0, 1.0, 32)
    shares[[5, 17]] = 0.0                                         # two experts get no token
    skewed = np.floor(shares / shares.sum() * 32768).astype(np.int64)
    skewed[np.argmax(skewed)] += 32768 - skewed.sum()
    return {"8x4096": np.full(8, 4096), "4x8192": np.full(4, 8192), "skewed32": skewed}


def _mgpu_ragged_dot():
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except ImportError:
        return None
    return functools.partial(ragged_dot_mgpu.ragged_dot, block_m=64, block_n=256, block_k=64,
                             max_concurrent_steps=4, grid_block_n=1)


def run(out: str | None = None, layouts: str = "all", repeats: int = 2, iters: int = 5,
        budget_s: float | None = None, nk: str = "all") -> Reporter:
    rep = Reporter("grouped_gemm", out)
    deadline = Deadline(budget_s)
    problems = group_layouts()
    if layouts != "all":
        problems = {name: problems[name] for name in layouts.split(",")}
    shapes = NK if nk == "all" else [tuple(int(v) for v in s.split("x")) for s in nk.split(",")]
    for n, k in shapes:
        for layout, sizes in problems.items():
            if deadline.left() < 0:
                rep.emit(layout=layout, n=n, k=k, skipped="time budget")
                continue
            _bench_problem(rep, deadline, layout, jnp.asarray(sizes, jnp.int32), n, k, repeats, iters)
    _summary(rep)
    return rep


def _cfg_name(cfg: GemmConfig | MgpuGroupedConfig) -> str:
    if isinstance(cfg, MgpuGroupedConfig):     # per-warpgroup tile / warpgroups stacked along m or n / stages
        return f"{cfg.tile_m}x{cfg.tile_n}/{cfg.wg_dim}/s{cfg.max_concurrent_steps}/k{cfg.k_blocks}"
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/w{cfg.num_warps}/s{cfg.num_stages}"


def _bench_problem(rep: Reporter, deadline: Deadline, layout: str, sizes: jax.Array, n: int, k: int, repeats: int,
                   iters: int) -> None:
    m, g = int(sizes.sum()), sizes.shape[0]
    base, flops = dict(layout=layout, groups=g, m=m, n=n, k=k), 2.0 * m * n * k
    timing = dict(repeats=repeats, iters=iters)
    calls = 2 * repeats
    keys = jax.random.split(jax.random.key(0), 3 * calls)
    xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in keys[:calls]]
    ws = [(jax.random.normal(kk, (g, k, n)) * 0.02).astype(jnp.bfloat16) for kk in keys[calls:2 * calls]]
    bf16_sets = list(zip(xs, ws, strict=True))
    ref = jax.lax.ragged_dot(xs[0], ws[0], sizes, preferred_element_type=jnp.float32)   # exact products, FP32 sums
    ragged = functools.partial(_ragged_dot, sizes=sizes)
    measure(rep, deadline, base, "ragged_dot", ragged, bf16_sets, ref, flops, **timing)
    mgpu = _mgpu_ragged_dot() if jax.default_backend() == "gpu" else None
    if mgpu is not None:
        measure(rep, deadline, base, "mgpu_ragged_dot", functools.partial(mgpu, group_sizes=sizes), bf16_sets, ref,
                flops, **timing)
    for cfg in BF16_CONFIGS:
        op = functools.partial(_pallas_bf16, sizes=sizes, cfg=cfg)
        measure(rep, deadline, base, "pallas_bf16", op, bf16_sets, ref, flops, _cfg_name(cfg), **timing)

    fp8_sets = [_quantize(x, w) for x, w in bf16_sets]                              # x8, sx, w8 [G, N, K], sw
    x8, sx, w8, sw = fp8_sets[0]
    ref8 = jax.lax.ragged_dot(fp8.dequantize(x8, sx, fp8.ACT_BLOCK, jnp.bfloat16), jnp.swapaxes(
        fp8.dequantize(w8, sw, fp8.WEIGHT_BLOCK, jnp.bfloat16), 1, 2), sizes, preferred_element_type=jnp.float32)
    for cfg in FP8_CONFIGS:
        op = functools.partial(_pallas_fp8, sizes=sizes, cfg=cfg)
        measure(rep, deadline, base, "pallas_fp8", op, fp8_sets, ref8, flops, _cfg_name(cfg), **timing)
    if jax.default_backend() == "gpu":
        for cfg in MOSAIC_FP8_CONFIGS:
            op = functools.partial(_pallas_fp8, sizes=sizes, cfg=cfg)
            measure(rep, deadline, base, "mosaic_fp8", op, fp8_sets, ref8, flops, _cfg_name(cfg), **timing)
    del fp8_sets
    _bench_wgrad(rep, deadline, base, sizes, bf16_sets, flops, timing)

    if layout == "8x4096":          # the training cost of the layer: forward + dgrad + wgrad through each VJP
        dys = [jax.random.normal(kk, (m, n), jnp.bfloat16) for kk in keys[2 * calls:]]
        sets = [(x, w, dy) for (x, w), dy in zip(bf16_sets, dys, strict=True)]
        for impl, kwargs in (("ragged_dot_fwd_bwd", None), ("pallas_bf16_fwd_bwd", dict(backend="pallas")),
                             ("pallas_fp8_fwd_bwd", dict(fp8=True, backend="pallas"))):
            op = functools.partial(_fwd_bwd, sizes=sizes, kwargs=kwargs)
            measure(rep, deadline, base, impl, op, sets, None, 3 * flops, **timing)


def _bench_wgrad(rep: Reporter, deadline: Deadline, base: dict, sizes: jax.Array, bf16_sets: list, flops: float,
                 timing: dict) -> None:
    """out[g] = x_g^T dy_g with dy [M, N] drawn like x: BF16 token-major, FP8 token-last (both operands 1x128
    along the tokens), against the FP32 product of the dequantized FP8 operands where the groups are few (the
    reference's ragged_dot transpose asked for 28 GiB at 32 groups on H100)."""
    m, n = base["m"], base["n"]
    sets = [(x, jax.random.normal(jax.random.key(100 + i), (m, n), jnp.bfloat16)) for i, (x, _) in enumerate(bf16_sets)]
    op = functools.partial(_wgrad, sizes=sizes, cfg=grouped_gemm.DEFAULT_BF16)
    measure(rep, deadline, base, "pallas_bf16_wgrad", op, sets, None, flops, **timing)
    fp8_sets = [_quantize_token_last(x, dy) for x, dy in sets]
    del sets
    ref = fp8.scaled_grouped_wgrad(*fp8_sets[0], sizes, backend="xla") if sizes.shape[0] <= 8 else None
    configs = [("pallas_fp8_wgrad", grouped_gemm.DEFAULT_FP8)]
    if jax.default_backend() == "gpu":
        configs.append(("mosaic_fp8_wgrad", grouped_gemm_mgpu.WGRAD_CONFIG))
    for impl, cfg in configs:
        op = functools.partial(_fp8_wgrad, sizes=sizes, cfg=cfg)
        measure(rep, deadline, base, impl, op, fp8_sets, ref, flops, _cfg_name(cfg), **timing)


def _wgrad(x: jax.Array, dy: jax.Array, sizes: jax.Array, cfg: GemmConfig) -> jax.Array:
    return grouped_gemm.transposed_grouped_matmul(x, dy, sizes, config=cfg)


def _fp8_wgrad(xt, sxt, dyt, sdyt, sizes: jax.Array, cfg: GemmConfig | MgpuGroupedConfig) -> jax.Array:
    return grouped_gemm.transposed_grouped_matmul(xt, dyt, sizes, sxt, sdyt, tokens_last=True, config=cfg)


@jax.jit
def _quantize_token_last(x: jax.Array, dy: jax.Array) -> tuple[jax.Array, ...]:
    return (*fp8.quantize(x.T), *fp8.quantize(dy.T))


def _ragged_dot(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(x, w, sizes)


def _pallas_bf16(x: jax.Array, w: jax.Array, sizes: jax.Array, cfg: GemmConfig) -> jax.Array:
    return grouped_gemm.grouped_matmul(x, w, sizes, config=cfg)


def _pallas_fp8(x8, sx, w8, sw, sizes: jax.Array, cfg: GemmConfig | MgpuGroupedConfig) -> jax.Array:
    return grouped_gemm.grouped_matmul(x8, w8, sizes, sx, sw, transpose_rhs=True, config=cfg)


@jax.jit
def _quantize(x: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
    return (*fp8.quantize(x), *fp8.quantize(jnp.swapaxes(w, 1, 2), fp8.WEIGHT_BLOCK))


def _fwd_bwd(x: jax.Array, w: jax.Array, dy: jax.Array, sizes: jax.Array, kwargs: dict | None):
    """Forward, then the VJP (dgrad and wgrad) of one grouped GEMM: ragged_dot (kwargs None) or ops'."""
    fn = (lambda x, w: jax.lax.ragged_dot(x, w, sizes)) if kwargs is None else (
        lambda x, w: grouped_matmul(x, w, sizes, **kwargs))
    y, vjp = jax.vjp(fn, x, w)
    return (y, *vjp(dy))


def _summary(rep: Reporter) -> None:
    best: dict[tuple, dict[str, float]] = {}
    for r in rep.records:
        if "tflops" in r:
            row = best.setdefault((r["layout"], r["n"], r["k"]), {})
            row[r["impl"]] = max(row.get(r["impl"], 0.0), r["tflops"])
    for (layout, n, k), row in best.items():
        rep.emit(kind="summary", layout=layout, n=n, k=k, **{f"{impl}_tflops": v for impl, v in row.items()})
    rep.table(["kind", "layout", "n", "k", "impl", "config", "tflops", "rel_err", "ragged_dot_tflops",
               "mgpu_ragged_dot_tflops", "pallas_bf16_tflops", "pallas_fp8_tflops", "mosaic_fp8_tflops",
               "pallas_fp8_wgrad_tflops", "mosaic_fp8_wgrad_tflops", "error"])
