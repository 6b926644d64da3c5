"""FP8 numerics of DeepSeek-V3 (paper sec. 3.3): fine-grained quantization and FP8 linears with custom VJPs.

Quantization to float8_e4m3fn with FP32 scales, one scale per block of the last two axes:

    s = max(amax(|block|), eps) / 448        q = clip(x / s, -448, 448) -> e4m3       x ~= q * s

- activations: 1x128 tiles (one scale per token per 128 channels), `block=(1, 128)`;
- weights: 128x128 blocks, `block=(128, 128)`;
- wgrad operands: 1x128 tiles along the token axis, i.e. `block=(1, 128)` on the transposed [K, M] copy.

Edge blocks smaller than 128 count as zero-padded (their amax is unchanged). `ue8m0=True` rounds each
scale up to a power of two (DeepSeek-V3.1's `scale_fmt: ue8m0`). The same `quantize`/`dequantize`
serve checkpoints (`dsv3_jax.convert.fp8_blocks`, numpy on the host, `eps=0`: amax / 448 with
all-zero blocks at scale 1, DeepSeek's weight format) and training (jnp, `eps=SCALE_EPS`, a floor that only
keeps all-zero tiles finite). DeepGEMM's activation quantizer floors amax at 1e-4; that floor flushes the
gradients of a token-mean loss (1e-6 and below), and FP8 then trains measurably worse (bench/RESULTS.md
run 7: 1.44% above BF16 after 300 steps of `small` with it, 0.27% without it).

FP8 linear y = x W (x [M, K], W [K, N], any float dtypes) with `jax.custom_vjp`; every GEMM takes FP8
operands quantized along its own contraction axis and accumulates in FP32:

    fprop  y  = x  . W        x: 1x128 along K,           W: 128x128 (read as W^T [N, K], K-major)
    dgrad  dx = dy . W^T      dy: 1x128 along N,          W: the same 128x128 blocks ([K, N] is K-major here)
    wgrad  dW = x^T . dy      x^T, dy^T: 1x128 along M; dW comes back in W's dtype (FP32 master)

The forward caches for the backward what its GEMMs read: W's FP8 blocks and x^T in FP8 tiles along M,
quantized once from x itself. (The paper caches the fprop's FP8 x and dequantizes, transposes and
re-quantizes it for the wgrad: two roundings of x where this takes one, for the same cached bytes.) Each
activation and gradient is needed in both orientations and each weight as [K, N] and [N, K] blocks:
`quantize_activation` / `quantize_weight` give both from one read of x on the "pallas" backend (the fused
kernel of `dsv3_jax.kernels.quantize`, the same codes and scales as the jnp path; FP32 weights excepted, see
there). On H200 that took the proxy-1gpu FP8 forward + backward from 0.427 s (XLA's quantization fusions,
8% behind BF16) to 0.391 s (2% ahead of BF16's 0.399 s), bench/RESULTS.md run 8.

`fp8_grouped_matmul` is the same for MoE experts (tokens sorted by expert, W [G, K, N], per-group wgrad).
Backends: "xla" dequantizes and runs an FP32 dot / ragged_dot (the reference, any device); "pallas" runs
the kernels of `dsv3_jax.kernels` on FP8 operands and scales (interpret mode off GPU): dense GEMMs whose
M and N fill whole 128-row tiles (K whole 128 blocks) take the Mosaic GPU kernel (`gemm_mgpu`, the
fastest measured on H100, bench/RESULTS.md), the others the Triton kernel (`gemm`); grouped GEMMs and their
wgrad likewise take the Mosaic GPU kernels of `grouped_gemm_mgpu` on a GPU where their tiles fit, else the
Triton ones (`grouped_gemm.default_config`); "auto" picks "pallas" on GPU and "xla" elsewhere.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsv3_jax.kernels import gemm, gemm_mgpu, grouped_gemm
from dsv3_jax.kernels import quantize as quantize_kernel

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448.0
TILE = 128
SCALE_EPS = 1e-30           # amax floor: all-zero tiles get the normal FP32 scale 1e-30 / 448, real values no floor
ACT_BLOCK = (1, TILE)
WEIGHT_BLOCK = (TILE, TILE)
BACKENDS = ("auto", "xla", "pallas")
HIGHEST = jax.lax.Precision.HIGHEST


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Scales of an array [..., R, C] in `block` blocks: [..., ceil(R / b0), ceil(C / b1)]."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def scales_from_amax(amax: Any, *, eps: float = SCALE_EPS, ue8m0: bool = False, xp: Any = jnp) -> Any:
    """FP32 scales max(amax, eps) / 448 (eps=0: amax / 448, and 1 where amax is 0); ue8m0 rounds up to 2^n."""
    amax = amax.astype(xp.float32)
    if eps > 0:
        s = xp.maximum(amax, xp.float32(eps)) / xp.float32(FP8_MAX)
    else:
        s = xp.where(amax > 0, amax / xp.float32(FP8_MAX), xp.float32(1.0))
    if ue8m0:                                   # 2^ceil(log2 s), exactly: s = m 2^e with m in [0.5, 1)
        m, e = xp.frexp(s)
        s = xp.ldexp(xp.ones_like(s), xp.where(m == 0.5, e - 1, e))
    return s.astype(xp.float32)


def expand_scales(s: Any, shape: tuple[int, ...], block: tuple[int, int], xp: Any = jnp) -> Any:
    """Each block's scale repeated over its elements: [..., Sr, Sc] -> [..., R, C] (edge blocks cut)."""
    rows, cols = shape[-2:]
    s = xp.repeat(s, block[0], axis=-2)[..., :rows, :]
    return xp.repeat(s, block[1], axis=-1)[..., :cols]


def quantize(x: Any, block: tuple[int, int] = ACT_BLOCK, *, eps: float = SCALE_EPS, ue8m0: bool = False,
             xp: Any = jnp) -> tuple[Any, Any]:
    """x [..., R, C] -> (float8_e4m3fn [..., R, C], float32 scales [..., ceil(R/b0), ceil(C/b1)]).

    xp is jax.numpy (traced, on device) or numpy (host-side checkpoint conversion).
    """
    x = x.astype(xp.float32)
    *lead, rows, cols = x.shape
    n_r, n_c = -(-rows // block[0]), -(-cols // block[1])
    pad = [(0, 0)] * len(lead) + [(0, n_r * block[0] - rows), (0, n_c * block[1] - cols)]
    tiles = xp.pad(x, pad).reshape(*lead, n_r, block[0], n_c, block[1])
    s = scales_from_amax(xp.abs(tiles).max(axis=(-3, -1)), eps=eps, ue8m0=ue8m0, xp=xp)
    q = xp.clip(tiles / s[..., :, None, :, None], -FP8_MAX, FP8_MAX)
    q = q.reshape(*lead, n_r * block[0], n_c * block[1])[..., :rows, :cols]
    return q.astype(FP8_DTYPE), s


def dequantize(q: Any, s: Any, block: tuple[int, int] = ACT_BLOCK, dtype: Any = None, xp: Any = jnp) -> Any:
    """q [..., R, C] times its block scales s [..., Sr, Sc] in FP32, cast to `dtype` (default float32)."""
    expected = scale_shape(tuple(q.shape), block)
    if tuple(s.shape) != expected:
        raise ValueError(f"scale shape {tuple(s.shape)} does not fit shape {tuple(q.shape)} with blocks {block}: "
                         f"expected {expected}")
    out = q.astype(xp.float32) * expand_scales(s.astype(xp.float32), tuple(q.shape), block, xp)
    return out if dtype is None else out.astype(dtype)


def resolve_backend(backend: str) -> str:
    """"auto" -> "pallas" on GPU, "xla" elsewhere; "pallas" off GPU -> "interpret" (Pallas interpret mode)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = jax.default_backend() == "gpu"
    if backend == "auto":
        return "pallas" if on_gpu else "xla"
    if backend == "pallas" and not on_gpu:
        return "interpret"
    return backend


# ----------------------------------------------------------------------------------------------------------
# Scaled GEMMs on quantized operands: the reference and the kernels compute the same function.

def scaled_matmul(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, *, b_block: int,
                  out_dtype: Any, backend: str) -> jax.Array:
    """a [M, K] fp8 (1x128 scales [M, Kb]) . b [N, K]^T fp8 (scales [ceil(N/b_block), Kb]) -> [M, N]."""
    mode = resolve_backend(backend)
    if mode == "xla":
        a_f = dequantize(a, a_scale, ACT_BLOCK)
        b_f = dequantize(b, b_scale, (b_block, TILE))
        return jnp.dot(a_f, b_f.T, precision=HIGHEST, preferred_element_type=jnp.float32).astype(out_dtype)
    if mode == "pallas" and gemm_mgpu.supports(a.shape[0], b.shape[0], a.shape[1]):   # the faster kernel on H100
        return gemm_mgpu.scaled_matmul(a, a_scale, b, b_scale, b_block=b_block, out_dtype=jnp.dtype(out_dtype))
    return gemm.scaled_matmul(a, a_scale, b, b_scale, b_block=b_block, out_dtype=jnp.dtype(out_dtype),
                              interpret=mode == "interpret")


def scaled_grouped_matmul(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array,
                          group_sizes: jax.Array, *, out_dtype: Any, backend: str) -> jax.Array:
    """Rows of group g of a [M, K] fp8 (scales [M, Kb]) times b[g]^T, b [G, N, K] fp8 in 128x128 blocks -> [M, N]."""
    mode = resolve_backend(backend)
    if mode == "xla":
        a_f = dequantize(a, a_scale, ACT_BLOCK)
        b_f = jnp.swapaxes(dequantize(b, b_scale, WEIGHT_BLOCK), 1, 2)
        return jax.lax.ragged_dot(a_f, b_f, group_sizes, precision=HIGHEST,
                                  preferred_element_type=jnp.float32).astype(out_dtype)
    return grouped_gemm.grouped_matmul(a, b, group_sizes, a_scale, b_scale, transpose_rhs=True, b_block=TILE,
                                       out_dtype=jnp.dtype(out_dtype), interpret=mode == "interpret")


def scaled_grouped_wgrad(a_t: jax.Array, a_scale: jax.Array, b_t: jax.Array, b_scale: jax.Array,
                         group_sizes: jax.Array, *, backend: str) -> jax.Array:
    """out[g] = a_g^T b_g [G, Ka, Nb] in FP32 from token-last fp8 a_t [Ka, M], b_t [Nb, M] (1x128 along M)."""
    mode = resolve_backend(backend)
    if mode == "xla":
        a_f = dequantize(a_t, a_scale, ACT_BLOCK).T
        b_f = dequantize(b_t, b_scale, ACT_BLOCK).T
        zeros = jnp.zeros((group_sizes.shape[0], a_f.shape[1], b_f.shape[1]), jnp.float32)
        ragged = lambda w: jax.lax.ragged_dot(a_f, w, group_sizes, precision=HIGHEST)
        return jax.vjp(ragged, zeros)[1](b_f)[0]
    return grouped_gemm.transposed_grouped_matmul(a_t, b_t, group_sizes, a_scale, b_scale, tokens_last=True,
                                                  out_dtype=jnp.float32, interpret=mode == "interpret")


# ----------------------------------------------------------------------------------------------------------
# Both orientations of each GEMM operand: jnp (two fusions) or one fused kernel pass.

_KERNEL_SCALES = functools.partial(scales_from_amax, eps=SCALE_EPS)


def quantize_activation(x: jax.Array, ue8m0: bool, backend: str
                        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """x [M, C] -> (x in 1x128 tiles along C, scales [M, Cb]; x^T [C, M] in 1x128 tiles along M, scales [C, Mb]).

    "pallas" reads x once (`dsv3_jax.kernels.quantize`); "xla" and ue8m0 scales take the two jnp quantizations.
    """
    mode = resolve_backend(backend)
    if mode == "xla" or ue8m0:
        return (*quantize(x, ACT_BLOCK, ue8m0=ue8m0), *quantize(x.T, ACT_BLOCK, ue8m0=ue8m0))
    return quantize_kernel.quantize_pair(x, _KERNEL_SCALES, interpret=mode == "interpret")


def quantize_weight(w: jax.Array, ue8m0: bool, backend: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """w [..., K, N] -> (fp8 [..., K, N], the same transposed [..., N, K], 128x128 block scales [..., Kb, Nb]).

    "pallas" (and interpret mode) take the fused kernel, BF16 and FP32 (master) weights alike; "xla" and ue8m0
    scales take XLA's fusions.
    """
    mode = resolve_backend(backend)
    if mode == "xla" or ue8m0:
        wq, ws = quantize(w, WEIGHT_BLOCK, ue8m0=ue8m0)
        return wq, jnp.swapaxes(wq, -1, -2), ws
    return quantize_kernel.quantize_pair(w, _KERNEL_SCALES, weight=True, interpret=mode == "interpret")


# ----------------------------------------------------------------------------------------------------------
# FP8 linear layers with custom VJPs.

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def fp8_matmul(x: jax.Array, w: jax.Array, out_dtype: Any = jnp.bfloat16, ue8m0: bool = False,
               backend: str = "auto") -> jax.Array:
    """y [M, N] = x [M, K] . w [K, N] with FP8 E4M3 operands (x 1x128, w 128x128) and FP32 accumulation."""
    return _fp8_matmul_fwd(x, w, out_dtype, ue8m0, backend)[0]


def _fp8_matmul_fwd(x, w, out_dtype, ue8m0, backend):
    xq, xs, x_t, x_ts = quantize_activation(x, ue8m0, backend)                         # x^T [K, M], 1x128 along M
    wq, wq_t, ws = quantize_weight(w, ue8m0, backend)
    y = scaled_matmul(xq, xs, wq_t, ws.T, b_block=TILE, out_dtype=out_dtype, backend=backend)
    # residuals: FP8 operands of the backward's GEMMs; zero-size arrays carry the primal dtypes
    return y, (x_t, x_ts, wq, ws, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_matmul_bwd(out_dtype, ue8m0, backend, res, dy):
    x_t, x_ts, wq, ws, x_like, w_like = res
    dyq, dys, dy_t, dy_ts = quantize_activation(dy, ue8m0, backend)                    # along N; dy^T [N, M]
    dx = scaled_matmul(dyq, dys, wq, ws, b_block=TILE, out_dtype=x_like.dtype, backend=backend)
    dw = scaled_matmul(x_t, x_ts, dy_t, dy_ts, b_block=1, out_dtype=jnp.float32, backend=backend)
    return dx, dw.astype(w_like.dtype)


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def fp8_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, out_dtype: Any = jnp.bfloat16,
                       ue8m0: bool = False, backend: str = "auto") -> jax.Array:
    """MoE experts in FP8: rows of group g of x [M, K] (sorted by expert) times w[g], w [G, K, N] -> [M, N]."""
    return _fp8_grouped_fwd(x, w, group_sizes, out_dtype, ue8m0, backend)[0]


def _fp8_grouped_fwd(x, w, group_sizes, out_dtype, ue8m0, backend):
    xq, xs, x_t, x_ts = quantize_activation(x, ue8m0, backend)
    wq, wq_t, ws = quantize_weight(w, ue8m0, backend)                                  # [G, K, N], [G, Kb, Nb]
    y = scaled_grouped_matmul(xq, xs, wq_t, jnp.swapaxes(ws, 1, 2), group_sizes, out_dtype=out_dtype,
                              backend=backend)
    return y, (x_t, x_ts, wq, ws, group_sizes, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_grouped_bwd(out_dtype, ue8m0, backend, res, dy):
    x_t, x_ts, wq, ws, group_sizes, x_like, w_like = res
    dyq, dys, dy_t, dy_ts = quantize_activation(dy, ue8m0, backend)
    dx = scaled_grouped_matmul(dyq, dys, wq, ws, group_sizes, out_dtype=x_like.dtype, backend=backend)
    dw = scaled_grouped_wgrad(x_t, x_ts, dy_t, dy_ts, group_sizes, backend=backend)
    return dx, dw.astype(w_like.dtype), np.zeros(group_sizes.shape, jax.dtypes.float0)


fp8_grouped_matmul.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)
