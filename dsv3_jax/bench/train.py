"""`dsv3-bench train`: single-GPU training throughput of a config in BF16 and FP8, next to HF's PyTorch peer,
and (with --accuracy_steps) a BF16 vs FP8 loss-curve comparison.

Each measurement runs in its own process (so peak memory is its own and an out-of-memory ends only it):

- `hf_torch` (`dsv3_jax.bench.hf_peer`): transformers' DeepseekV3, forward + backward, BF16, first;
- `jax ... fwd_bwd`: `jax.value_and_grad` of `dsv3_jax.train.step.compute_losses` (CE + balance loss; MTP
  off so the work equals the peer's), BF16 weights like the peer's;
- `jax ... train_step`: `dsv3_jax.train.step.train_step` with `make_optimizer(deepseek-v3-pretrain)`:
  forward with MTP, backward, clipping, AdamW with BF16 moments, router-bias update.

Attention runs `attention_impl="flash"` (cuDNN): the reference path's [batch, 128 heads, 4096, 4096] FP32
scores do not fit next to the rest. Tokens are random ids (throughput does not depend on them). Reported:
step time (median of --steps after 2 warm-up steps), tokens/s, model TFLOP/s and MFU
(`dsv3_jax.train.flops.train_flops_per_token`: 6 x matmul parameters + attention, against the dense BF16
peak), peak GPU memory (allocator peak) and compile time.

Accuracy (`--accuracy_steps N`): the `small` config trained N steps from one seed on the same batches
(256-byte windows at seeded random offsets of the Python standard library's sources, the device's own copy:
a shuffled stream, as training data is) in BF16 and in FP8 with `train_step`; the record holds both loss
curves and the relative difference of the smoothed losses. Each run's final weights are then scored on
held-out windows (another seed of the same pool, so some of their bytes were also trained on: the same
batches for both runs, not a clean generalization measure) in its own precision and in the other one
(`forward_penalties`): how much of FP8's gap is the FP8 forward's error on any weights, and how much the
weights that FP8 training reached.
`--accuracy_control` trains BF16 a second time: its difference from the first BF16 run is the noise floor
of the comparison (on GPU, atomics make two identical runs differ from the first steps, and training at
a small batch and a high learning rate amplifies any difference). A deterministic comparison (bench/RESULTS.md
run 5: two BF16 runs identical over 300 steps) is

    XLA_FLAGS=--xla_gpu_exclude_nondeterministic_ops=true dsv3-bench train --only none --nopeer \
        --accuracy_steps 300 --accuracy_control --accuracy_batch 64 --accuracy_lr 3e-4 --accuracy_attention reference

`--accuracy_seeds N` repeats the comparison from N seeds (initialization and batches): each seed's record,
then the seed-mean curves compared and the per-seed signed final differences (their spread is the error bar
of one seed's comparison); `--accuracy_first_seed S` starts at seed S (seeds split over several calls);
`--accuracy_parallel P` trains P runs at a time on the one GPU (short kernels: side by side, and more so under a
CUDA MPS daemon, they finish more seeds an hour; bench/RESULTS.md run 13);
`--accuracy_bias_update_speed G` sets the aux-loss-free balancing's bias step (default the recipe's 1e-3; 0 keeps
the routing biases at zero, so that no sign(load error) flip steers the two runs' routing apart).
(--accuracy_batch: sequences of 256 bytes, default 16; --accuracy_lr: peak LR, default 1e-3, the schedule's
other rates scale with it; --accuracy_attention: "flash" = cuDNN, default, which the flag above makes fail
in jax 0.11.2; "reference" = XLA's einsum path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dsv3_jax.bench.timing import Reporter

PROCESS_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}   # one process per measurement may use the whole GPU
SMOOTH = 20                                                 # moving-average window of the accuracy comparison
# what makes accuracy records comparable, and the value a record made before a key existed ran with
SETTING_KEYS = ("config", "steps", "batch", "peak_lr", "attention", "bias_update_speed")
SETTING_DEFAULTS = {"bias_update_speed": 1e-3}
HELDOUT_BATCHES = 4                                         # batches of other windows scoring the trained weights


def default_specs(config: str, batch: int, seq: int) -> list[dict[str, Any]]:
    """The measurements of `dsv3-bench train` in the order they run (the most important first)."""
    common = dict(config=config, seq=seq, param_dtype="bfloat16")
    return [
        dict(common, name="jax_bf16_fwd_bwd", mode="fwd_bwd", fp8=False, batch=batch, mtp=False),
        dict(common, name="jax_fp8_fwd_bwd", mode="fwd_bwd", fp8=True, batch=batch, mtp=False),
        dict(common, name="jax_fp8_train_step", mode="train_step", fp8=True, batch=max(1, batch // 2), mtp=True),
        dict(common, name="jax_bf16_train_step", mode="train_step", fp8=False, batch=max(1, batch // 2), mtp=True),
    ]


def _hyper(lr: float = 2.2e-4, mtp: float = 0.3, gamma: float = 1e-3, alpha: float = 1e-4):
    import jax.numpy as jnp

    from dsv3_jax.train.step import Hyper
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return Hyper(learning_rate=f32(lr), mtp_weight=f32(mtp), bias_update_speed=f32(gamma), balance_alpha=f32(alpha))


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Compile and time one training configuration in this process (JAX on the default device).

    If it does not fit in memory, it is compiled again with full rematerialization of each layer
    (`remat_policy="full"`) and the record says so.
    """
    import jax

    from dsv3_jax.bench.timing import device_info
    from dsv3_jax.config import load_config
    from dsv3_jax.model.functional import init_params
    from dsv3_jax.train.flops import peak_flops_per_device, train_flops_per_token

    cfg = load_config(spec["config"], fp8=spec["fp8"], attention_impl=spec.get("attention", "flash"),
                      param_dtype=spec["param_dtype"], remat_policy=spec.get("remat", "none"))
    if not spec["mtp"]:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    b, t = spec["batch"], spec["seq"]
    tokens = jax.random.randint(jax.random.key(1), (b, t + 1), 0, cfg.vocab_size)
    for remat in dict.fromkeys((cfg.remat_policy, "full")):
        try:   # fresh parameters each try: a train_step that ran out of memory may have consumed its donated state
            timing = _time_steps(cfg.replace(remat_policy=remat), spec, init_params(cfg, jax.random.key(0)), tokens)
            break
        except Exception as exc:  # noqa: BLE001 - out of memory: try again with remat; anything else: report
            if "RESOURCE_EXHAUSTED" not in str(exc) or remat == "full":
                raise
    flops_tok = train_flops_per_token(cfg, t, with_mtp=bool(spec["mtp"]))
    tok_s = b * t / timing["step_s"]
    peak = peak_flops_per_device()
    stats = jax.devices()[0].memory_stats() or {}
    return {**device_info(), **spec, "impl": "jax", "precision": "fp8" if spec["fp8"] else "bf16", "remat": remat,
            **timing, "tokens_per_s": tok_s, "model_tflops": flops_tok * tok_s / 1e12,
            "mfu": flops_tok * tok_s / peak if peak else None, "flops_per_token": flops_tok,
            "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None}


def _time_steps(cfg: Any, spec: dict[str, Any], params: Any, tokens: Any) -> dict[str, Any]:
    """Compile time, then the median of spec["steps"] timed steps after 2 warm-up steps."""
    import jax

    from dsv3_jax.train.optimizer import make_optimizer
    from dsv3_jax.train.recipe import load_recipe
    from dsv3_jax.train.step import compute_losses, init_state, train_step

    hyper = _hyper()
    if spec["mode"] == "fwd_bwd":
        fn = jax.jit(lambda p, x: jax.value_and_grad(lambda p: compute_losses(cfg, p, x, hyper)[0])(p))
        state = params
        advance = lambda compiled, state: (state, compiled(state, tokens)[0])
    else:
        optimizer = make_optimizer(load_recipe("deepseek-v3-pretrain"))
        state = init_state(params, optimizer)
        fn = jax.jit(lambda s, x: train_step(cfg, optimizer, s, x, hyper), donate_argnums=0)
        advance = lambda compiled, state: (lambda out: (out[0], out[1]["loss"]))(compiled(state, tokens))
    t0 = time.perf_counter()
    compiled = fn.lower(state, tokens).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, loss = advance(compiled, state)
        jax.block_until_ready(loss)
    times = []
    for _ in range(spec.get("steps", 5)):
        t0 = time.perf_counter()
        state, loss = advance(compiled, state)
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - t0)
    return {"step_s": float(np.median(times)), "step_s_all": times, "compile_s": compile_s, "loss": float(loss)}


def stdlib_windows(count: int, length: int, seed: int = 0, pool_bytes: int = 16 * 2 ** 20) -> np.ndarray:
    """`count` windows of `length` bytes at seeded random offsets into the first `pool_bytes` of this Python's
    standard-library sources (sorted paths, site-packages left out), as int32 token ids 0..255 [count, length]:
    a shuffled stream, so that consecutive steps do not walk through one module after another."""
    chunks, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= pool_bytes:
            break
    pool = np.frombuffer(b"".join(chunks)[:pool_bytes], np.uint8)
    if len(pool) < length:
        raise ValueError(f"the standard-library sources hold {len(pool)} bytes, fewer than one window of {length}")
    starts = np.random.default_rng(seed).integers(0, len(pool) - length + 1, count)
    return pool[starts[:, None] + np.arange(length)].astype(np.int32)


def precision_name(spec: dict[str, Any]) -> str:
    """"fp8", "bf16", or "bf16_rerun" (the control run of the accuracy comparison)."""
    return "fp8" if spec["fp8"] else "bf16_rerun" if spec.get("rerun") else "bf16"


def accuracy_curve(spec: dict[str, Any]) -> dict[str, Any]:
    """Train spec["config"] for spec["steps"] steps (train_step, AdamW, FP32 master weights); the loss per step."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.bench.timing import device_info
    from dsv3_jax.config import load_config
    from dsv3_jax.model.functional import init_params
    from dsv3_jax.train import schedules
    from dsv3_jax.train.optimizer import make_optimizer
    from dsv3_jax.train.recipe import load_recipe
    from dsv3_jax.train.step import init_state, train_step

    steps, b, t, lr = spec["steps"], spec["batch"], spec["seq"], spec.get("peak_lr", 1e-3)
    cfg = load_config(spec["config"], fp8=spec["fp8"], attention_impl=spec.get("attention", "flash"))
    total = steps * b * t
    recipe = load_recipe("tiny-cpu", seq_len=t, batch_size_start=b, batch_size_end=b, batch_ramp_tokens=0,
                         total_tokens=total, warmup_steps=20, peak_lr=lr, min_lr=0.1 * lr, final_lr=0.03 * lr,
                         lr_decay_start_tokens=int(0.6 * total), lr_decay_tokens=int(0.35 * total),
                         min_lr_tokens=int(0.03 * total), mtp_weight_switch_tokens=int(0.6 * total),
                         bias_update_speed=spec.get("bias_update_speed", SETTING_DEFAULTS["bias_update_speed"]),
                         bias_update_stop_tokens=int(0.95 * total))
    data = stdlib_windows(steps * b, t + 1, seed=spec.get("seed", 0)).reshape(steps, b, t + 1)
    optimizer = make_optimizer(recipe)
    state = init_state(init_params(cfg, jax.random.key(spec.get("seed", 0))), optimizer)
    step_fn = jax.jit(lambda s, x, h: train_step(cfg, optimizer, s, x, h), donate_argnums=0)
    losses, t0 = [], time.perf_counter()
    for i in range(steps):
        seen = i * b * t
        hyper = _hyper(schedules.learning_rate(recipe, i, seen), schedules.mtp_weight(recipe, seen),
                       schedules.bias_update_speed(recipe, seen), recipe.balance_alpha)
        state, metrics = step_fn(state, jnp.asarray(data[i]), hyper)
        losses.append(metrics["loss"])
    losses = [float(x) for x in jax.device_get(losses)]
    wall = time.perf_counter() - t0
    heldout = stdlib_windows(HELDOUT_BATCHES * b, t + 1, seed=spec.get("seed", 0) + 1).reshape(-1, b, t + 1)
    return {**device_info(), **spec, "impl": "jax", "mode": "accuracy", "precision": precision_name(spec),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "losses": losses, "wall_s": wall,
            "heldout_loss": heldout_loss(cfg, state.params, heldout),
            "heldout_loss_other_precision": heldout_loss(cfg.replace(fp8=not cfg.fp8), state.params, heldout)}


def heldout_loss(cfg: Any, params: Any, batches: np.ndarray) -> float:
    """Mean next-token CE (nats/token) of params under cfg's precision over batches [n, batch, seq + 1]."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.train.step import eval_step

    step = jax.jit(lambda p, x: eval_step(cfg, p, x))
    sums = jax.device_get([step(params, jnp.asarray(x)) for x in batches])
    return float(sum(float(s) for s, _ in sums) / sum(float(n) for _, n in sums))


def forward_penalties(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Split FP8's held-out loss gap into the FP8 forward's error and the weights FP8 training reached:
    (L - L_bf16) / L_bf16 with L_bf16 the BF16 run's weights in BF16, for the FP8 run's weights in FP8 (the
    whole gap), the FP8 run's weights in BF16 (what training in FP8 changed) and the BF16 weights in FP8 (what
    the FP8 forward alone costs)."""
    bf16, fp8 = runs["bf16"], runs["fp8"]
    base = bf16["heldout_loss"]
    rel = lambda x: (x - base) / base
    return {"heldout_loss_bf16": base, "heldout_loss_fp8": fp8["heldout_loss"],
            "heldout_gap_fp8": rel(fp8["heldout_loss"]),
            "heldout_gap_fp8_weights_bf16_forward": rel(fp8["heldout_loss_other_precision"]),
            "heldout_gap_bf16_weights_fp8_forward": rel(bf16["heldout_loss_other_precision"])}


def smoothed(x: list[float], window: int = SMOOTH) -> np.ndarray:
    """Trailing moving average (the first window-1 points average what exists so far)."""
    x = np.asarray(x, np.float64)
    c = np.cumsum(np.insert(x, 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), window)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def signed_rel_diff(base: list[float], other: list[float]) -> np.ndarray:
    """(other - base) / base of the smoothed losses, per step."""
    a = smoothed(base)
    return (smoothed(other) - a) / a


def warmup_end(steps: int) -> int:
    """The first step the accuracy comparison's maxima and means count (after two smoothing windows)."""
    return min(steps - 1, 2 * SMOOTH)


def compare_curves(base: list[float], other: list[float]) -> dict[str, float]:
    """Relative difference |other - base| / base of the smoothed losses: at the end, max and mean after warm-up,
    and the signed mean (other - base) / base after warm-up (a bias, where the others also count drift)."""
    a, b = smoothed(base), smoothed(other)
    signed = signed_rel_diff(base, other)
    rel = np.abs(signed)
    start = warmup_end(len(rel))
    return {"final_rel_diff": float(rel[-1]), "final_signed_rel_diff": float(signed[-1]),
            "max_rel_diff_after_warmup": float(rel[start:].max()),
            "mean_rel_diff_after_warmup": float(rel[start:].mean()),
            "mean_signed_rel_diff_after_warmup": float(signed[start:].mean()), "final_loss_base": float(a[-1]),
            "final_loss_other": float(b[-1])}


def plot_curves(curves: dict[str, list[float]], path: str, title: str, band: np.ndarray | None = None) -> None:
    """Loss curves {"bf16": ..., "fp8": ..., optionally "bf16_rerun": ...}; below, each one's difference from BF16,
    FP8's with +-band around it (seed means: two standard errors, `seed_mean_standard_error`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    base = curves["bf16"]
    steps = np.arange(1, len(base) + 1)
    colors = dict(zip(curves, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for name, curve in curves.items():
        top.plot(steps, curve, alpha=0.2, color=colors[name])
        top.plot(steps, smoothed(curve), label=f"{name.upper()} (moving average {SMOOTH})", color=colors[name])
    top.set_ylabel("training loss (nats/token)")
    top.set_title(title)
    top.legend()
    for name, curve in curves.items():
        if name != "bf16":
            rel = signed_rel_diff(base, curve) * 100
            bottom.plot(steps, rel, label=f"{name.upper()} - BF16", color=colors[name])
            if name == "fp8" and band is not None:
                bottom.fill_between(steps, rel - 100 * band, rel + 100 * band, color=colors[name], alpha=0.2,
                                    label="± 2 standard errors of the seed mean")
    for sign in (1, -1):
        bottom.axhline(sign * 0.25, color="black", linestyle="--", label="±0.25% (paper)" if sign > 0 else None)
    bottom.set_ylabel("(X - BF16) / BF16 (%)")
    bottom.set_xlabel("step")
    bottom.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _subprocess(args: list[str], timeout: float, env: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
    """Run a measuring process with `env` on top of ours; its JSON lines and the tail of its other output."""
    env = {**os.environ, **PROCESS_ENV, **env}
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
        text, tail = proc.stdout, proc.stderr[-2000:]
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        tail = f"timed out after {timeout:.0f} s"
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return records, tail


def _run_jobs(jobs: list[tuple[str, list[str], dict[str, str]]], deadline: float, parallel: int = 1
              ) -> Iterator[tuple[str, list[dict[str, Any]] | None, str]]:
    """Run jobs (name, command, environment), `parallel` at a time; yield (name, JSON records, output tail) in
    job order, records None for a job that would have started less than 30 s before the deadline."""
    def one(job: tuple[str, list[str], dict[str, str]]) -> tuple[str, list[dict[str, Any]] | None, str]:
        name, args, env = job
        left = deadline - time.monotonic()
        return (name, None, "") if left < 30 else (name, *_subprocess(args, left, env))

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        yield from pool.map(one, jobs)


def run(out: str | None = None, config: str = "proxy-1gpu", batch: int = 2, seq: int = 4096, steps: int = 5,
        peer: bool = True, only: str = "all", accuracy_steps: int = 0, accuracy_config: str = "small",
        plot: str | None = None, budget_s: float = 3000.0, accuracy_control: bool = False, accuracy_batch: int = 16,
        accuracy_lr: float = 1e-3, accuracy_attention: str = "flash", accuracy_seeds: int = 1,
        accuracy_first_seed: int = 0, accuracy_parallel: int = 1,
        accuracy_bias_update_speed: float = SETTING_DEFAULTS["bias_update_speed"]) -> Reporter:
    """Run the peer, the accuracy runs (accuracy_parallel at a time, sharing the GPU) and each throughput
    measurement (alone) in child processes, within budget_s."""
    rep = Reporter("train", out, with_device=False)
    deadline = time.monotonic() + budget_s
    me = [sys.executable, "-m", "dsv3_jax.bench.train"]
    peer_jobs: list[tuple[str, list[str], dict[str, str]]] = []     # name, command, environment
    if peer:
        peer_jobs.append(("hf_torch", [sys.executable, "-m", "dsv3_jax.bench.hf_peer", "--config", config,
                                       "--batch", str(batch), "--seq", str(seq), "--steps", str(steps)], {}))
    setting = dict(zip(SETTING_KEYS, (accuracy_config, accuracy_steps, accuracy_batch, accuracy_lr, accuracy_attention,
                                      accuracy_bias_update_speed), strict=True))
    # the accuracy runs of one precision compile the same program for every seed: they share a compilation
    # cache (not the throughput runs, whose compile time is a figure); run side by side, each gets its share of
    # the GPU's memory (their losses do not depend on it: bench/RESULTS.md run 13)
    cache = tempfile.TemporaryDirectory(prefix="dsv3-accuracy-cache-")
    accuracy_env = {"JAX_COMPILATION_CACHE_DIR": cache.name}
    if accuracy_parallel > 1:
        accuracy_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / accuracy_parallel:.3f}"
    accuracy_jobs = []
    seeds = range(accuracy_first_seed, accuracy_first_seed + accuracy_seeds) if accuracy_steps else range(0)
    for seed in seeds:
        for fp8, rerun in [(False, False), (True, False)] + [(False, True)] * accuracy_control:
            spec = dict(**setting, fp8=fp8, rerun=rerun, seq=256, seed=seed)
            suffix = f"_seed{seed}" if accuracy_seeds > 1 or accuracy_first_seed else ""
            accuracy_jobs.append((f"accuracy_{precision_name(spec)}{suffix}", [*me, "--accuracy", json.dumps(spec)],
                                  accuracy_env))
    chosen = [s for s in default_specs(config, batch, seq) if only == "all" or s["name"] in only.split(",")]
    throughput_jobs = [(s["name"], [*me, "--measure", json.dumps({**s, "steps": steps})], {}) for s in chosen]
    runs: dict[int, dict[str, dict[str, Any]]] = {}          # seed -> precision -> accuracy record
    for group, parallel in ((peer_jobs, 1), (accuracy_jobs, accuracy_parallel), (throughput_jobs, 1)):
        for name, records, tail in _run_jobs(group, deadline, parallel):
            if records is None:
                rep.emit(name=name, skipped=f"time budget of {budget_s:.0f} s spent")
                continue
            if not records:
                rep.emit(name=name, error=tail)
            for r in records:
                rep.emit(**{**r, "name": name})
                if r.get("mode") == "accuracy":
                    runs.setdefault(r.get("seed", 0), {})[r["precision"]] = r
    cache.cleanup()
    _accuracy_summaries(rep, runs, setting, plot)
    rep.table(["name", "precision", "mode", "batch", "step_s", "tokens_per_s", "model_tflops", "mfu", "peak_mem_gb",
               "compile_s", "seed", "final_rel_diff", "error"])
    return rep


def seed_mean_standard_error(base: Sequence[list[float]], other: Sequence[list[float]]) -> np.ndarray:
    """Per step, the standard error of the seed mean of `signed_rel_diff` over paired runs (one per seed): the
    noise the seed-mean comparison still carries, std over seeds / sqrt(seeds)."""
    diffs = np.array([signed_rel_diff(b, o) for b, o in zip(base, other, strict=True)])
    return diffs.std(axis=0, ddof=1) / np.sqrt(len(diffs))


def _accuracy_summaries(rep: Reporter, runs: dict[int, dict[str, dict[str, Any]]], setting: dict[str, Any],
                        plot: str | None) -> None:
    """Per seed, FP8 (and the BF16 rerun) against BF16; over several seeds, the seed-mean curves compared too
    (the per-seed signed final differences show the spread a single seed's comparison has); the plot draws
    the one seed's curves, or the seed means."""
    setting = dict(setting, smooth_window=SMOOTH)
    complete = {seed: by for seed, by in sorted(runs.items()) if "bf16" in by and "fp8" in by}
    curves = {seed: {p: r["losses"] for p, r in by.items()} for seed, by in complete.items()}
    fp8_vs_bf16 = {seed: compare_curves(c["bf16"], c["fp8"]) for seed, c in curves.items()}
    for seed, c in curves.items():
        rep.emit(name="accuracy_summary", seed=seed, **setting, **fp8_vs_bf16[seed],
                 **forward_penalties(complete[seed]))
        if "bf16_rerun" in c:
            rep.emit(name="accuracy_control_bf16_rerun", seed=seed, **setting,
                     **compare_curves(c["bf16"], c["bf16_rerun"]))
    if not complete:
        return
    plotted, band = next(iter(curves.values())), None
    if len(complete) > 1:
        plotted = {p: np.mean([c[p] for c in curves.values()], axis=0).tolist() for p in ("bf16", "fp8")}
        signed = [cmp["final_signed_rel_diff"] for cmp in fp8_vs_bf16.values()]
        error = seed_mean_standard_error([c["bf16"] for c in curves.values()], [c["fp8"] for c in curves.values()])
        start = warmup_end(len(error))
        rep.emit(name="accuracy_summary_seed_mean", seeds=sorted(complete), **setting,
                 **compare_curves(plotted["bf16"], plotted["fp8"]), final_signed_rel_diff_per_seed=signed,
                 final_signed_rel_diff_std=float(np.std(signed, ddof=1)),
                 max_rel_diff_after_warmup_per_seed=[cmp["max_rel_diff_after_warmup"] for cmp in fp8_vs_bf16.values()],
                 standard_error_final=float(error[-1]), standard_error_max_after_warmup=float(error[start:].max()))
        band = 2 * error
    if plot:
        seeds = f"mean of {len(complete)} seeds" if len(complete) > 1 else "same seed and data"
        title = (f"{setting['config']}: BF16 vs FP8, {seeds}\n{setting['steps']} steps of {setting['batch']} x 256 "
                 f"tokens, peak LR {setting['peak_lr']:g}, bias update speed {setting['bias_update_speed']:g}, "
                 f"{setting['attention']} attention")
        try:
            plot_curves(plotted, plot, title, band=band)
        except ImportError as err:
            rep.emit(name="plot", error=f"no plot: {err}")


def merge_accuracy_records(paths: Sequence[str]) -> tuple[dict[int, dict[str, dict[str, Any]]], dict[str, Any]]:
    """The accuracy records (seed -> precision -> record) in the JSON lines of earlier `dsv3-bench train
    --accuracy_steps N --out FILE` calls, and the setting they share (`SETTING_KEYS`). A seed and precision
    recorded twice must hold the same losses (the runs are deterministic); records of another setting, lines that
    are not JSON and files without accuracy records are errors that name the file."""
    from dsv3_jax.data.sources import json_lines

    runs: dict[int, dict[str, dict[str, Any]]] = {}
    setting: dict[str, Any] | None = None
    for path in paths:
        for n, record in json_lines(path):
            if not isinstance(record, dict) or record.get("mode") != "accuracy" or "losses" not in record:
                continue
            this = {k: record.get(k, SETTING_DEFAULTS.get(k)) for k in SETTING_KEYS}
            setting = setting or this
            if this != setting:
                raise ValueError(f"{path}:{n}: an accuracy record of another setting ({this}, not {setting})")
            seed, precision = record.get("seed", 0), record["precision"]
            seen = runs.setdefault(seed, {}).get(precision)
            if seen is not None and seen["losses"] != record["losses"]:
                raise ValueError(f"{path}:{n}: seed {seed} ({precision}) recorded before with other losses")
            runs[seed][precision] = record
    if setting is None:
        raise ValueError(f"no accuracy records in {', '.join(paths)}")
    return runs, setting


def summarize_accuracy(paths: Sequence[str], out: str | None = None, plot: str | None = None) -> Reporter:
    """`dsv3-bench accuracy --records A,B`: the accuracy summaries (per seed, and of the seed means) over the
    records of several earlier calls, e.g. seeds split with --accuracy_first_seed."""
    runs, setting = merge_accuracy_records(paths)
    rep = Reporter("train", out, with_device=False)
    _accuracy_summaries(rep, runs, setting, plot)
    rep.table(["name", "seed", "seeds", "final_signed_rel_diff", "max_rel_diff_after_warmup",
               "mean_signed_rel_diff_after_warmup", "heldout_gap_fp8", "heldout_gap_bf16_weights_fp8_forward"])
    return rep


def _child_main(argv: list[str]) -> None:
    """`python -m dsv3_jax.bench.train --measure SPEC_JSON` or `--accuracy SPEC_JSON`: print one JSON line."""
    flag, spec = argv[1], json.loads(argv[2])
    try:
        record = measure(spec) if flag == "--measure" else accuracy_curve(spec)
    except Exception as exc:  # noqa: BLE001 - out of memory and the like are results, reported as such
        record = {**spec, "error": repr(exc)[:1500]}
    print(json.dumps(record, default=float), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv)
