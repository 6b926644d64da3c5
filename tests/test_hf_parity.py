"""Logits parity with Hugging Face transformers' DeepseekV3ForCausalLM on random tiny models (float32).

Each model is built by `transformers.DeepseekV3Config` with random non-trivial weights (random norm
scales, router weights that spread the sigmoid scores, a non-zero `e_score_correction_bias`), saved
with `save_pretrained`, loaded with `dsv3_jax.load_hf` and run with `dsv3_jax.forward`.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import dsv3_jax  # noqa: E402
from dsv3_jax.convert.fp8_blocks import quantize_blocks  # noqa: E402
from dsv3_jax.convert.hf import dequantize_params  # noqa: E402

pytestmark = pytest.mark.hf

TOL = 1e-4
BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
    n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=24, q_lora_rank=40, qk_rope_head_dim=8,
    qk_nope_head_dim=12, v_head_dim=16, max_position_embeddings=64, routed_scaling_factor=2.5, rms_norm_eps=1e-6,
    rope_interleave=True, norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def yarn(factor: float, original: int, mscale: float, mscale_all_dim: float, theta: float = 10000.0) -> dict:
    return {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


CASES = {
    # q_lora, interleaved rope, YaRN with attention factor != 1 and mscale_all_dim softmax scaling, 4 groups keep 2
    "yarn_interleave": dict(rope_parameters=yarn(4.0, 4, 0.8, 1.0)),
    # plain q_proj, rotate-half rope, every layer MoE, no groups, two shared experts
    "q_proj_halves_all_moe": dict(q_lora_rank=None, rope_interleave=False, first_k_dense_replace=0, n_group=1,
                                  topk_group=1, n_shared_experts=2, routed_scaling_factor=1.5),
    # two dense layers, 2 groups keep 1, YaRN spelled DeepSeek's way (`rope_scaling`) in config.json
    "dense2_groups_rope_scaling": dict(first_k_dense_replace=2, n_group=2, topk_group=1, num_experts_per_tok=2,
                                       rope_parameters=yarn(8.0, 8, 1.0, 0.7, theta=500.0)),
}


def build_hf(overrides: dict, seed: int = 0):
    """A random DeepseekV3ForCausalLM (float32, eval) with non-trivial norms, router weights and router bias."""
    cfg = transformers.DeepseekV3Config(**{**BASE, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for name, value in state.items():
        if name.endswith("e_score_correction_bias"):
            state[name] = 0.3 * torch.randn(value.shape, generator=gen)
        elif value.ndim == 1:                                   # RMSNorm scales
            state[name] = 1.0 + 0.2 * torch.randn(value.shape, generator=gen)
        elif name.endswith("mlp.gate.weight"):                  # router logits ~ N(0, 1.5^2)
            state[name] = 1.5 * torch.randn(value.shape, generator=gen) / math.sqrt(value.shape[-1])
        else:                                                   # [.., out, in]: unit-variance outputs
            state[name] = torch.randn(value.shape, generator=gen) / math.sqrt(value.shape[-1])
    model.load_state_dict(state)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def tokens_for(vocab: int, seed: int = 1, shape: tuple[int, int] = (2, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def our_logits(path, tokens: np.ndarray, moe_impl: str = "dense", **load_kwargs) -> tuple[np.ndarray, object]:
    cfg, params = dsv3_jax.load_hf(path, dtype="float32", **load_kwargs)
    logits = dsv3_jax.forward(cfg.replace(dtype="float32", moe_impl=moe_impl), params, tokens)
    return np.asarray(logits), cfg


def to_rope_scaling(path) -> None:
    """Rewrite config.json with DeepSeek's spelling: `rope_theta` + `rope_scaling` with `type`."""
    file = path / "config.json"
    raw = json.loads(file.read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    file.write_text(json.dumps(raw))


@pytest.mark.parametrize(("case", "moe_impl"), [
    ("yarn_interleave", "dense"), ("yarn_interleave", "ragged"),
    ("q_proj_halves_all_moe", "ragged"), ("dense2_groups_rope_scaling", "dense"),
])
def test_logits_match_transformers(tmp_path, case, moe_impl):
    model = build_hf(CASES[case])
    model.save_pretrained(tmp_path)
    if case == "dense2_groups_rope_scaling":
        to_rope_scaling(tmp_path)
    tokens = tokens_for(BASE["vocab_size"])
    ours, cfg = our_logits(tmp_path, tokens, moe_impl)
    assert cfg.num_nextn_predict_layers == 0          # transformers saves no MTP layer
    assert cfg.rope_interleave == model.config.rope_interleave
    want = hf_logits(model, tokens)
    assert np.abs(want).max() > 0.5                   # logits are not trivially small
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)


def test_biased_routing_is_exercised():
    """The bias changes which experts the router picks (otherwise parity would not test it)."""
    model = build_hf(CASES["yarn_interleave"])
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(64, BASE["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, _, with_bias = gate(x)
        gate.e_score_correction_bias.zero_()
        _, _, without_bias = gate(x)
    assert not torch.equal(with_bias.sort(-1).values, without_bias.sort(-1).values)


def test_fused_expert_layout_loads(tmp_path):
    """transformers' in-memory layout (mlp.experts.gate_up_proj / down_proj) loads to the same logits."""
    from safetensors.torch import save_file

    model = build_hf(CASES["yarn_interleave"], seed=4)
    model.config.to_json_file(tmp_path / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tokens = tokens_for(BASE["vocab_size"], seed=5)
    ours, _ = our_logits(tmp_path, tokens, "ragged")
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=TOL, rtol=0)


def test_save_hf_loads_in_transformers(tmp_path):
    """load_hf -> save_hf -> DeepseekV3ForCausalLM.from_pretrained gives the original model's logits."""
    model = build_hf(CASES["dense2_groups_rope_scaling"], seed=6)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = dsv3_jax.load_hf(tmp_path / "hf", dtype="float32")
    dsv3_jax.save_hf(cfg, params, tmp_path / "ours", max_shard_bytes=200_000)
    assert len(list((tmp_path / "ours").glob("*.safetensors"))) > 1
    again = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    tokens = tokens_for(BASE["vocab_size"], seed=7)
    np.testing.assert_array_equal(hf_logits(again, tokens), hf_logits(model, tokens))


# ----------------------------------------------------------------------------------------------------------
# FP8: DeepSeek's release format, written here from the HF state dict
# ----------------------------------------------------------------------------------------------------------

FP8_NAMES = re.compile(r".*\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                       r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
# Dimensions above and not multiple of 128, so weights have several blocks and ragged edge blocks.
FP8_CASE = dict(hidden_size=160, intermediate_size=272, moe_intermediate_size=136, q_lora_rank=132, kv_lora_rank=130,
                num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_group=2, topk_group=1,
                num_experts_per_tok=2, qk_nope_head_dim=64, v_head_dim=72, rope_parameters=yarn(4.0, 4, 1.0, 1.0))


def dequantize_reference(w8: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """REFERENCE.md's definition, one block at a time: W[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128]."""
    out = np.empty(w8.shape, np.float32)
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            rows, cols = slice(128 * bi, 128 * bi + 128), slice(128 * bj, 128 * bj + 128)
            out[rows, cols] = w8[rows, cols].astype(np.float32) * scale_inv[bi, bj]
    return out


def per_expert(state: dict) -> dict:
    """transformers' fused expert tensors -> DeepSeek's per-expert names."""
    out = {}
    for name, value in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            f = value.shape[1] // 2
            for j in range(value.shape[0]):
                out[name.replace("gate_up_proj", f"{j}.gate_proj.weight")] = value[j, :f]
                out[name.replace("gate_up_proj", f"{j}.up_proj.weight")] = value[j, f:]
        elif name.endswith("mlp.experts.down_proj"):
            for j in range(value.shape[0]):
                out[name.replace("down_proj", f"{j}.down_proj.weight")] = value[j]
        else:
            out[name] = value
    return out


def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(tmp_path):
    from safetensors.numpy import save_file

    model = build_hf(FP8_CASE, seed=8)
    fused = {k: v.numpy() for k, v in model.state_dict().items()}
    files: list[dict] = [{}, {}]                 # two shards + index, like the release
    dequantized = {}
    for n, (name, w) in enumerate(per_expert(fused).items()):
        shard = files[n % 2]
        if FP8_NAMES.match(name):
            w8, s = quantize_blocks(w)
            assert s.shape == (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128))
            shard[name], shard[name + "_scale_inv"] = w8, s
            dequantized[name] = dequantize_reference(w8, s)
        else:
            shard[name] = w
    assert sum(k.endswith("_scale_inv") for f in files for k in f) > 10
    assert any(v.shape[0] > 1 and v.shape[1] > 1 for f in files for k, v in f.items() if k.endswith("_scale_inv"))
    weight_map = {}
    for i, shard in enumerate(files):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, tmp_path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    raw = model.config.to_dict()
    raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(raw))

    # HF on the dequantized weights (fused back into its in-memory layout)
    state = model.state_dict()
    for name in list(state):
        m = re.match(r"(.*mlp\.experts\.)(gate_up_proj|down_proj)$", name)
        if m:
            parts = []
            for j in range(state[name].shape[0]):
                if m[2] == "down_proj":
                    parts.append(dequantized[f"{m[1]}{j}.down_proj.weight"])
                else:
                    parts.append(np.concatenate([dequantized[f"{m[1]}{j}.gate_proj.weight"],
                                                 dequantized[f"{m[1]}{j}.up_proj.weight"]]))
            state[name] = torch.as_tensor(np.stack(parts))
        elif name in dequantized:
            state[name] = torch.as_tensor(dequantized[name])
    model.load_state_dict(state)
    tokens = tokens_for(BASE["vocab_size"], seed=9)
    want = hf_logits(model, tokens)

    ours, cfg = our_logits(tmp_path, tokens, "ragged")
    assert cfg.quantization_config is None
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)

    cfg8, params8 = dsv3_jax.load_hf(tmp_path, dtype="float32", keep_fp8=True)
    w_gate = params8["moe_layers"]["mlp"]["w_gate"]
    assert w_gate["fp8"].dtype == np.dtype("float8_e4m3fn") and w_gate["scale_inv"].shape[-2:] == (2, 2)
    logits = dsv3_jax.forward(cfg8.replace(dtype="float32"), dequantize_params(cfg8, params8), tokens)
    np.testing.assert_allclose(np.asarray(logits), want, atol=TOL, rtol=0)
