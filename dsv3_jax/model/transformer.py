"""The decoder: embedding, scanned dense and MoE layers, final norm, output head, MTP modules."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import RMSNorm, SwiGLU, dense, dtype_of, normal_init
from dsv3_jax.model.mla import MLA
from dsv3_jax.model.moe import MoE, MoEStats
from dsv3_jax.model.rope import rope_angles

HIDDEN = ("activation_batch", "activation_length", "activation_embed")

REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + MLA(norm(x)); y = h + FFN(norm(h)), FFN dense SwiGLU or DeepSeekMoE.

    Called by nn.scan as (carry, broadcast...) -> (carry, per-layer output): x [batch, seq, embed].
    """

    cfg: ModelConfig
    is_moe: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, positions: jnp.ndarray):
        cfg = self.cfg
        h = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="input_layernorm")(x)
        x = x + MLA(cfg, name="self_attn")(h, cos, sin, positions)
        x = nn.with_logical_constraint(x, HIDDEN)
        h = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="post_attention_layernorm")(x)
        if self.is_moe:
            y, stats = MoE(cfg, name="mlp")(h)
        else:
            y, stats = SwiGLU(cfg, cfg.intermediate_size, name="mlp")(h), None
        x = nn.with_logical_constraint(x + y, HIDDEN)
        return x, stats


def scanned_layers(cfg: ModelConfig, is_moe: bool, length: int, name: str) -> nn.Module:
    """`length` identical DecoderLayers as one nn.scan (params stacked on a leading "layers" axis)."""
    layer = DecoderLayer
    if cfg.remat_policy != "none":
        layer = nn.remat(DecoderLayer, policy=REMAT[cfg.remat_policy], prevent_cse=False)
    scan = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=length,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    return scan(cfg, is_moe, name=name)


class MTPModule(nn.Module):
    """One MTP depth (paper sec. 2.2, eq. 21-23): h' = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]), then one block.

    h [batch, seq, embed] is the previous depth's output (the main model's final-norm output for k=1,
    as HF transformers and vLLM feed DeepSeek's MTP weights); `next_emb` [batch, seq, embed] holds
    Emb(t_{i+k}). Returns the block output after `shared_head.norm`, before the shared output head.
    """

    cfg: ModelConfig
    is_moe: bool

    @nn.compact
    def __call__(self, h, next_emb, cos, sin, positions):
        cfg = self.cfg
        e = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="enorm")(next_emb)
        hn = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="hnorm")(h)
        x = dense(cfg, cfg.hidden_size, ("mtp_concat", "embed"), "eh_proj")(jnp.concatenate([e, hn], -1))
        x, stats = DecoderLayer(cfg, self.is_moe, name="block")(x, cos, sin, positions)
        return RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="shared_head_norm")(x), stats


class ModelOutput(NamedTuple):
    """logits [batch, seq, vocab] f32; mtp_logits [depth, batch, seq, vocab] f32 or None (depth k at position i
    predicts token i+1+k; the last k positions are padding); moe: {"moe_layers": MoEStats [L_moe, B, E],
    "mtp_k": MoEStats [B, E]} for the layers that are MoE."""

    logits: jnp.ndarray
    mtp_logits: jnp.ndarray | None
    moe: dict[str, MoEStats]


class Transformer(nn.Module):
    """DeepSeek-V3: tokens [batch, seq] int32 -> ModelOutput."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray | None = None, with_mtp: bool = True) -> ModelOutput:
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        cos, sin = rope_angles(cfg, positions)
        table = self.param("embed_tokens", normal_init(cfg.initializer_range, ("vocab", "embed")),
                           (cfg.vocab_size, cfg.hidden_size), dtype_of(cfg.param_dtype))
        embed = lambda t: nn.with_logical_constraint(jnp.take(table, t, axis=0).astype(dtype), HIDDEN)
        x = embed(tokens)
        moe: dict[str, Any] = {}
        if cfg.n_dense_layers:
            x, _ = scanned_layers(cfg, False, cfg.n_dense_layers, "dense_layers")(x, cos, sin, positions)
        if cfg.n_moe_layers:
            x, moe["moe_layers"] = scanned_layers(cfg, True, cfg.n_moe_layers, "moe_layers")(x, cos, sin, positions)
        h = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="norm")(x)
        head = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")
        logits = head(h).astype(jnp.float32)

        mtp_logits = None
        if cfg.num_nextn_predict_layers and (with_mtp or self.is_initializing()):
            depth_logits = []
            for k in range(1, cfg.num_nextn_predict_layers + 1):
                shifted = jnp.concatenate([tokens[:, k:], jnp.zeros_like(tokens[:, :k])], axis=1)  # t_{i+k}
                is_moe = cfg.num_hidden_layers + k - 1 >= cfg.first_k_dense_replace
                h, stats = MTPModule(cfg, is_moe, name=f"mtp_{k - 1}")(h, embed(shifted), cos, sin, positions)
                if stats is not None:
                    moe[f"mtp_{k - 1}"] = stats
                depth_logits.append(head(h).astype(jnp.float32))
            mtp_logits = jnp.stack(depth_logits)
        return ModelOutput(logits, mtp_logits, moe)
