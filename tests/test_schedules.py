"""Recipes and schedules: the paper's numbers (REFERENCE.md "Training recipe") at the token counts it gives."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.train import schedules
from dsv3_jax.train.recipe import Recipe, RecipeError, load_recipe, recipe_names

T = 10**12
B = 10**9


@pytest.fixture(scope="module")
def paper() -> Recipe:
    return load_recipe("deepseek-v3-pretrain")


@pytest.fixture(scope="module")
def tiny() -> Recipe:
    return load_recipe("tiny-cpu")


def test_shipped_recipes_load():
    assert {"deepseek-v3-pretrain", "tiny-cpu"} <= set(recipe_names())
    for name in recipe_names():
        assert isinstance(load_recipe(name), Recipe)


def test_paper_recipe_fields(paper):
    assert paper.seq_len == 4096 and paper.total_tokens == 14.8 * T
    assert (paper.adam_beta1, paper.adam_beta2, paper.weight_decay, paper.grad_clip_norm) == (0.9, 0.95, 0.1, 1.0)
    assert paper.balance_alpha == 1e-4 and paper.fim_rate == 0.1
    assert isinstance(paper.total_tokens, int)
    # 469B tokens of ramp plus 14.33T at 15360 x 4096 tokens per step
    assert 230_000 < paper.total_steps < 250_000


@pytest.mark.parametrize("step, tokens, expected", [
    (0, 0, 0.0),
    (1000, 1000 * 3072 * 4096, 1.1e-4),             # half-way through the 2K-step warmup
    (2000, 2000 * 3072 * 4096, 2.2e-4),
    (300_000, 5 * T, 2.2e-4),                       # constant phase
    (300_000, 10 * T, 2.2e-4),                      # cosine starts at 10T
    (300_000, 12.15 * T, (2.2e-4 + 2.2e-5) / 2),    # midpoint of the 4.3T cosine
    (300_000, 14.299 * T, 2.2e-5),                  # ~end of the cosine
    (300_000, 14.5 * T, 2.2e-5),                    # 333B plateau
    (300_000, 14.7 * T, 7.3e-6),                    # last 167B
    (300_000, 14.8 * T, 7.3e-6),
])
def test_learning_rate_paper(paper, step, tokens, expected):
    assert float(schedules.learning_rate(paper, step, tokens)) == pytest.approx(expected, rel=1e-4, abs=1e-12)


def test_learning_rate_boundaries_and_shape(paper):
    lr = lambda tokens: float(schedules.learning_rate(paper, 10**6, tokens))
    decay_end = (10 + 4.3) * T
    assert lr(decay_end - 1e9) == pytest.approx(2.2e-5, rel=1e-3)
    assert lr(decay_end + 333 * B - 2e9) == pytest.approx(2.2e-5)
    assert lr(decay_end + 333 * B + 2e9) == pytest.approx(7.3e-6)
    curve = [lr(t) for t in np.linspace(0, 14.8 * T, 200)]
    assert all(a >= b for a, b in zip(curve, curve[1:], strict=False))       # never increases after warmup
    warm = [float(schedules.learning_rate(paper, s, 0)) for s in range(0, 2500, 100)]
    assert warm == sorted(warm) and warm[-1] == pytest.approx(2.2e-4)


def test_schedules_jit(paper):
    """Traced step and float32 tokens: no Python branching on values; 14.5T does not overflow."""
    fn = jax.jit(lambda step, tokens: (schedules.learning_rate(paper, step, tokens),
                                       schedules.mtp_weight(paper, tokens),
                                       schedules.bias_update_speed(paper, tokens)))
    lr, lam, gamma = fn(jnp.int32(500_000), jnp.float32(14.5 * T))
    assert lr.dtype == jnp.float32
    np.testing.assert_allclose([lr, lam, gamma], [2.2e-5, 0.1, 0.0], rtol=1e-5)
    lr, lam, gamma = fn(jnp.int32(1000), jnp.float32(1 * T))
    np.testing.assert_allclose([lr, lam, gamma], [1.1e-4, 0.3, 0.001], rtol=1e-5)


def test_batch_size_ramp(paper):
    assert schedules.batch_size(paper, 0) == 3072
    assert schedules.batch_size(paper, 469 * B) == 15360
    assert schedules.batch_size(paper, 10 * T) == 15360
    assert schedules.batch_size(paper, 469 * B // 2) == (3072 + 15360) // 2
    sizes = [schedules.batch_size(paper, t) for t in range(0, 470 * B, B)]
    assert sizes == sorted(sizes) and all(s % paper.batch_size_quantum == 0 for s in sizes)
    assert isinstance(sizes[0], int) and len(set(sizes)) == 17     # 3072 + k * 768, k = 0..16


def test_steps_for_tokens(tiny):
    seen, steps = 0, 0
    while seen < tiny.total_tokens:                 # what the training loop does
        seen += schedules.batch_size(tiny, seen) * tiny.seq_len
        steps += 1
    assert tiny.total_steps == steps


@pytest.mark.parametrize("tokens, lam, gamma", [(9 * T, 0.3, 0.001), (11 * T, 0.1, 0.001), (14 * T, 0.1, 0.001),
                                                (14.5 * T, 0.1, 0.0)])
def test_mtp_weight_and_bias_speed(paper, tokens, lam, gamma):
    assert float(schedules.mtp_weight(paper, tokens)) == pytest.approx(lam)
    assert float(schedules.bias_update_speed(paper, tokens)) == pytest.approx(gamma)


def test_tiny_recipe_is_the_paper_scaled(paper, tiny):
    """Every token boundary of tiny-cpu is the paper's times one factor, so the schedule keeps its shape."""
    scale = tiny.total_tokens / paper.total_tokens
    for name in ("batch_ramp_tokens", "lr_decay_start_tokens", "lr_decay_tokens", "min_lr_tokens",
                 "mtp_weight_switch_tokens", "bias_update_stop_tokens"):
        assert getattr(tiny, name) == pytest.approx(getattr(paper, name) * scale, rel=1e-3), name
    assert 125 <= tiny.total_steps <= 175
    lrs = [float(schedules.learning_rate(tiny, s, t)) for s, t in ((10**4, 300_000), (10**4, 486_000),
                                                                  (10**4, 580_000), (10**4, 590_000))]
    assert lrs[0] == pytest.approx(tiny.peak_lr) and tiny.min_lr < lrs[1] < tiny.peak_lr
    assert lrs[2:] == pytest.approx([tiny.min_lr, tiny.final_lr])


def _write(tmp_path, raw):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    return path


def test_recipe_errors_name_field_and_file(tmp_path, tiny):
    raw = dataclasses.asdict(tiny)
    good = load_recipe(_write(tmp_path, {**raw, "_comment": "comments are allowed"}))
    assert good == tiny
    assert load_recipe("tiny-cpu", peak_lr=1e-3).peak_lr == 1e-3
    assert load_recipe(_write(tmp_path, {**raw, "total_tokens": 5.92e5})).total_tokens == 592_000
    cases = [({**raw, "peak_lr_typo": 1.0}, "peak_lr_typo"),
             ({k: v for k, v in raw.items() if k != "seq_len"}, "seq_len"),
             ({**raw, "seq_len": 12.5}, "seq_len"),
             ({**raw, "fim_rate": 1.5}, "fim_rate"),
             ({**raw, "warmup_steps": "20"}, "warmup_steps"),
             ({**raw, "batch_size_quantum": 3}, "batch_size_quantum"),
             ({**raw, "total_tokens": 1000}, "total_tokens")]
    for bad, field in cases:
        path = _write(tmp_path, bad)
        with pytest.raises(RecipeError, match=field) as err:
            load_recipe(path)
        assert str(path) in str(err.value)
    with pytest.raises(RecipeError, match="no recipe named"):
        load_recipe("no-such-recipe")
    with pytest.raises(RecipeError, match="peak_lr"):
        dataclasses.replace(tiny, peak_lr=-1.0)
