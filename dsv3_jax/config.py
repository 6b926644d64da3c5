"""Model configuration: HF `config.json` field names, loading and validation.

A `ModelConfig` holds exactly the hyperparameters of a DeepSeek-V2/V3 Hugging Face config (same
names, so a downloaded `config.json` loads unchanged) plus a few fields of this project that say
*how* to run the model (dtypes, MoE dispatch path, remat policy, FP8). Every field is checked on
load; an unknown or inconsistent field raises `ConfigError` naming the field and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dsv3_jax.named_json import read_named_json, shipped_names

CONFIG_DIR = Path(__file__).parent / "configs"

# HF config keys that carry no information for this implementation (bookkeeping, inference-time
# switches of transformers, or values we check elsewhere). They are accepted and dropped.
_IGNORED_HF_KEYS = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "pretraining_tp", "attention_dropout", "output_router_logits", "router_aux_loss_coef",
    "aux_loss_alpha", "seq_aux", "ep_size", "pad_token_id", "num_mtp_layers", "_name_or_path",
    "id2label", "label2id", "tie_word_embeddings", "return_dict", "output_hidden_states",
    "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
    "mlp_layer_types", "head_dim", "qk_head_dim", "num_local_experts", "mtp_hidden_states_first",
})

MOE_IMPLS = ("dense", "ragged")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_moe_inputs")
KERNEL_BACKENDS = ("auto", "xla", "pallas")   # dsv3_jax.ops: Pallas kernels on GPU ("auto") or XLA everywhere
ATTENTION_IMPLS = ("reference", "flash")      # flash: dsv3_jax.ops.attention (cuDNN on GPU), no [B, H, T, T] scores
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config field is unknown, missing, of the wrong type, or inconsistent with another."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 model hyperparameters (HF names) and how to execute them.

    Defaults are the 671B model's (REFERENCE.md); smaller configs override them in configs/*.json.
    """

    # --- HF DeepseekV3Config fields ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense FFN of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048       # per routed/shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA: must equal num_attention_heads when given
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536          # None: plain q_proj (DeepSeek-V2-Lite)
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"           # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"           # "noaux_tc" (V3: group score = top-2 sum), "group_limited_greedy"
                                            # (V2: group score = max), "greedy" (no groups)
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    num_nextn_predict_layers: int = 1
    initializer_range: float = 0.006        # paper init std (HF's default is 0.02)
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    quantization_config: Mapping[str, Any] | None = None

    # --- execution (this project) ---
    dtype: str = "bfloat16"                 # activations / matmul inputs
    param_dtype: str = "float32"            # master weights
    moe_impl: str = "ragged"                # "dense": every expert on every token (reference); "ragged": sorted
    remat_policy: str = "none"              # per scanned layer: see REMAT_POLICIES
    scan_layers: bool = True
    fp8: bool = False
    kernel_backend: str = "auto"            # FP8 GEMMs and MoE grouped GEMMs: see KERNEL_BACKENDS
    attention_impl: str = "reference"       # see ATTENTION_IMPLS

    # ---------- derived ----------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.n_dense_layers

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale^2 under YaRN (DeepSeek's `mscale_all_dim` correction)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale *= m * m
        return scale

    def __hash__(self) -> int:  # rope_scaling is a dict: hash the canonical JSON so configs can be jit-static
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes` applied and validated."""
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json content (DeepSeek naming: `rope_scaling` with `type`)."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
        }
        exec_fields = {"dtype", "param_dtype", "moe_impl", "remat_policy", "scan_layers", "fp8", "kernel_backend",
                       "attention_impl"}
        for f in dataclasses.fields(self):
            if f.name in exec_fields or f.name == "num_key_value_heads":
                continue
            value = getattr(self, f.name)
            if f.name in ("rope_scaling", "quantization_config"):
                if value is None:
                    continue
                value = dict(value)
            out[f.name] = value
        out["num_key_value_heads"] = self.num_attention_heads
        out["tie_word_embeddings"] = False
        return out

    def validate(self, source: str = "config") -> None:
        _validate(self, source)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature factor m = 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _fail(source: str, msg: str) -> None:
    raise ConfigError(f"{source}: {msg}")


def _validate(cfg: ModelConfig, source: str) -> None:
    positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
                "v_head_dim", "qk_nope_head_dim", "n_routed_experts", "num_experts_per_tok",
                "n_group", "topk_group", "max_position_embeddings")
    for name in positive:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(source, f"field '{name}' must be a positive integer, got {value!r}")
    for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(source, f"field '{name}' must be a non-negative integer, got {value!r}")
    if cfg.q_lora_rank is not None and (not isinstance(cfg.q_lora_rank, int) or cfg.q_lora_rank <= 0):
        _fail(source, f"field 'q_lora_rank' must be a positive integer or null, got {cfg.q_lora_rank!r}")
    if cfg.num_key_value_heads not in (None, cfg.num_attention_heads):
        _fail(source, f"'num_key_value_heads' ({cfg.num_key_value_heads}) must equal 'num_attention_heads' "
                      f"({cfg.num_attention_heads}): MLA has one latent KV shared by all heads")
    if cfg.qk_rope_head_dim % 2:
        _fail(source, f"'qk_rope_head_dim' must be even, got {cfg.qk_rope_head_dim}")
    if cfg.n_routed_experts % cfg.n_group:
        _fail(source, f"'n_routed_experts' ({cfg.n_routed_experts}) must be divisible by 'n_group' ({cfg.n_group})")
    if cfg.topk_group > cfg.n_group:
        _fail(source, f"'topk_group' ({cfg.topk_group}) must be <= 'n_group' ({cfg.n_group})")
    reachable = cfg.topk_group * (cfg.n_routed_experts // cfg.n_group)
    if cfg.topk_method == "greedy":
        reachable = cfg.n_routed_experts
    if cfg.num_experts_per_tok > reachable:
        _fail(source, f"'num_experts_per_tok' ({cfg.num_experts_per_tok}) exceeds the {reachable} experts that "
                      f"'topk_group' ({cfg.topk_group}) of 'n_group' ({cfg.n_group}) groups can reach")
    if cfg.topk_method == "noaux_tc" and cfg.n_routed_experts // cfg.n_group < 2 and cfg.n_group > 1:
        _fail(source, "topk_method 'noaux_tc' scores a group by its top-2 experts: each group needs >= 2 experts")
    if cfg.first_k_dense_replace > cfg.num_hidden_layers:
        _fail(source, f"'first_k_dense_replace' ({cfg.first_k_dense_replace}) exceeds 'num_hidden_layers' "
                      f"({cfg.num_hidden_layers})")
    if cfg.moe_layer_freq != 1:
        _fail(source, f"'moe_layer_freq' must be 1 (every layer after the dense ones is MoE), got {cfg.moe_layer_freq}")
    if cfg.hidden_act != "silu":
        _fail(source, f"'hidden_act' must be 'silu' (SwiGLU), got {cfg.hidden_act!r}")
    if cfg.scoring_func not in ("sigmoid", "softmax"):
        _fail(source, f"'scoring_func' must be 'sigmoid' or 'softmax', got {cfg.scoring_func!r}")
    if cfg.topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
        _fail(source, f"'topk_method' must be 'noaux_tc', 'group_limited_greedy' or 'greedy', got {cfg.topk_method!r}")
    if cfg.attention_bias:
        _fail(source, "'attention_bias': true is not supported (DeepSeek-V2/V3 have no attention biases)")
    if cfg.rope_scaling is not None:
        kind = cfg.rope_type
        if kind not in ("yarn", "default"):
            _fail(source, f"rope scaling type {kind!r} is not supported (use 'yarn' or none)")
        if kind == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if key not in cfg.rope_scaling:
                    _fail(source, f"yarn rope scaling needs '{key}'")
            if cfg.rope_scaling["factor"] <= 0:
                _fail(source, f"yarn 'factor' must be positive, got {cfg.rope_scaling['factor']}")
    for name, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("moe_impl", MOE_IMPLS),
                          ("remat_policy", REMAT_POLICIES), ("kernel_backend", KERNEL_BACKENDS),
                          ("attention_impl", ATTENTION_IMPLS)):
        if getattr(cfg, name) not in allowed:
            _fail(source, f"'{name}' must be one of {allowed}, got {getattr(cfg, name)!r}")


def _normalize_rope(raw: dict[str, Any], source: str) -> None:
    """Fold transformers-5 `rope_parameters` into DeepSeek's `rope_theta` + `rope_scaling` (in place)."""
    params = raw.pop("rope_parameters", None)
    if params is not None:
        params = dict(params)
        if "rope_theta" in params:
            raw["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type", params.pop("type", "default"))
        if kind != "default":
            if raw.get("rope_scaling") not in (None, {}):
                _fail(source, "both 'rope_scaling' and 'rope_parameters' describe rope scaling; keep one")
            raw["rope_scaling"] = {"type": kind, **params}
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        scaling = dict(scaling)
        if "rope_type" in scaling:
            scaling["type"] = scaling.pop("rope_type")
        if scaling.get("type", "default") == "default":
            scaling = None
        raw["rope_scaling"] = scaling


def config_from_dict(raw: Mapping[str, Any], source: str = "config", **overrides: Any) -> ModelConfig:
    """Build and validate a ModelConfig from an HF-style dict; unknown keys are errors."""
    raw = dict(raw)
    # transformers 5 writes the checkpoint's storage dtype as "dtype" (formerly "torch_dtype"; "float16", or
    # null): not this project's execution dtype, which only `overrides` set.
    raw.pop("dtype", None)
    raw.update(overrides)
    _normalize_rope(raw, source)
    if raw.get("tie_word_embeddings"):
        _fail(source, "'tie_word_embeddings': true is not supported (DeepSeek-V3 has a separate lm_head)")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in known:
            kwargs[key] = value
        elif key not in _IGNORED_HF_KEYS:
            _fail(source, f"unknown field '{key}' (known fields: see dsv3_jax.config.ModelConfig)")
    if isinstance(kwargs.get("eos_token_id"), list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    for key, value in kwargs.items():
        if isinstance(value, float) and value.is_integer() and key in (
                "vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings"):
            kwargs[key] = int(value)
    cfg = ModelConfig(**kwargs)
    cfg.validate(source)
    return cfg


def config_names() -> list[str]:
    """Names of the configs shipped in dsv3_jax/configs/."""
    return shipped_names(CONFIG_DIR)


def load_config(name_or_path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """Load a shipped config by name (`tiny`, `deepseek-v3-671b`, ...) or an HF config.json / model directory.

    `overrides` replace fields before validation, e.g. `load_config("tiny", dtype="float32")`.
    """
    raw, path = read_named_json(name_or_path, CONFIG_DIR, "config", ConfigError)
    return config_from_dict(raw, source=str(path), **overrides)
