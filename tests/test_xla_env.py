"""dsv3_jax.xla_env: default XLA flags, added only for a jaxlib that knows them, never over the user's."""

from dsv3_jax import xla_env


def test_set_defaults_adds_missing_flags_only(monkeypatch):
    monkeypatch.setattr(xla_env.jaxlib_version, "__version_info__", (0, 11, 2))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                        "--xla_gpu_unsupported_use_ragged_all_to_all_one_shot_kernel=true"}
    flags = xla_env.set_defaults(env)
    assert env["XLA_FLAGS"] == flags
    assert "--xla_force_host_platform_device_count=8" in flags
    assert "one_shot_kernel=true" in flags and "one_shot_kernel=false" not in flags      # the user's value stays
    assert "--xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true" in flags
    assert xla_env.set_defaults(env) == flags                                              # idempotent


def test_set_defaults_skips_old_jaxlib(monkeypatch):
    monkeypatch.setattr(xla_env.jaxlib_version, "__version_info__", (0, 10, 2))
    env = {}
    assert xla_env.set_defaults(env) == "" and "XLA_FLAGS" not in env
