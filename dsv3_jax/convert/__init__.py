"""Checkpoint conversion: Hugging Face safetensors (bf16/fp32 or DeepSeek's block FP8) <-> params <-> orbax.

    cfg, params = dsv3_jax.load_hf("DeepSeek-V3/")          # FP8 + weight_scale_inv dequantized on load
    dsv3_jax.save_hf(cfg, params, "out/", fp8=True)          # DeepSeek's release layout
    save_orbax(cfg, params, "ckpt/"); cfg, params = load_orbax("ckpt/")

`hf.py` maps HF tensors to params, `fp8_blocks.py` holds the 128x128 block (de)quantization of checkpoint
weights, `orbax_io.py` the orbax parameter directory, `cli.py` the `dsv3-convert` console script.
"""

from dsv3_jax.convert.hf import CheckpointError, dequantize_params, load_hf, save_hf

__all__ = ["CheckpointError", "dequantize_params", "load_hf", "save_hf", "load_orbax", "save_orbax"]


def __getattr__(name: str):
    # orbax is slow to import: only on first use.
    if name in ("load_orbax", "save_orbax"):
        from dsv3_jax.convert import orbax_io
        return getattr(orbax_io, name)
    raise AttributeError(f"module 'dsv3_jax.convert' has no attribute {name!r}")
