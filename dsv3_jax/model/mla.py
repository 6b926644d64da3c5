"""Multi-head Latent Attention (paper sec. 2.1.1, eq. 1-11).

Letters in einsum strings: b batch, s query position, t key position, h head, d head dim,
c latent (kv_lora_rank), r rope dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import RMSNorm, dense
from dsv3_jax.model.rope import apply_rope
from dsv3_jax.ops.attention import mla_flash_attention

LATENT_NORM_EPS = 1e-6  # HF and DeepSeek fix the latent norms' eps, whatever rms_norm_eps says
ACT = ("activation_batch", "activation_length", "activation_heads", None)


def causal_mask(q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
    """[batch, 1, s, t] True where key position <= query position."""
    return (k_positions[:, None, None, :] <= q_positions[:, None, :, None])


class MLA(nn.Module):
    """x [batch, seq, embed] -> [batch, seq, embed].

    Queries: x -> q_a_proj (d_c' = q_lora_rank) -> RMSNorm -> q_b_proj -> [nope | rope] per head (eq. 6-8),
    or a plain q_proj when q_lora_rank is None. Keys/values: x -> kv_a_proj_with_mqa -> latent c_kv
    (eq. 1) + a rope key shared by all heads (eq. 3); c_kv -> RMSNorm -> kv_b_proj -> per-head
    k_nope, v (eq. 2, 4). Attention softmax in float32 (eq. 10), o_proj (eq. 11).
    """

    cfg: ModelConfig

    def queries(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """q_nope [b, s, h, qk_nope_head_dim], q_rope [b, s, h, qk_rope_head_dim] (before rotation)."""
        cfg = self.cfg
        heads = (cfg.num_attention_heads, cfg.qk_head_dim)
        if cfg.q_lora_rank is None:
            q = dense(cfg, heads, ("embed", "heads", "qk_head_dim"), "q_proj")(x)
        else:
            c_q = dense(cfg, cfg.q_lora_rank, ("embed", "q_lora"), "q_a_proj")(x)
            c_q = RMSNorm(LATENT_NORM_EPS, cfg.dtype, name="q_a_layernorm")(c_q)
            q = dense(cfg, heads, ("q_lora", "heads", "qk_head_dim"), "q_b_proj")(c_q)
        q = nn.with_logical_constraint(q, ACT)
        return q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]

    def latent_kv(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Normalized latent c_kv [b, t, kv_lora_rank] and the unrotated rope key [b, t, qk_rope_head_dim]."""
        cfg = self.cfg
        kv = dense(cfg, cfg.kv_lora_rank + cfg.qk_rope_head_dim, ("embed", "kv_lora_rope"), "kv_a_proj_with_mqa")(x)
        c_kv = RMSNorm(LATENT_NORM_EPS, cfg.dtype, name="kv_a_layernorm")(kv[..., :cfg.kv_lora_rank])
        return c_kv, kv[..., cfg.kv_lora_rank:]

    def kv_up(self) -> nn.Module:
        cfg = self.cfg
        return dense(cfg, (cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim),
                     ("kv_lora", "heads", "kv_head_dim"), "kv_b_proj")

    def reference_attention(self, q_nope, q_rope, k_nope, k_rope, v, positions):
        """Eq. 10: softmax over [b, h, s, t] FP32 scores masked by position, times v -> [b, s, h, v_head_dim]."""
        scores = (jnp.einsum("bshd,bthd->bhst", q_nope, k_nope, preferred_element_type=jnp.float32)
                  + jnp.einsum("bshr,btr->bhst", q_rope, k_rope, preferred_element_type=jnp.float32))
        scores = scores * self.cfg.softmax_scale
        scores = jnp.where(causal_mask(positions, positions), scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bhst,bthd->bshd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)

    @nn.compact
    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        q_nope, q_rope = self.queries(x)
        c_kv, k_rope = self.latent_kv(x)
        q_rope = apply_rope(q_rope, cos, sin, cfg.rope_interleave)
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin, cfg.rope_interleave)[:, :, 0, :]
        kv = nn.with_logical_constraint(self.kv_up()(c_kv), ACT)
        k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
        if cfg.attention_impl == "flash":
            out = mla_flash_attention(q_nope, q_rope, k_nope, k_rope, v, cfg.softmax_scale)
        else:
            out = self.reference_attention(q_nope, q_rope, k_nope, k_rope, v, positions)
        out = nn.with_logical_constraint(out, ACT)
        return dense(cfg, cfg.hidden_size, ("heads", "v_head_dim", "embed"), "o_proj", n_in=2)(out)
