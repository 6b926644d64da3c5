"""`dsv3-bench NAME`: GPU benchmarks, one JSON line per measurement on stdout (and appended to --out).

    dsv3-bench gemm                          # blockwise FP8 GEMM vs BF16 / per-tensor FP8 / jnp dequant (XLA)
    dsv3-bench grouped_gemm                  # MoE grouped GEMM, BF16 and FP8, vs ragged_dot and jax's Mosaic kernel
    dsv3-bench quantize                      # FP8 quantization of GEMM operands: XLA fusions vs the fused kernel
    dsv3-bench train --config proxy-1gpu     # tokens/s, MFU, memory: JAX BF16 and FP8 vs HF transformers (PyTorch)
    dsv3-bench train --only none --nopeer --accuracy_steps 300 --plot curves.png   # BF16 vs FP8 loss curves
    dsv3-bench accuracy --records a.jsonl,b.jsonl --plot curves.png   # those of several calls' seeds, merged
    dsv3-bench moe_layer                     # expert-parallel MoE layer, EP=1 vs EP=all GPUs, all-to-all GB/s
    dsv3-bench pipeline --schedule dualpipe --pp 8   # draws the schedule (PNG), bubble/params/activations per schedule
    dsv3-bench pipeline_step --config proxy-1gpu --schedule dualpipe   # pipe=all GPUs vs pipe=1: time, bubble
    dsv3-bench plan --config deepseek-v3-671b --mesh pipe=16,expert=64,data=2   # per-device memory per schedule
    dsv3-bench profile --target moe_layer    # device time per kernel (moe_layer, moe_local, train)

Names: gemm, grouped_gemm, quantize, train, accuracy, moe_layer, pipeline, pipeline_step, plan, profile. Figures
measured on this project's devices: dsv3_jax/bench/RESULTS.md.
"""

from __future__ import annotations

import sys

from absl import flags

from dsv3_jax import xla_env

# A FlagValues of our own, so these flags never collide with other CLIs imported into one process.
FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "Append every JSON line to this file too.", flag_values=FLAGS)
flags.DEFINE_string("shapes", "all", "gemm: 'all' or comma-separated MxNxK.", flag_values=FLAGS)
flags.DEFINE_string("impls", "all", "gemm: 'all' or some of bf16,fp8_tensor,fp8_block_jnp,fp8_block_pallas,"
                    "fp8_block_mgpu.", flag_values=FLAGS)
flags.DEFINE_string("mgpu_configs", None, "gemm: a JSON list of MgpuGemmConfig keyword dicts to sweep instead of "
                    "bench.gemm.CONFIGS_MGPU, e.g. '[{\"k_blocks\": 1, \"max_concurrent_steps\": 4}]'.",
                    flag_values=FLAGS)
flags.DEFINE_string("layouts", "all", "grouped_gemm: 'all' or some of 8x4096,4x8192,skewed32.", flag_values=FLAGS)
flags.DEFINE_string("nk", "all", "grouped_gemm: 'all' or comma-separated NxK.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", None, "gemm / grouped_gemm / quantize: calls per timed batch (default 4 / 2 / 4).",
                     flag_values=FLAGS)
flags.DEFINE_string("config", "proxy-1gpu", "train / profile / pipeline_step: model config.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 2, "train: sequences per step (train_step runs use half); pipeline_step: sequences "
                     "per micro-batch (default 1).", flag_values=FLAGS)
flags.DEFINE_integer("seq", 4096, "train: tokens per sequence.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "train / pipeline_step: timed steps per measurement (after warm-up).",
                     flag_values=FLAGS)
flags.DEFINE_bool("peer", True, "train: also run HF transformers' DeepseekV3 (PyTorch) on the config.",
                  flag_values=FLAGS)
flags.DEFINE_string("only", "all", "train: 'all', 'none' or some of jax_bf16_fwd_bwd, jax_fp8_fwd_bwd, "
                    "jax_fp8_train_step, jax_bf16_train_step.", flag_values=FLAGS)
flags.DEFINE_integer("accuracy_steps", 0, "train: also train --accuracy_config this many steps in BF16 and FP8.",
                     flag_values=FLAGS)
flags.DEFINE_string("accuracy_config", "small", "train: config of the accuracy comparison.", flag_values=FLAGS)
flags.DEFINE_string("plot", None, "train: write the accuracy loss curves to this PNG.", flag_values=FLAGS)
flags.DEFINE_bool("accuracy_control", False, "train: train BF16 twice, the run-to-run noise floor of the comparison.",
                  flag_values=FLAGS)
flags.DEFINE_integer("accuracy_batch", 16, "train: sequences per step of the accuracy runs.", flag_values=FLAGS)
flags.DEFINE_float("accuracy_lr", 1e-3, "train: peak learning rate of the accuracy runs.", flag_values=FLAGS)
flags.DEFINE_enum("accuracy_attention", "flash", ["flash", "reference"], "train: attention of the accuracy runs "
                  "(reference: the jnp softmax path, deterministic with --xla_gpu_exclude_nondeterministic_ops).",
                  flag_values=FLAGS)
flags.DEFINE_integer("accuracy_seeds", 1, "train: repeat the accuracy comparison from this many seeds (init and data) "
                     "and compare the seed-mean curves too.", flag_values=FLAGS, lower_bound=1)
flags.DEFINE_integer("accuracy_first_seed", 0, "train: the first of the --accuracy_seeds seeds (to split seeds over "
                     "several calls).", flag_values=FLAGS, lower_bound=0)
flags.DEFINE_integer("accuracy_parallel", 1, "train: accuracy runs trained at a time, sharing the GPU (each gets "
                     "0.9 / P of its memory; `small` at batch 64 needs about 10.4 GB a run: P <= 6 on an 80 GB H100).",
                     flag_values=FLAGS, lower_bound=1)
flags.DEFINE_float("accuracy_bias_update_speed", 1e-3, "train: the accuracy runs' aux-loss-free bias update speed "
                   "(gamma; 0: fixed biases, routing without the sign-driven bias walk).", flag_values=FLAGS,
                   lower_bound=0)
flags.DEFINE_string("records", None, "accuracy: comma-separated JSONL files of earlier `train --accuracy_steps "
                    "--out` calls.", flag_values=FLAGS)
flags.DEFINE_float("budget_s", None, "Skip (and report) measurements that would start after this many seconds.",
                   flag_values=FLAGS)

flags.DEFINE_string("schedule", "dualpipe", "pipeline / pipeline_step: the schedule (gpipe, 1f1b, zb1p, dualpipe).",
                    flag_values=FLAGS)
flags.DEFINE_integer("pp", None, "pipeline / pipeline_step: pipeline stages (default 8 / every device).",
                     flag_values=FLAGS)
flags.DEFINE_integer("microbatches", None, "pipeline / plan / pipeline_step: micro-batches per step (default "
                     "2 x pp + 4 / 2 x pp + 4 / 2 x pp).", flag_values=FLAGS)
flags.DEFINE_string("png", None, "pipeline: where to draw the schedule (default pipeline_<schedule>_pp<pp>.png).",
                    flag_values=FLAGS)
flags.DEFINE_string("mesh", "pipe=16,expert=64,data=2", "plan: the mesh, axis=size,...", flag_values=FLAGS)

flags.DEFINE_integer("experts_per_gpu", 32, "moe_layer: routed experts per GPU (DeepSeek-V3 at EP=8: 256 / 8).",
                     flag_values=FLAGS)
flags.DEFINE_integer("tokens_per_gpu", 4096, "moe_layer: tokens per GPU.", flag_values=FLAGS)
flags.DEFINE_string("moe_backend", "auto", "moe_layer: grouped GEMM backend of the local experts (auto, xla, pallas).",
                    flag_values=FLAGS)
flags.DEFINE_enum("moe_exchange", "auto", ["auto", "ragged", "padded"], "moe_layer: the all-to-all of the dispatch.",
                  flag_values=FLAGS)

flags.DEFINE_enum("target", "moe_layer", ["moe_layer", "moe_local", "train"], "profile: the program to profile.",
                  flag_values=FLAGS)
flags.DEFINE_integer("top", 25, "profile: ops and kernels reported per target.", flag_values=FLAGS)
flags.DEFINE_bool("profile_grad", False, "profile: moe_layer / moe_local forward + backward.", flag_values=FLAGS)
flags.DEFINE_string("layer_fn", None, "profile: module:function replacing the profiled MoE function (a candidate).",
                    flag_values=FLAGS)
flags.DEFINE_bool("fp8", False, "profile: train target in FP8.", flag_values=FLAGS)
flags.DEFINE_string("hlo_dir", None, "profile: also write the optimized HLO (gzip) into this folder.",
                    flag_values=FLAGS)

NAMES = ("gemm", "grouped_gemm", "quantize", "train", "accuracy", "moe_layer", "pipeline", "pipeline_step", "plan",
         "profile")


def _error(message: str) -> int:
    """Print `message` as dsv3-bench's error and give the exit status of a bad invocation."""
    print(f"dsv3-bench: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    xla_env.set_defaults()          # before any benchmark starts a JAX backend (children inherit it)
    try:
        rest = FLAGS(argv)
    except flags.Error as err:
        return _error(f"{err}\n\n{__doc__}")
    if len(rest) != 2 or rest[1] not in NAMES:
        return _error(f"give one benchmark name of {', '.join(NAMES)}\n\n{__doc__}")
    name = rest[1]
    if name == "gemm":
        from dsv3_jax.bench import gemm
        try:
            configs = gemm.mgpu_configs(FLAGS.mgpu_configs) if FLAGS.mgpu_configs else gemm.CONFIGS_MGPU
        except ValueError as err:
            return _error(str(err))
        gemm.run(FLAGS.out, FLAGS.shapes, repeats=FLAGS.repeats or 4, budget_s=FLAGS.budget_s, impls=FLAGS.impls,
                 configs_mgpu=configs)
    elif name == "grouped_gemm":
        from dsv3_jax.bench import grouped_gemm
        grouped_gemm.run(FLAGS.out, FLAGS.layouts, repeats=FLAGS.repeats or 2, budget_s=FLAGS.budget_s,
                         nk=FLAGS.nk)
    elif name == "quantize":
        from dsv3_jax.bench import quantize
        quantize.run(FLAGS.out, repeats=FLAGS.repeats or 4, budget_s=FLAGS.budget_s)
    elif name == "moe_layer":
        from dsv3_jax.bench import moe_layer
        moe_layer.run(FLAGS.out, tokens=FLAGS.tokens_per_gpu, experts_per_device=FLAGS.experts_per_gpu,
                      repeats=FLAGS.repeats or 4, budget_s=FLAGS.budget_s, backend=FLAGS.moe_backend,
                      exchange=FLAGS.moe_exchange)
    elif name == "profile":
        from dsv3_jax.bench import profile
        profile.run(FLAGS.out, FLAGS.target, top=FLAGS.top, grad=FLAGS.profile_grad, backend=FLAGS.moe_backend,
                    exchange=FLAGS.moe_exchange, layer_fn=FLAGS.layer_fn, config=FLAGS.config, fp8=FLAGS.fp8,
                    batch=FLAGS.batch, seq=FLAGS.seq, hlo_dir=FLAGS.hlo_dir)
    elif name == "pipeline":
        from dsv3_jax.bench import pipeline
        pipeline.run(FLAGS.schedule, FLAGS.pp or 8, FLAGS.microbatches, FLAGS.png, FLAGS.out)
    elif name == "pipeline_step":
        from dsv3_jax.bench import pipeline_step
        pipeline_step.run(FLAGS.config, FLAGS.schedule, FLAGS.pp, FLAGS.microbatches,
                          rows=FLAGS.batch if FLAGS["batch"].present else 1, seq=FLAGS.seq, steps=FLAGS.steps,
                          out=FLAGS.out)
    elif name == "accuracy":
        from dsv3_jax.bench import train
        if not FLAGS.records:
            return _error("accuracy needs --records FILE[,FILE...]")
        try:
            train.summarize_accuracy(FLAGS.records.split(","), FLAGS.out, FLAGS.plot)
        except (OSError, ValueError) as err:
            return _error(str(err))
    elif name == "plan":
        from dsv3_jax.bench import plan
        config = FLAGS.config if FLAGS["config"].present else "deepseek-v3-671b"
        plan.run(config, FLAGS.mesh, n_mb=FLAGS.microbatches, out=FLAGS.out)
    else:
        from dsv3_jax.bench import train
        train.run(FLAGS.out, FLAGS.config, FLAGS.batch, FLAGS.seq, FLAGS.steps, FLAGS.peer, FLAGS.only,
                  FLAGS.accuracy_steps, FLAGS.accuracy_config, FLAGS.plot, FLAGS.budget_s or 3000.0,
                  FLAGS.accuracy_control, FLAGS.accuracy_batch, FLAGS.accuracy_lr, FLAGS.accuracy_attention,
                  FLAGS.accuracy_seeds, FLAGS.accuracy_first_seed, FLAGS.accuracy_parallel,
                  FLAGS.accuracy_bias_update_speed)
    return 0


def run() -> None:
    """Console-script entry point (`dsv3-bench`)."""
    if any(a in ("-h", "--help", "--helpfull") for a in sys.argv[1:]):
        print(__doc__ + "\n" + str(FLAGS))
        sys.exit(0)
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
