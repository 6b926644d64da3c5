"""`dsv3-bench pipeline_step`: a pipelined forward + backward over pipe = P devices against pipe = 1 on one.

Both run the same executor (`pipeline_exec.pipelined_value_and_grad`: per-stage vjp, the backward
recomputing each stage from its input) on the same `n_mb` micro-batches of `rows` sequences: pipe=1 runs the
whole model for every micro-batch on device 0 (time T1), pipe=P cuts it into P stages under `schedule`
(time TP). A bubble-free pipeline of balanced stages would take T1 / P, so

    measured bubble share = 1 - T1 / (P * TP)

(it also holds the neighbour sends and any stage imbalance), printed next to the schedule's own share from
its table at chunk times F=1, B=2, W=1 (`pipeline.bubble`, as `dsv3-bench pipeline` prints it). Parameters
are cast to the config's activation dtype (BF16 for proxy-1gpu) so that pipe=1 fits one GPU. One JSON line
per mesh, then one with the comparison.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.bench.pipeline import COSTS
from dsv3_jax.bench.timing import Reporter
from dsv3_jax.config import load_config
from dsv3_jax.model.functional import init_params
from dsv3_jax.model.layers import dtype_of
from dsv3_jax.parallel import pipeline, pipeline_exec
from dsv3_jax.parallel.mesh import ParallelConfig, make_mesh, use_mesh
from dsv3_jax.train.step import Hyper


def _time_value_and_grad(cfg, pp: int, name: str, n_mb: int, params, tokens, steps: int) -> dict[str, float]:
    """Median seconds of one jitted pipelined value_and_grad on a pipe=pp mesh (after one warm-up call);
    pipe=1 runs the micro-batches one after another (GPipe on one stage)."""
    mesh = make_mesh(ParallelConfig(pipe=pp, data=1), jax.devices()[:pp])
    schedule = pipeline.build(name if pp > 1 else "gpipe", pp, n_mb)
    hyper = Hyper(*(jnp.float32(v) for v in (0.0, 0.3, 0.0, 1e-4)))
    fn = jax.jit(pipeline_exec.pipelined_value_and_grad(cfg, mesh, schedule))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    tokens = jax.device_put(tokens, NamedSharding(mesh, P()))
    with use_mesh(mesh):
        t0 = time.perf_counter()
        compiled = fn.lower(params, tokens, hyper).compile()
        compile_s = time.perf_counter() - t0
        loss = float(compiled(params, tokens, hyper)[0][0])
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, tokens, hyper))
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "compile_s": compile_s, "loss": loss,
            "lockstep_steps": int(pipeline_exec.step_table(schedule).rows.shape[0])}


def run(config: str = "proxy-1gpu", schedule: str = "dualpipe", pp: int | None = None, n_mb: int | None = None,
        rows: int = 1, seq: int = 4096, steps: int = 3, out: str | None = None) -> list[dict]:
    """Time pipe=1 and pipe=pp (default: every device) on n_mb (default 2 pp) micro-batches of `rows` x `seq`."""
    pp = pp or jax.device_count()
    if pp < 2:
        raise SystemExit(f"dsv3-bench pipeline_step: needs at least 2 devices, {jax.device_count()} visible")
    n_mb = n_mb or 2 * pp
    cfg = load_config(config)
    dtype = dtype_of(cfg.dtype)
    params = jax.jit(lambda k: jax.tree.map(lambda a: a.astype(dtype), init_params(cfg, k)),
                     out_shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0]))(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (n_mb * rows, seq + 1), dtype=np.int32)
    reporter = Reporter("pipeline_step", out)
    base = {"config": config, "schedule": schedule, "n_mb": n_mb, "rows": rows, "seq": seq}
    timed = {}
    for p in (1, pp):
        timed[p] = _time_value_and_grad(cfg, p, schedule, n_mb, params, tokens, steps)
        reporter.emit(**base, pipe=p, **timed[p], tokens_per_s=n_mb * rows * seq / timed[p]["step_s"])
    table = pipeline.build(schedule, pp, n_mb)
    work = n_mb * (COSTS.F + COSTS.B)
    bubble = pipeline.bubble(table, COSTS)
    reporter.emit(**base, pipe=pp, speedup=timed[1]["step_s"] / timed[pp]["step_s"],
                  bubble_share_measured=1 - timed[1]["step_s"] / (pp * timed[pp]["step_s"]),
                  bubble_share_schedule=bubble / (bubble + work),
                  loss_difference=abs(timed[pp]["loss"] - timed[1]["loss"]))
    return reporter.records
