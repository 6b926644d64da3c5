"""Benchmark helpers that run without a GPU: the accuracy comparison and the profiler's MoE programs."""

import jax
import numpy as np

from dsv3_jax.bench import profile, train


def test_compare_curves_signed_and_absolute():
    base = [2.0] * 100
    other = [2.0 * (1.01 if i % 40 < 20 else 0.99) for i in range(100)]   # drift both ways, no bias
    cmp = train.compare_curves(base, other)
    assert 0 < cmp["mean_rel_diff_after_warmup"] <= 0.01 + 1e-9
    assert abs(cmp["mean_signed_rel_diff_after_warmup"]) < cmp["mean_rel_diff_after_warmup"]
    assert train.precision_name({"fp8": False, "rerun": True}) == "bf16_rerun"


def test_profile_moe_programs_run_on_cpu():
    for target in ("moe_layer", "moe_local"):
        fn, args, context = profile.moe_programs(target, True, "xla", "auto", None, tokens=32, hidden=128,
                                                 expert_dim=64, n_experts=8, top_k=2)
        with context:
            grads = jax.block_until_ready(fn(*args))
        assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)
