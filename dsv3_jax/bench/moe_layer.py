"""`dsv3-bench moe_layer`: the expert-parallel routed-expert layer at DeepSeek-V3 widths, EP=1 against EP=all GPUs.

Per GPU: `tokens` tokens of width `hidden`, top-`top_k` routing spread uniformly over `experts_per_device`
x EP experts of hidden size `expert_dim` (DeepSeek-V3: 7168, 256 experts of 2048, top-8, EP=8 -> 32 per
GPU). Each EP size gets the same work per GPU, so the layer time of EP=n minus that of EP=1 is what the
dispatch and combine exchanges (plus their sorting) cost. Records, one JSON line each:

    layer       time of dispatch + grouped expert GEMMs + combine (`expert_parallel_experts`), expert TFLOP/s
    all_to_all  a plain `jax.lax.all_to_all` of the dispatch's bytes in the same run: the NCCL reference
    exchange    for EP > 1, the bytes that leave each GPU (dispatch in BF16, combine in FP32) divided by
                the layer's extra time over EP=1: the bandwidth the layer's all-to-alls achieved per GPU
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.bench.timing import Deadline, Reporter, time_op
from dsv3_jax.ops.grouped_matmul import grouped_matmul
from dsv3_jax.parallel.expert_parallel import EXPERT, expert_parallel_experts
from dsv3_jax.parallel.mesh import ParallelConfig, batch_axes, make_mesh, use_mesh


def _uniform_routing(key: jax.Array, n: int, n_experts: int, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Distinct experts per token, uniform over experts: experts [n, K] int32, combine weights [n, K] f32."""
    experts = jnp.argsort(jax.random.uniform(key, (n, n_experts)), axis=-1)[:, :top_k].astype(jnp.int32)
    return experts, jnp.full((n, top_k), 1.0 / top_k, jnp.float32)


def _time_layer(mesh, tokens: int, hidden: int, expert_dim: int, n_experts: int, top_k: int, repeats: int,
                backend: str, exchange: str) -> dict[str, float]:
    """Time of the routed-expert layer on `mesh` (tokens per device), compiled as the model compiles it."""
    ep = mesh.shape[EXPERT]
    n = tokens * ep
    rows = NamedSharding(mesh, P(batch_axes(mesh)))
    keys = jax.random.split(jax.random.key(0), 2 * repeats + 4)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    w_gate = put(0.02 * jax.random.normal(keys[0], (n_experts, hidden, expert_dim), jnp.bfloat16), P(EXPERT))
    w_up = put(0.02 * jax.random.normal(keys[1], (n_experts, hidden, expert_dim), jnp.bfloat16), P(EXPERT))
    w_down = put(0.02 * jax.random.normal(keys[2], (n_experts, expert_dim, hidden), jnp.bfloat16), P(EXPERT))
    experts, weights = (jax.device_put(a, rows) for a in _uniform_routing(keys[3], n, n_experts, top_k))
    arg_sets = [(jax.device_put(jax.random.normal(k, (n, hidden), jnp.bfloat16), rows), experts, weights,
                 w_gate, w_up, w_down) for k in keys[4:]]
    layer = functools.partial(expert_parallel_experts, exchange=exchange,
                              grouped_matmul=functools.partial(grouped_matmul, backend=backend))
    with use_mesh(mesh):
        t = time_op(layer, arg_sets, repeats=repeats)
    return {"ms": t["seconds"] * 1e3, "compile_s": t["compile_s"],
            "tflops_per_gpu": 6 * tokens * top_k * hidden * expert_dim / t["seconds"] / 1e12}


def _time_all_to_all(mesh, rows: int, hidden: int, repeats: int) -> float:
    """Seconds of one tiled all-to-all of [rows, hidden] BF16 per device over the expert axis."""
    ep = mesh.shape[EXPERT]
    sharding = NamedSharding(mesh, P(EXPERT))
    exchange = jax.shard_map(lambda x: jax.lax.all_to_all(x, EXPERT, 0, 0, tiled=True), mesh=mesh,
                             in_specs=P(EXPERT), out_specs=P(EXPERT))
    keys = jax.random.split(jax.random.key(1), 2 * repeats)
    arg_sets = [(jax.device_put(jax.random.normal(k, (ep * rows, hidden), jnp.bfloat16), sharding),) for k in keys]
    return time_op(exchange, arg_sets, repeats=repeats)["seconds"]


def run(out: str | None, *, tokens: int = 4096, hidden: int = 7168, expert_dim: int = 2048,
        experts_per_device: int = 32, top_k: int = 8, repeats: int = 4, budget_s: float | None = None,
        backend: str = "auto", exchange: str = "auto") -> None:
    """Emit the layer at EP=1 (one GPU) and EP=all GPUs, the plain all-to-all, and the achieved bandwidth.

    `backend` picks the grouped GEMM of the local experts (`dsv3_jax.ops.grouped_matmul`: auto, xla, pallas),
    `exchange` the all-to-all of `expert_parallel_experts` (auto, ragged, padded).
    """
    if top_k > experts_per_device:
        raise ValueError(f"top_k {top_k} needs at least as many experts per GPU, got {experts_per_device}")
    reporter, deadline = Reporter("moe_layer", out), Deadline(budget_s)
    shape = {"backend": backend, "exchange": exchange,
             "tokens_per_gpu": tokens, "hidden": hidden, "expert_dim": expert_dim, "top_k": top_k,
             "experts_per_gpu": experts_per_device}
    layer_ms = {}
    for ep in sorted({1, jax.device_count()}):
        if deadline.left() < 0:
            reporter.emit(what="layer", ep=ep, skipped="time budget", **shape)
            continue
        mesh = make_mesh(ParallelConfig(data=1, expert=ep))
        result = _time_layer(mesh, tokens, hidden, expert_dim, experts_per_device * ep, top_k, repeats,
                             backend, exchange)
        layer_ms[ep] = result["ms"]
        reporter.emit(what="layer", ep=ep, n_experts=experts_per_device * ep, **shape, **result)
        if ep == 1:
            continue
        remote = (ep - 1) / ep * tokens * top_k * hidden        # elements each GPU sends away per exchange
        seconds = _time_all_to_all(mesh, tokens * top_k, hidden, repeats)
        reporter.emit(what="all_to_all", ep=ep, bytes_sent_per_gpu=remote * 2, ms=seconds * 1e3,
                      gb_per_s_per_gpu=remote * 2 / seconds / 1e9, **shape)
        extra = (layer_ms[ep] - layer_ms[1]) / 1e3
        sent = remote * (2 + 4)                                  # dispatch BF16 rows, combine FP32 rows
        reporter.emit(what="exchange", ep=ep, extra_ms_over_ep1=extra * 1e3, bytes_sent_per_gpu=sent,
                      gb_per_s_per_gpu=sent / extra / 1e9 if extra > 0 else None, **shape)
