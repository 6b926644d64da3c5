"""`dsv3-train`: pre-train a DeepSeek-V3-style model. With no flags: the tiny config on the built-in corpus.

    dsv3-train                                   # tiny model, built-in corpus, tiny-cpu recipe, ./runs/tiny
    dsv3-train --config small --recipe tiny-cpu --steps 500 --workdir runs/small
    dsv3-train --config path/to/config.json --data corpus.jsonl --tokenizer path/to/tokenizer_dir
    dsv3-train --config proxy-1gpu --fp8                             # FP8 training (Pallas kernels on GPU)
    dsv3-train --mesh data=2,expert=4                                # any mesh over the visible devices
    dsv3-train --mesh pipe=4,data=2 --pipeline-schedule dualpipe     # pipeline stages over "pipe"
    dsv3-train --distributed --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0   # one per host
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from dsv3_jax.parallel.pipeline import SCHEDULES

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "Model config: a name from dsv3_jax/configs or a path to an HF config.json.")
flags.DEFINE_string("recipe", "tiny-cpu", "Training recipe: a name from dsv3_jax/configs/recipes or a JSON path.")
flags.DEFINE_string("workdir", "runs/tiny", "Directory for checkpoints, metrics.jsonl, TensorBoard and the tokenizer.")
flags.DEFINE_integer("steps", None, "Train until this step (default: the recipe's total steps).")
flags.DEFINE_integer("seed", 0, "Seed of the initialization and of the data order.")
flags.DEFINE_string("data", "builtin", "'builtin' (Python's standard library sources), a text file or directory, "
                    "a .jsonl file (field 'text') or a .parquet file (column 'text').")
flags.DEFINE_string("tokenizer", None, "HF tokenizer.json or tokenizer directory; default: train one on --data "
                    "once and cache it in the workdir.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Override the config's activation dtype.")
flags.DEFINE_bool("fp8", False, "FP8 training (the config's `fp8`): every eligible linear and the expert GEMMs in "
                  "E4M3 with 1x128 activation tiles and 128x128 weight blocks, FP32 accumulation.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("mesh", "", "Mesh axis sizes over all devices, e.g. 'data=2,expert=4' (axes pipe, data, expert, "
                    "tensor; one may be -1 = the remaining devices; default: every device data parallel).")
flags.DEFINE_enum("pipeline_schedule", "dualpipe", list(SCHEDULES),
                  "Pipeline schedule when --mesh has pipe > 1 (DualPipe: bidirectional, each device holds stages "
                  "i and pipe-1-i; it needs an even number of micro-batches >= 2 x pipe).")
flags.DEFINE_alias("pipeline-schedule", "pipeline_schedule")
flags.DEFINE_integer("microbatches", 0, "Micro-batches per step with pipe > 1 (0: one sequence per data shard each, "
                     "batch / data-parallel size: the smallest bubble); must divide the rows of each data shard.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (one process per host or GPU); "
                  "unset --coordinator/--num_processes/--process_id come from SLURM, Open MPI or the TPU pod.")
flags.DEFINE_string("coordinator", None, "host:port of process 0's coordinator service (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (with --distributed).")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dsv3_jax import xla_env

    xla_env.set_defaults()          # before JAX starts a backend
    if FLAGS.distributed:
        import jax

        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    from dsv3_jax.config import ConfigError, load_config
    from dsv3_jax.data import DataError, TokenizerError
    from dsv3_jax.parallel.mesh import ParallelConfig, ParallelConfigError
    from dsv3_jax.train.checkpoint import CheckpointError
    from dsv3_jax.train.recipe import RecipeError, load_recipe
    from dsv3_jax.train.trainer import TrainingError, train

    try:
        overrides = {"dtype": FLAGS.dtype} if FLAGS.dtype else {}
        if FLAGS.fp8:
            overrides["fp8"] = True
        cfg = load_config(FLAGS.config, **overrides)
        recipe = load_recipe(FLAGS.recipe)
        print(f"config {FLAGS.config} (activations {cfg.dtype}, FP8 {'on' if cfg.fp8 else 'off'}), recipe "
              f"{FLAGS.recipe}, mesh {FLAGS.mesh or 'all devices data parallel'}", flush=True)
        parallel = ParallelConfig.parse(FLAGS.mesh)
        result = train(cfg, recipe, FLAGS.workdir, steps=FLAGS.steps, seed=FLAGS.seed, data=FLAGS.data,
                       tokenizer_path=FLAGS.tokenizer, progress=FLAGS.progress, parallel=parallel,
                       pipeline_schedule=FLAGS.pipeline_schedule, microbatches=FLAGS.microbatches)
    except (ConfigError, RecipeError, DataError, TokenizerError, CheckpointError, TrainingError,
            ParallelConfigError) as err:
        print(f"dsv3-train: error: {err}", file=sys.stderr)
        return 1
    verdict = "below" if result.heldout_loss < result.unigram_loss else "NOT below"
    print(f"\n{'stopped by signal' if result.stopped_early else 'done'} at step {result.step} "
          f"({result.tokens:,} tokens)")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {result.workdir / 'metrics.jsonl'} (TensorBoard: {result.workdir / 'tensorboard'})")
    print(f"held-out loss {result.heldout_loss:.4f} nats/token ({result.heldout_bits_per_byte:.4f} bits/byte), "
          f"{verdict} the unigram model of the same data: {result.unigram_loss:.4f} nats/token")
    return 0


def _quiet_main(argv: list[str]) -> None:
    """main() with library INFO logs (orbax, absl) hidden unless --verbosity is given."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    sys.exit(main(argv))


def run() -> None:
    """Console-script entry point (`--help`: this module's docstring and flags; `--helpfull`: every flag)."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(f"{__doc__}\n{FLAGS.module_help(__name__)}")
        sys.exit(0)
    app.run(_quiet_main)
