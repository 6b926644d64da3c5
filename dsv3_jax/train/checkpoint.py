"""Training checkpoints with orbax: async, atomic, keep-last-N, resumable to the same step and data position.

Layout of `<workdir>/checkpoints/<step>/`:
    state/   the TrainState pytree (params, optimizer state, step) — orbax StandardSave
    data/    the data iterator's state (JSON), so a resumed run sees the batches an uninterrupted one would
    meta/    JSON: model config, tokens seen, wall time; checked against the running config on restore

Orbax writes each step into a temporary directory and renames it when every item is complete, so a
save killed half-way never shows up as a step (it is never "latest"); temporaries are cleaned up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsv3_jax.config import ModelConfig


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted, or does not match the running configuration."""


def _config_dict(cfg: ModelConfig) -> dict[str, Any]:
    return cfg.to_hf_dict()


class Checkpointer:
    """Saves and restores (state, data-iterator state, metadata) under `directory`, keeping the last `keep` steps."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any], cfg: ModelConfig, tokens: int,
             force: bool = False) -> bool:
        """Start writing step `step` (returns at once when async); True if a save was started."""
        meta = {"config": _config_dict(cfg), "tokens": int(tokens), "step": int(step)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        return self._manager.save(step, args=args, force=force)

    def wait(self) -> None:
        """Block until every pending async save is committed."""
        self._manager.wait_until_finished()

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # orbax raises many types for unreadable files
            raise CheckpointError(f"checkpoint {self.directory / str(step)}: cannot read its metadata ({err})") from err

    def restore(self, step: int, abstract_state: Any, cfg: ModelConfig) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(state, data_state, meta) of `step`. `abstract_state` gives shapes, dtypes and shardings.

        Raises CheckpointError naming the differing fields when the checkpoint was written for another
        model config, and naming the step directory when its files are unreadable.
        """
        where = self.directory / str(step)
        meta = self.read_meta(step)
        saved, running = meta.get("config", {}), _config_dict(cfg)
        diff = sorted(k for k in set(saved) | set(running) if saved.get(k) != running.get(k))
        if diff:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {running.get(k)!r}" for k in diff[:6])
            raise CheckpointError(f"checkpoint {where} was written for another model config ({details}); "
                                  f"use a fresh --workdir or the same --config")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as err:
            raise CheckpointError(f"checkpoint {where} is corrupted or does not match the training state: "
                                  f"{type(err).__name__}: {err}") from err
        _check_same_structure(abstract_state, restored["state"], where)
        return restored["state"], restored["data"], meta

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _check_same_structure(expected: Any, got: Any, where: Path) -> None:
    exp_leaves = jax.tree_util.tree_leaves_with_path(expected)
    got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
    for path, leaf in exp_leaves:
        other = got_leaves.get(path)
        if other is None or tuple(other.shape) != tuple(leaf.shape):
            name = jax.tree_util.keystr(path)
            shape = None if other is None else tuple(other.shape)
            raise CheckpointError(f"checkpoint {where}: leaf {name} has shape {shape}, "
                                  f"the run expects {tuple(leaf.shape)}")


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete pytree, as orbax restore wants them."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


