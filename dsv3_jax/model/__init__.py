"""DeepSeek-V3 model in Flax Linen: MLA, DeepSeekMoE, MTP, scanned decoder."""

from dsv3_jax.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
