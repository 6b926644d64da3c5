import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.train.checkpoint import Checkpointer, CheckpointError, abstract_like


def _state(value: float):
    return {"params": {"w": jnp.full((4, 3), value), "b": jnp.arange(3.0) * value}, "step": jnp.int32(value)}


@pytest.fixture
def cfg():
    return dsv3_jax.load_config("tiny")


def test_save_restore_round_trip_keeps_last_n(tmp_path, cfg):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"doc_index": step}, cfg, tokens=100 * step)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    state, data, meta = ckpt.restore(3, abstract_like(_state(0)), cfg)
    np.testing.assert_array_equal(state["params"]["w"], 3.0)
    assert data == {"doc_index": 3} and meta["tokens"] == 300
    ckpt.close()


_KILL_MID_SAVE = """
import os, sys
import jax.numpy as jnp
import orbax.checkpoint as ocp
import dsv3_jax
from dsv3_jax.train.checkpoint import Checkpointer

cfg = dsv3_jax.load_config("tiny")
state = lambda v: {"params": {"w": jnp.full((4, 3), v), "b": jnp.arange(3.0) * v}, "step": jnp.int32(v)}
ckpt = Checkpointer(sys.argv[1], async_save=False)
ckpt.save(1, state(1.0), {"doc_index": 1}, cfg, tokens=1)
ckpt.wait()
ocp.JsonCheckpointHandler._save_fn = lambda *a, **k: os._exit(3)   # the process dies inside the write of step 2
ckpt.save(2, state(2.0), {"doc_index": 2}, cfg, tokens=2)
"""


def test_interrupted_write_never_becomes_latest(tmp_path, cfg):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _KILL_MID_SAVE, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert any("2" in p.name and p.name != "2" for p in tmp_path.iterdir()), "the killed save left no temporary"
    fresh = Checkpointer(tmp_path)
    assert fresh.latest_step() == 1
    state, data, _ = fresh.restore(1, abstract_like(_state(0)), cfg)
    np.testing.assert_array_equal(state["params"]["b"], [0.0, 1.0, 2.0])
    assert data == {"doc_index": 1}


def test_mismatched_config_is_named(tmp_path, cfg):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(5, _state(5), {}, cfg, tokens=5)
    ckpt.wait()
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 128 vs run 256"):
        ckpt.restore(5, abstract_like(_state(0)), cfg.replace(hidden_size=256))


def test_corrupted_checkpoint_gives_a_clear_error(tmp_path, cfg):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(7, _state(7), {}, cfg, tokens=7)
    ckpt.wait()
    state_dir = tmp_path / "7" / "state"
    for path in state_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="7.*corrupted"):
        Checkpointer(tmp_path).restore(7, abstract_like(_state(0)), cfg)


def test_missing_state_leaf_is_named(tmp_path, cfg):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, _state(1), {}, cfg, tokens=1)
    ckpt.wait()
    bigger = dict(_state(0), extra=jnp.zeros(2))
    with pytest.raises(CheckpointError):
        Checkpointer(tmp_path).restore(1, abstract_like(bigger), cfg)
    shutil.rmtree(tmp_path)
