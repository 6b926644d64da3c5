"""The training loop end to end on a small synthetic corpus: resume, divergence, signals, balancing, metrics."""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.parallel.mesh import ParallelConfig
from dsv3_jax.train import schedules
from dsv3_jax.train.checkpoint import Checkpointer
from dsv3_jax.train.metrics import read_metrics
from dsv3_jax.train.optimizer import make_optimizer
from dsv3_jax.train.recipe import load_recipe
from dsv3_jax.train.step import Hyper, init_state, train_step
from dsv3_jax.train.trainer import TrainingError, train

# A 20-step run of 4 -> 8 sequences of 32 tokens: the batch ramp, an eval and two checkpoints fall inside it.
RECIPE_OVERRIDES = dict(seq_len=32, total_tokens=4096, batch_size_start=4, batch_size_end=8, batch_ramp_tokens=640,
                        batch_size_quantum=4, warmup_steps=5, lr_decay_start_tokens=2048, lr_decay_tokens=1024,
                        min_lr_tokens=512, mtp_weight_switch_tokens=2048, bias_update_stop_tokens=3584,
                        log_every=1, eval_every=10, eval_batches=2, eval_batch_size=4, checkpoint_every=10)
# Batches of 4 split over 4 of the 8 emulated devices: resume and the checkpoints run on sharded state.
MESH = "data=4"
QUIET_ON_MESH = dict(progress=False, parallel=ParallelConfig.parse(MESH))
LOGGED_KEYS = {"step", "tokens", "loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "max_vio", "max_vio_per_layer",
               "tokens_per_s", "mfu", "batch_size"}


@pytest.fixture(scope="module")
def cfg():
    return dsv3_jax.load_config("tiny", vocab_size=512, num_hidden_layers=2, dtype="float32")


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("tiny-cpu", **RECIPE_OVERRIDES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL corpus of 300 small code-like documents (numbers, strings, comments) with a held-out split."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "value", "count", "index", "total", "name", "items"]
    lines = []
    for i in range(300):
        body = "\n".join(f"    {rng.choice(words)}_{j} = {rng.integers(0, 1000)}  # {rng.choice(words)}"
                         for j in range(int(rng.integers(3, 12))))
        lines.append(json.dumps({"text": f"def {rng.choice(words)}_{i}():\n{body}\n    return '{i}'\n"}))
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_resumed_run_sees_the_same_data_and_gives_the_same_losses(cfg, recipe, corpus, tmp_path):
    full = train(cfg, recipe, tmp_path / "full", steps=20, data=corpus, **QUIET_ON_MESH)
    train(cfg, recipe, tmp_path / "split", steps=10, data=corpus, **QUIET_ON_MESH)
    resumed = train(cfg, recipe, tmp_path / "split", steps=20, data=corpus, **QUIET_ON_MESH)

    uninterrupted, split = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert sorted(uninterrupted) == sorted(split) == list(range(1, 21))
    np.testing.assert_allclose([split[s] for s in range(1, 21)], [uninterrupted[s] for s in range(1, 21)],
                               rtol=1e-6)
    assert resumed.step == full.step == 20 and resumed.tokens == full.tokens
    # the batch ramp 4 -> 8 happened inside the run and was followed on resume
    assert full.tokens == sum(schedules.batch_size(recipe, t) for t in _tokens_before_each_step(recipe, 20)) * 32
    assert resumed.heldout_loss == pytest.approx(full.heldout_loss, rel=1e-6)
    assert full.heldout_loss < full.unigram_loss
    assert Checkpointer(tmp_path / "split" / "checkpoints").all_steps() == [10, 20]


def _tokens_before_each_step(recipe, steps):
    seen = []
    tokens = 0
    for _ in range(steps):
        seen.append(tokens)
        tokens += schedules.batch_size(recipe, tokens) * recipe.seq_len
    return seen


def test_metrics_jsonl_and_tensorboard_have_every_key(cfg, recipe, corpus, tmp_path):
    train(cfg, recipe, tmp_path, steps=10, data=corpus, **QUIET_ON_MESH)
    records = read_metrics(tmp_path)
    logged = [r for r in records if "loss" in r]
    assert len(logged) == 10 and all(set(r) >= LOGGED_KEYS for r in logged)
    assert all(np.isfinite(r[k]) for r in logged for k in ("loss", "mtp_loss", "aux_loss", "grad_norm", "max_vio"))
    assert len(logged[0]["max_vio_per_layer"]) == cfg.n_moe_layers + cfg.num_nextn_predict_layers
    evals = [r for r in records if "heldout_loss" in r]
    assert evals and all(r["heldout_bpb"] > 0 for r in evals)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()


def test_non_finite_loss_stops_with_the_last_good_checkpoint_intact(cfg, recipe, corpus, tmp_path, monkeypatch):
    real = schedules.learning_rate
    # an infinite learning rate at step 12 makes the parameters non-finite, so step 13's loss is NaN
    monkeypatch.setattr(schedules, "learning_rate",
                        lambda r, step, tokens: jnp.inf if step == 12 else real(r, step, tokens))
    with pytest.raises(TrainingError, match=r"step 14: .* not finite.*last good checkpoint is step 10"):
        train(cfg, recipe, tmp_path, steps=20, data=corpus, **QUIET_ON_MESH)

    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [10]
    monkeypatch.setattr(schedules, "learning_rate", real)
    resumed = train(cfg, recipe, tmp_path, steps=12, data=corpus, **QUIET_ON_MESH)   # restores step 10 and goes on
    assert resumed.step == 12 and np.isfinite(resumed.heldout_loss)


def test_train_step_leaves_the_state_untouched_when_the_loss_is_not_finite(cfg, recipe):
    params = dsv3_jax.init_params(cfg, jax.random.key(0))
    params["norm"]["scale"] = params["norm"]["scale"].at[0].set(jnp.nan)
    optimizer = make_optimizer(recipe)
    state = init_state(params, optimizer)
    hyper = Hyper(*(jnp.float32(v) for v in (1e-3, 0.3, 0.01, 1e-4)))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, cfg.vocab_size)
    new, metrics = jax.jit(functools.partial(train_step, cfg, optimizer))(state, tokens, hyper)
    assert not bool(metrics["finite"])
    assert int(new.step) == 0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new, state)


def test_bias_balancing_removes_a_skewed_routing_and_gamma_zero_keeps_it(cfg, recipe):
    """Every layer starts with expert 0 favoured by +0.2; only the routing biases move (LR 0)."""
    params = dsv3_jax.init_params(cfg, jax.random.key(0))
    for mlp in (params["moe_layers"]["mlp"], params["mtp_0"]["block"]["mlp"]):
        mlp["e_score_correction_bias"] = mlp["e_score_correction_bias"].at[..., 0].add(0.2)
    optimizer = make_optimizer(recipe)
    step = jax.jit(functools.partial(train_step, cfg, optimizer))
    tokens = jax.random.randint(jax.random.key(1), (8, 33), 0, cfg.vocab_size)

    def max_vio_trace(gamma):
        state = init_state(params, optimizer)
        hyper = Hyper(*(jnp.float32(v) for v in (0.0, 0.3, gamma, 0.0)))
        trace = []
        for _ in range(40):
            state, metrics = step(state, tokens, hyper)
            trace.append(float(metrics["max_vio"]))
        return trace

    balanced, skewed = max_vio_trace(0.01), max_vio_trace(0.0)
    top_k, experts = cfg.num_experts_per_tok, cfg.n_routed_experts
    assert skewed[0] == pytest.approx(experts / top_k - 1, abs=1e-6)     # expert 0 takes every token
    assert min(skewed) == pytest.approx(skewed[0])                       # without balancing nothing changes
    assert max(balanced[-10:]) < 0.5 * skewed[0]


def _cli(*args, **popen):
    code = "from dsv3_jax.train.cli import run; run()"
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def test_cli_reports_bad_input_by_name(tmp_path):
    out, _ = _cli("--config", "no-such-config", "--workdir", str(tmp_path)).communicate(timeout=120)
    assert "dsv3-train: error:" in out and "no-such-config" in out
    bad = tmp_path / "recipe.json"
    bad.write_text(json.dumps({"seq_len": 0}))
    out, _ = _cli("--recipe", str(bad), "--workdir", str(tmp_path)).communicate(timeout=120)
    assert "dsv3-train: error:" in out and "recipe.json" in out


def test_cli_fp8_flag_trains_in_fp8(cfg, corpus, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(cfg.to_hf_dict()))
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps(dataclasses.asdict(load_recipe("tiny-cpu", **RECIPE_OVERRIDES))))
    out, _ = _cli("--config", str(config_path), "--recipe", str(recipe_path), "--data", corpus, "--fp8", "--steps", "2",
                  "--mesh", MESH, "--noprogress", "--workdir", str(tmp_path / "run")).communicate(timeout=300)
    assert "FP8 on" in out and "done at step 2" in out, out
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run") if "loss" in r)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(cfg, corpus, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(dict(cfg.to_hf_dict(), dtype="float32")))
    recipe_path = tmp_path / "recipe.json"
    recipe = load_recipe("tiny-cpu", **dict(RECIPE_OVERRIDES, checkpoint_every=1000))
    recipe_path.write_text(json.dumps(dataclasses.asdict(recipe)))
    workdir = tmp_path / "run"
    proc = _cli("--config", str(config_path), "--dtype", "float32", "--recipe", str(recipe_path), "--data", corpus,
                "--workdir", str(workdir), "--steps", "100000", "--noprogress", "--mesh", MESH,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 240
    while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out and "stopped by signal" in out
    steps = Checkpointer(workdir / "checkpoints").all_steps()
    assert len(steps) == 1 and f"checkpoint: {workdir / 'checkpoints' / str(steps[0])}" in out


# pipe=4 x data=2 DualPipe needs an even number >= 8 of micro-batches of 2 rows (one per data shard): batch 16.
PIPELINE_OVERRIDES = dict(RECIPE_OVERRIDES, batch_size_start=16, batch_size_end=16, batch_size_quantum=16,
                          eval_batch_size=8)


def test_dualpipe_over_pipe4_data2_gives_the_data8_losses(corpus, tmp_path):
    """`dsv3-train --mesh pipe=4,data=2 --pipeline-schedule dualpipe` against `--mesh data=8`: the same per-step
    losses and gradient norms (float32), the same held-out loss."""
    cfg = dsv3_jax.load_config("tiny", vocab_size=512, dtype="float32")
    recipe = load_recipe("tiny-cpu", **PIPELINE_OVERRIDES)
    runs = {mesh: train(cfg, recipe, tmp_path / mesh, steps=3, data=corpus, progress=False,
                        parallel=ParallelConfig.parse(mesh), pipeline_schedule="dualpipe")
            for mesh in ("pipe=4,data=2", "data=8")}
    piped, flat = ({r["step"]: r for r in read_metrics(run.workdir) if "loss" in r} for run in runs.values())
    assert sorted(piped) == sorted(flat) == [1, 2, 3]
    for step in flat:
        for key in ("loss", "mtp_loss", "aux_loss", "grad_norm"):
            np.testing.assert_allclose(piped[step][key], flat[step][key], rtol=2e-5, err_msg=f"step {step} {key}")
    np.testing.assert_allclose(runs["pipe=4,data=2"].heldout_loss, runs["data=8"].heldout_loss, rtol=2e-5)


def test_pipeline_batch_too_small_for_the_schedule_is_named(cfg, corpus, tmp_path):
    recipe = load_recipe("tiny-cpu", **RECIPE_OVERRIDES)          # batches 4 -> 8: 2 -> 4 micro-batches
    with pytest.raises(TrainingError, match="dualpipe needs even pp and even n_mb >= 2 pp"):
        train(cfg, recipe, tmp_path, steps=1, data=corpus, progress=False,
              parallel=ParallelConfig.parse("pipe=2,data=2"), pipeline_schedule="dualpipe")
    out, _ = _cli("--pipeline-schedule", "interleaved", "--workdir", str(tmp_path)).communicate(timeout=120)
    assert "pipeline_schedule" in out and "interleaved" in out
    out, _ = _cli("--help").communicate(timeout=120)
    assert "--pipeline_schedule: <gpipe|1f1b|zb1p|dualpipe>" in out and "--microbatches" in out and "--mesh" in out
