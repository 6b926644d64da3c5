"""The decoder cut into pipeline stages: a cost model, balanced contiguous partitions, per-stage parameters.

Stage 0 holds the embedding, the last stage the final norm, the output head and the MTP modules (as
DeepSeek places them); decoder layers are split contiguously so the most expensive stage is as cheap as
possible, uneven layer counts allowed (61 layers + MTP over 16 stages).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import numpy as np

from dsv3_jax.config import ModelConfig


class StageSpec(NamedTuple):
    """Stage `index` runs decoder layers [start, stop) of the whole stack (dense layers first, then MoE)."""

    index: int
    start: int
    stop: int
    first: bool
    last: bool

    def dense_range(self, cfg: ModelConfig) -> tuple[int, int]:
        """Its slice of the stacked `dense_layers` params."""
        k = cfg.n_dense_layers
        return min(self.start, k), min(self.stop, k)

    def moe_range(self, cfg: ModelConfig) -> tuple[int, int]:
        """Its slice of the stacked `moe_layers` params."""
        k = cfg.n_dense_layers
        return max(self.start - k, 0), max(self.stop - k, 0)


def _attention_macs(cfg: ModelConfig, seq_len: int) -> float:
    """Per token: MLA projections and the causal score / value products (seq_len / 2 keys on average)."""
    h, d = cfg.num_attention_heads, cfg.hidden_size
    q = d * cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim if cfg.q_lora_rank else d * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + h * cfg.v_head_dim * d + h * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2


def layer_macs(cfg: ModelConfig, is_moe: bool, seq_len: int) -> float:
    """Forward multiply-adds per token of one decoder layer (the cost model's unit; backward is ~2x for all)."""
    d = cfg.hidden_size
    ffn = (3 * d * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
           + d * cfg.n_routed_experts) if is_moe else 3 * d * cfg.intermediate_size
    return _attention_macs(cfg, seq_len) + ffn


def tail_macs(cfg: ModelConfig, seq_len: int) -> float:
    """Forward multiply-adds per token of the last stage's extras: output head and every MTP depth."""
    d, head = cfg.hidden_size, cfg.hidden_size * cfg.vocab_size
    mtp = 0.0
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        mtp += 2 * d * d + layer_macs(cfg, cfg.num_hidden_layers + k - 1 >= cfg.first_k_dense_replace, seq_len) + head
    return head + mtp


@functools.lru_cache(maxsize=64)
def partition(cfg: ModelConfig, pp: int, seq_len: int = 4096) -> tuple[StageSpec, ...]:
    """Contiguous split of the num_hidden_layers decoder layers into pp stages (at least one layer each)
    minimizing the most expensive stage's cost (layer_macs, plus tail_macs on the last stage)."""
    n = cfg.num_hidden_layers
    if not 1 <= pp <= n:
        raise ValueError(f"cannot split {n} layers into {pp} pipeline stages")
    costs = [layer_macs(cfg, i >= cfg.first_k_dense_replace, seq_len) for i in range(n)]
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    tail = tail_macs(cfg, seq_len)
    # best[k][i]: the least max-stage cost putting layers [0, i) on stages [0, k); cut[k][i]: where stage k-1 starts.
    best = np.full((pp + 1, n + 1), np.inf)
    cut = np.zeros((pp + 1, n + 1), int)
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                stage = prefix[i] - prefix[j] + (tail if k == pp else 0.0)
                value = max(best[k - 1][j], stage)
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [n], n
    for k in range(pp, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    bounds = bounds[::-1]
    return tuple(StageSpec(s, int(bounds[s]), int(bounds[s + 1]), s == 0, s == pp - 1) for s in range(pp))


def stage_costs(cfg: ModelConfig, specs: tuple[StageSpec, ...], seq_len: int = 4096) -> list[float]:
    """Forward multiply-adds per token of every stage under the cost model."""
    out = []
    for spec in specs:
        cost = sum(layer_macs(cfg, i >= cfg.first_k_dense_replace, seq_len) for i in range(spec.start, spec.stop))
        out.append(cost + (tail_macs(cfg, seq_len) if spec.last else 0.0))
    return out


def _size(tree: Any) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def stage_param_counts(cfg: ModelConfig, shapes: dict[str, Any], specs: tuple[StageSpec, ...]) -> list[int]:
    """Parameters each stage holds, from parameter shapes (dsv3_jax.param_shapes: nothing allocated).

    Stage 0 counts the embedding; the last stage the final norm, head and MTP modules (whose embedding
    and head are the shared ones, so DualPipe's device 0, holding both ends, stores them once).
    """
    per_layer = {name: _size(shapes[name]) // max(n, 1)
                 for name, n in (("dense_layers", cfg.n_dense_layers), ("moe_layers", cfg.n_moe_layers))
                 if name in shapes}
    out = []
    for spec in specs:
        (d0, d1), (m0, m1) = spec.dense_range(cfg), spec.moe_range(cfg)
        count = (d1 - d0) * per_layer.get("dense_layers", 0) + (m1 - m0) * per_layer.get("moe_layers", 0)
        if spec.first:
            count += _size(shapes["embed_tokens"])
        if spec.last:
            count += _size([shapes["norm"], shapes["lm_head"]] + [v for k, v in shapes.items() if k.startswith("mtp_")])
        out.append(int(count))
    return out
