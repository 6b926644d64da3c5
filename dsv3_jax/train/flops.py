"""Model FLOPs per token and MFU, the way training reports count them.

Training FLOPs per token = 6 x (active parameters that do matmuls) + attention-score FLOPs:
forward, per layer, 2 x heads x (qk_head_dim + v_head_dim) x seq/2 (causal), tripled for backward.
The embedding lookup does no matmul and is excluded; the output head is included.
"""

from __future__ import annotations

import jax

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.functional import count_params

# Dense BF16 tensor-core peaks (FLOP/s) by device kind, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12}


def train_flops_per_token(cfg: ModelConfig, seq_len: int, with_mtp: bool = True) -> float:
    counts = count_params(cfg)
    matmul_params = counts["active"] - cfg.vocab_size * cfg.hidden_size
    layers = cfg.num_hidden_layers
    if with_mtp:
        matmul_params += counts["mtp"] + cfg.num_nextn_predict_layers * cfg.vocab_size * cfg.hidden_size
        # an MTP block's routed experts run top-k only, like the main MoE layers
        if counts["mtp"]:
            e, f, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
            matmul_params -= cfg.num_nextn_predict_layers * 3 * d * f * (e - cfg.num_experts_per_tok)
        layers += cfg.num_nextn_predict_layers
    attention = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2 * layers
    return 6.0 * matmul_params + 3.0 * attention


def peak_flops_per_device() -> float | None:
    """The device's dense BF16 peak, or None where it is unknown (CPU)."""
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in kind:
            return flops
    return None
