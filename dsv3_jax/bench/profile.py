"""`dsv3-bench profile`: where the device time of one compiled program goes, op by op (jax.profiler trace).

Targets (one JSON line per top op, then one summary line per target):

    moe_layer   `expert_parallel_experts` at EP=1 (the `dsv3-bench moe_layer` shapes), forward, and forward +
                backward (`--profile_grad`): dispatch, local grouped GEMMs, combine
    moe_local   the model's single-device path `swiglu_grouped_experts` at the same shapes
    train       `dsv3-bench train`'s fwd_bwd program on --config (BF16, or FP8 with --fp8)

The program runs `runs` times under `jax.profiler.trace`; the device planes of the trace ("/device:GPU:0")
are read back with `jax.profiler.ProfileData` and every kernel event of their stream lines counts under
its kernel name. Figures are milliseconds per run; `summary` adds the wall time per run (untraced).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import glob
import gzip
import importlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from dsv3_jax.bench.timing import Reporter


def kernel_key(name: str, stats: dict[str, Any]) -> str:
    """A kernel event's name, followed by ` @ ` and the HLO instruction that launched it when that differs.

    XLA fusions appear under their HLO names (`input_scatter_fusion_1`, matching `compiled.as_text()`);
    library and Pallas kernels under their own (cuBLAS `nvjet_...`, `fp8_grouped_gemm`), and every Mosaic GPU
    kernel as `anonymous_mosaic_gpu_kernel`: the `hlo_op` stat (`custom-call.12`) tells them apart.
    """
    op = stats.get("hlo_op")
    return name if not op or op == name else f"{name} @ {op}"


def device_kernel_times(trace_dir: str, runs: int) -> dict[str, float]:
    """{kernel_key: ms per run} summed over the stream lines of the device planes of the trace in trace_dir."""
    from jax.profiler import ProfileData

    totals: collections.Counter = collections.Counter()
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if plane.name.startswith("/device:"):
                for line in plane.lines:
                    if line.name.startswith("Stream"):
                        for event in line.events:
                            key = kernel_key(event.name, dict(event.stats))
                            totals[key] += event.duration_ns / 1e6 / runs
    return dict(totals)


def profile_program(fn: Callable[..., Any], args: tuple, runs: int = 3) -> tuple[dict[str, float], float]:
    """Device ms per kernel of jitted `fn(*args)` over `runs` traced runs (after one untraced), and the wall
    seconds per run measured outside the trace."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(runs):
        jax.block_until_ready(fn(*args))
    wall = (time.perf_counter() - t0) / runs
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(runs):
                jax.block_until_ready(fn(*args))
        return device_kernel_times(trace_dir, runs), wall


def _resolve(dotted: str) -> Callable[..., Any]:
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)


def _moe_args(tokens: int, hidden: int, expert_dim: int, n_experts: int, top_k: int):
    from dsv3_jax.bench.moe_layer import _uniform_routing

    keys = jax.random.split(jax.random.key(0), 5)
    w = lambda key, shape: 0.02 * jax.random.normal(key, shape, jnp.bfloat16)
    experts, weights = _uniform_routing(keys[3], tokens, n_experts, top_k)
    x = jax.random.normal(keys[4], (tokens, hidden), jnp.bfloat16)
    up = (n_experts, hidden, expert_dim)
    return x, experts, weights, w(keys[0], up), w(keys[1], up), w(keys[2], (n_experts, expert_dim, hidden))


def _with_grad(layer: Callable[..., jax.Array]) -> Callable[..., Any]:
    """Forward + backward of sum(layer(...)**2) with respect to x and the three expert weights."""
    loss = lambda x, e, wt, g, u, d: jnp.sum(jnp.square(layer(x, e, wt, g, u, d).astype(jnp.float32)))
    return jax.grad(loss, argnums=(0, 3, 4, 5))


def moe_programs(target: str, grad: bool, backend: str, exchange: str, layer_fn: str | None,
                 tokens: int = 4096, hidden: int = 7168, expert_dim: int = 2048, n_experts: int = 32,
                 top_k: int = 8) -> tuple[Callable[..., Any], tuple, contextlib.AbstractContextManager]:
    """The jitted MoE program of `target`, its arguments and the context to trace and run it in
    (moe_layer: the EP=1 mesh; moe_local: none)."""
    from dsv3_jax.model.moe import Routing, swiglu_grouped_experts
    from dsv3_jax.ops.grouped_matmul import grouped_matmul
    from dsv3_jax.parallel.mesh import ParallelConfig, make_mesh, use_mesh

    gm = functools.partial(grouped_matmul, backend=backend)
    if target == "moe_layer":
        ep_fn = _resolve(layer_fn or "dsv3_jax.parallel.expert_parallel:expert_parallel_experts")
        context = use_mesh(make_mesh(ParallelConfig(data=1, expert=1)))
        layer = lambda x, e, wt, g, u, d: ep_fn(x, e, wt, g, u, d, grouped_matmul=gm, exchange=exchange)
    else:
        local = _resolve(layer_fn) if layer_fn else swiglu_grouped_experts
        context = contextlib.nullcontext()
        layer = lambda x, e, wt, g, u, d: local(x, g, u, d, Routing(e, wt, None), grouped_matmul=gm)
    fn = _with_grad(layer) if grad else layer
    return jax.jit(fn), _moe_args(tokens, hidden, expert_dim, n_experts, top_k), context


def train_program(config: str, fp8: bool, batch: int, seq: int
                  ) -> tuple[Callable[..., Any], tuple, contextlib.AbstractContextManager]:
    """`dsv3-bench train`'s fwd_bwd program (MTP off, flash attention, BF16 parameters) and its arguments."""
    from dsv3_jax.bench.train import _hyper
    from dsv3_jax.config import load_config
    from dsv3_jax.model.functional import init_params
    from dsv3_jax.train.step import compute_losses

    cfg = load_config(config, fp8=fp8, attention_impl="flash", param_dtype="bfloat16")
    cfg = cfg.replace(num_nextn_predict_layers=0)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)
    hyper = _hyper()
    fn = jax.jit(lambda p, x: jax.value_and_grad(lambda p: compute_losses(cfg, p, x, hyper)[0])(p))
    return fn, (params, tokens), contextlib.nullcontext()


def run(out: str | None, target: str, *, top: int = 25, runs: int = 3, grad: bool = False, backend: str = "auto",
        exchange: str = "auto", layer_fn: str | None = None, config: str = "proxy-1gpu", fp8: bool = False,
        batch: int = 2, seq: int = 4096, hlo_dir: str | None = None) -> None:
    """Profile `target` and emit its top kernels by device time; with hlo_dir, also write its optimized HLO."""
    rep = Reporter("profile", out)
    if target == "train":
        fn, args, context = train_program(config, fp8, batch, seq)
        shape = {"config": config, "fp8": fp8, "batch": batch, "seq": seq}
    else:
        fn, args, context = moe_programs(target, grad, backend, exchange, layer_fn)
        shape = {"grad": grad, "backend": backend, "exchange": exchange, "layer_fn": layer_fn}
    tag = f"{target}{'_fp8' if fp8 else ''}{'_grad' if grad else ''}"
    with context:
        if hlo_dir:
            Path(hlo_dir).mkdir(parents=True, exist_ok=True)
            with gzip.open(Path(hlo_dir) / f"{tag}.hlo.txt.gz", "wt") as f:
                f.write(fn.lower(*args).compile().as_text())
        times, wall = profile_program(fn, args, runs)
    for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        rep.emit(target=tag, kind="kernel", name=name[:200], ms=ms, **shape)
    rep.emit(target=tag, kind="summary", wall_ms=wall * 1e3, device_kernel_ms=sum(times.values()), **shape)
