"""HF checkpoint conversion: block FP8, save_hf/load_hf round trips, clear errors, atomic writes, dsv3-convert."""

from __future__ import annotations

import json
import logging
import math

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import dsv3_jax
from dsv3_jax.convert import CheckpointError, cli, dequantize_params, hf
from dsv3_jax.convert.fp8_blocks import FP8_MAX, dequantize_blocks, quantize_blocks, scale_shape

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


def leaves_equal(a, b) -> bool:
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def read_all(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (float8 via the loader's reader)."""
    with hf._Reader(path) as reader:
        return {name: reader.read(name) for name in reader.info}


def rewrite(path, tensors: dict[str, np.ndarray]) -> None:
    """Replace a checkpoint's tensors by `tensors`, as one unindexed model.safetensors."""
    for file in [*path.glob("*.safetensors"), path / hf.INDEX_FILE]:
        file.unlink(missing_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_cfg, tiny_params):
    """The tiny float32 model (with its MTP layer) saved once as an HF checkpoint."""
    path = tmp_path_factory.mktemp("hf") / "tiny"
    dsv3_jax.save_hf(tiny_cfg, tiny_params, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# 128x128 blocks
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(130, 257), (3, 200, 129), (64, 48), (256, 128)])
def test_block_quantization_follows_the_definition(shape):
    rng = np.random.default_rng(0)
    w = (rng.normal(size=shape) * np.exp(rng.normal(size=shape[:-2] + (1, 1)))).astype(np.float32)
    w8, s = quantize_blocks(w)
    assert w8.dtype == FP8 and s.dtype == np.float32
    assert s.shape == shape[:-2] + (math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128)) == scale_shape(shape)
    deq = dequantize_blocks(w8, s)
    for idx in np.ndindex(*s.shape):                       # W[i, j] = fp8[i, j] * s[i // 128, j // 128]
        *lead, bi, bj = idx
        block = (*lead, slice(128 * bi, 128 * bi + 128), slice(128 * bj, 128 * bj + 128))
        np.testing.assert_array_equal(deq[block], w8[block].astype(np.float32) * s[idx])
        # s = amax / 448: the block's largest entry maps to +-448 exactly
        assert s[idx] == np.float32(np.abs(w[block]).max() / FP8_MAX)
        assert np.abs(w8[block].astype(np.float32)).max() == FP8_MAX
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 (plus the subnormal step near zero)
    scale = np.repeat(np.repeat(s, 128, -2), 128, -1)[..., :shape[-2], :shape[-1]]
    assert np.all(np.abs(deq - w) <= 2.0 ** -4 * np.abs(w) + 2.0 ** -10 * scale)


def test_zero_block_and_bad_scale_shape():
    w = np.zeros((130, 10), np.float32)
    w[129, 3] = 2.0
    w8, s = quantize_blocks(w)
    assert s[0, 0] == 1.0 and s[1, 0] == 2.0 / FP8_MAX
    np.testing.assert_array_equal(dequantize_blocks(w8, s), w)
    with pytest.raises(ValueError, match=r"scale_inv shape \(1, 1\) does not fit weight shape \(130, 10\)"):
        dequantize_blocks(w8, s[:1])


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------

def test_float32_round_trip_is_exact(saved, tiny_cfg, tiny_params):
    cfg, params = dsv3_jax.load_hf(saved)
    assert cfg == tiny_cfg.replace(dtype=cfg.dtype) and cfg.num_nextn_predict_layers == 1
    assert leaves_equal(params, tiny_params)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(tiny_params)


def test_layout_is_deepseeks(saved, tiny_cfg, tiny_params):
    tensors = read_all(saved)
    last = tiny_cfg.num_hidden_layers                       # the MTP layer's index
    assert tensors["model.layers.1.mlp.experts.7.gate_proj.weight"].shape == (64, 128)
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.experts.7.down_proj.weight"],
                                  np.asarray(tiny_params["moe_layers"]["mlp"]["w_down"][0, 7]).T)
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.o_proj.weight"],
                                  np.asarray(tiny_params["dense_layers"]["self_attn"]["o_proj"]["kernel"][0]).reshape(
                                      -1, 128).T)
    np.testing.assert_array_equal(tensors[f"model.layers.{last}.embed_tokens.weight"],
                                  tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(tensors[f"model.layers.{last}.shared_head.head.weight"], tensors["lm_head.weight"])
    assert tensors[f"model.layers.{last}.eh_proj.weight"].shape == (128, 256)
    assert f"model.layers.{last}.shared_head.norm.weight" in tensors
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (8, 128)
    raw = json.loads((saved / "config.json").read_text())
    assert "quantization_config" not in raw and raw["num_nextn_predict_layers"] == 1


def test_bfloat16_round_trip(tmp_path, tiny_cfg, tiny_params):
    dsv3_jax.save_hf(tiny_cfg, tiny_params, tmp_path / "bf16", dtype="bfloat16")
    tensors = read_all(tmp_path / "bf16")
    assert tensors["model.layers.1.self_attn.q_b_proj.weight"].dtype == ml_dtypes.bfloat16
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == np.float32          # router stays fp32
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    cfg, params = dsv3_jax.load_hf(tmp_path / "bf16", dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    specs = dsv3_jax.param_shapes(cfg)
    assert jax.tree_util.tree_map(lambda s: s.dtype, specs) == jax.tree_util.tree_map(lambda x: x.dtype, params)
    def rounded(path, x, spec):  # everything went through bf16 except the float32 router
        if jax.tree_util.keystr(path).endswith(("['gate']", "['e_score_correction_bias']")):
            return np.asarray(x)
        return np.asarray(x).astype(ml_dtypes.bfloat16).astype(spec.dtype)

    assert leaves_equal(params, jax.tree_util.tree_map_with_path(rounded, tiny_params, specs))


def test_fp8_round_trip(tmp_path, tiny_cfg, tiny_params):
    dsv3_jax.save_hf(tiny_cfg, tiny_params, tmp_path / "fp8", fp8=True)
    raw = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert raw["quantization_config"]["weight_block_size"] == [128, 128]
    tensors = read_all(tmp_path / "fp8")
    fp8_names = {n for n, t in tensors.items() if t.dtype == FP8}
    assert {n + "_scale_inv" for n in fp8_names} == {n for n in tensors if n.endswith("_scale_inv")}
    last = tiny_cfg.num_hidden_layers
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.experts.3.up_proj.weight",
                 "model.layers.1.mlp.shared_experts.gate_proj.weight", "model.layers.3.self_attn.kv_b_proj.weight",
                 f"model.layers.{last}.self_attn.o_proj.weight", f"model.layers.{last}.mlp.experts.0.down_proj.weight"):
        assert name in fp8_names, name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 f"model.layers.{last}.eh_proj.weight", f"model.layers.{last}.shared_head.head.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert name not in fp8_names, name
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 3)    # [128, 384]

    cfg, params = dsv3_jax.load_hf(tmp_path / "fp8")
    assert cfg.quantization_config is None
    for path, got in jax.tree_util.tree_leaves_with_path(params):
        want = np.asarray(_get(tiny_params, path))
        # per-block bound: 2^-4 relative + subnormal step of a block whose amax <= the whole tensor's
        bound = 2.0 ** -4 * np.abs(want) + 2.0 ** -10 * np.abs(want).max() / FP8_MAX
        assert np.all(np.abs(np.asarray(got) - want) <= bound), jax.tree_util.keystr(path)

    cfg8, params8 = dsv3_jax.load_hf(tmp_path / "fp8", keep_fp8=True)
    assert cfg8.quantization_config["quant_method"] == "fp8"
    w_gate = params8["moe_layers"]["mlp"]["w_gate"]
    assert w_gate["fp8"].shape == (3, 8, 64, 128) and w_gate["scale_inv"].shape == (3, 8, 1, 1)
    assert params8["embed_tokens"].dtype == np.float32
    assert leaves_equal(dequantize_params(cfg8, params8), params)
    # FP8 leaves are written back unchanged
    dsv3_jax.save_hf(cfg8, params8, tmp_path / "again", fp8=True)
    again = read_all(tmp_path / "again")
    assert again.keys() == tensors.keys()
    assert all(np.array_equal(again[n].view(np.uint8), tensors[n].view(np.uint8)) for n in fp8_names)


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_sharded_output_has_an_index(tmp_path, tiny_cfg, tiny_params):
    limit = 1_000_000
    dsv3_jax.save_hf(tiny_cfg, tiny_params, tmp_path / "sharded", max_shard_bytes=limit)
    files = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 3
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / hf.INDEX_FILE).read_text())
    held = {}
    for file in files:
        with safe_open(file, "np") as f:
            held.update(dict.fromkeys(f.keys(), file.name))
            assert file.stat().st_size <= limit + 10_000 or len(f.keys()) == 1   # one tensor may exceed the limit
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in read_all(tmp_path / "sharded").values())
    _, params = dsv3_jax.load_hf(tmp_path / "sharded")
    assert leaves_equal(params, tiny_params)


def test_shardings_place_each_leaf(saved, tiny_params):
    mesh = jax.make_mesh((len(jax.devices()),), ("x",))
    experts = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    pick = lambda path: experts if path[-1] in ("w_gate", "w_up", "w_down") and path[0] == "moe_layers" else replicated
    _, params = dsv3_jax.load_hf(saved, shardings=pick)
    assert params["moe_layers"]["mlp"]["w_up"].sharding == experts
    assert params["norm"]["scale"].sharding == replicated
    tree = jax.tree_util.tree_map(lambda _: replicated, tiny_params)
    _, params = dsv3_jax.load_hf(saved, shardings=tree)
    assert params["lm_head"]["kernel"].sharding == replicated
    assert leaves_equal(params, tiny_params)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture()
def editable(tmp_path, saved):
    """A private copy of the saved checkpoint: (directory, its tensors)."""
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text((saved / "config.json").read_text())
    tensors = read_all(saved)
    rewrite(path, tensors)
    return path, tensors


def test_missing_tensor_is_named(editable):
    path, tensors = editable
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight' "
                                              r"\(expected shape \[64, 128\]\)"):
        dsv3_jax.load_hf(path)


def test_extra_tensor_is_named(editable):
    path, tensors = editable
    tensors["model.layers.1.mlp.experts.8.up_proj.weight"] = np.zeros((64, 128), np.float32)
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\.mlp\.experts\.8\.up_proj\.weight' "
                                              r"\(shape \[64, 128\]"):
        dsv3_jax.load_hf(path)


def test_shape_mismatch_names_both_shapes(editable):
    path, tensors = editable
    tensors["model.layers.0.self_attn.kv_b_proj.weight"] = np.zeros((256, 33), np.float32)
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.kv_b_proj\.weight' has shape \[256, 33\]"
                                              r" .* expected \[256, 32\]"):
        dsv3_jax.load_hf(path)


def test_missing_index_shard_and_config_are_named(editable, tmp_path):
    path, _ = editable
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (path / hf.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors"):
        dsv3_jax.load_hf(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        dsv3_jax.load_hf(tmp_path / "empty")


def test_mtp_layer_absent_or_partial(editable, caplog):
    path, tensors = editable
    mtp = [n for n in tensors if n.startswith("model.layers.4.")]
    rewrite(path, {n: t for n, t in tensors.items() if n not in mtp[1:]})
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.4."):
        dsv3_jax.load_hf(path)
    rewrite(path, {n: t for n, t in tensors.items() if n not in mtp})
    with caplog.at_level(logging.WARNING):
        cfg, params = dsv3_jax.load_hf(path)
    assert cfg.num_nextn_predict_layers == 0 and "mtp_0" not in params and "0 MTP layer" in caplog.text


def test_differing_mtp_copy_warns(editable, caplog):
    path, tensors = editable
    tensors["model.layers.4.shared_head.head.weight"] = tensors["model.layers.4.shared_head.head.weight"] + 1
    rewrite(path, tensors)
    with caplog.at_level(logging.WARNING):
        dsv3_jax.load_hf(path)
    assert "model.layers.4.shared_head.head.weight differs from lm_head.weight" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------

def snapshot(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_existing_directory_is_refused(saved, tiny_cfg, tiny_params):
    before = snapshot(saved)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        dsv3_jax.save_hf(tiny_cfg, tiny_params, saved)
    assert snapshot(saved) == before


def test_interrupted_save_keeps_the_old_directory(tmp_path, monkeypatch, tiny_cfg, tiny_params):
    target = tmp_path / "out"
    dsv3_jax.save_hf(tiny_cfg, tiny_params, target, max_shard_bytes=1_000_000)
    before = snapshot(target)
    calls = []

    def dying_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed mid-save")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(hf.safetensors.numpy, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        dsv3_jax.save_hf(tiny_cfg, tiny_params, target, max_shard_bytes=1_000_000, overwrite=True)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]          # no temporary left behind
    monkeypatch.undo()
    dsv3_jax.save_hf(tiny_cfg, tiny_params, target, dtype="bfloat16", overwrite=True)
    assert snapshot(target) != before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------------
# dsv3-convert
# ---------------------------------------------------------------------------------------------------------

def test_convert_cli_hf_orbax_hf(tmp_path, saved, tiny_params, capsys):
    orbax_dir, back = tmp_path / "orbax", tmp_path / "back"
    assert cli.main(["dsv3-convert", "--from", "hf", "--to", "orbax", "--input", str(saved),
                     "--output", str(orbax_dir)]) == 0
    assert (orbax_dir / "config.json").exists() and (orbax_dir / "state").is_dir()
    cfg, params = dsv3_jax.convert.load_orbax(orbax_dir)
    assert leaves_equal(params, tiny_params) and cfg.num_nextn_predict_layers == 1
    assert cli.main(["dsv3-convert", "--from", "orbax", "--to", "hf", "--input", str(orbax_dir),
                     "--output", str(back)]) == 0
    assert snapshot(back) == snapshot(saved)
    err = capsys.readouterr().err
    assert "moe_layers/mlp/w_gate" in err and "done:" in err
    # the same output again is refused before anything is read
    assert cli.main(["dsv3-convert", "--from", "orbax", "--to", "hf", "--input", str(orbax_dir),
                     "--output", str(back)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["dsv3-convert", "--from", "orbax", "--to", "hf", "--input", str(orbax_dir), "--output",
                     str(back), "--overwrite", "--fp8", "--dtype", "bfloat16"]) == 0
    assert json.loads((back / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


@pytest.mark.parametrize("args, code, message", [
    (["--from", "hf", "--to", "orbax", "--output", "x"], 2, "--input is required"),
    (["--from", "tf", "--to", "hf", "--input", "x", "--output", "y"], 2, "value should be one of"),
    (["--from", "hf", "--to", "orbax", "--input", "x", "--output", "y", "--fp8"], 2, "--fp8 applies to --to hf"),
    (["--from", "hf", "--to", "hf", "--input", "/no/such/dir", "--output", "y"], 1, "no such directory"),
])
def test_convert_cli_rejects_bad_input(args, code, message, capsys):
    assert cli.main(["dsv3-convert", *args]) == code
    assert message in capsys.readouterr().err


def test_convert_cli_reports_a_bad_checkpoint(editable, tmp_path, capsys):
    path, tensors = editable
    del tensors["lm_head.weight"]
    rewrite(path, tensors)
    assert cli.main(["dsv3-convert", "--from", "hf", "--to", "orbax", "--input", str(path),
                     "--output", str(tmp_path / "o")]) == 1
    assert "missing tensor 'lm_head.weight'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_convert_cli_help(capsys):
    assert cli.main(["dsv3-convert", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--from" in out and "--fp8" in out and "orbax" in out
