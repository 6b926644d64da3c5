"""Causal MLA attention core without the [batch, heads, seq, seq] score matrix (`attention_impl: flash`).

MLA's per-head query [q_nope | q_rope] (qk_head_dim = 192 for V3) meets keys [k_nope | k_rope], the rope
key shared by all heads; values have v_head_dim (128). `jax.nn.dot_product_attention` wants one head
dim for q, k and v, so the narrower side is zero-padded (v for V3: padding changes neither the scores
nor the kept output columns) and the padding is cut from the output.
On GPU with BF16/FP16 activations it runs cuDNN's fused flash attention (forward and backward in
O(seq) memory, softmax in FP32); elsewhere XLA's implementation of the same function (which does build
the scores). The mask is
causal by index: query i sees keys 0..i, the case of training and of prefill without a cache. The
reference path (`attention_impl: reference`, in `dsv3_jax.model.mla`) masks by position instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mla_flash_attention(q_nope: jax.Array, q_rope: jax.Array, k_nope: jax.Array, k_rope: jax.Array, v: jax.Array,
                        scale: float) -> jax.Array:
    """Causal softmax(q k^T * scale) v.

    q_nope [b, s, h, dn], q_rope [b, s, h, dr] (rotated), k_nope [b, s, h, dn], k_rope [b, s, dr] (rotated,
    shared by the heads), v [b, s, h, dv] -> [b, s, h, dv] in v's dtype.
    """
    b, s, h, _ = q_nope.shape
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (b, s, h, k_rope.shape[-1]))], axis=-1)
    dv, d = v.shape[-1], max(q.shape[-1], v.shape[-1])
    pad = lambda x: jnp.pad(x.astype(v.dtype), ((0, 0), (0, 0), (0, 0), (0, d - x.shape[-1])))
    half = v.dtype in (jnp.bfloat16, jnp.float16)
    impl = "cudnn" if half and jax.default_backend() == "gpu" else None
    out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), scale=scale, is_causal=True, implementation=impl)
    return out[..., :dv]
