"""Run any pipeline schedule table on the real model: shard_map over the mesh, ppermute between neighbours.

Every device runs the same `lax.scan` over the schedule's lock-step grid (`pipeline.simulate` with unit
slots, lowered by `step_table`). At each step a device reads its row and runs, through `lax.switch`, its
F lane (stage forward), B lane (input-gradient B, or full backward BW) and W lane (deferred weight
gradient); then four `ppermute`s move activations and input gradients one device right or left, and the
receiver files each into a slot of its pool. Pools are as deep as the schedule's peak of live tensors
(slots are reused once their last reader ran), not the number of micro-batches. Backward lanes recompute
the stage forward from its stored input and take `jax.vjp` with respect to the input (B), the weights (W)
or both (BW), so no closure crosses a step.

Loss: the training loss of `dsv3_jax.train.step.compute_losses`, next-token CE + lambda * MTP + alpha *
sequence-wise balance loss, as a mean over micro-batches and data shards. The balance loss is a sum over
MoE layers, so each stage adds its own layers' part. Parameters live in a chunk layout: decoder layers
stacked [pipe, chunks, layers_max, ...] (a device's chunk k is `schedule.stages_of(device)[k]`, padded to
the longest stage), embedding / final norm / head / MTP replicated over "pipe" (only the end stages use
them; their gradients are summed over "pipe"). The shard_map spans the whole mesh: each micro-batch is
split over the data-parallel axes and routed experts over "expert" (the compute layout of
`dsv3_jax.parallel.mesh`), so the MoE layers dispatch by all-to-all inside each stage.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import RMSNorm, dense, dtype_of
from dsv3_jax.model.rope import rope_angles
from dsv3_jax.model.transformer import DecoderLayer, MTPModule
from dsv3_jax.parallel import pipeline, stages
from dsv3_jax.parallel.mesh import batch_axes as batch_axes_of
from dsv3_jax.parallel.mesh import param_specs
from dsv3_jax.train import losses

STACKS = ("dense_layers", "moe_layers")
CHANNELS = (("act", 1), ("act", -1), ("grad", 1), ("grad", -1))     # what, direction of travel (+1: to d+1)


class Layout:
    """Where every stage's layers sit in the chunk layout, for one (cfg, schedule)."""

    def __init__(self, cfg: ModelConfig, schedule: pipeline.Schedule, specs: tuple[stages.StageSpec, ...]):
        self.cfg, self.schedule, self.specs = cfg, schedule, specs
        self.ranges = {"dense_layers": [s.dense_range(cfg) for s in specs],
                       "moe_layers": [s.moe_range(cfg) for s in specs]}
        self.stacks = [name for name in STACKS if max(b - a for a, b in self.ranges[name]) > 0]
        self.index, self.valid = {}, {}
        for name in self.stacks:
            lmax = max(b - a for a, b in self.ranges[name])
            idx = np.zeros((schedule.pp, schedule.n_chunks, lmax), np.int32)
            for d in range(schedule.pp):
                for c, s in enumerate(schedule.stages_of(d)):
                    a, b = self.ranges[name][s]
                    idx[d, c, :b - a] = np.arange(a, b)
            valid = np.zeros_like(idx, bool)
            for d in range(schedule.pp):
                for c, s in enumerate(schedule.stages_of(d)):
                    a, b = self.ranges[name][s]
                    valid[d, c, :b - a] = True
            self.index[name], self.valid[name] = idx, valid

    def split(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Model params -> (chunks {stack: leaves [pipe, chunks, layers_max, ...]}, shared params)."""
        chunks = {}
        for name in self.stacks:
            idx, valid = self.index[name], self.valid[name]
            mask = lambda leaf: valid.reshape(valid.shape + (1,) * (leaf.ndim - 1))  # noqa: B023
            chunks[name] = jax.tree_util.tree_map(lambda a: jnp.where(mask(a), a[idx], 0), params[name])  # noqa: B023
        shared = {k: v for k, v in params.items() if k not in STACKS}
        return chunks, shared

    def merge(self, chunk_grads: dict[str, Any], shared_grads: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
        """Chunk-layout gradients -> model layout, summing a stage's copies (DualPipe holds each twice)."""
        out = dict(shared_grads)
        for name in STACKS:
            if name not in like:
                continue
            if name not in self.stacks:
                out[name] = jax.tree_util.tree_map(jnp.zeros_like, like[name])
                continue
            idx, valid = self.index[name].reshape(-1), self.valid[name].reshape(-1)

            def scatter(g, ref, idx=idx, valid=valid):
                flat = g.reshape((-1,) + g.shape[3:])
                flat = jnp.where(valid.reshape((-1,) + (1,) * (flat.ndim - 1)), flat, 0)
                return jnp.zeros_like(ref).at[idx].add(flat)
            out[name] = jax.tree_util.tree_map(scatter, chunk_grads[name], like[name])
        return out


def _run_stack(cfg: ModelConfig, is_moe: bool, stacked: Any, n: int, x, cos, sin, positions):
    """x [batch, seq, embed] through the first n layers of `stacked` (scanned); MoE stats stacked [n, ...]."""
    layer = DecoderLayer(cfg, is_moe)
    body = lambda h, p: layer.apply({"params": p}, h, cos, sin, positions)
    return jax.lax.scan(body, x, jax.tree_util.tree_map(lambda a: a[:n], stacked))


def stage_apply(cfg: ModelConfig, layout: Layout, s: int, chunk: dict[str, Any], shared: dict[str, Any],
                x: jax.Array, tokens: jax.Array, weights: jax.Array):
    """One stage on one micro-batch: ((y [b, t, d], objective []), (metrics [3], moe loads [layers_max, E],
    mtp loads [depth, E])).

    tokens int [b, t + 1] (inputs and targets); x is the previous stage's output (ignored on stage 0, which
    embeds). objective = alpha * this stage's balance loss (+ CE + lambda * MTP on the last stage);
    metrics = (CE, MTP, balance) parts; weights = (lambda, alpha).
    """
    spec = layout.specs[s]
    dtype = dtype_of(cfg.dtype)
    inputs = tokens[:, :-1]
    b, t = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_angles(cfg, positions)
    embed = lambda ids: jnp.take(shared["embed_tokens"], ids, axis=0).astype(dtype)
    if spec.first:
        x = embed(inputs)
    n_exp, k_top = cfg.n_routed_experts, cfg.num_experts_per_tok
    aux = jnp.zeros((), jnp.float32)
    lmax = layout.index["moe_layers"].shape[-1] if "moe_layers" in layout.stacks else 0
    loads = jnp.zeros((lmax, n_exp), jnp.float32)
    depth = cfg.num_nextn_predict_layers
    mtp_loads = jnp.zeros((depth, n_exp), jnp.float32)
    a, z = layout.ranges["dense_layers"][s]
    if z > a:
        x, _ = _run_stack(cfg, False, chunk["dense_layers"], z - a, x, cos, sin, positions)
    a, z = layout.ranges["moe_layers"][s]
    if z > a:
        x, stats = _run_stack(cfg, True, chunk["moe_layers"], z - a, x, cos, sin, positions)
        aux = aux + losses.sequence_balance_loss(stats.counts, stats.mean_probs, k_top, t)
        loads = loads.at[:z - a].set(stats.counts.sum(1).astype(jnp.float32))
    ce = mtp = jnp.zeros((), jnp.float32)
    if spec.last:
        h = RMSNorm(cfg.rms_norm_eps, cfg.dtype).apply({"params": shared["norm"]}, x)
        head = lambda v: dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head").apply(
            {"params": shared["lm_head"]}, v).astype(jnp.float32)
        ce = losses.cross_entropy(head(h), tokens[:, 1:])[0]
        if depth:
            depth_logits = []
            for k in range(1, depth + 1):
                shifted = jnp.concatenate([inputs[:, k:], jnp.zeros_like(inputs[:, :k])], axis=1)
                is_moe = cfg.num_hidden_layers + k - 1 >= cfg.first_k_dense_replace
                h, stats = MTPModule(cfg, is_moe).apply({"params": shared[f"mtp_{k - 1}"]}, h, embed(shifted),
                                                        cos, sin, positions)
                if stats is not None:
                    aux = aux + losses.sequence_balance_loss(stats.counts[None], stats.mean_probs[None], k_top, t)
                    mtp_loads = mtp_loads.at[k - 1].set(stats.counts.sum(0).astype(jnp.float32))
                depth_logits.append(head(h))
            mtp = losses.mtp_loss(jnp.stack(depth_logits), tokens)
    objective = ce + weights[0] * mtp + weights[1] * aux
    return (x, objective), (jnp.stack([ce, mtp, aux]), loads, mtp_loads)


COLUMNS = ("f", "f_mb", "f_x",                      # F lane: branch (0 idle, 1 + stage), micro-batch, input slot
           "b", "b_mb", "b_x", "b_g",               # B lane: branch (1 + stage: B, 1 + pp + stage: BW), slots
           "w", "w_mb", "w_x", "w_g",               # W lane: branch (1 + stage), micro-batch, slots
           "f_send", "b_send",                      # direction of the F output / B input gradient: +1, -1, 0
           *(f"recv_{what}_{'right' if step == 1 else 'left'}" for what, step in CHANNELS))  # slot it lands in
COL = {name: i for i, name in enumerate(COLUMNS)}


class StepTable(NamedTuple):
    """The executor's program: rows [steps, pipe, len(COLUMNS)] and the slots of each buffer pool.

    A received tensor occupies a slot of its pool ("act": stage inputs, "grad": output cotangents) from
    the step it arrives until its last reader (F, B or BW, W) has run; slots are reused greedily, so the
    pools are as deep as the schedule's peak of live tensors, not the number of micro-batches. Slot
    index == slots means "none" (the first stage's input, the last stage's cotangent, unused lanes).
    """

    rows: np.ndarray
    act_slots: int
    grad_slots: int


def _assign_slots(lifetimes: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Greedy interval colouring: lifetimes [(written at the end of step, last read in step)] -> (slot of
    each, number of slots). A slot can take a new tensor at the end of its last reader's step."""
    slot_of, free_from = [0] * len(lifetimes), []
    for i in sorted(range(len(lifetimes)), key=lambda i: lifetimes[i]):
        write, last_read = lifetimes[i]
        slot = next((s for s, busy_until in enumerate(free_from) if busy_until <= write), len(free_from))
        if slot == len(free_from):
            free_from.append(0)
        free_from[slot], slot_of[i] = last_read, slot
    return slot_of, len(free_from)


def step_table(schedule: pipeline.Schedule) -> StepTable:
    """Lower `schedule` onto the lock-step grid of `pipeline.simulate` (unit slots): per step and device,
    the three lanes' ops, the send directions and where each received tensor goes (COLUMNS)."""
    grid = pipeline.simulate(schedule)
    pp = schedule.pp
    start = {(op.kind, op.mb, op.stage): int(grid[d][k][0])
             for d, slots in enumerate(schedule.slots) for k, slot in enumerate(slots) for op in slot}
    readers = {"act": ("F", "B", "BW", "W"), "grad": ("B", "BW", "W")}
    received = collections.defaultdict(list)         # (device, what) -> [(transfer, reading stage, last read)]
    for tr in pipeline.transfers(schedule):
        stage = tr.stage + (1 if tr.what == "act" else -1)          # the stage that reads it
        last = max(start[(kind, tr.mb, stage)] for kind in readers[tr.what] if (kind, tr.mb, stage) in start)
        received[(tr.dst, tr.what)].append((tr, stage, last))
    slot, depth = {}, {"act": 0, "grad": 0}
    for (_, what), items in received.items():
        slots, n = _assign_slots([(tr.step, last) for tr, _, last in items])
        depth[what] = max(depth[what], n)
        for (tr, stage, _), s in zip(items, slots, strict=True):
            slot[(what, tr.mb, stage)] = (tr, s)

    steps = int(max(end for dev in grid for _, end in dev))
    rows = np.zeros((steps, pp, len(COLUMNS)), np.int32)
    none = {"act": depth["act"], "grad": depth["grad"]}
    for name in COLUMNS:
        if name.endswith("_x") or name.startswith("recv_act"):
            rows[:, :, COL[name]] = none["act"]
        elif name.endswith("_g") or name.startswith("recv_grad"):
            rows[:, :, COL[name]] = none["grad"]
    x_slot = lambda op: slot[("act", op.mb, op.stage)][1] if op.stage > 0 else depth["act"]
    g_slot = lambda op: slot[("grad", op.mb, op.stage)][1] if op.stage < pp - 1 else depth["grad"]
    for d, slots in enumerate(schedule.slots):
        for k, ops in enumerate(slots):
            row = rows[int(grid[d][k][0]), d]
            for op in ops:
                if op.kind == "F":
                    row[[COL["f"], COL["f_mb"], COL["f_x"]]] = 1 + op.stage, op.mb, x_slot(op)
                    if op.stage < pp - 1:
                        row[COL["f_send"]] = schedule.device_of(op.mb, op.stage + 1) - d
                elif op.kind in ("B", "BW"):
                    branch = 1 + op.stage + (pp if op.kind == "BW" else 0)
                    row[[COL["b"], COL["b_mb"], COL["b_x"], COL["b_g"]]] = branch, op.mb, x_slot(op), g_slot(op)
                    if op.stage > 0:
                        row[COL["b_send"]] = schedule.device_of(op.mb, op.stage - 1) - d
                else:
                    row[[COL["w"], COL["w_mb"], COL["w_x"], COL["w_g"]]] = 1 + op.stage, op.mb, x_slot(op), g_slot(op)
    for (what, _, _), (tr, s) in slot.items():
        rows[tr.step, tr.dst, len(COLUMNS) - 4 + CHANNELS.index((what, tr.dst - tr.src))] = s
    return StepTable(rows, depth["act"], depth["grad"])


def _add_at(tree: Any, chunk: int, update: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, u: a.at[chunk].add(u), tree, update)


def _used_axes(spec: P) -> set[str]:
    return {a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())}


def _reduce_grads(grads: Any, specs: Any, batch_axes: tuple[str, ...], dp: int) -> Any:
    """Gradient of the mean loss over all data shards: each leaf summed over the batch axes it is not split
    over, divided by the data-parallel size. (Expert weights split over "expert" already received the other
    expert-axis shards' contributions through the all-to-all's transpose.)"""
    def reduce(g, spec):
        axes = tuple(a for a in batch_axes if a not in _used_axes(spec))
        return (jax.lax.psum(g, axes) if axes else g) / dp
    return jax.tree_util.tree_map(reduce, grads, specs, is_leaf=lambda x: isinstance(x, P))


def _pipeline_body(cfg: ModelConfig, layout: Layout, table: StepTable, batch_axes: tuple[str, ...], dp: int,
                   specs: tuple[Any, Any], chunks, shared, tokens, weights):
    """Per-device program (inside shard_map over the whole mesh): chunks leaves [1, n_chunks, ...] (this
    device's stages; expert weights its E / ep experts), tokens [n_mb, b, t + 1] (its rows of each micro-batch)."""
    schedule = layout.schedule
    pp, n_mb = schedule.pp, schedule.n_mb
    chunks = jax.tree_util.tree_map(lambda a: a[0], chunks)
    d = jax.lax.axis_index("pipe")
    b, t = tokens.shape[1], tokens.shape[2] - 1
    act_shape = (b, t, cfg.hidden_size)
    dtype = dtype_of(cfg.dtype)
    lmax = layout.index["moe_layers"].shape[-1] if "moe_layers" in layout.stacks else 0
    carry = {"acts": jnp.zeros((table.act_slots + 1, *act_shape), dtype),      # [slot (+ none), b, t, d]
             "gouts": jnp.zeros((table.grad_slots + 1, *act_shape), dtype),
             "g_chunks": jax.tree_util.tree_map(jnp.zeros_like, chunks),
             "g_shared": jax.tree_util.tree_map(jnp.zeros_like, shared),
             "metrics": jnp.zeros((3,), jnp.float32),
             "loads": jnp.zeros((schedule.n_chunks, lmax, cfg.n_routed_experts), jnp.float32),
             "mtp_loads": jnp.zeros((cfg.num_nextn_predict_layers, cfg.n_routed_experts), jnp.float32)}
    zeros_act = jnp.zeros(act_shape, dtype)
    scale = jnp.asarray(1.0 / n_mb, jnp.float32)

    def fn(s):
        c = schedule.chunk_of(s)
        return c, lambda ch, sh, x, tok: stage_apply(cfg, layout, s, ch, sh, x, tok, weights)

    def forward(s, carry, row):
        c, f = fn(s)
        x, tok = carry["acts"][row[COL["f_x"]]], tokens[row[COL["f_mb"]]]
        (y, _), (metrics, loads, mtp_loads) = f(_chunk(chunks, c), shared, x, tok)
        carry = dict(carry, metrics=carry["metrics"] + metrics, loads=carry["loads"].at[c].add(loads),
                     mtp_loads=carry["mtp_loads"] + mtp_loads)
        return carry, (zeros_act if layout.specs[s].last else y.astype(dtype))

    def operands(s, carry, row, lane):
        """(input x, tokens, output cotangent) of stage s's op in the B or W lane."""
        x, tok = carry["acts"][row[COL[f"{lane}_x"]]], tokens[row[COL[f"{lane}_mb"]]]
        g = zeros_act if layout.specs[s].last else carry["gouts"][row[COL[f"{lane}_g"]]]
        return x, tok, (g, scale)

    def backward(s, with_weights, carry, row):
        c, f = fn(s)
        x, tok, ct = operands(s, carry, row, "b")
        if layout.specs[s].first:
            if not with_weights:
                return carry, zeros_act
            _, vjp = jax.vjp(lambda ch, sh: f(ch, sh, x, tok)[0], _chunk(chunks, c), shared)
            g_ch, g_sh = vjp(ct)
            return _accumulate(carry, c, g_ch, g_sh), zeros_act
        if not with_weights:
            _, vjp = jax.vjp(lambda xx: f(_chunk(chunks, c), shared, xx, tok)[0], x)
            return carry, vjp(ct)[0].astype(dtype)
        _, vjp = jax.vjp(lambda ch, sh, xx: f(ch, sh, xx, tok)[0], _chunk(chunks, c), shared, x)
        g_ch, g_sh, dx = vjp(ct)
        return _accumulate(carry, c, g_ch, g_sh), dx.astype(dtype)

    def weight(s, carry, row):
        c, f = fn(s)
        x, tok, ct = operands(s, carry, row, "w")
        _, vjp = jax.vjp(lambda ch, sh: f(ch, sh, x, tok)[0], _chunk(chunks, c), shared)
        return _accumulate(carry, c, *vjp(ct))

    def _accumulate(carry, c, g_ch, g_sh):
        g_chunks = {k: _add_at(carry["g_chunks"][k], c, g_ch[k]) for k in carry["g_chunks"]}
        g_shared = jax.tree_util.tree_map(jnp.add, carry["g_shared"], g_sh)
        return dict(carry, g_chunks=g_chunks, g_shared=g_shared)

    idle = lambda carry, row: (carry, zeros_act)
    f_lane = [idle] + [functools.partial(forward, s) for s in range(pp)]
    b_lane = ([idle] + [functools.partial(backward, s, False) for s in range(pp)]
              + [functools.partial(backward, s, True) for s in range(pp)])
    w_lane = [lambda carry, row: carry] + [functools.partial(weight, s) for s in range(pp)]
    right = [(i, i + 1) for i in range(pp - 1)]
    left = [(i + 1, i) for i in range(pp - 1)]

    def step(carry, rows):
        row = rows[d]
        carry, y = jax.lax.switch(row[COL["f"]], f_lane, carry, row)
        carry, dx = jax.lax.switch(row[COL["b"]], b_lane, carry, row)
        carry = jax.lax.switch(row[COL["w"]], w_lane, carry, row)
        for c, (what, direction) in enumerate(CHANNELS):
            payload, sent_dir = (y, row[COL["f_send"]]) if what == "act" else (dx, row[COL["b_send"]])
            sent = jax.lax.ppermute(jnp.where(sent_dir == direction, payload, 0), "pipe",
                                    right if direction == 1 else left)
            key = "acts" if what == "act" else "gouts"
            carry[key] = carry[key].at[row[len(COLUMNS) - 4 + c]].set(sent)
        return carry, None

    carry, _ = jax.lax.scan(step, carry, jnp.asarray(table.rows))
    chunk_specs, shared_specs = specs
    g_chunks = jax.tree_util.tree_map(lambda g: g[None], carry["g_chunks"])
    g_chunks = _reduce_grads(g_chunks, chunk_specs, batch_axes, dp)
    g_shared = _reduce_grads(jax.lax.psum(carry["g_shared"], "pipe"), shared_specs, batch_axes, dp)
    metrics = jax.lax.psum(carry["metrics"], "pipe") / n_mb
    mtp_loads = jax.lax.psum(carry["mtp_loads"], "pipe")
    loads = carry["loads"][None]
    if batch_axes:
        metrics = jax.lax.pmean(metrics, batch_axes)
        loads, mtp_loads = jax.lax.psum((loads, mtp_loads), batch_axes)
    return g_chunks, g_shared, metrics, loads, mtp_loads


def _chunk(chunks: dict[str, Any], c: int) -> dict[str, Any]:
    return jax.tree_util.tree_map(lambda a: a[c], chunks)


class PipelineError(ValueError):
    """A pipeline set-up that cannot run: schedule, micro-batch count, batch size or mesh."""


def schedule_for(name: str, pp: int, batch: int, dp: int, microbatches: int = 0) -> pipeline.Schedule:
    """The schedule `name` for a global batch of `batch` rows over `dp` data shards, cut into `microbatches`
    micro-batches (0: batch / dp, one row per data shard each: the most the batch allows, the smallest bubble
    share). Raises PipelineError naming what to change."""
    if batch % dp:
        raise PipelineError(f"batch {batch} does not split over the data-parallel size {dp}")
    rows = batch // dp
    n_mb = microbatches or rows
    if n_mb < 1 or rows % n_mb:
        raise PipelineError(f"{n_mb} micro-batches do not split the {rows} rows each data shard gets of a "
                            f"batch of {batch}: pick a divisor of {rows}")
    try:
        return pipeline.build(name, pp, n_mb)
    except pipeline.ScheduleError as err:
        raise PipelineError(f"batch {batch} over data-parallel size {dp} in {n_mb} micro-batches: {err}; change "
                            "the batch size (recipe), --microbatches, --mesh or --pipeline_schedule") from None


def _on_mesh(spec: P, mesh: Mesh) -> P:
    """`spec` without the axes `mesh` does not have."""
    def entry(e):
        axes = tuple(a for a in ((e,) if isinstance(e, str) else e or ()) if a in mesh.axis_names)
        return (axes[0] if len(axes) == 1 else axes) if axes else None
    return P(*(entry(e) for e in spec))


def stage_specs(cfg: ModelConfig, mesh: Mesh, layout: Layout) -> tuple[dict[str, Any], dict[str, Any]]:
    """PartitionSpecs of (chunk-layout decoder layers [pipe, chunks, layers_max, ...], shared params): the
    compute layout of `dsv3_jax.parallel.mesh` (experts over "expert"), stages over "pipe"."""
    is_spec = lambda x: isinstance(x, P)
    specs = jax.tree.map(lambda s: _on_mesh(s, mesh), param_specs(cfg), is_leaf=is_spec)
    chunk = {name: jax.tree.map(lambda s: P("pipe", None, *s), specs[name], is_leaf=is_spec) for name in layout.stacks}
    return chunk, {k: v for k, v in specs.items() if k not in STACKS}


def pipelined_value_and_grad(cfg: ModelConfig, mesh: Mesh, schedule: pipeline.Schedule,
                             batch_axes: Sequence[str] | None = None) -> Callable:
    """fn(params, tokens [batch, seq + 1], hyper) -> ((total loss, (metrics, loads)), grads), the value and
    gradient of `dsv3_jax.train.step.compute_losses` (same structure), computed by running `schedule` over the
    mesh's "pipe" axis (size schedule.pp) with the batch cut into schedule.n_mb micro-batches, each split over
    `batch_axes` (default: the mesh's data-parallel axes). `hyper` needs `mtp_weight` and `balance_alpha`.
    Jit it (cfg, mesh and schedule are static); params may come in any sharding (e.g. ZeRO-1's).
    """
    if mesh.shape["pipe"] != schedule.pp:
        raise PipelineError(f"mesh pipe={mesh.shape['pipe']} but the schedule has pp={schedule.pp}")
    if mesh.shape.get("tensor", 1) > 1:
        raise PipelineError(f"pipeline stages do not split over tensor={mesh.shape['tensor']}: use tensor=1 "
                            "with pipe > 1 (DeepSeek-V3 trains without tensor parallelism)")
    layout = Layout(cfg, schedule, stages.partition(cfg, schedule.pp))
    table = step_table(schedule)
    batch_axes = batch_axes_of(mesh) if batch_axes is None else tuple(batch_axes)
    dp = math.prod(mesh.shape[a] for a in batch_axes)
    chunk_specs, shared_specs = stage_specs(cfg, mesh, layout)
    rows = P(None, batch_axes or None)
    body = functools.partial(_pipeline_body, cfg, layout, table, batch_axes, dp, (chunk_specs, shared_specs))
    run = jax.shard_map(body, mesh=mesh, in_specs=(chunk_specs, shared_specs, rows, P()),
                        out_specs=(chunk_specs, shared_specs, P(), P("pipe"), P()), check_vma=False)

    def value_and_grad(params, tokens, hyper):
        n_mb = schedule.n_mb
        if tokens.shape[0] % (n_mb * dp):
            raise PipelineError(f"batch {tokens.shape[0]} does not split into {n_mb} micro-batches over "
                                f"data-parallel size {dp}")
        chunks, shared = layout.split(params)
        micro = tokens.reshape(n_mb, tokens.shape[0] // n_mb, tokens.shape[1])
        weights = jnp.stack([jnp.asarray(hyper.mtp_weight, jnp.float32), jnp.asarray(hyper.balance_alpha, jnp.float32)])
        with nn.logical_axis_rules(()):           # inside the shard_map the model's arrays are per device
            g_chunks, g_shared, metrics, loads, mtp_loads = run(chunks, shared, micro, weights)
        grads = layout.merge(g_chunks, g_shared, params)
        ce, mtp, aux = metrics[0], metrics[1], metrics[2]
        total = ce + weights[0] * mtp + weights[1] * aux
        moe_loads = {}
        if "moe_layers" in layout.stacks:
            flat = loads.reshape((-1,) + loads.shape[3:])
            idx = layout.index["moe_layers"].reshape(-1)
            valid = layout.valid["moe_layers"].reshape(-1)
            moe_loads["moe_layers"] = jnp.zeros((cfg.n_moe_layers, cfg.n_routed_experts), jnp.float32).at[idx].add(
                jnp.where(valid[:, None], flat, 0)).astype(jnp.int32)
        for k in range(cfg.num_nextn_predict_layers):
            if cfg.num_hidden_layers + k >= cfg.first_k_dense_replace:
                moe_loads[f"mtp_{k}"] = mtp_loads[k].astype(jnp.int32)
        metrics = {"loss": ce, "mtp_loss": mtp, "aux_loss": aux, "total_loss": total}
        return (total, (metrics, moe_loads)), grads

    return value_and_grad
