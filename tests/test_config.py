import json

import pytest

import dsv3_jax
from dsv3_jax.config import ConfigError, config_names


def test_every_shipped_config_loads():
    for name in config_names():
        cfg = dsv3_jax.load_config(name)
        assert cfg.num_hidden_layers == cfg.n_dense_layers + cfg.n_moe_layers


def test_671b_config_matches_reference():
    cfg = dsv3_jax.load_config("deepseek-v3-671b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (7168, 61, 256, 8)
    assert (cfg.n_group, cfg.topk_group, cfg.first_k_dense_replace) == (8, 4, 3)
    # softmax scale with YaRN factor 40: 192^-0.5 * (0.1 ln 40 + 1)^2 (REFERENCE.md)
    assert cfg.softmax_scale == pytest.approx(0.13523, abs=1e-5)


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "config.json"
    raw = json.loads((dsv3_jax.config.CONFIG_DIR / "tiny.json").read_text())
    raw["hiden_size"] = 3
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="unknown field 'hiden_size'"):
        dsv3_jax.load_config(path)


@pytest.mark.parametrize("change, message", [
    ({"n_routed_experts": 10, "n_group": 4}, "divisible by 'n_group'"),
    ({"topk_group": 5}, "'topk_group' \\(5\\) must be <= 'n_group'"),
    ({"num_experts_per_tok": 5}, "exceeds the 4 experts"),
    ({"qk_rope_head_dim": 15}, "must be even"),
    ({"hidden_size": 0}, "'hidden_size' must be a positive integer"),
    ({"num_key_value_heads": 2}, "must equal 'num_attention_heads'"),
    ({"moe_impl": "magic"}, "'moe_impl' must be one of"),
])
def test_inconsistent_fields_are_rejected(change, message):
    with pytest.raises(ConfigError, match=message):
        dsv3_jax.load_config("tiny", **change)


def test_missing_config_names_the_choices():
    with pytest.raises(ConfigError, match="not one of"):
        dsv3_jax.load_config("no-such-model")


def test_transformers5_rope_parameters_are_accepted():
    raw = json.loads((dsv3_jax.config.CONFIG_DIR / "deepseek-v3-671b.json").read_text())
    scaling = raw.pop("rope_scaling")
    scaling["rope_type"] = scaling.pop("type")
    raw["rope_parameters"] = {"rope_theta": raw.pop("rope_theta"), **scaling}
    cfg = dsv3_jax.config.config_from_dict(raw)
    assert cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 40 and cfg.rope_theta == 10000


def test_param_counts_of_671b():
    counts = dsv3_jax.count_params(dsv3_jax.load_config("deepseek-v3-671b"))
    assert abs(counts["total"] / 671e9 - 1) < 0.005
    assert abs(counts["active"] / 37e9 - 1) < 0.02
    assert abs(counts["mtp"] / 11.6e9 - 1) < 0.02
    assert abs(counts["hf_checkpoint"] / 685e9 - 1) < 0.005


def test_proxy_1gpu_has_the_reference_size():
    assert abs(dsv3_jax.count_params(dsv3_jax.load_config("proxy-1gpu"))["total"] / 7.36e9 - 1) < 0.002
