"""Grouped GEMM for MoE experts with backend dispatch: the `grouped_matmul` hook of `swiglu_grouped_experts`.

    out = grouped_matmul(lhs [M, K] sorted by expert, rhs [G, K, N], group_sizes [G]) -> [M, N]

Same signature and result as `jax.lax.ragged_dot` (rows past sum(group_sizes) are zero). Backends:
"xla" is `jax.lax.ragged_dot` itself (CPU/TPU; bit-identical to the model's reference path); "pallas"
runs the Pallas kernels of `dsv3_jax.kernels.grouped_gemm` with a custom VJP (dgrad: the same kernel
reading rhs transposed; wgrad: the per-group transposed kernel, FP32 accumulation); "auto" is "pallas"
on GPU, "xla" elsewhere. With fp8=True the FP8 grouped linear of `dsv3_jax.ops.fp8` runs instead; on a GPU
its forward, dgrad and wgrad take the Mosaic GPU kernels of `dsv3_jax.kernels.grouped_gemm_mgpu` wherever
their tiles fit (M a multiple of 128, as in the model's top-k token copies), the Triton ones elsewhere: on
H100 FP8 forward + dgrad + wgrad went from 183 to 566 TFLOP/s, BF16 (Triton) does 603 (bench/RESULTS.md run 5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.kernels import grouped_gemm
from dsv3_jax.ops.fp8 import fp8_grouped_matmul, resolve_backend


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, preferred_element_type: Any = None, *,
                   fp8: bool = False, backend: str = "auto") -> jax.Array:
    """lhs [M, K] (rows grouped by expert) times rhs[g] [K, N] for the rows of group g -> [M, N]."""
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    if fp8:
        return fp8_grouped_matmul(lhs, rhs, group_sizes, out_dtype, False, backend)
    mode = resolve_backend(backend)
    if mode == "xla":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
    return _pallas_grouped(lhs, rhs, group_sizes, out_dtype, mode == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas_grouped(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, out_dtype: jnp.dtype,
                    interpret: bool) -> jax.Array:
    return grouped_gemm.grouped_matmul(lhs, rhs.astype(lhs.dtype), group_sizes, out_dtype=out_dtype,
                                       interpret=interpret)


def _pallas_grouped_fwd(lhs, rhs, group_sizes, out_dtype, interpret):
    return _pallas_grouped(lhs, rhs, group_sizes, out_dtype, interpret), (lhs, rhs, group_sizes)


def _pallas_grouped_bwd(out_dtype, interpret, res, dy):
    lhs, rhs, group_sizes = res
    dy = dy.astype(lhs.dtype)
    # dgrad: dy [M, N] . rhs[g]^T, rhs [G, K, N] read as [G, N_out=K, K_in=N] (K-major over N)
    dlhs = grouped_gemm.grouped_matmul(dy, rhs.astype(lhs.dtype), group_sizes, transpose_rhs=True,
                                       out_dtype=lhs.dtype, interpret=interpret)
    drhs = grouped_gemm.transposed_grouped_matmul(lhs, dy, group_sizes, out_dtype=jnp.float32, interpret=interpret)
    return dlhs, drhs.astype(rhs.dtype), np.zeros(group_sizes.shape, jax.dtypes.float0)


_pallas_grouped.defvjp(_pallas_grouped_fwd, _pallas_grouped_bwd)


def for_config(cfg: Any) -> Callable[..., jax.Array]:
    """The grouped GEMM a ModelConfig asks for (`fp8`, `kernel_backend`), with ragged_dot's signature."""
    if not cfg.fp8 and resolve_backend(cfg.kernel_backend) == "xla":
        return jax.lax.ragged_dot
    return functools.partial(grouped_matmul, fp8=cfg.fp8, backend=cfg.kernel_backend)
