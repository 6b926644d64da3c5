"""Benchmark helpers that run without a GPU: the accuracy comparison and the profiler's MoE programs."""

import json

import jax
import numpy as np
import pytest

from dsv3_jax.bench import profile, train


def test_compare_curves_signed_and_absolute():
    base = [2.0] * 100
    other = [2.0 * (1.01 if i % 40 < 20 else 0.99) for i in range(100)]   # drift both ways, no bias
    cmp = train.compare_curves(base, other)
    assert 0 < cmp["mean_rel_diff_after_warmup"] <= 0.01 + 1e-9
    assert abs(cmp["mean_signed_rel_diff_after_warmup"]) < cmp["mean_rel_diff_after_warmup"]
    assert train.precision_name({"fp8": False, "rerun": True}) == "bf16_rerun"


def test_accuracy_summaries_compare_each_seed_and_the_seed_means():
    from dsv3_jax.bench.timing import Reporter

    def run(level):
        return {"losses": [level] * 60, "heldout_loss": level, "heldout_loss_other_precision": level}
    # FP8 1% above BF16 from seed 0, 1% below from seed 1: each seed differs by 1%, their means not at all
    runs = {0: {"bf16": run(2.0), "fp8": run(2.02)}, 1: {"bf16": run(2.0), "fp8": run(1.98)}, 2: {"bf16": run(2.0)}}
    rep = Reporter("train", None, with_device=False)
    train._accuracy_summaries(rep, runs, {"config": "tiny"}, None)
    per_seed = [r for r in rep.records if r["name"] == "accuracy_summary"]
    assert [r["seed"] for r in per_seed] == [0, 1]                  # seed 2 lacks its FP8 run
    assert [r["final_signed_rel_diff"] for r in per_seed] == pytest.approx([0.01, -0.01])
    (mean,) = [r for r in rep.records if r["name"] == "accuracy_summary_seed_mean"]
    assert mean["seeds"] == [0, 1] and mean["final_rel_diff"] == pytest.approx(0.0, abs=1e-12)
    assert mean["final_signed_rel_diff_std"] == pytest.approx(0.01 * 2 ** 0.5)
    # per step, the seed mean of +1% and -1% has a standard error of std / sqrt(2) = 1%
    assert mean["standard_error_final"] == pytest.approx(0.01) and mean["standard_error_max_after_warmup"] == (
        pytest.approx(0.01))


@pytest.mark.parametrize("parallel", [1, 3])
def test_accuracy_seeds_start_at_the_first_seed(monkeypatch, parallel):
    started, memory = [], set()

    def fake(args, timeout, env):   # a child's JSON line: the accuracy record of its spec
        spec = json.loads(args[-1])
        started.append((spec["seed"], train.precision_name(spec)))
        memory.add(env.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
        level = 2.0 + 0.01 * spec["fp8"]
        return [{"mode": "accuracy", "seed": spec["seed"], "precision": train.precision_name(spec),
                 "losses": [level] * 50, "heldout_loss": level, "heldout_loss_other_precision": level}], ""
    monkeypatch.setattr(train, "_subprocess", fake)
    rep = train.run(None, peer=False, only="none", accuracy_steps=50, accuracy_seeds=2, accuracy_first_seed=5,
                    accuracy_parallel=parallel)
    assert sorted(started) == [(5, "bf16"), (5, "fp8"), (6, "bf16"), (6, "fp8")]
    assert [r["name"] for r in rep.records if r.get("mode") == "accuracy"] == [   # reported in job order
        "accuracy_bf16_seed5", "accuracy_fp8_seed5", "accuracy_bf16_seed6", "accuracy_fp8_seed6"]
    assert [r["seed"] for r in rep.records if r["name"] == "accuracy_summary"] == [5, 6]
    assert memory == ({None} if parallel == 1 else {"0.300"})   # parallel runs share the GPU's memory


def test_gemm_bench_takes_mosaic_configs_as_json():
    from dsv3_jax.bench import gemm
    from dsv3_jax.kernels.gemm_mgpu import MgpuGemmConfig

    assert gemm.mgpu_configs('[{"tile_m": 128, "epi_tile_n": 32}, {}]') == (
        MgpuGemmConfig(tile_m=128, epi_tile_n=32), MgpuGemmConfig())
    for bad, message in (("x", "not JSON"), ('{"k_blocks": 1}', "list of objects"),
                         ('[{"tile_x": 1}]', "entry .*tile_x"), ('[{"cluster_dim": "k"}]', "entry .*cluster_dim")):
        with pytest.raises(ValueError, match=message):
            gemm.mgpu_configs(bad)


def test_profile_moe_programs_run_on_cpu():
    for target in ("moe_layer", "moe_local"):
        fn, args, context = profile.moe_programs(target, True, "xla", "auto", None, tokens=32, hidden=128,
                                                 expert_dim=64, n_experts=8, top_k=2)
        with context:
            grads = jax.block_until_ready(fn(*args))
        assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


def test_pipeline_step_bench_runs_pipe2_against_pipe1_with_equal_losses():
    from dsv3_jax.bench import pipeline_step

    records = pipeline_step.run("tiny", "dualpipe", pp=2, n_mb=4, seq=8, steps=1)
    one, two, summary = records
    assert (one["pipe"], two["pipe"]) == (1, 2) and one["step_s"] > 0 and two["step_s"] > 0
    assert summary["loss_difference"] < 1e-2 and summary["bubble_share_schedule"] == 0.0   # (pp/2 - 1) = 0
    assert summary["bubble_share_measured"] == pytest.approx(1 - one["step_s"] / (2 * two["step_s"]))


def test_accuracy_data_is_seeded_shuffled_windows_of_the_stdlib():
    a, b = train.stdlib_windows(64, 257, seed=0, pool_bytes=2 ** 20), train.stdlib_windows(64, 257, seed=0,
                                                                                            pool_bytes=2 ** 20)
    np.testing.assert_array_equal(a, b)                               # both precisions see the same batches
    assert a.shape == (64, 257) and a.dtype == np.int32 and a.min() >= 0 and a.max() < 256
    assert not np.array_equal(a, train.stdlib_windows(64, 257, seed=1, pool_bytes=2 ** 20))
    pool = train.stdlib_windows(1, 2 ** 20, seed=0, pool_bytes=2 ** 20)[0]   # the whole pool, in order
    starts = [int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(pool, 16) == w[:16]).all(1))[0])
              for w in a[:8]]
    assert len(set(starts)) == 8 and sorted(starts) != starts          # distinct offsets, not in stream order


def test_forward_penalties_split_the_heldout_gap_into_forward_and_weights():
    runs = {"bf16": {"heldout_loss": 2.0, "heldout_loss_other_precision": 2.01},
            "fp8": {"heldout_loss": 2.03, "heldout_loss_other_precision": 2.02}}
    gap = train.forward_penalties(runs)
    assert gap["heldout_gap_fp8"] == pytest.approx(0.015)
    assert gap["heldout_gap_fp8_weights_bf16_forward"] == pytest.approx(0.01)
    assert gap["heldout_gap_bf16_weights_fp8_forward"] == pytest.approx(0.005)


def test_heldout_loss_scores_params_in_either_precision():
    from dsv3_jax.config import load_config
    from dsv3_jax.model.functional import init_params

    cfg = load_config("tiny")
    params = init_params(cfg, jax.random.key(0))
    batches = train.stdlib_windows(2 * 2, 17, seed=1, pool_bytes=2 ** 16).reshape(2, 2, 17)
    bf16 = train.heldout_loss(cfg, params, batches)
    fp8 = train.heldout_loss(load_config("tiny", fp8=True), params, batches)
    assert abs(bf16 - np.log(cfg.vocab_size)) < 0.1              # untrained: about uniform over the vocabulary
    assert 0 < abs(fp8 - bf16) < 1e-2                             # FP8 quantization moves the loss, a little


def test_quantize_bench_compares_the_kernel_with_xla_on_cpu():
    from dsv3_jax.bench import quantize

    records = quantize.run(None, repeats=1, activations=((200, 300),), weights=((2, 130, 260),)).records
    runs = {(r["kind"], r["dtype"], r["impl"]): r for r in records}
    assert set(runs) == {("activation", "bfloat16", "xla"), ("activation", "bfloat16", "pallas"),
                         ("weight", "bfloat16", "xla"), ("weight", "bfloat16", "pallas"), ("weight", "float32", "xla"),
                         ("weight", "float32", "pallas")}
    assert all(r["ms"] > 0 and r["mismatch"] < 1e-3 for r in records)


def test_accuracy_records_of_several_calls_merge_into_one_seed_mean(tmp_path):
    def record(seed, precision, level, **setting):
        return {"mode": "accuracy", "seed": seed, "precision": precision, "losses": [level] * 50,
                "heldout_loss": level, "heldout_loss_other_precision": level, "config": "small", "steps": 50,
                "batch": 64, "peak_lr": 3e-4, "attention": "reference", **setting}

    def write(name, *records):
        path = tmp_path / name
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
        return str(path)

    # seed 0 in the first call, seeds 0 (the same runs again) and 1 in the second: FP8 +1% and -1%
    first = write("a.jsonl", record(0, "bf16", 2.0), record(0, "fp8", 2.02), {"name": "accuracy_summary"})
    second = write("b.jsonl", record(0, "bf16", 2.0), record(1, "bf16", 2.0), record(1, "fp8", 1.98))
    rep = train.summarize_accuracy([first, second])
    (mean,) = [r for r in rep.records if r["name"] == "accuracy_summary_seed_mean"]
    assert mean["seeds"] == [0, 1] and mean["final_signed_rel_diff_per_seed"] == pytest.approx([0.01, -0.01])

    other_lr = write("c.jsonl", record(2, "bf16", 2.0, peak_lr=1e-3))
    with pytest.raises(ValueError, match="c.jsonl:1: an accuracy record of another setting"):
        train.merge_accuracy_records([first, other_lr])
    # records made before the bias update speed was a setting hold the speed they ran with, 1e-3
    explicit = write("g.jsonl", record(3, "bf16", 2.0, bias_update_speed=1e-3), record(3, "fp8", 2.0))
    assert sorted(train.merge_accuracy_records([first, explicit])[0]) == [0, 3]
    fixed_bias = write("h.jsonl", record(4, "bf16", 2.0, bias_update_speed=0.0))
    with pytest.raises(ValueError, match="h.jsonl:1: an accuracy record of another setting"):
        train.merge_accuracy_records([first, fixed_bias])
    rerun_differs = write("d.jsonl", record(0, "fp8", 2.03))
    with pytest.raises(ValueError, match="seed 0 \\(fp8\\) recorded before with other losses"):
        train.merge_accuracy_records([first, rerun_differs])
    with pytest.raises(ValueError, match="no accuracy records"):
        train.merge_accuracy_records([write("e.jsonl", {"name": "accuracy_summary"})])
    with pytest.raises(ValueError, match="f.jsonl:1: invalid JSON"):
        train.merge_accuracy_records([write("f.jsonl", "x")])
