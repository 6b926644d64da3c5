"""The jitted training and evaluation steps: pure functions of (state, batch, hyperparameters).

Loss (paper eq. 17-20, 24-25): L = CE(next token) + lambda * mean_k CE(MTP depth k) + alpha * sequence-wise
balance loss. After the optimizer update, every MoE layer's routing bias moves by -gamma * sign(load - mean
load) from the step's global expert loads (sec. 2.1.2). A step whose loss or gradient is not finite
leaves the state untouched and reports `finite = False`.

On a mesh (`sharded_steps`) the state lives in the ZeRO-1 layout of `dsv3_jax.parallel.mesh`: the step
gathers the parameters into the compute layout, and the gradients land back in the state layout
(reduce-scatter), where the optimizer updates each device's shard. Sums over the sharded batch (losses,
expert loads) are global: jit partitions them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.functional import apply, init_params
from dsv3_jax.parallel import pipeline_exec
from dsv3_jax.parallel.mesh import (
    ParamLayouts,
    batch_sharding,
    data_parallel_size,
    param_layouts,
    train_state_shardings,
)
from dsv3_jax.train import balance, losses


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint must hold to resume: step counter, FP32 master params, optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


class Hyper(NamedTuple):
    """Per-step schedule values (float32 scalars), computed on the host from the tokens seen."""

    learning_rate: jax.Array
    mtp_weight: jax.Array
    bias_update_speed: jax.Array
    balance_alpha: jax.Array


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def _moe_loads(moe: dict[str, Any]) -> dict[str, jax.Array]:
    """Global tokens per expert of each MoE module, summed over the batch: {name: [L, E] or [E]}."""
    return {name: stats.counts.sum(axis=-2) for name, stats in moe.items()}


def _balance_loss(cfg: ModelConfig, moe: dict[str, Any], seq_len: int) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    for stats in moe.values():
        counts, probs = stats.counts, stats.mean_probs
        if counts.ndim == 2:                       # an unstacked (MTP) layer: add the layer axis
            counts, probs = counts[None], probs[None]
        total = total + losses.sequence_balance_loss(counts, probs, cfg.num_experts_per_tok, seq_len)
    return total


def compute_losses(cfg: ModelConfig, params: Any, tokens: jax.Array, hyper: Hyper):
    """(total loss, (metrics, loads)) for a packed batch tokens [batch, seq + 1]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out = apply(cfg, params, inputs)
    ce = losses.cross_entropy(out.logits, targets)[0]
    mtp = losses.mtp_loss(out.mtp_logits, tokens) if out.mtp_logits is not None else jnp.zeros((), jnp.float32)
    aux = _balance_loss(cfg, out.moe, inputs.shape[1])
    total = ce + hyper.mtp_weight * mtp + hyper.balance_alpha * aux
    return total, ({"loss": ce, "mtp_loss": mtp, "aux_loss": aux, "total_loss": total}, _moe_loads(out.moe))


def _constrain(tree: Any, shardings: Any | None) -> Any:
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState, tokens: jax.Array,
               hyper: Hyper, layouts: ParamLayouts | None = None,
               value_and_grad: Callable | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on tokens [batch, seq + 1]. Jit with cfg, optimizer, layouts and value_and_grad static.

    value_and_grad(params, tokens, hyper) -> ((total, (metrics, loads)), grads) of `compute_losses`; default
    jax.value_and_grad over the compute layout (a pipeline passes `pipelined_value_and_grad`)."""
    if value_and_grad is None:
        compute = layouts.compute if layouts else None
        value_and_grad = jax.value_and_grad(
            lambda p, tok, h: compute_losses(cfg, _constrain(p, compute), tok, h), has_aux=True)
    (_, (metrics, loads)), grads = value_and_grad(state.params, tokens, hyper)
    grads = _constrain(grads, layouts.state if layouts else None)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(grad_norm)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, learning_rate=hyper.learning_rate)
    params = optax.apply_updates(state.params, updates)
    params = balance.update_router_biases(params, loads, hyper.bias_update_speed)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)

    vio = {name: balance.max_vio(load if load.ndim == 2 else load[None]) for name, load in loads.items()}
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite, learning_rate=hyper.learning_rate)
    if vio:
        metrics["max_vio"] = jnp.max(jnp.concatenate(list(vio.values())))
        metrics["max_vio_per_layer"] = jnp.concatenate(list(vio.values()))
    return new_state, metrics


def eval_step(cfg: ModelConfig, params: Any, tokens: jax.Array,
              layouts: ParamLayouts | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token CE in nats, number of tokens) over tokens [batch, seq + 1]."""
    logits = apply(cfg, _constrain(params, layouts.compute if layouts else None), tokens[:, :-1], with_mtp=False).logits
    mean, count = losses.cross_entropy(logits, tokens[:, 1:])
    return mean * count, count


class ShardedSteps(NamedTuple):
    """The state's shardings and the jitted steps of one (cfg, optimizer, mesh). Call (and lower) them inside
    `use_mesh(mesh)`: MoE layers pick their all-to-all dispatch and activations their constraints from it.

    init(key) -> TrainState; train(state, tokens, hyper) -> (state, metrics), donating the state;
    evaluate(params, tokens) -> (loss sum, count). Metrics come back replicated.
    """

    state_shardings: Any
    init: Callable[[jax.Array], TrainState]
    train: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


def sharded_steps(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                  pipeline_schedule: str = "dualpipe", microbatches: int = 0) -> ShardedSteps:
    """Jit init, train and eval steps for `mesh`: state in the ZeRO-1 layout, batches over the data axes.

    With pipe > 1 the train step runs `pipeline_schedule` over "pipe" (`dsv3_jax.parallel.pipeline_exec`)
    in `microbatches` micro-batches (0: one row per data shard each), compiled once per batch size; the
    optimizer state is also split over "pipe" (ZeRO-1) and evaluation runs unpipelined."""
    make_state = lambda key: init_state(init_params(cfg, key), optimizer)
    abstract = jax.eval_shape(make_state, jax.random.key(0))
    shardings = train_state_shardings(cfg, mesh, optimizer, abstract)
    layouts = param_layouts(cfg, mesh, abstract.params)
    rows, replicated = batch_sharding(mesh), NamedSharding(mesh, P())

    def jit_train(value_and_grad: Callable | None = None) -> Callable:
        return jax.jit(functools.partial(train_step, cfg, optimizer, layouts=layouts, value_and_grad=value_and_grad),
                       donate_argnums=0, in_shardings=(shardings, rows, replicated),
                       out_shardings=(shardings, replicated))

    pipelined = mesh.shape["pipe"] > 1
    train = _pipelined_train(cfg, mesh, pipeline_schedule, microbatches, jit_train) if pipelined else jit_train()
    return ShardedSteps(
        shardings,
        init=jax.jit(make_state, out_shardings=shardings),
        train=train,
        evaluate=jax.jit(functools.partial(eval_step, cfg, layouts=layouts), in_shardings=(shardings.params, rows),
                         out_shardings=replicated))


def _pipelined_train(cfg: ModelConfig, mesh: Mesh, name: str, microbatches: int,
                     jit_train: Callable[[Callable], Callable]) -> Callable:
    """train(state, tokens, hyper) running schedule `name` over "pipe", one jitted step per batch size."""
    compiled: dict[int, Callable] = {}
    dp = data_parallel_size(mesh)

    def train(state: TrainState, tokens: jax.Array, hyper: Hyper):
        batch = tokens.shape[0]
        if batch not in compiled:
            schedule = pipeline_exec.schedule_for(name, mesh.shape["pipe"], batch, dp, microbatches)
            compiled[batch] = jit_train(pipeline_exec.pipelined_value_and_grad(cfg, mesh, schedule))
        return compiled[batch](state, tokens, hyper)
    return train
