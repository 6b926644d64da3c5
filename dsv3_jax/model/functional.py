"""Pure functions over the model: init, apply, parameter counts and logical axes."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.transformer import ModelOutput, Transformer

Params = dict[str, Any]


def _dummy_tokens() -> jnp.ndarray:
    return jnp.zeros((1, 2), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random parameters (N(0, initializer_range^2) matrices, unit norms, zero router bias) as a plain pytree."""
    boxed = Transformer(cfg).init(key, _dummy_tokens())["params"]
    return nn.meta.unbox(boxed)


def param_shapes(cfg: ModelConfig) -> Params:
    """jax.ShapeDtypeStruct for every parameter, without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


def param_logical_axes(cfg: ModelConfig) -> Params:
    """A pytree like the params holding each leaf's logical axis names (jax.sharding.PartitionSpec)."""
    boxed = jax.eval_shape(lambda k: Transformer(cfg).init(k, _dummy_tokens())["params"], jax.random.key(0))
    return nn.get_partition_spec(boxed)


@functools.partial(jax.jit, static_argnums=(0, 4))
def apply(cfg: ModelConfig, params: Params, tokens: jnp.ndarray, positions: jnp.ndarray | None = None,
          with_mtp: bool = True) -> ModelOutput:
    """Full forward: main logits, MTP logits and per-layer MoE statistics. tokens int32 [batch, seq]."""
    return Transformer(cfg).apply({"params": params}, tokens, positions, with_mtp)


def forward(cfg: ModelConfig, params: Params, tokens: jnp.ndarray) -> jnp.ndarray:
    """Next-token logits float32 [batch, seq, vocab] for tokens int32 [batch, seq]."""
    return apply(cfg, params, jnp.asarray(tokens, jnp.int32), with_mtp=False).logits


def _size(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from shapes alone (jax.eval_shape, nothing allocated).

    total: main model with embedding and head, without MTP. active: per token (shared experts and the
    top-k routed experts of each MoE layer; embedding and head included). mtp: the MTP modules' own
    parameters (they share embedding and head). hf_checkpoint: what a released HF checkpoint stores,
    where each MTP layer repeats the embedding and head.
    """
    shapes = param_shapes(cfg)
    mtp = {k: v for k, v in shapes.items() if k.startswith("mtp_")}
    main = {k: v for k, v in shapes.items() if not k.startswith("mtp_")}
    total = _size(main)
    routed = 0
    if "moe_layers" in main:
        mlp = main["moe_layers"]["mlp"]
        routed = _size([mlp["w_gate"], mlp["w_up"], mlp["w_down"]])
    active = total - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    embed_and_head = 2 * cfg.vocab_size * cfg.hidden_size
    return {
        "total": total,
        "active": active,
        "mtp": _size(mtp),
        "hf_checkpoint": total + _size(mtp) + cfg.num_nextn_predict_layers * embed_and_head,
    }
