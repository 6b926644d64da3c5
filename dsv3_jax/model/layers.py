"""Basic layers: RMSNorm, a dense projection with logical axis names, the SwiGLU feed-forward."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.ops.fp8 import fp8_matmul
from dsv3_jax.ops.matmul import matmul


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def normal_init(std: float, axes: Sequence[str | None]) -> nn.initializers.Initializer:
    """N(0, std^2) initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), tuple(axes))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32; x [..., dim]."""

    eps: float = 1e-6
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (normed.astype(x.dtype) * scale).astype(self.dtype)


class Dense(nn.Module):
    """Projection contracting the last `n_in` axes of x with a kernel [*in_dims, *features].

    `axes` names every kernel axis (inputs first) for the sharding rules. The matmul runs in
    `dtype` with float32 accumulation; with `fp8` it runs on FP8 E4M3 operands (x in 1x128 tiles,
    the float32 kernel in 128x128 blocks, `dsv3_jax.ops.fp8.fp8_matmul`) on `kernel_backend`.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    n_in: int = 1
    std: float = 0.006
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    fp8: bool = False
    kernel_backend: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        in_dims = x.shape[x.ndim - self.n_in:]
        kernel = self.param("kernel", normal_init(self.std, self.axes), (*in_dims, *self.features),
                            dtype_of(self.param_dtype))
        dtype = dtype_of(self.dtype)
        k, n = math.prod(in_dims), math.prod(self.features)
        x2, w2 = x.reshape(-1, k), kernel.reshape(k, n)
        # BF16 GEMMs in the backward too (dsv3_jax.ops.matmul): dot_general(..., f32).astype(bf16) differentiates
        # into TF32 GEMMs (223 of 606 ms of proxy-1gpu forward + backward on H100, bench/RESULTS.md)
        y = fp8_matmul(x2.astype(dtype), w2, dtype, False, self.kernel_backend) if self.fp8 else matmul(x2, w2, dtype)
        return y.reshape(*x.shape[:x.ndim - self.n_in], *self.features)


def dense(cfg: ModelConfig, features: int | tuple[int, ...], axes: tuple[str | None, ...], name: str,
          n_in: int = 1, dtype: str | None = None) -> Dense:
    """A Dense with the config's init std, dtypes and FP8 switch.

    With `cfg.fp8` every projection runs in FP8 except the output head (the one onto the "vocab" axis),
    which the paper keeps in BF16 with the embedding, router, norms and attention core.
    """
    features = (features,) if isinstance(features, int) else tuple(features)
    return Dense(features=features, axes=axes, n_in=n_in, std=cfg.initializer_range,
                 dtype=dtype or cfg.dtype, param_dtype=cfg.param_dtype, fp8=cfg.fp8 and "vocab" not in axes,
                 kernel_backend=cfg.kernel_backend, name=name)


MLP_ACT = ("activation_batch", "activation_length", "activation_mlp")


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): x [batch, seq, embed] -> [batch, seq, embed] (dense layers, shared experts)."""

    cfg: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg, f = self.cfg, self.intermediate_size
        gate = dense(cfg, f, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg, f, ("embed", "mlp"), "up_proj")(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, MLP_ACT)
        return dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down_proj")(h)
