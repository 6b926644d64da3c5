"""Run any pipeline schedule table on the real model: shard_map over "pipe", ppermute between neighbours.

Every device runs the same `lax.scan` over the schedule's lock-step grid (`pipeline.simulate` with unit
slots). At each step a device reads its row of the table and runs, through `lax.switch`, its F lane (stage
forward), B lane (input-gradient B, or full backward BW) and W lane (deferred weight gradient), then four
`ppermute`s move activations and input gradients one device right or left; receivers file them by
(chunk, micro-batch). Backward lanes recompute the stage forward from its stored input and take
`jax.vjp` with respect to the input (B), the weights (W) or both (BW), so no closure crosses a step.

Loss: the training loss of `dsv3_jax.train.step.compute_losses`, next-token CE + lambda * MTP + alpha *
sequence-wise balance loss, as a mean over micro-batches (and data shards). The balance loss is a sum over
MoE layers, so each stage adds its own layers' part. Parameters live in a chunk layout: decoder layers
stacked [pipe, chunks, layers_max, ...] (a device's chunk k is `schedule.stages_of(device)[k]`, padded to
the longest stage), embedding / final norm / head / MTP replicated over "pipe" (only the end stages use
them; their gradients are summed over "pipe"). Batch axes (e.g. "data") split each micro-batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

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


def step_table(schedule: pipeline.Schedule) -> np.ndarray:
    """int32 [steps, pipe, 6 + 2 + 2 * 4]: per lock-step and device the F / B / W lane (branch, micro-batch),
    the F and B send directions (+1, -1, 0) and, per CHANNELS entry, where a received tensor goes
    (chunk, micro-batch; micro-batch n_mb is the discard slot)."""
    grid = pipeline.simulate(schedule)
    pp, n_mb = schedule.pp, schedule.n_mb
    steps = int(max(end for dev in grid for _, end in dev))
    table = np.zeros((steps, pp, 8 + 2 * len(CHANNELS)), np.int32)
    table[:, :, 9::2] = n_mb
    for d, slots in enumerate(schedule.slots):
        for slot, (start, _) in zip(slots, grid[d], strict=True):
            row = table[int(start), d]
            for op in slot:
                if op.kind == "F":
                    row[0:2] = 1 + op.stage, op.mb
                    if op.stage < pp - 1:
                        row[6] = schedule.device_of(op.mb, op.stage + 1) - d
                elif op.kind in ("B", "BW"):
                    row[2:4] = 1 + op.stage + (pp if op.kind == "BW" else 0), op.mb
                    if op.stage > 0:
                        row[7] = schedule.device_of(op.mb, op.stage - 1) - d
                else:
                    row[4:6] = 1 + op.stage, op.mb
    for tr in pipeline.transfers(schedule):
        stage = tr.stage + (1 if tr.what == "act" else -1)
        c = CHANNELS.index((tr.what, tr.dst - tr.src))
        table[tr.step, tr.dst, 8 + 2 * c: 10 + 2 * c] = schedule.chunk_of(stage), tr.mb
    return table


def _add_at(tree: Any, chunk: int, update: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, u: a.at[chunk].add(u), tree, update)


def _pipeline_body(cfg: ModelConfig, layout: Layout, table: np.ndarray, batch_axes: tuple[str, ...],
                   chunks, shared, tokens, weights):
    """Per-device program (inside shard_map): chunks leaves [1, n_chunks, ...], tokens [n_mb, b, t + 1]."""
    schedule = layout.schedule
    pp, n_mb = schedule.pp, schedule.n_mb
    chunks = jax.tree_util.tree_map(lambda a: a[0], chunks)
    d = jax.lax.axis_index("pipe")
    b, t = tokens.shape[1], tokens.shape[2] - 1
    act_shape = (b, t, cfg.hidden_size)
    dtype = dtype_of(cfg.dtype)
    buffers = jnp.zeros((schedule.n_chunks, n_mb + 1, *act_shape), dtype)       # [chunk, mb (+ discard), ...]
    lmax = layout.index["moe_layers"].shape[-1] if "moe_layers" in layout.stacks else 0
    carry = {"acts": buffers, "gouts": buffers,
             "g_chunks": jax.tree_util.tree_map(jnp.zeros_like, chunks),
             "g_shared": jax.tree_util.tree_map(jnp.zeros_like, shared),
             "metrics": jnp.zeros((3,), jnp.float32),
             "loads": jnp.zeros((schedule.n_chunks, lmax, cfg.n_routed_experts), jnp.float32),
             "mtp_loads": jnp.zeros((cfg.num_nextn_predict_layers, cfg.n_routed_experts), jnp.float32)}
    zeros_act = jnp.zeros(act_shape, dtype)
    scale = 1.0 / n_mb

    def fn(s):
        c = schedule.chunk_of(s)
        return c, lambda ch, sh, x, tok: stage_apply(cfg, layout, s, ch, sh, x, tok, weights)

    def forward(s, carry, mb):
        c, f = fn(s)
        (y, _), (metrics, loads, mtp_loads) = f(_chunk(chunks, c), shared,
                                                 carry["acts"][c, mb], tokens[mb])
        carry = dict(carry, metrics=carry["metrics"] + metrics, loads=carry["loads"].at[c].add(loads),
                     mtp_loads=carry["mtp_loads"] + mtp_loads)
        return carry, (zeros_act if layout.specs[s].last else y.astype(dtype))

    def cotangent(s, carry, c, mb):
        g = zeros_act if layout.specs[s].last else carry["gouts"][c, mb]
        return g, jnp.asarray(scale, jnp.float32)

    def backward(s, with_weights, carry, mb):
        c, f = fn(s)
        x, tok = carry["acts"][c, mb], tokens[mb]
        ct = cotangent(s, carry, c, mb)
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

    def weight(s, carry, mb):
        c, f = fn(s)
        x, tok = carry["acts"][c, mb], tokens[mb]
        _, vjp = jax.vjp(lambda ch, sh: f(ch, sh, x, tok)[0], _chunk(chunks, c), shared)
        g_ch, g_sh = vjp(cotangent(s, carry, c, mb))
        return _accumulate(carry, c, g_ch, g_sh)

    def _accumulate(carry, c, g_ch, g_sh):
        g_chunks = {k: _add_at(carry["g_chunks"][k], c, g_ch[k]) for k in carry["g_chunks"]}
        g_shared = jax.tree_util.tree_map(jnp.add, carry["g_shared"], g_sh)
        return dict(carry, g_chunks=g_chunks, g_shared=g_shared)

    idle = lambda carry, mb: (carry, zeros_act)
    f_lane = [idle] + [functools.partial(forward, s) for s in range(pp)]
    b_lane = ([idle] + [functools.partial(backward, s, False) for s in range(pp)]
              + [functools.partial(backward, s, True) for s in range(pp)])
    w_lane = [lambda carry, mb: carry] + [functools.partial(weight, s) for s in range(pp)]
    right = [(i, i + 1) for i in range(pp - 1)]
    left = [(i + 1, i) for i in range(pp - 1)]

    def step(carry, rows):
        row = rows[d]
        carry, y = jax.lax.switch(row[0], f_lane, carry, row[1])
        carry, dx = jax.lax.switch(row[2], b_lane, carry, row[3])
        carry = jax.lax.switch(row[4], w_lane, carry, row[5])
        for c, (what, direction) in enumerate(CHANNELS):
            payload, sent_dir = (y, row[6]) if what == "act" else (dx, row[7])
            sent = jax.lax.ppermute(jnp.where(sent_dir == direction, payload, 0), "pipe",
                                    right if direction == 1 else left)
            key = "acts" if what == "act" else "gouts"
            carry[key] = carry[key].at[row[8 + 2 * c], row[9 + 2 * c]].set(sent)
        return carry, None

    carry, _ = jax.lax.scan(step, carry, jnp.asarray(table))
    g_chunks = jax.tree_util.tree_map(lambda g: g[None], carry["g_chunks"])
    g_shared = jax.lax.psum(carry["g_shared"], "pipe")
    metrics = jax.lax.psum(carry["metrics"], "pipe") / n_mb
    mtp_loads = jax.lax.psum(carry["mtp_loads"], "pipe")
    loads = carry["loads"][None]
    if batch_axes:
        g_chunks, g_shared, metrics = jax.lax.pmean((g_chunks, g_shared, metrics), batch_axes)
        loads, mtp_loads = jax.lax.psum((loads, mtp_loads), batch_axes)
    return g_chunks, g_shared, metrics, loads, mtp_loads


def _chunk(chunks: dict[str, Any], c: int) -> dict[str, Any]:
    return jax.tree_util.tree_map(lambda a: a[c], chunks)


def pipelined_value_and_grad(cfg: ModelConfig, mesh: Mesh, schedule: pipeline.Schedule,
                             batch_axes: Sequence[str] = ()) -> Callable:
    """fn(params, tokens [batch, seq + 1], hyper) -> ((total loss, (metrics, loads)), grads), the value and
    gradient of `dsv3_jax.train.step.compute_losses` (same structure), computed by running `schedule` over the
    mesh's "pipe" axis (size schedule.pp) with the batch cut into schedule.n_mb micro-batches, each split over
    `batch_axes`. `hyper` needs `mtp_weight` and `balance_alpha`. Jit it (cfg, mesh and schedule are static).
    """
    if mesh.shape["pipe"] != schedule.pp:
        raise ValueError(f"mesh pipe={mesh.shape['pipe']} but the schedule has pp={schedule.pp}")
    layout = Layout(cfg, schedule, stages.partition(cfg, schedule.pp))
    table = step_table(schedule)
    batch_axes = tuple(batch_axes)
    batch = batch_axes if batch_axes else None
    body = functools.partial(_pipeline_body, cfg, layout, table, batch_axes)
    run = jax.shard_map(body, mesh=mesh, in_specs=(P("pipe"), P(), P(None, batch), P()),
                        out_specs=(P("pipe"), P(), P(), P("pipe"), P()), check_vma=False)

    def value_and_grad(params, tokens, hyper):
        n_mb = schedule.n_mb
        if tokens.shape[0] % n_mb:
            raise ValueError(f"batch {tokens.shape[0]} does not split into {n_mb} micro-batches")
        chunks, shared = layout.split(params)
        micro = tokens.reshape(n_mb, tokens.shape[0] // n_mb, tokens.shape[1])
        weights = jnp.stack([jnp.asarray(hyper.mtp_weight, jnp.float32), jnp.asarray(hyper.balance_alpha, jnp.float32)])
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
