"""Timing and reporting shared by the benchmarks: one JSON line per measurement.

Device work is asynchronous, so every timed region ends in `jax.block_until_ready`. Kernels are timed
in batches: one jitted call runs the op R times, each on its own input set (distinct buffers, so XLA
cannot merge the calls, and the rotation keeps inputs from sitting in L2), and the per-op time is the
slope (T(2R) - T(R)) / R of the medians over several runs after warm-up: that removes the fixed dispatch
and synchronization cost which would otherwise dominate sub-100-microsecond kernels.
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

DATE = datetime.date.today().isoformat()   # of the machine that measured (records carry it)


def device_info() -> dict[str, Any]:
    d = jax.devices()[0]
    return {"device": d.device_kind, "platform": d.platform, "jax": jax.__version__}


class Deadline:
    """A wall-clock budget: `left()` seconds remain; benchmarks skip (and report) what would start after it."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()


class Reporter:
    """Prints each record as one JSON line (stdout) and appends it to `path` when given."""

    def __init__(self, bench: str, path: str | None = None, with_device: bool = True):
        self.bench = bench
        self.path = Path(path) if path else None
        self.records: list[dict[str, Any]] = []
        # with_device=False: a process that must not initialize the accelerator (it would reserve its memory)
        self.base = {"bench": bench, "date": DATE, **(device_info() if with_device else {})}

    def emit(self, **record: Any) -> dict[str, Any]:
        record = {**self.base, **record}
        self.records.append(record)
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(line + "\n")
        return record

    def table(self, keys: Sequence[str]) -> None:
        """A short fixed-width summary of every record (the end of the output is what a remote run shows)."""
        print(" | ".join(keys), file=sys.stderr)
        for r in self.records:
            print(" | ".join(_fmt(r.get(k)) for k in keys), file=sys.stderr)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)[:40] if v is not None else "-"


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def time_op(op: Callable[..., Any], arg_sets: Sequence[tuple], *, repeats: int = 8, iters: int = 7,
            warmup: int = 2) -> dict[str, float]:
    """Per-call device time of `op(*args)` in seconds: slope between batches of `repeats` and 2x`repeats` calls,
    the median over `iters` pairs of batches timed back to back (so that a drift of the GPU's clock between
    them, which a GEMM at full power drives, cancels out in each pair's difference).

    Call i of a batch uses arg_sets[i]: give 2 x repeats tuples that differ pairwise in at least one array.
    Also returns the median time per call of the larger batch ("batch_seconds", launch overhead included), the
    compile time of the larger batch and the output of the first call ("first").
    """
    if len(arg_sets) < 2 * repeats:
        raise ValueError(f"time_op needs {2 * repeats} distinct argument sets, got {len(arg_sets)}")

    def batch(r: int):
        return jax.jit(lambda sets: [op(*sets[i]) for i in range(r)])

    small, large = batch(repeats), batch(2 * repeats)
    sets = list(arg_sets)
    t0 = time.perf_counter()
    compiled_large = large.lower(sets).compile()
    compile_s = time.perf_counter() - t0
    compiled_small = small.lower(sets).compile()
    t0 = time.perf_counter()
    first = jax.block_until_ready(compiled_small(sets))[0]
    if time.perf_counter() - t0 > 0.5:            # slow ops: fewer runs (the spread is small at this length)
        iters, warmup = min(iters, 3), min(warmup, 1)
    for _ in range(warmup):
        jax.block_until_ready(compiled_small(sets))
        jax.block_until_ready(compiled_large(sets))
    pairs = [(_seconds(lambda: compiled_small(sets)), _seconds(lambda: compiled_large(sets))) for _ in range(iters)]
    per_call = max(statistics.median(large - small for small, large in pairs), 1e-9) / repeats
    batch = statistics.median(large for _, large in pairs) / (2 * repeats)
    return {"seconds": per_call, "batch_seconds": batch, "compile_s": compile_s, "first": first}


def measure(rep: Reporter, deadline: Deadline, base: dict[str, Any], impl: str, op: Callable[..., Any],
            arg_sets: Sequence[tuple], ref: jax.Array | None, flops: float, config: str | None = None,
            repeats: int = 4, iters: int = 7) -> None:
    """Check `op` on arg_sets[0] against `ref`, time it, and emit one record (or the error, or a skip)."""
    if deadline.left() < 0:
        rep.emit(**base, impl=impl, config=config, skipped="time budget")
        return
    try:
        t = time_op(op, arg_sets, repeats=repeats, iters=iters)
        got = t["first"]
        got = got[0] if isinstance(got, tuple | list) else got
        err = None if ref is None else rel_error(got, ref)
        max_err = None if ref is None else max_rel_error(got, ref)
        rep.emit(**base, impl=impl, config=config, ms=t["seconds"] * 1e3, batch_ms=t["batch_seconds"] * 1e3,
                 tflops=flops / t["seconds"] / 1e12,
                 rel_err=err, max_err=max_err, compile_s=t["compile_s"])
    except Exception as exc:  # noqa: BLE001 - a failing variant is a result, not a crash
        rep.emit(**base, impl=impl, config=config, error=repr(exc)[:500])


def rel_error(got: jax.Array, want: jax.Array) -> float:
    """||got - want|| / ||want|| in float32 (NaN anywhere gives NaN)."""
    g, w = got.astype(jax.numpy.float32), want.astype(jax.numpy.float32)
    return float(jax.numpy.linalg.norm(g - w) / jax.numpy.linalg.norm(w))


def max_rel_error(got: jax.Array, want: jax.Array) -> float:
    """max |got - want| / max |want| in float32 (the worst element against the output's scale)."""
    g, w = got.astype(jax.numpy.float32), want.astype(jax.numpy.float32)
    return float(jax.numpy.max(jax.numpy.abs(g - w)) / jax.numpy.max(jax.numpy.abs(w)))
