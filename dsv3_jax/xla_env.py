"""XLA flags this project sets by default; entry points call `set_defaults()` before JAX starts a backend.

Ragged all-to-all (the expert-parallel dispatch, `dsv3_jax.parallel.expert_parallel`): on one host XLA:GPU
runs `jax.lax.ragged_all_to_all` as its "one-shot" copy kernel, which parallelizes over the ragged chunks
(one per peer), not over rows: one MoE layer's dispatch and combine (4096 tokens x top-8 x 7168, one GPU)
took 531 ms on H100, against 10 ms with the same exchange through NCCL send/recv (bench/RESULTS.md,
2026-11-24). The flags that route it to NCCL exist from jaxlib 0.11 on (0.10 aborts on the second one);
flags the user already set in XLA_FLAGS win.
"""

from __future__ import annotations

import os

from jaxlib import version as jaxlib_version

RAGGED_ALL_TO_ALL_NCCL = {
    "xla_gpu_unsupported_use_ragged_all_to_all_one_shot_kernel": "false",
    "xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback": "true",
}
MIN_JAXLIB = (0, 11)


def set_defaults(environ: dict[str, str] | os._Environ = os.environ) -> str:
    """Append the project's default flags to environ["XLA_FLAGS"] (those not already named there) and return
    the result. Takes effect only if no JAX backend has started yet in this process."""
    flags = environ.get("XLA_FLAGS", "")
    if tuple(jaxlib_version.__version_info__[:2]) >= MIN_JAXLIB:
        extra = [f"--{name}={value}" for name, value in RAGGED_ALL_TO_ALL_NCCL.items() if f"--{name}=" not in flags]
        flags = " ".join([flags, *extra]).strip()
        environ["XLA_FLAGS"] = flags
    return flags
