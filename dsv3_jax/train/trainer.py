"""The training loop: data, schedules, the jitted step, evaluation, checkpoints, metrics, signals.

`train(...)` runs from the latest checkpoint in the workdir (or from scratch) to `steps`, writing
`metrics.jsonl`, TensorBoard events and orbax checkpoints, and returns a `TrainResult`.

The same loop runs on any mesh (`--mesh data=2,expert=4`; default: every device data parallel), in one
process or many (after `jax.distributed.initialize()`): the state lives sharded in the ZeRO-1 layout,
each process puts its rows of the global batch on its devices, and all processes write their shards of
every checkpoint. Every process packs the same global token stream and keeps its own rows, so losses,
data position and checkpoints do not depend on the number of processes (resume on another host count
works); process 0 alone writes metrics, the tokenizer and the run's JSON files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from dsv3_jax.config import ModelConfig
from dsv3_jax.data import (
    Tokenizer,
    eval_batches,
    load_documents,
    load_tokenizer,
    make_train_iterator,
    tokenize_documents,
    train_tokenizer,
    unigram_loss,
)
from dsv3_jax.parallel import pipeline_exec
from dsv3_jax.parallel.mesh import (
    ParallelConfig,
    ParallelConfigError,
    data_parallel_size,
    global_batch,
    make_mesh,
    use_mesh,
)
from dsv3_jax.train import schedules
from dsv3_jax.train.checkpoint import Checkpointer, abstract_like
from dsv3_jax.train.flops import peak_flops_per_device, train_flops_per_token
from dsv3_jax.train.metrics import MetricsWriter
from dsv3_jax.train.optimizer import make_optimizer
from dsv3_jax.train.recipe import Recipe
from dsv3_jax.train.step import Hyper, sharded_steps


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad input); the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    step: int
    tokens: int
    checkpoint: Path | None
    heldout_loss: float
    heldout_bits_per_byte: float
    unigram_loss: float
    stopped_early: bool


def prepare_tokenizer(cfg: ModelConfig, workdir: Path, tokenizer_path: str | None,
                      train_texts: list[str]) -> Tokenizer:
    """The given tokenizer, else the one cached in `<workdir>/tokenizer`, else one trained now (by process 0)
    and cached there."""
    cached = workdir / "tokenizer"
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        if not (cached / "tokenizer.json").exists() and jax.process_index() == 0:
            print(f"training a byte-level BPE tokenizer of {cfg.vocab_size} tokens on {len(train_texts)} documents")
            train_tokenizer(train_texts, vocab_size=cfg.vocab_size).save(cached)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("dsv3-train tokenizer")
        tokenizer = load_tokenizer(cached)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TrainingError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model config's vocab_size is "
                            f"{cfg.vocab_size}: use a config with vocab_size >= {tokenizer.vocab_size}")
    return tokenizer


def _hyper(recipe: Recipe, step: int, tokens: int) -> Hyper:
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return Hyper(learning_rate=f32(schedules.learning_rate(recipe, step, tokens)),
                 mtp_weight=f32(schedules.mtp_weight(recipe, tokens)),
                 bias_update_speed=f32(schedules.bias_update_speed(recipe, tokens)),
                 balance_alpha=f32(recipe.balance_alpha))


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then: save, clean exit)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: signals stay with their owner
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:       # second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def evaluate(step: Any, mesh: Any, params: Any, batches: list[dict[str, np.ndarray]],
             n_bytes: int) -> tuple[float, float]:
    """(mean held-out next-token loss in nats, bits per byte) with the jitted eval `step` on `mesh`."""
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, n = step(params, global_batch(mesh, batch["tokens"]))
        total, count = total + float(loss_sum), count + int(n)
    return total / count, total / (math.log(2) * n_bytes)


def train(cfg: ModelConfig, recipe: Recipe, workdir: str | Path, *, steps: int | None = None, seed: int = 0,
          data: str = "builtin", tokenizer_path: str | None = None, progress: bool = True,
          parallel: ParallelConfig | None = None, pipeline_schedule: str = "dualpipe",
          microbatches: int = 0) -> TrainResult:
    """Train `cfg` with `recipe` in `workdir` up to `steps` (default: the recipe's), resuming if possible.

    `parallel` gives the mesh (default: all devices data parallel); batch sizes must divide over its
    data-parallel size. With pipe > 1 each step runs `pipeline_schedule` ("gpipe", "1f1b", "zb1p",
    "dualpipe") in `microbatches` micro-batches (0: one row per data shard each).
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    steps = recipe.total_steps if steps is None else steps
    hosts, host = jax.process_count(), jax.process_index()
    try:
        mesh = make_mesh(parallel or ParallelConfig())
    except ParallelConfigError as err:
        raise TrainingError(str(err)) from err
    dp = data_parallel_size(mesh)

    def check_batch(size: int, what: str) -> None:
        if size % dp or size % hosts:
            raise TrainingError(f"{what} {size} is not divisible by the data-parallel size {dp} of mesh "
                                f"{dict(mesh.shape)} and the {hosts} processes; change the recipe or --mesh")

    check_batch(recipe.eval_batch_size, "eval_batch_size")
    if mesh.shape["pipe"] > 1:      # every batch size of the ramp must cut into micro-batches the schedule runs
        for size in schedules.batch_sizes(recipe):
            check_batch(size, "batch size")
            try:
                pipeline_exec.schedule_for(pipeline_schedule, mesh.shape["pipe"], size, dp, microbatches)
            except pipeline_exec.PipelineError as err:
                raise TrainingError(f"mesh {dict(mesh.shape)}, pipeline schedule {pipeline_schedule!r}: "
                                    f"{err}") from err
    if host == 0:
        (workdir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
        (workdir / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2))

    train_texts = load_documents(data, "train")
    heldout_texts = load_documents(data, "heldout")
    tokenizer = prepare_tokenizer(cfg, workdir, tokenizer_path, train_texts)
    train_docs = tokenize_documents(tokenizer, train_texts)
    heldout_docs = tokenize_documents(tokenizer, heldout_texts)
    evals, _, eval_bytes = eval_batches(tokenizer, heldout_docs, seq_len=recipe.seq_len,
                                        batch_size=recipe.eval_batch_size // hosts, max_batches=recipe.eval_batches)

    optimizer = make_optimizer(recipe)
    jitted = sharded_steps(cfg, optimizer, mesh, pipeline_schedule, microbatches)
    with use_mesh(mesh):
        state = jitted.init(jax.random.key(seed))
    ckpt = Checkpointer(workdir / "checkpoints", keep=recipe.keep_checkpoints)

    def data_iterator(size: int, resume_from: dict[str, Any] | None = None):
        """Global batches of `size` rows; the stream position does not depend on the batch size."""
        check_batch(size, "batch size")
        it = make_train_iterator(tokenizer, train_docs, seq_len=recipe.seq_len, batch_size=size, seed=seed,
                                 fim_rate=recipe.fim_rate, split_rate=recipe.split_rate, shard_index=0, shard_count=1)
        if resume_from is not None:
            it.set_state(resume_from)
        return it

    def next_batch() -> jax.Array:
        rows = next(data_it)["tokens"]
        per_host = rows.shape[0] // hosts
        return global_batch(mesh, rows[host * per_host:(host + 1) * per_host])

    batch_size = schedules.batch_size(recipe, 0)
    data_it = data_iterator(batch_size)
    tokens = 0
    start = ckpt.latest_step()
    if start is not None:
        state, data_state, meta = ckpt.restore(start, abstract_like(state), cfg)
        tokens = int(meta["tokens"])
        batch_size = schedules.batch_size(recipe, tokens)
        data_it = data_iterator(batch_size, data_state)
        print(f"resumed from {ckpt.directory / str(start)} (step {start}, {tokens:,} tokens)")
    step = int(state.step)

    flops_per_token = train_flops_per_token(cfg, recipe.seq_len)
    peak = peak_flops_per_device()
    metrics_out = MetricsWriter(workdir)
    bar = tqdm(total=steps, initial=step, disable=not progress or host != 0, unit="step", dynamic_ncols=True)
    last_saved, stopped = start, False
    window_start, window_tokens = time.perf_counter(), 0
    try:
        with _StopRequest() as stop, use_mesh(mesh):
            while step < steps:
                if schedules.batch_size(recipe, tokens) != batch_size:   # batch-size ramp
                    batch_size = schedules.batch_size(recipe, tokens)
                    data_it = data_iterator(batch_size, data_it.get_state())
                state, m = jitted.train(state, next_batch(), _hyper(recipe, step, tokens))
                step += 1
                tokens += batch_size * recipe.seq_len
                window_tokens += batch_size * recipe.seq_len
                if not bool(m["finite"]):
                    where = f"; the last good checkpoint is step {last_saved}" if last_saved is not None else ""
                    raise TrainingError(f"step {step}: loss {float(m['total_loss'])} / gradient norm "
                                        f"{float(m['grad_norm'])} is not finite; stopping without applying it{where}")
                if step % recipe.log_every == 0 or step == steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / elapsed
                    record = {"step": step, "tokens": tokens, "loss": float(m["loss"]),
                              "mtp_loss": float(m["mtp_loss"]), "aux_loss": float(m["aux_loss"]),
                              "lr": float(m["learning_rate"]), "grad_norm": float(m["grad_norm"]),
                              "max_vio": float(m.get("max_vio", 0.0)),
                              "max_vio_per_layer": np.asarray(m.get("max_vio_per_layer", [])).round(4).tolist(),
                              "batch_size": batch_size, "tokens_per_s": tokens_per_s,
                              "mfu": (tokens_per_s * flops_per_token / (peak * jax.device_count())) if peak else None}
                    metrics_out.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                    vio=f"{record['max_vio']:.2f}")
                    window_start, window_tokens = time.perf_counter(), 0
                if step % recipe.eval_every == 0 and step != steps:
                    loss, bpb = evaluate(jitted.evaluate, mesh, state.params, evals, eval_bytes)
                    metrics_out.write({"step": step, "tokens": tokens, "heldout_loss": loss, "heldout_bpb": bpb})
                if step % recipe.checkpoint_every == 0 or stop.signal is not None:
                    ckpt.save(step, state, data_it.get_state(), cfg, tokens)
                    last_saved = step
                bar.update(1)
                if stop.signal is not None:
                    stopped = True
                    break
        if last_saved != step:
            ckpt.save(step, state, data_it.get_state(), cfg, tokens, force=True)
            last_saved = step
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
    with use_mesh(mesh):
        loss, bpb = evaluate(jitted.evaluate, mesh, state.params, evals, eval_bytes)
    metrics_out.write({"step": step, "tokens": tokens, "heldout_loss": loss, "heldout_bpb": bpb})
    metrics_out.close()
    unigram = unigram_loss(train_docs, [b["tokens"][:, 1:] for b in evals], tokenizer.vocab_size)
    checkpoint = ckpt.directory / str(last_saved) if last_saved is not None else None
    return TrainResult(workdir, step, tokens, checkpoint, loss, bpb, unigram, stopped)
