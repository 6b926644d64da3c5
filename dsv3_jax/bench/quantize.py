"""`dsv3-bench quantize`: FP8 quantization of GEMM operands, XLA's fusions against the fused Pallas kernel.

Every FP8 linear quantizes its input and its output gradient in both orientations (1x128 tiles along the
channels, and transposed along the tokens) and its weight as 128x128 blocks plus the transposed copy
(`dsv3_jax.ops.fp8.quantize_activation` / `quantize_weight`). Shapes are those of `proxy-1gpu` at 2 x 4096
tokens: the dense and MLA linears (8192 tokens) and the routed experts (65,536 token rows, top-8).

Each line: median time, effective bandwidth (bytes read + written, once each) and `mismatch`, the fraction
of output elements (codes and scales) where the variant differs from XLA's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.bench.timing import Deadline, Reporter, time_op
from dsv3_jax.ops import fp8

ACTIVATIONS = ((8192, 7168), (8192, 2048), (8192, 16384), (65536, 7168), (65536, 2048))   # [tokens, channels]
WEIGHTS = ((7168, 18432), (18432, 7168), (32, 7168, 2048), (32, 2048, 7168))               # [(G,) K, N]
DTYPES = (jnp.bfloat16, jnp.float32)     # activations and gradients are BF16; weights BF16 or FP32 masters
IMPLS = ("xla", "pallas")


def _bytes(shape: tuple[int, ...], dtype: jnp.dtype, weight: bool) -> float:
    """Bytes one pass moves: x read once, two FP8 copies and their FP32 scales written."""
    n = float(np.prod(shape))
    scales = n / (128 * 128) if weight else 2 * n / 128
    return n * jnp.dtype(dtype).itemsize + 2 * n + 4 * scales


def mismatch(got: tuple[jax.Array, ...], want: tuple[jax.Array, ...]) -> float:
    """Fraction of elements, over every output, where got and want differ (codes compared as float32)."""
    differ = sum(int(jnp.sum(g.astype(jnp.float32) != w.astype(jnp.float32))) for g, w in zip(got, want, strict=True))
    return differ / sum(w.size for w in want)


def _bench(rep: Reporter, deadline: Deadline, shape: tuple[int, ...], weight: bool, dtype: jnp.dtype,
           repeats: int) -> None:
    keys = jax.random.split(jax.random.key(0), 2 * repeats)
    sets = [(jax.random.normal(k, shape, dtype),) for k in keys]
    quantizer = fp8.quantize_weight if weight else fp8.quantize_activation
    base = dict(kind="weight" if weight else "activation", shape="x".join(map(str, shape)),
                dtype=jnp.dtype(dtype).name)
    want = None
    for impl in IMPLS:
        if deadline.left() < 0:
            rep.emit(**base, impl=impl, skipped="time budget")
            continue
        op = functools.partial(quantizer, ue8m0=False, backend=impl)
        try:
            t = time_op(op, sets, repeats=repeats)
            want = want or t["first"]                                 # op(*sets[0]) of XLA, the first impl
            rep.emit(**base, impl=impl, ms=t["seconds"] * 1e3,
                     gb_per_s=_bytes(shape, dtype, weight) / t["seconds"] / 1e9,
                     mismatch=mismatch(t["first"], want), compile_s=t["compile_s"])
        except Exception as exc:  # noqa: BLE001 - a failing variant is a result, not a crash
            rep.emit(**base, impl=impl, error=repr(exc)[:500])


def run(out: str | None = None, repeats: int = 4, budget_s: float | None = None,
        activations: tuple[tuple[int, ...], ...] = ACTIVATIONS,
        weights: tuple[tuple[int, ...], ...] = WEIGHTS) -> Reporter:
    """Every activation and weight shape through XLA's quantization and the fused kernel."""
    rep = Reporter("quantize", out)
    deadline = Deadline(budget_s)
    for shapes, weight in ((activations, False), (weights, True)):
        for shape in shapes:
            for dtype in DTYPES if weight else DTYPES[:1]:
                _bench(rep, deadline, shape, weight, dtype, repeats)
    rep.table(["kind", "shape", "dtype", "impl", "ms", "gb_per_s", "mismatch"])
    return rep
