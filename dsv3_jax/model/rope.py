"""Rotary position embedding with YaRN scaling, as HF `rope_scaling` / DeepSeek's reference define it.

Decoupled RoPE (paper eq. 3, 5) rotates only the `qk_rope_head_dim` part of queries and the shared key.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig, yarn_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """Dimension index whose wavelength completes `num_rotations` turns over `max_pos` positions."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rope_dim // 2] (float32) and the factor applied to cos/sin.

    YaRN: frequencies below the correction range are divided by `factor` (interpolation), those above
    are kept (extrapolation), with a linear ramp between; the cos/sin factor is
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for DeepSeek-V3). The softmax-scale
    part of YaRN is `ModelConfig.softmax_scale`.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    inv_freq = (1.0 / base ** exponents).astype(np.float32)
    if cfg.rope_type != "yarn":
        return inv_freq, 1.0
    rs = cfg.rope_scaling
    factor = float(rs["factor"])
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    original = rs["original_max_position_embeddings"]
    low = _yarn_correction_dim(beta_fast, dim, base, original)
    high = _yarn_correction_dim(beta_slow, dim, base, original)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_angles(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [*positions.shape, rope_dim // 2], already multiplied by the YaRN factor."""
    inv_freq, factor = rope_frequencies(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, interleaved: bool) -> jnp.ndarray:
    """Rotate x [batch, seq, heads, rope_dim] by angles cos/sin [batch, seq, rope_dim // 2].

    interleaved=True rotates adjacent pairs (x0, x1), (x2, x3), ... (DeepSeek's layout, HF
    `rope_interleave`); False rotates the two halves (x_i, x_{i + d/2}). The output keeps x's layout.
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
