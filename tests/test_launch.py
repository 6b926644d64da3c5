"""launch/local_cpu.sh: 2 processes x 4 CPU devices train like 1 process x 8 devices, and their checkpoint resumes
in a single process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

import dsv3_jax
from dsv3_jax.parallel.mesh import ParallelConfig
from dsv3_jax.train.metrics import read_metrics
from dsv3_jax.train.recipe import load_recipe
from dsv3_jax.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
MESH = "data=2,expert=4"
RECIPE = dict(seq_len=32, total_tokens=8 * 32 * 4, batch_size_start=8, batch_size_end=8, batch_ramp_tokens=256,
              batch_size_quantum=8, warmup_steps=1, lr_decay_start_tokens=512, lr_decay_tokens=256, min_lr_tokens=128,
              mtp_weight_switch_tokens=1024, bias_update_stop_tokens=1024, log_every=1, eval_every=1000,
              eval_batches=1, eval_batch_size=8, checkpoint_every=1000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_two_processes_give_the_one_process_losses_and_checkpoint(tmp_path):
    cfg = dsv3_jax.load_config("tiny", vocab_size=512, num_hidden_layers=1, first_k_dense_replace=0, dtype="float32")
    recipe = load_recipe("tiny-cpu", **RECIPE)
    rng = np.random.default_rng(0)
    corpus = tmp_path / "docs.jsonl"
    lines = ("\n".join(f"    x_{j} = {rng.integers(0, 1000)}  # item {j}" for j in range(10)) for _ in range(300))
    corpus.write_text("".join(json.dumps({"text": f"def f{i}():\n{body}\n"}) + "\n" for i, body in enumerate(lines)))
    one = tmp_path / "one"
    train(cfg, recipe, one, steps=3, data=str(corpus), progress=False, parallel=ParallelConfig.parse(MESH))

    (tmp_path / "config.json").write_text(json.dumps(dict(cfg.to_hf_dict(), dtype="float32")))
    (tmp_path / "recipe.json").write_text(json.dumps(recipe.__dict__))
    env = dict(os.environ, NPROC="2", DEVICES="4", PORT=str(_free_port()), LOG_DIR=str(tmp_path / "logs"),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    two = tmp_path / "two"
    proc = subprocess.run([str(ROOT / "launch" / "local_cpu.sh"), "--config", str(tmp_path / "config.json"),
                           "--dtype", "float32", "--recipe", str(tmp_path / "recipe.json"), "--data", str(corpus),
                           "--tokenizer", str(one / "tokenizer"), "--mesh", MESH, "--workdir", str(two),
                           "--steps", "3", "--noprogress"], env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs[-3000:]
    assert "done at step 3" in proc.stdout

    single, multi = _losses(one), _losses(two)
    assert sorted(multi) == sorted(single) == [1, 2, 3]
    np.testing.assert_allclose([multi[s] for s in (1, 2, 3)], [single[s] for s in (1, 2, 3)], rtol=1e-5)

    # the 2-process checkpoint (each process wrote its shards) resumes in this 8-device process
    for workdir in (one, two):
        train(cfg, recipe, workdir, steps=4, data=str(corpus), tokenizer_path=str(one / "tokenizer"), progress=False,
              parallel=ParallelConfig.parse(MESH))
    np.testing.assert_allclose(_losses(two)[4], _losses(one)[4], rtol=1e-5)
