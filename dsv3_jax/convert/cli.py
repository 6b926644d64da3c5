"""`dsv3-convert`: convert model weights between Hugging Face safetensors and orbax.

    dsv3-convert --from hf --to orbax --input DeepSeek-V3/ --output ckpt/ --dtype bfloat16
    dsv3-convert --from orbax --to hf --input ckpt/ --output hf-out/ --fp8

`--from hf` reads bf16/fp32 or DeepSeek's FP8 (+ weight_scale_inv) checkpoints, dequantizing FP8 weights.
`--to hf` writes DeepSeek's layout (per-expert tensors, MTP layer at index num_hidden_layers), FP8 with
`--fp8`. The orbax directory layout is documented in `dsv3_jax.convert.orbax_io`. Outputs are written
atomically; an existing non-empty output needs `--overwrite`. Exit status: 0 on success, 1 when the
input is bad or the output exists, 2 for wrong flags.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from absl import flags

from dsv3_jax.config import ConfigError

# A FlagValues of our own, so these flags never collide with other CLIs imported into one process.
FLAGS = flags.FlagValues()
flags.DEFINE_enum("from", None, ["hf", "orbax"], "Input format.", flag_values=FLAGS)
flags.DEFINE_enum("to", None, ["hf", "orbax"], "Output format.", flag_values=FLAGS)
flags.DEFINE_string("input", None, "Input directory.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "Output directory (written atomically).", flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                  "Dtype of kernels and embedding (norms and router stay float32). Default: --from hf: the "
                  "config's param_dtype (float32); --from orbax: as stored.", flag_values=FLAGS)
flags.DEFINE_bool("fp8", False, "--to hf: write block Linear weights as FP8 E4M3 + 128x128 weight_scale_inv, "
                  "as DeepSeek's release does.", flag_values=FLAGS)
flags.DEFINE_float("max_shard_gb", 5.0, "--to hf: largest safetensors file, in GB (1e9 bytes).", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output directory.", flag_values=FLAGS)

log = logging.getLogger("dsv3_jax.convert")


def _usage() -> str:
    return f"{__doc__}\nFlags:\n{FLAGS.get_help(include_special_flags=False)}\n"


def _error(msg: str, code: int) -> int:
    print(f"dsv3-convert: error: {msg}", file=sys.stderr)
    return code


def main(argv: Sequence[str]) -> int:
    """Run the converter with command-line `argv` (argv[0] is the program name); returns the exit status."""
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(_usage())
        return 0
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(list(argv))
    except flags.Error as err:
        return _error(f"{err} (see --help)", 2)
    if len(rest) > 1:
        return _error(f"unexpected arguments {rest[1:]} (see --help)", 2)
    for name in ("from", "to", "input", "output"):
        if FLAGS[name].value is None:
            return _error(f"--{name} is required (see --help)", 2)
    source, target = FLAGS["from"].value, FLAGS.to
    if FLAGS.fp8 and target != "hf":
        return _error("--fp8 applies to --to hf only", 2)
    if not Path(FLAGS.input).is_dir():
        return _error(f"--input {FLAGS.input}: no such directory", 1)
    output = Path(FLAGS.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not FLAGS.overwrite:
        return _error(f"--output {output} exists and is not empty; pass --overwrite to replace it", 1)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dsv3-convert: %(message)s"))
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return _convert(source, target)
    except (ConfigError, ValueError, FileExistsError, FileNotFoundError, PermissionError) as err:
        return _error(str(err), 1)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


def _convert(source: str, target: str) -> int:
    from dsv3_jax.convert import hf, orbax_io

    t0 = time.time()
    log.info("reading %s (%s)", FLAGS.input, source)
    if source == "hf":
        cfg, params = hf.load_hf(FLAGS.input, dtype=FLAGS.dtype)
    else:
        cfg, params = orbax_io.load_orbax(FLAGS.input, dtype=FLAGS.dtype)
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    log.info("read %s parameters (%d layers, %d MTP) in %.1fs", f"{n:,}", cfg.num_hidden_layers,
             cfg.num_nextn_predict_layers, time.time() - t0)
    log.info("writing %s (%s%s)", FLAGS.output, target, ", fp8" if FLAGS.fp8 else "")
    if target == "hf":
        hf.save_hf(cfg, params, FLAGS.output, fp8=FLAGS.fp8, max_shard_bytes=int(FLAGS.max_shard_gb * 1e9),
                   overwrite=FLAGS.overwrite)
    else:
        orbax_io.save_orbax(cfg, params, FLAGS.output, overwrite=FLAGS.overwrite)
    log.info("done: %s -> %s in %.1fs", FLAGS.input, FLAGS.output, time.time() - t0)
    return 0


def run() -> None:
    """Console-script entry point (`dsv3-convert`)."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
