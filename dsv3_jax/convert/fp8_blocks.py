"""Block-wise FP8 E4M3 weights as DeepSeek-V3's released checkpoints store them (numpy, host side).

A Linear weight W [out, in] is cut into `block` = (128, 128) tiles; edge tiles are smaller when a
dimension is not a multiple of 128. Each tile has one float32 `weight_scale_inv` s, and

    W[i, j] ~= fp8[i, j] * s[i // 128, j // 128]        scale_inv [ceil(out / 128), ceil(in / 128)]

(DeepSeek's `weight_dequant`: the stored "inverse" scale is the multiplier that dequantizes).
Quantization uses s = amax(|tile|) / 448 (448 is the largest E4M3 value), so each tile's
largest entry maps to +-448; edge tiles are treated as if zero-padded to 128 x 128, which leaves
their amax unchanged. An all-zero tile gets s = 1.

Leading axes (layers, experts) broadcast: w [..., out, in] with scale_inv [..., S_out, S_in].
Training-time FP8 (activation tiles, FP8 matmuls) lives in `dsv3_jax.ops.fp8`; this module only
reads and writes checkpoint weights.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448.0
BLOCK = (128, 128)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, ...]:
    """Shape of the scale_inv of a weight of `shape` [..., out, in]: [..., ceil(out/b0), ceil(in/b1)]."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def expand_scales(scale_inv: np.ndarray, shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> np.ndarray:
    """Each block's scale repeated over its elements: [..., S_out, S_in] -> [..., out, in] (edge blocks cut)."""
    rows, cols = shape[-2:]
    s = np.repeat(scale_inv, block[0], axis=-2)[..., :rows, :]
    return np.repeat(s, block[1], axis=-1)[..., :cols]


def dequantize_blocks(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = BLOCK,
                      dtype: np.dtype | str = np.float32) -> np.ndarray:
    """fp8 weight [..., out, in] times its block scales [..., S_out, S_in] (float32 math), cast to `dtype`."""
    expected = scale_shape(w.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not fit weight shape {tuple(w.shape)} "
                         f"with blocks {block}: expected {expected}")
    out = w.astype(np.float32) * expand_scales(scale_inv.astype(np.float32), w.shape, block)
    return out.astype(dtype, copy=False)


def quantize_blocks(w: np.ndarray, block: tuple[int, int] = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Weight [..., out, in] -> (fp8 E4M3 [..., out, in], float32 scale_inv [..., S_out, S_in]) with s = amax / 448."""
    w = np.asarray(w, dtype=np.float32)
    *lead, rows, cols = w.shape
    n_r, n_c = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = np.zeros((*lead, n_r * block[0], n_c * block[1]), np.float32)
    padded[..., :rows, :cols] = w
    tiles = padded.reshape(*lead, n_r, block[0], n_c, block[1])
    amax = np.abs(tiles).max(axis=(-3, -1))                                  # [..., S_out, S_in]
    scale_inv = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = np.clip(w / expand_scales(scale_inv, w.shape, block), -FP8_MAX, FP8_MAX)
    return q.astype(FP8_DTYPE), scale_inv
