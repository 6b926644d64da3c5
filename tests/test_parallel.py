"""Meshes on 8 emulated CPU devices give the single-device answer: forward, gradients, training steps, ZeRO-1
memory, all-to-all expert dispatch that drops no token."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.model.functional import apply
from dsv3_jax.parallel import mesh as pm
from dsv3_jax.parallel.expert_parallel import expert_parallel_experts, padded_ragged_all_to_all
from dsv3_jax.train.optimizer import make_optimizer
from dsv3_jax.train.recipe import load_recipe
from dsv3_jax.train.step import Hyper, compute_losses, init_state, sharded_steps, train_step

MESHES = ["data=8", "expert=8", "data=2,expert=4", "data=2,expert=2,tensor=2"]
HYPER = Hyper(*(jnp.float32(v) for v in (1e-3, 0.3, 0.01, 1e-4)))


@pytest.fixture(scope="module")
def cfg():
    """One MoE decoder layer and one MoE MTP block: every sharded path, little to compile."""
    return dsv3_jax.load_config("tiny", vocab_size=512, num_hidden_layers=1, first_k_dense_replace=0, dtype="float32")


@pytest.fixture(scope="module")
def params(cfg):
    return dsv3_jax.init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens(cfg):
    return jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.vocab_size)


@pytest.fixture(scope="module")
def optimizer():
    return make_optimizer(load_recipe("tiny-cpu"))


def _logits_and_grads(cfg, params, tokens):
    logits = apply(cfg, params, tokens[:, :-1], with_mtp=False).logits
    grads = jax.grad(lambda p: compute_losses(cfg, p, tokens, HYPER)[0])(params)
    return logits, grads


def _on_mesh(cfg, text, params, tokens):
    """Logits and gradients with params in the compute layout of `text`, tokens split over the data axes."""
    mesh = pm.make_mesh(pm.ParallelConfig.parse(text))
    layouts = pm.param_layouts(cfg, mesh, params)
    with pm.use_mesh(mesh):
        placed = jax.device_put(params, layouts.compute)
        rows = jax.device_put(tokens, pm.batch_sharding(mesh))
        return jax.jit(functools.partial(_logits_and_grads, cfg))(placed, rows)


@pytest.fixture(scope="module")
def reference(cfg, params, tokens):
    return jax.jit(functools.partial(_logits_and_grads, cfg))(params, tokens)


def _assert_close(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5), got, want)


@pytest.mark.parametrize("text", MESHES)
def test_logits_and_gradients_on_a_mesh_equal_the_single_device_run(cfg, params, tokens, reference, text):
    _assert_close(_on_mesh(cfg, text, params, tokens), reference)


@pytest.fixture(scope="module")
def reference_losses(cfg, params, tokens, optimizer):
    state = init_state(params, optimizer)
    step = jax.jit(functools.partial(train_step, cfg, optimizer))
    losses = []
    for _ in range(3):
        state, m = step(state, tokens, HYPER)
        losses.append(float(m["total_loss"]))
    return losses


@pytest.mark.parametrize("text", MESHES)
def test_three_training_steps_on_a_mesh_give_the_single_device_losses(cfg, params, tokens, optimizer,
                                                                     reference_losses, text):
    mesh = pm.make_mesh(pm.ParallelConfig.parse(text))
    steps = sharded_steps(cfg, optimizer, mesh)
    losses = []
    with pm.use_mesh(mesh):
        state = jax.device_put(init_state(params, optimizer), steps.state_shardings)
        rows = jax.device_put(tokens, pm.batch_sharding(mesh))
        for _ in range(3):
            state, m = steps.train(state, rows, HYPER)
            losses.append(float(m["total_loss"]))
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


def _shard_bytes(tree):
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def _bytes(tree):
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def test_expert_weights_split_over_ep_and_optimizer_state_over_the_data_parallel_size(cfg, tokens, optimizer):
    """The jitted sharded init, then the compiled step's layout and per-device memory."""
    mesh = pm.make_mesh(pm.ParallelConfig.parse("data=2,expert=4"))
    steps = sharded_steps(cfg, optimizer, mesh)
    with pm.use_mesh(mesh):
        state = steps.init(jax.random.key(0))
        compiled = steps.train.lower(state, jax.device_put(tokens, pm.batch_sharding(mesh)), HYPER).compile()
    layouts = pm.param_layouts(cfg, mesh, state.params)
    w_gate = state.params["moe_layers"]["mlp"]["w_gate"]                       # [layers, E, embed, expert_mlp]
    assert layouts.compute["moe_layers"]["mlp"]["w_gate"].shard_shape(w_gate.shape)[1] == cfg.n_routed_experts // 4
    dp = pm.data_parallel_size(mesh)
    assert dp == 8
    # ZeRO-1: master weights and both Adam moments, 1/8 per device (up to a few small unsplittable leaves)
    adam = state.opt_state[2]
    for tree in (state.params, adam.mu, adam.nu):
        assert _shard_bytes(tree) <= 1.02 * _bytes(tree) / dp
    stats = compiled.memory_analysis()
    state_bytes = _bytes(state)
    assert stats.argument_size_in_bytes <= 1.02 * state_bytes / dp + tokens.nbytes + 64
    assert stats.argument_size_in_bytes >= _shard_bytes(state)

    hlo = compiled.as_text()
    assert "all-to-all" in hlo
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    gathers = [line for line in hlo.splitlines() if "all-gather" in line]
    assert gathers                                                             # ZeRO-1: state -> compute layout
    assert not [g for g in gathers if f"[1,{e},{d},{f}]" in g or f"[1,{e},{f},{d}]" in g]   # all experts at once


def test_all_tokens_routed_to_one_expert_drop_nothing_and_match_the_reference(cfg, params, tokens):
    """A huge routing bias on expert 0 sends every token there (one device receives every copy)."""
    skewed = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[..., 0].add(100.0) if "e_score_correction_bias" in jax.tree_util.keystr(path) else x,
        params)
    out = apply(cfg, skewed, tokens[:, :-1])
    counts = out.moe["moe_layers"].counts.sum(axis=(0, 1))
    assert int(counts[0]) == tokens[:, :-1].size                              # every token chose expert 0
    dense = jax.jit(functools.partial(_logits_and_grads, cfg.replace(moe_impl="dense")))(skewed, tokens)
    _assert_close(_on_mesh(cfg, "expert=8", skewed, tokens), dense)


def test_padded_exchange_moves_the_rows_ragged_all_to_all_would():
    """Device i sends i+1 rows to every device j, which stores them after those of devices < i."""
    mesh = jax.make_mesh((4,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    ep, block = 4, 4

    def body(x):
        me = jax.lax.axis_index("expert")
        sizes = jnp.full((ep,), me + 1, jnp.int32)
        offsets = jnp.zeros((ep,), jnp.int32)                                  # every block is the same rows
        before = jnp.full((ep,), me * (me + 1) // 2, jnp.int32)
        recv = jnp.arange(1, ep + 1, dtype=jnp.int32)
        return padded_ragged_all_to_all(x, jnp.full((12, 1), -1.0), offsets, sizes, before, recv,
                                        axis_name="expert", block=block)

    x = jnp.arange(16.0).reshape(16, 1)                                        # device i holds 4i .. 4i+3
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=jax.P("expert"), out_specs=jax.P("expert")))(
        jax.device_put(x, jax.NamedSharding(mesh, jax.P("expert"))))
    expected = np.concatenate([4 * i + np.arange(i + 1) for i in range(ep)] + [[-1.0, -1.0]])
    for j in range(ep):
        np.testing.assert_array_equal(np.asarray(out)[12 * j:12 * (j + 1), 0], expected)


def test_mesh_strings_parse_and_bad_ones_are_named():
    parallel = pm.ParallelConfig.parse("data=2, expert=-1")
    assert parallel.resolve(8) == {"pipe": 1, "data": 2, "expert": 4, "tensor": 1}
    assert pm.ParallelConfig.parse("").resolve(8)["data"] == 8
    for text, match in [("data=2,gpu=4", "'gpu=4' is not AXIS=SIZE"), ("data=x", "must be an integer"),
                        ("data=-1,expert=-1", "at most one"), ("data=2,data=4", "given twice"),
                        ("data=0", "must be >= 1")]:
        with pytest.raises(pm.ParallelConfigError, match=match):
            pm.ParallelConfig.parse(text)
    with pytest.raises(pm.ParallelConfigError, match="needs 16 devices"):
        pm.ParallelConfig.parse("data=4,expert=4").resolve(8)
    with pytest.raises(pm.ParallelConfigError, match="not divisible by 3"):
        pm.ParallelConfig.parse("data=3,expert=-1").resolve(8)


def test_ragged_exchange_lowers_forward_and_backward_to_ragged_all_to_all(cfg):
    """GPU / TPU exchange: XLA:CPU cannot compile ragged-all-to-all, so check the lowered program only."""
    mesh = pm.make_mesh(pm.ParallelConfig.parse("data=2,expert=4"))
    e, d, f, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (32, d))
    experts = jax.random.randint(keys[1], (32, k), 0, e)
    weights = jnp.full((32, k), 0.5)
    w_in = jax.random.normal(keys[2], (e, d, f))
    w_out = jax.random.normal(keys[3], (e, f, d))

    def loss(x, w_gate, w_up, w_down):
        y = expert_parallel_experts(x, experts, weights, w_gate, w_up, w_down, grouped_matmul=jax.lax.ragged_dot,
                                    exchange="ragged")
        return jnp.sum(y ** 2)

    with pm.use_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, w_in, w_in, w_out).as_text()
    assert text.count("ragged_all_to_all") >= 4          # dispatch and return, forward and transposed
    assert "all_gather" in text                          # the [ep, ep] send sizes, int32
    assert not re.search(r"all_gather\"[^\n]*-> tensor<[0-9x]*xf32>", text)     # never weights or tokens
