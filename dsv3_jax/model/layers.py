"""Basic layers: RMSNorm, a dense projection with logical axis names, the SwiGLU feed-forward."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig


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
    `dtype` with float32 accumulation.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    n_in: int = 1
    std: float = 0.006
    dtype: str = "bfloat16"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        in_dims = x.shape[x.ndim - self.n_in:]
        kernel = self.param("kernel", normal_init(self.std, self.axes), (*in_dims, *self.features),
                            dtype_of(self.param_dtype))
        dtype = dtype_of(self.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())),
                                preferred_element_type=jnp.float32)
        return y.astype(dtype)


def dense(cfg: ModelConfig, features: int | tuple[int, ...], axes: tuple[str | None, ...], name: str,
          n_in: int = 1, dtype: str | None = None) -> Dense:
    """A Dense with the config's init std and dtypes."""
    features = (features,) if isinstance(features, int) else tuple(features)
    return Dense(features=features, axes=axes, n_in=n_in, std=cfg.initializer_range,
                 dtype=dtype or cfg.dtype, param_dtype=cfg.param_dtype, name=name)


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
