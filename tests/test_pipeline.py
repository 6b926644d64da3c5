"""Pipeline schedules as data, the bubble formulas, stage partitioning, and the shard_map executor proved
against the unpipelined training loss and gradients (8 emulated CPU devices)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.parallel import pipeline, pipeline_exec, stages
from dsv3_jax.parallel.mesh import ParallelConfig, make_mesh
from dsv3_jax.train.step import Hyper, compute_losses

# F = B - W (forward as long as the input-gradient backward), as in the DualPipe README's figures.
COSTS = (pipeline.Costs(F=1, B=2, W=1), pipeline.Costs(F=1, B=2, W=1, FB=2.5), pipeline.Costs(F=2, B=3, W=1, FB=4))


@pytest.mark.parametrize("name", pipeline.SCHEDULES)
def test_every_schedule_is_valid_for_pp8(name):
    for n_mb in (16, 20, 32):
        pipeline.validate(pipeline.build(name, 8, n_mb))


@pytest.mark.parametrize("name", pipeline.SCHEDULES)
def test_bubble_from_the_table_equals_the_formula(name):
    for pp in (4, 8, 16):
        for n_mb in (2 * pp, 2 * pp + 6, 4 * pp):
            schedule = pipeline.build(name, pp, n_mb)
            for costs in COSTS:
                assert pipeline.bubble(schedule, costs) == pipeline.bubble_formula(name, pp, costs)


def test_activation_and_parameter_multiples_match_the_dualpipe_table():
    for pp in (4, 8, 16):
        held = {name: pipeline.peak_activations(pipeline.build(name, pp, 3 * pp)) for name in pipeline.SCHEDULES}
        assert held == {"gpipe": 3 * pp, "1f1b": pp, "zb1p": pp, "dualpipe": pp + 1}
    assert pipeline.build("dualpipe", 4, 8).stages_of(1) == (1, 2)


def test_validator_rejects_broken_tables():
    good = pipeline.build("1f1b", 4, 8)
    dropped = dataclasses.replace(good, slots=(good.slots[0][:-1],) + good.slots[1:])
    with pytest.raises(pipeline.ScheduleError, match="BW x0"):
        pipeline.validate(dropped)
    swapped = list(good.slots[3])
    swapped[0], swapped[1] = swapped[1], swapped[0]          # backward before its forward
    with pytest.raises(pipeline.ScheduleError, match="deadlock"):
        pipeline.validate(dataclasses.replace(good, slots=good.slots[:3] + (tuple(swapped),)))
    with pytest.raises(pipeline.ScheduleError, match="n_mb >= 2 pp"):
        pipeline.build("dualpipe", 4, 6)


def test_671b_splits_61_layers_and_mtp_over_16_balanced_stages():
    cfg = dsv3_jax.load_config("deepseek-v3-671b")
    specs = stages.partition(cfg, 16)
    sizes = [s.stop - s.start for s in specs]
    assert sum(sizes) == 61 and min(sizes) >= 1 and specs[0].first and specs[-1].last
    assert sizes[-1] < max(sizes)                         # the head and MTP weigh on the last stage
    costs = stages.stage_costs(cfg, specs)
    assert max(costs) < 1.3 * sum(costs) / 16


@pytest.fixture(scope="module")
def reference(tiny_cfg, tiny_params):
    tokens = jax.random.randint(jax.random.key(1), (16, 9), 0, tiny_cfg.vocab_size)
    hyper = Hyper(jnp.float32(1e-3), jnp.float32(0.3), jnp.float32(1e-3), jnp.float32(0.1))
    grad_fn = jax.value_and_grad(lambda p: compute_losses(tiny_cfg, p, tokens, hyper), has_aux=True)
    return tokens, hyper, jax.jit(grad_fn)(tiny_params)


@pytest.mark.parametrize("pipe,data,expert,n_mb", [(4, 1, 1, 8), (2, 2, 2, 4)])
@pytest.mark.parametrize("name", pipeline.SCHEDULES)
def test_pipelined_loss_and_gradients_equal_the_unpipelined_model(tiny_cfg, tiny_params, reference, name, pipe, data,
                                                                  expert, n_mb):
    """Every schedule on pipe=4 and pipe=2 x data=2 x expert=2 (experts split over "expert",
    tokens moved by the all-to-all inside each stage): loss, metrics and expert loads equal the unpipelined
    model's, every gradient within 1e-5 of its largest element."""
    tokens, hyper, ((ref_total, (ref_metrics, ref_loads)), ref_grads) = reference
    mesh = make_mesh(ParallelConfig(pipe=pipe, data=data, expert=expert))
    fn = pipeline_exec.pipelined_value_and_grad(tiny_cfg, mesh, pipeline.build(name, pipe, n_mb))
    with jax.set_mesh(mesh):
        (total, (metrics, loads)), grads = jax.jit(fn)(tiny_params, tokens, hyper)
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-6)
    for key in ref_loads:
        np.testing.assert_array_equal(loads[key], ref_loads[key])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
        scale = float(jnp.max(jnp.abs(ref))) or 1.0
        assert float(jnp.max(jnp.abs(g - ref))) <= 1e-5 * scale, jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", pipeline.SCHEDULES)
def test_buffer_slots_do_not_grow_with_micro_batches(name):
    """The executor's activation / gradient pools are as deep as the schedule's live tensors: the same for
    2 pp and 4 pp micro-batches (except GPipe, which holds every forward before the first backward)."""
    for pp in (2, 4, 8):
        few, many = (pipeline_exec.step_table(pipeline.build(name, pp, n)) for n in (2 * pp, 4 * pp))
        if name == "gpipe":
            assert (few.act_slots, many.act_slots) == (2 * pp, 4 * pp)
        else:
            assert (few.act_slots, few.grad_slots) == (many.act_slots, many.grad_slots)
            assert few.act_slots <= 2 * pp and few.grad_slots <= pp


def test_schedule_for_names_the_fix():
    assert pipeline_exec.schedule_for("dualpipe", 4, 16, 2).n_mb == 8
    assert pipeline_exec.schedule_for("1f1b", 4, 16, 2, microbatches=4).n_mb == 4
    with pytest.raises(pipeline_exec.PipelineError, match="dualpipe needs even pp and even n_mb >= 2 pp"):
        pipeline_exec.schedule_for("dualpipe", 4, 8, 2)
    with pytest.raises(pipeline_exec.PipelineError, match="pick a divisor of 8"):
        pipeline_exec.schedule_for("1f1b", 4, 16, 2, microbatches=3)
    with pytest.raises(pipeline_exec.PipelineError, match="unknown schedule"):
        pipeline_exec.schedule_for("interleaved", 4, 16, 2)
