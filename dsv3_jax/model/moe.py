"""DeepSeekMoE (paper sec. 2.1.2, eq. 12-16): shared experts + fine-grained routed experts.

Router in float32: affinities s = sigmoid(u W) (eq. 15; softmax for DeepSeek-V2 configs); the
balancing bias b is added to s only to *choose* experts (eq. 16); node/group-limited selection keeps
the `topk_group` best of `n_group` groups (group score = sum of its top-2 biased affinities); the
combine weights are the chosen experts' unbiased affinities, normalized, times `routed_scaling_factor`.
No token is ever dropped.

Two dispatch paths with one answer: `dense` runs every expert on every token and masks (the
reference), `ragged` sorts token copies by expert and runs grouped GEMMs (`jax.lax.ragged_dot`, or the
Pallas / FP8 grouped GEMMs that `dsv3_jax.ops.grouped_matmul` picks from `fp8` and `kernel_backend`).
Traced under a mesh (`dsv3_jax.parallel.mesh.use_mesh`), `ragged` becomes expert parallel: tokens go to
the devices holding their experts by all-to-all (`dsv3_jax.parallel.expert_parallel`); the config does
not change with the mesh. `dense` stays the reference there too (jit partitions it as it likes).
Letters: n token, k chosen slot, e expert, g group, d embed, f expert hidden.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import SwiGLU, dtype_of, normal_init
from dsv3_jax.ops.grouped_matmul import for_config as grouped_matmul_for
from dsv3_jax.ops.permute import dispatch_rows, inverse_permutation, permute_rows
from dsv3_jax.parallel.expert_parallel import expert_parallel_experts, experts_held, mesh_wants_expert_parallel


class Routing(NamedTuple):
    """Router output for N tokens: chosen experts [N, K] int32, combine weights [N, K] f32, affinities [N, E] f32."""

    experts: jnp.ndarray
    weights: jnp.ndarray
    scores: jnp.ndarray


def route(cfg: ModelConfig, logits: jnp.ndarray, bias: jnp.ndarray | None) -> Routing:
    """Select experts from router logits [N, E] (float32); `bias` [E] enters selection only."""
    scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    choice = scores if bias is None else scores + bias
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        n, e = choice.shape
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)
        # group score [N, G]: sum of the top-2 (V3) or the max (V2) affinity in the group
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1) if cfg.topk_method == "noaux_tc" else grouped.max(-1)
        _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)             # [N, topk_group]
        keep = jnp.zeros_like(group_scores, dtype=bool).at[jnp.arange(n)[:, None], top_groups].set(True)
        choice = jnp.where(jnp.repeat(keep, e // cfg.n_group, axis=1), choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)                 # [N, K]
    weights = jnp.take_along_axis(scores, experts, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return Routing(experts.astype(jnp.int32), weights * cfg.routed_scaling_factor, scores)


def swiglu_dense_experts(x: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray, w_down: jnp.ndarray,
                         routing: Routing) -> jnp.ndarray:
    """Reference: every expert on every token, weighted by the (mostly zero) combine matrix. x [N, d]."""
    n_experts = w_gate.shape[0]
    combine = jnp.zeros((x.shape[0], n_experts), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], routing.experts].add(routing.weights)
    h = jax.nn.silu(jnp.einsum("nd,edf->enf", x, w_gate)) * jnp.einsum("nd,edf->enf", x, w_up)
    y = jnp.einsum("enf,efd->end", h, w_down, preferred_element_type=jnp.float32)
    return jnp.einsum("ne,end->nd", combine, y)


def sort_by_expert(experts: jnp.ndarray, n_experts: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Order of the N*K token copies sorted by expert (stable) and the group sizes [E]."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    return order, sizes


def swiglu_grouped_experts(x: jnp.ndarray, w_gate: jnp.ndarray, w_up: jnp.ndarray, w_down: jnp.ndarray,
                           routing: Routing, grouped_matmul=jax.lax.ragged_dot) -> jnp.ndarray:
    """Sorted path: gather token copies by expert, three grouped GEMMs, gather back, weighted sum. x [N, d].

    Both row moves are gathers, forward and backward (`dsv3_jax.ops.permute`): no scatter, no atomics."""
    n, k = routing.experts.shape
    order, sizes = sort_by_expert(routing.experts, w_gate.shape[0])
    inverse = inverse_permutation(order)
    xs = dispatch_rows(x, order, inverse, k)                                      # [N*K, d] sorted by expert
    h = jax.nn.silu(grouped_matmul(xs, w_gate, sizes)) * grouped_matmul(xs, w_up, sizes)
    ys = grouped_matmul(h, w_down, sizes, preferred_element_type=jnp.float32)    # [N*K, d]
    y = permute_rows(ys, inverse, order).reshape(n, k, -1)                        # back to (token, slot) order
    return jnp.einsum("nk,nkd->nd", routing.weights, y)


class MoEStats(NamedTuple):
    """Per sequence: tokens routed to each expert `counts` [B, E] and mean normalized affinity `mean_probs` [B, E]."""

    counts: jnp.ndarray
    mean_probs: jnp.ndarray


class MoE(nn.Module):
    """x [batch, seq, embed] -> (y [batch, seq, embed], MoEStats). Eq. 12: y = sum shared + sum g_i FFN_i."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, MoEStats]:
        cfg = self.cfg
        b, t, d = x.shape
        e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
        std, pdt = cfg.initializer_range, dtype_of(cfg.param_dtype)
        gate = self.param("gate", normal_init(std, ("embed", "exp_router")), (d, e), jnp.float32)
        bias = None
        if cfg.topk_method == "noaux_tc":
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("exp_router",))
            bias = self.param("e_score_correction_bias", zeros, (e,), jnp.float32)
            bias = jax.lax.stop_gradient(bias)   # updated by the balancing rule, never by gradients
        tokens = x.reshape(b * t, d)
        routing = route(cfg, jnp.dot(tokens.astype(jnp.float32), gate), bias)

        dtype = dtype_of(cfg.dtype)
        grouped = cfg.moe_impl == "ragged"
        wdt = pdt if cfg.fp8 and grouped else dtype   # FP8 experts quantize the FP32 master weights
        held = experts_held(e)          # e, or e / ep inside a pipeline stage's shard_map
        w_gate = self.param("w_gate", normal_init(std, ("exp", "embed", "expert_mlp")), (held, d, f), pdt).astype(wdt)
        w_up = self.param("w_up", normal_init(std, ("exp", "embed", "expert_mlp")), (held, d, f), pdt).astype(wdt)
        w_down = self.param("w_down", normal_init(std, ("exp", "expert_mlp", "embed")), (held, f, d), pdt).astype(wdt)
        if grouped and mesh_wants_expert_parallel() and not self.is_initializing():
            routed = expert_parallel_experts(tokens.astype(dtype), routing.experts, routing.weights, w_gate, w_up,
                                             w_down, grouped_matmul=grouped_matmul_for(cfg))
        else:
            experts = swiglu_dense_experts
            if grouped:
                experts = functools.partial(swiglu_grouped_experts, grouped_matmul=grouped_matmul_for(cfg))
            routed = experts(tokens.astype(dtype), w_gate, w_up, w_down, routing)
        routed = routed.reshape(b, t, d)
        y = routed.astype(dtype)
        if cfg.n_shared_experts:
            y = y + SwiGLU(cfg, f * cfg.n_shared_experts, name="shared_experts")(x)

        one_hot = jax.nn.one_hot(routing.experts.reshape(b, t * cfg.num_experts_per_tok), e, dtype=jnp.int32)
        normalized = routing.scores / routing.scores.sum(-1, keepdims=True)
        stats = MoEStats(counts=one_hot.sum(1), mean_probs=normalized.reshape(b, t, e).mean(1))
        return y, stats
