"""dsv3_jax: DeepSeek-V3 in JAX/Flax.

    cfg = dsv3_jax.load_config("tiny")
    params = dsv3_jax.init_params(cfg, jax.random.key(0))
    logits = dsv3_jax.forward(cfg, params, tokens)
"""

from dsv3_jax.config import ConfigError, ModelConfig, load_config
from dsv3_jax.model.functional import apply, count_params, forward, init_params, param_logical_axes, param_shapes

__all__ = [
    "ConfigError", "ModelConfig", "load_config", "apply", "count_params", "forward", "init_params",
    "param_logical_axes", "param_shapes", "load_hf", "save_hf",
]


def __getattr__(name: str):
    # Checkpoint conversion pulls in safetensors; import it on first use.
    if name in ("load_hf", "save_hf"):
        from dsv3_jax.convert import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'dsv3_jax' has no attribute {name!r}")
