"""`dsv3-bench plan`: per-device memory of a training layout for every pipeline schedule, from shapes only.

Parameters come from jax.eval_shape (dsv3_jax.param_shapes), stages from the cost-model partition, held
micro-batches from the schedule tables. Bytes per parameter: BF16 compute copy 2, FP32 gradient 4, and
ZeRO-1 optimizer state (FP32 master 4 + two BF16 moments 4) sharded over the data-parallel ranks: routed
experts over `data`, everything else over `expert` x `data` (attention and dense parts are data-parallel
across the EP group). Routed experts are split over `expert`. Activations: the stored stage inputs of the
held micro-batches (the executor recomputes a stage's forward in its backward), [micro_batch, seq, hidden]
in BF16 each; a stage's transient working set during recompute is not included. No tensor parallelism.
"""

from __future__ import annotations

import math

import jax

import dsv3_jax
from dsv3_jax.bench.timing import Reporter
from dsv3_jax.parallel import pipeline, stages
from dsv3_jax.parallel.mesh import ParallelConfig

GB = 1e9


def _size(tree) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def stage_split(cfg, shapes, specs) -> tuple[list[int], list[int]]:
    """(routed-expert parameters, other parameters) per stage."""
    totals = stages.stage_param_counts(cfg, shapes, specs)
    routed_per_layer = 0
    if "moe_layers" in shapes:
        mlp = shapes["moe_layers"]["mlp"]
        routed_per_layer = _size([mlp["w_gate"], mlp["w_up"], mlp["w_down"]]) // cfg.n_moe_layers
    routed = []
    for spec in specs:
        m0, m1 = spec.moe_range(cfg)
        count = (m1 - m0) * routed_per_layer
        if spec.last:
            count += sum(_size([v["block"]["mlp"][w] for w in ("w_gate", "w_up", "w_down")])
                         for k, v in shapes.items() if k.startswith("mtp_") and "w_gate" in v["block"]["mlp"])
        routed.append(count)
    return routed, [t - r for t, r in zip(totals, routed, strict=True)]


def plan(config: str, mesh: dict[str, int], micro_batch: int = 1, seq: int = 4096, n_mb: int | None = None,
         schedules: tuple[str, ...] = pipeline.SCHEDULES) -> list[dict]:
    """One record per schedule: per-device parameters, gradients, optimizer state, activations (GB), each the
    maximum over the pipe devices (an expert-parallel rank's share)."""
    cfg = dsv3_jax.load_config(config)
    pp, ep, dp = mesh.get("pipe", 1), mesh.get("expert", 1), mesh.get("data", 1)
    shapes = dsv3_jax.param_shapes(cfg)
    specs = stages.partition(cfg, pp, seq)
    routed, other = stage_split(cfg, shapes, specs)
    n_mb = n_mb or 2 * pp + 4
    rows = []
    for name in schedules:
        schedule = pipeline.build(name, pp, n_mb)
        per_device = []
        for d in range(pp):
            held = schedule.stages_of(d)
            r = sum(routed[s] for s in held) / ep
            o = sum(other[s] for s in held)
            if cfg.num_nextn_predict_layers and not schedule.bidirectional and d == pp - 1:
                o += cfg.vocab_size * cfg.hidden_size      # MTP's copy of the embedding (DualPipe's device 0 has it)
            per_device.append((r + o, r / dp + o / (ep * dp)))
        params = max(p for p, _ in per_device)
        opt_params = max(q for _, q in per_device)
        acts = pipeline.peak_activations(schedule) * micro_batch * seq * cfg.hidden_size * 2
        row = {"config": config, "mesh": mesh, "schedule": name, "stages_layers":
               [s.stop - s.start for s in specs], "params_per_device_B": round(params / 1e9, 2),
               "params_bf16_GB": round(2 * params / GB, 1), "grads_fp32_GB": round(4 * params / GB, 1),
               "optimizer_zero1_GB": round(8 * opt_params / GB, 1),
               "held_microbatches": pipeline.peak_activations(schedule),
               "activations_GB": round(acts / GB, 2)}
        row["total_GB"] = round(row["params_bf16_GB"] + row["grads_fp32_GB"] + row["optimizer_zero1_GB"]
                                + row["activations_GB"], 1)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table of plan() records."""
    head = ("| schedule | params/device | BF16 params | FP32 grads | ZeRO-1 optimizer | held micro-batches "
            "| activations | total |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['params_per_device_B']}B | {r['params_bf16_GB']} GB | "
                     f"{r['grads_fp32_GB']} GB | {r['optimizer_zero1_GB']} GB | {r['held_microbatches']} | "
                     f"{r['activations_GB']} GB | {r['total_GB']} GB |")
    return "\n".join(lines)


def run(config: str = "deepseek-v3-671b", mesh: str = "pipe=16,expert=64,data=2", micro_batch: int = 1,
        seq: int = 4096, n_mb: int | None = None, out: str | None = None) -> list[dict]:
    """Print one JSON line per schedule, then the Markdown table."""
    rows = plan(config, ParallelConfig.parse(mesh).sizes(), micro_batch, seq, n_mb)
    reporter = Reporter("plan", out, with_device=False)
    for row in rows:
        reporter.emit(**row)
    print(table(rows))
    return rows

