"""dsv3_jax.analysis: per-token routing traces agree with the model, absorbed MLA equals naive MLA, loaders."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax import analysis
from dsv3_jax.data import train_tokenizer
from dsv3_jax.train.checkpoint import Checkpointer
from dsv3_jax.train.optimizer import make_optimizer
from dsv3_jax.train.recipe import load_recipe
from dsv3_jax.train.step import init_state


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return jax.random.randint(jax.random.key(1), (3, 24), 0, tiny_cfg.vocab_size)


@pytest.fixture(scope="module")
def trained_like_params(tiny_cfg, tiny_params):
    """Tiny params with larger router weights and nonzero biases, so routing is far from ties and biases matter."""
    mlp = tiny_params["moe_layers"]["mlp"]
    keys = jax.random.split(jax.random.key(7), 2)
    mlp = dict(mlp, gate=jax.random.normal(keys[0], mlp["gate"].shape) * 0.3,
               e_score_correction_bias=jax.random.normal(keys[1], mlp["e_score_correction_bias"].shape) * 0.1)
    return dict(tiny_params, moe_layers=dict(tiny_params["moe_layers"], mlp=mlp))


def test_routing_trace_counts_equal_the_models_counts(tiny_cfg, trained_like_params, tokens):
    trace = analysis.routing_trace(tiny_cfg, trained_like_params, tokens)
    n_moe, (b, t), k, e = tiny_cfg.n_moe_layers, tokens.shape, tiny_cfg.num_experts_per_tok, tiny_cfg.n_routed_experts
    assert trace.experts.shape == trace.plain_experts.shape == trace.weights.shape == (n_moe, b, t, k)
    assert trace.scores.shape == (n_moe, b, t, e)
    assert trace.shared_norm.shape == trace.routed_norm.shape == (n_moe, b, t)
    np.testing.assert_array_equal(trace.counts(), analysis.model_counts(tiny_cfg, trained_like_params, tokens))
    np.testing.assert_allclose(trace.weights.sum(-1), tiny_cfg.routed_scaling_factor, rtol=1e-5)
    assert np.all(trace.shared_norm > 0) and np.all(trace.routed_norm > 0)


def test_group_limit_keeps_the_chosen_experts_inside_topk_group_groups(tiny_cfg, trained_like_params, tokens):
    trace = analysis.routing_trace(tiny_cfg, trained_like_params, tokens)
    per_group = tiny_cfg.n_routed_experts // tiny_cfg.n_group
    groups = np.asarray(trace.experts) // per_group
    assert max(len(set(row)) for row in groups.reshape(-1, groups.shape[-1])) <= tiny_cfg.topk_group
    changed = trace.group_limit_changed()
    biased = np.asarray(trace.scores) + np.asarray(trained_like_params["moe_layers"]["mlp"]["e_score_correction_bias"])[
        :, None, None, :]
    total = lambda experts: np.take_along_axis(biased, np.asarray(experts), -1).sum(-1)
    # plain top-k maximizes the biased affinity sum; the group limit gives up some of it exactly where it changes
    assert np.all(total(trace.plain_experts)[changed] > total(trace.experts)[changed])
    np.testing.assert_allclose(total(trace.plain_experts)[~changed], total(trace.experts)[~changed], rtol=1e-6)
    assert 0 < changed.mean() < 1


def test_without_groups_the_choice_is_plain_topk(tiny_cfg, trained_like_params, tokens):
    greedy = tiny_cfg.replace(n_group=1, topk_group=1)
    trace = analysis.routing_trace(greedy, trained_like_params, tokens)
    assert not trace.group_limit_changed().any()


def test_no_shared_experts_gives_zero_shared_norm(tiny_cfg, tokens):
    cfg = tiny_cfg.replace(n_shared_experts=0)
    params = dsv3_jax.init_params(cfg, jax.random.key(0))
    trace = analysis.routing_trace(cfg, params, tokens)
    assert np.all(trace.shared_norm == 0) and np.all(trace.routed_norm > 0)
    np.testing.assert_array_equal(trace.counts(), analysis.model_counts(cfg, params, tokens))


@pytest.mark.parametrize("variant", ["tiny", "no_q_lora", "yarn"])
def test_absorbed_attention_equals_naive_attention(tiny_cfg, variant):
    cfg = {"tiny": tiny_cfg,
           "no_q_lora": tiny_cfg.replace(q_lora_rank=None),
           "yarn": tiny_cfg.replace(rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                                                  "mscale": 1.0, "mscale_all_dim": 1.0})}[variant]
    params = dsv3_jax.init_params(cfg, jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (2, 40, cfg.hidden_size))
    for layer in range(cfg.num_hidden_layers):
        attn = analysis.layer_params(cfg, params, layer)["self_attn"]
        naive, absorbed = analysis.naive_attention(cfg, attn, x), analysis.absorbed_attention(cfg, attn, x)
        scale = float(jnp.abs(naive).max())
        np.testing.assert_allclose(absorbed / scale, naive / scale, atol=1e-5)


def test_layer_params_picks_from_the_right_stack(tiny_cfg, tiny_params):
    first_moe = analysis.layer_params(tiny_cfg, tiny_params, tiny_cfg.n_dense_layers)
    np.testing.assert_array_equal(first_moe["mlp"]["gate"], tiny_params["moe_layers"]["mlp"]["gate"][0])
    assert "gate" not in analysis.layer_params(tiny_cfg, tiny_params, 0)["mlp"]
    with pytest.raises(ValueError, match="outside"):
        analysis.layer_params(tiny_cfg, tiny_params, tiny_cfg.num_hidden_layers)


def test_mla_cache_bytes_of_deepseek_v3():
    size = analysis.mla_cache_bytes(dsv3_jax.load_config("deepseek-v3-671b"))
    assert size.values_mla == 512 + 64 == 576
    assert size.values_mha == 128 * (192 + 128)
    assert size.bytes_mla == 576 * 61 * 2 and size.bytes_mha == 128 * 320 * 61 * 2


def test_python_token_kinds():
    source = 'def f(x):\n    """Doc."""\n    s = "text"  # a comment\n    return x + 0x1F\n'
    tokenizer = train_tokenizer([source] * 4, vocab_size=300)
    ids, kinds = analysis.python_token_kinds(tokenizer, source)
    assert tokenizer.decode(ids) == source and len(kinds) == len(ids)
    by_kind = {}
    for i, k in zip(ids, kinds, strict=True):
        by_kind.setdefault(analysis.TOKEN_KINDS[k], "")
        by_kind[analysis.TOKEN_KINDS[k]] += tokenizer.decode([i])
    assert "Doc." in by_kind["docstring"] and "text" in by_kind["string"] and "comment" in by_kind["comment"]
    assert "0x1F" in by_kind["number"].replace(" ", "") and "return" in by_kind["keyword"]
    assert "Doc" not in by_kind.get("string", "")


def test_python_token_kinds_survives_broken_source():
    tokenizer = train_tokenizer(["x = (1,\n"] * 4, vocab_size=270)
    ids, kinds = analysis.python_token_kinds(tokenizer, "x = (1,\n")
    assert len(ids) == len(kinds) > 0


def test_load_model_and_bias_history_from_a_workdir(tiny_cfg, tiny_params, tmp_path):
    recipe = load_recipe("tiny-cpu")
    (tmp_path / "config.json").write_text(json.dumps(tiny_cfg.to_hf_dict()))
    (tmp_path / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe)))
    train_tokenizer(["def f():\n    return 1\n"] * 4, vocab_size=270).save(tmp_path / "tokenizer")
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    biases = []
    for step in (10, 20):
        bias = jnp.full_like(tiny_params["moe_layers"]["mlp"]["e_score_correction_bias"], step / 100)
        mlp = dict(tiny_params["moe_layers"]["mlp"], e_score_correction_bias=bias)
        params = dict(tiny_params, moe_layers=dict(tiny_params["moe_layers"], mlp=mlp))
        ckpt.save(step, init_state(params, make_optimizer(recipe)), {}, tiny_cfg, step * 100)
        biases.append(np.asarray(bias))
    ckpt.close()

    steps, history = analysis.bias_history(tmp_path)
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_array_equal(history, np.stack(biases))
    cfg, params, tokenizer = analysis.load_model(tmp_path, step=10)
    assert cfg == tiny_cfg and tokenizer is not None
    np.testing.assert_array_equal(params["moe_layers"]["mlp"]["e_score_correction_bias"], biases[0])


def test_load_model_from_an_hf_directory(tiny_cfg, tiny_params, tmp_path):
    dsv3_jax.save_hf(tiny_cfg, tiny_params, tmp_path / "hf")
    cfg, params, tokenizer = analysis.load_model(tmp_path / "hf")
    assert tokenizer is None and cfg.hidden_size == tiny_cfg.hidden_size and cfg.dtype == "float32"
    np.testing.assert_array_equal(params["moe_layers"]["mlp"]["gate"], tiny_params["moe_layers"]["mlp"]["gate"])
