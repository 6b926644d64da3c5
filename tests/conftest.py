"""Test set-up: CPU only, 8 emulated devices for multi-device tests, float32 model configs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests jit the same programs many times (each train() call, each subprocess): share compiled executables.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("DSV3_TEST_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "dsv3-jax-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import dsv3_jax  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    """The tiny config in float32 (exact comparisons)."""
    return dsv3_jax.load_config("tiny", dtype="float32")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    return dsv3_jax.init_params(tiny_cfg, jax.random.key(0))
