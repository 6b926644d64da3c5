"""Expert parallelism: routed experts split over the "expert" mesh axis, tokens moved to them by all-to-all.

Inside `shard_map` every device holds n tokens (its share of the batch, split over ("data", "expert"))
and E_l = E / ep experts (device j: experts [j E_l, (j+1) E_l)), of which it holds 1 / tp of the columns:

    1. sort the n K token copies by expert; destination device = expert // E_l, so copies for one
       device are contiguous and already ordered by expert;
    2. exchange the per-expert counts (all_to_all), then the copies (dispatch all-to-all);
    3. order the received rows by local expert, run the local experts as one grouped GEMM
       (`dsv3_jax.ops.grouped_matmul`), undo the order;
    4. send results back (return all-to-all), put them under their token copies, weighted sum over k,
       psum over "tensor" (each tensor rank computed 1 / tp of the expert hidden columns).

Exchange: `jax.lax.ragged_all_to_all` on GPU and TPU; XLA:CPU has no ragged-all-to-all, so there a padded
all-to-all with the same meaning runs (`padded_ragged_all_to_all`). No token is ever dropped: buffers
hold the worst case. A token's K experts are distinct, so at most min(K, E_l) of its copies go to one
device: a device sends at most n min(K, E_l) rows to any one device (the padded block size) and receives
at most ep n min(K, E_l) rows in all (the receive buffer), reached when every token picks the same experts.

Node-limited routing (paper sec. 2.1.2): `route` keeps each token's experts inside its `topk_group` best
of `n_group` contiguous expert groups. With the expert axis spanning several hosts and `n_group` equal to
the number of hosts it spans (host h holding group h), each token's copies reach at most `topk_group`
hosts; the buffers above do not rely on it.

Letters: n local tokens, k chosen slot, m = n K copies, r received rows, d embed, f expert hidden.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax.ops.permute import dispatch_rows, inverse_permutation, permute_rows
from dsv3_jax.parallel.mesh import batch_axes

EXPERT, TENSOR = "expert", "tensor"


def padded_ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                             send_sizes: jax.Array, output_offsets: jax.Array, recv_sizes: jax.Array, *,
                             axis_name: str, block: int) -> jax.Array:
    """`jax.lax.ragged_all_to_all` through one dense all-to-all of [ep, block] row blocks.

    operand [m, d]: rows input_offsets[j] + [0, send_sizes[j]) go to device j, landing at rows
    output_offsets[j] + [0, ...) of its `output` [R, d]; rows of `output` nobody writes keep their value.
    `block` must bound every send_sizes[j] (static).
    """
    ep = send_sizes.shape[0]
    rows = jnp.arange(block)
    src = input_offsets[:, None] + rows                                          # [ep, block]
    valid = rows < send_sizes[:, None]
    blocks = jnp.where(valid[..., None], jnp.take(operand, jnp.where(valid, src, 0), axis=0), 0)
    received = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)          # [ep, block, d] by source
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)     # where each source writes
    dest = jnp.where(rows < recv_sizes[:, None], where[:, None] + rows, output.shape[0])
    return output.at[dest.reshape(-1)].set(received.reshape(ep * block, -1), mode="drop")


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _local_experts_by_row(recv_counts: jax.Array, n_rows: int) -> jax.Array:
    """Local expert of each received row (E_l for rows past the data). recv_counts [ep, E_l]: rows from
    source i for local expert l; source blocks are contiguous in source order, each ordered by expert."""
    ep, n_local = recv_counts.shape
    ends = jnp.cumsum(recv_counts.reshape(-1))                                    # (source, expert) blocks
    boundaries = jnp.zeros((n_rows + 1,), jnp.int32).at[ends].add(1, mode="drop")  # a block ends at row i
    block = jnp.cumsum(boundaries[:n_rows])                                      # [r] blocks ended by row i
    return jnp.where(block < ep * n_local, block % n_local, n_local)


def _dispatch_combine(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                      w_down: jax.Array, *, n_experts: int, grouped_matmul: Callable[..., jax.Array],
                      ragged: bool) -> jax.Array:
    """Per device: x [n, d], experts / weights [n, K], local w_gate / w_up [E_l, d, f/tp], w_down [E_l, f/tp, d]
    -> routed output [n, d] float32 (summed over the tensor axis)."""
    n, k = experts.shape
    n_local = w_gate.shape[0]
    ep = n_experts // n_local
    me = jax.lax.axis_index(EXPERT)

    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)                                       # copies sorted by expert
    per_expert = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    inv_order = inverse_permutation(order)
    xs = dispatch_rows(x, order, inv_order, k)                                   # [m, d]
    send_sizes = per_expert.reshape(ep, n_local).sum(1)                           # [ep] rows to device j
    sizes = jax.lax.all_gather(send_sizes, EXPERT)                               # [ep src, ep dst]
    recv_counts = jax.lax.all_to_all(per_expert.reshape(ep, n_local), EXPERT, 0, 0, tiled=True)  # [src, E_l]
    recv_sizes = sizes[:, me]
    send_offsets = _exclusive_cumsum(send_sizes)
    recv_offsets = _exclusive_cumsum(recv_sizes)
    remote_offsets = _exclusive_cumsum(sizes, axis=0)[me]        # where my rows start in each device's buffer
    return_offsets = _exclusive_cumsum(sizes, axis=1)[:, me]     # where each source's rows sat in its own sort

    block = n * min(k, n_local)                   # most rows one device sends another (module docstring)
    if ep == 1:                                   # one device: every row stays, in place (block = m)
        exchange = lambda operand, output, *offsets_and_sizes: operand
    elif ragged:
        exchange = functools.partial(jax.lax.ragged_all_to_all, axis_name=EXPERT)
    else:
        exchange = functools.partial(padded_ragged_all_to_all, axis_name=EXPERT, block=block)

    received = exchange(xs, jnp.zeros((ep * block, x.shape[1]), x.dtype), send_offsets, send_sizes,
                        remote_offsets, recv_sizes)                              # [r, d] by (source, expert)
    local = _local_experts_by_row(recv_counts, received.shape[0])
    by_expert = jnp.argsort(local, stable=True)
    inv_by_expert = inverse_permutation(by_expert)
    group_sizes = recv_counts.sum(0)
    rows = permute_rows(received, by_expert, inv_by_expert)
    h = jax.nn.silu(grouped_matmul(rows, w_gate, group_sizes)) * grouped_matmul(rows, w_up, group_sizes)
    out = grouped_matmul(h, w_down, group_sizes, preferred_element_type=jnp.float32)   # [r, d]
    out = permute_rows(out, inv_by_expert, by_expert)                                  # back to (source, expert)

    back = exchange(out, jnp.zeros((n * k, out.shape[1]), out.dtype), recv_offsets, recv_sizes,
                    return_offsets, send_sizes)                                  # [m, d] in sorted copy order
    y = permute_rows(back, inv_order, order).reshape(n, k, -1)
    y = jnp.einsum("nk,nkd->nd", weights, y)
    return jax.lax.psum(y, TENSOR)


def expert_parallel_experts(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
                            w_up: jax.Array, w_down: jax.Array, *, grouped_matmul: Callable[..., jax.Array],
                            exchange: str = "auto") -> jax.Array:
    """Routed experts on the active mesh (`jax.set_mesh`): x [N, d] -> float32 [N, d].

    Inside a shard_map over the whole mesh (pipeline stages) x, the routing and the weights are this
    device's shards (its tokens, its E / ep experts) and the exchange runs directly.

    experts / weights [N, K] are the routing (global expert ids, combine weights); the expert weights
    [E, d, f] / [E, f, d] are split over "expert" (and their f columns over "tensor"); tokens over the
    data-parallel axes. `exchange`: "ragged" (`jax.lax.ragged_all_to_all`), "padded", or "auto" (ragged
    on GPU / TPU, padded on CPU, whose XLA backend lacks ragged-all-to-all).
    """
    mesh = jax.sharding.get_abstract_mesh()
    ragged = jax.default_backend() in ("gpu", "tpu") if exchange == "auto" else exchange == "ragged"
    if EXPERT in mesh.manual_axes:           # already per device (a pipeline stage): local tokens and experts
        return _dispatch_combine(x, experts, weights, w_gate, w_up, w_down, grouped_matmul=grouped_matmul,
                                 ragged=ragged, n_experts=w_gate.shape[0] * mesh.shape[EXPERT])
    rows = P(batch_axes(mesh))
    body = functools.partial(_dispatch_combine, n_experts=w_gate.shape[0], grouped_matmul=grouped_matmul,
                             ragged=ragged)
    return jax.shard_map(body, mesh=mesh, out_specs=rows, check_vma=False,  # Pallas kernels: no vma types
                         in_specs=(rows, rows, rows, P(EXPERT, None, TENSOR), P(EXPERT, None, TENSOR),
                                   P(EXPERT, TENSOR, None)))(x, experts, weights, w_gate, w_up, w_down)


def experts_held(n_experts: int) -> int:
    """Routed experts whose weights this trace holds: all, or E / ep inside a shard_map that took "expert"."""
    mesh = jax.sharding.get_abstract_mesh()
    return n_experts // mesh.shape[EXPERT] if EXPERT in mesh.manual_axes else n_experts


def mesh_wants_expert_parallel() -> bool:
    """True when traced under a mesh with the expert and tensor axes, either all free (the layer opens its
    own shard_map) or all taken by an enclosing shard_map over the whole mesh (a pipeline stage: x and the
    expert weights are already this device's shards)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {EXPERT, TENSOR} <= set(mesh.axis_names):
        return False
    taken = set(mesh.manual_axes) & {EXPERT, TENSOR, *batch_axes(mesh)}
    return not taken or taken == {EXPERT, TENSOR, *batch_axes(mesh)}
