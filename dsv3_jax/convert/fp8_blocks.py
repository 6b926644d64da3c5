"""Block-wise FP8 E4M3 weights as DeepSeek-V3's released checkpoints store them (numpy, host side).

A Linear weight W [out, in] is cut into `block` = (128, 128) tiles; edge tiles are smaller when a
dimension is not a multiple of 128. Each tile has one float32 `weight_scale_inv` s, and

    W[i, j] ~= fp8[i, j] * s[i // 128, j // 128]        scale_inv [ceil(out / 128), ceil(in / 128)]

(DeepSeek's `weight_dequant`: the stored "inverse" scale is the multiplier that dequantizes).
Quantization uses s = amax(|tile|) / 448 (448 is the largest E4M3 value), so each tile's
largest entry maps to +-448; edge tiles are treated as if zero-padded to 128 x 128, which leaves
their amax unchanged. An all-zero tile gets s = 1.

Leading axes (layers, experts) broadcast: w [..., out, in] with scale_inv [..., S_out, S_in].
The arithmetic is `dsv3_jax.ops.fp8.quantize` / `dequantize` run with numpy (`eps=0`: no amax floor),
the same code that quantizes activations and weights in FP8 training.
"""

from __future__ import annotations

import numpy as np

from dsv3_jax.ops import fp8

FP8_DTYPE = np.dtype(fp8.FP8_DTYPE)
FP8_MAX = fp8.FP8_MAX  # 448.0
BLOCK = fp8.WEIGHT_BLOCK


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """Shape of the scale_inv of a weight of `shape` [..., out, in]: [..., ceil(out/b0), ceil(in/b1)]."""
    return fp8.scale_shape(tuple(shape), block)


def dequantize_blocks(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = BLOCK,
                      dtype: np.dtype | str = np.float32) -> np.ndarray:
    """fp8 weight [..., out, in] times its block scales [..., S_out, S_in] (float32 math), cast to `dtype`."""
    expected = scale_shape(w.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not fit weight shape {tuple(w.shape)} "
                         f"with blocks {tuple(block)}: expected {expected}")
    out = fp8.dequantize(np.asarray(w), np.asarray(scale_inv), tuple(block), xp=np)
    return out.astype(dtype, copy=False)


def quantize_blocks(w: np.ndarray, block: tuple[int, int] = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Weight [..., out, in] -> (fp8 E4M3 [..., out, in], float32 scale_inv [..., S_out, S_in]) with s = amax / 448."""
    q, s = fp8.quantize(np.asarray(w, dtype=np.float32), tuple(block), eps=0.0, xp=np)
    return np.ascontiguousarray(q), s     # row-major, as the safetensors writer expects
