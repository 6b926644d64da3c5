"""Model parameters as an orbax checkpoint directory (what `dsv3-convert --to orbax` writes).

Layout of such a directory:

    <dir>/config.json   the model config, HF format (ModelConfig.to_hf_dict(); `dsv3_jax.load_config(<dir>)` reads it)
    <dir>/state/        orbax StandardCheckpointer save of the pytree {"params": params}

`params` is exactly the tree of `dsv3_jax.init_params(cfg, key)` (scanned layers stacked on a leading
axis, kernels [in, out]). The trainer can start from it with
`ocp.StandardCheckpointer().restore(<dir>/"state", {"params": abstract_params})["params"]`, or with
`load_orbax(<dir>)`. The directory is written into a temporary sibling and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from dsv3_jax.config import ModelConfig, load_config
from dsv3_jax.convert.hf import CheckpointError, Params, Shardings, _sharding_for, staged_directory
from dsv3_jax.model.functional import param_shapes

STATE_DIR = "state"


def save_orbax(cfg: ModelConfig, params: Params, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write config.json and the orbax item `state/` holding {"params": params}; returns the path."""
    with staged_directory(path, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / STATE_DIR, {"params": params})
        checkpointer.wait_until_finished()
        checkpointer.close()
    return Path(path)


def _more(keys: list) -> str:
    return f" and {len(keys) - 1} more" if len(keys) > 1 else ""


def load_orbax(path: str | os.PathLike, *, dtype: str | np.dtype | None = None,
               shardings: Shardings = None) -> tuple[ModelConfig, Params]:
    """Read a directory written by `save_orbax`: (config, params).

    dtype: dtype of kernels and embedding (default: as stored); norms and router stay float32. The
    returned config's `param_dtype` says which. shardings: as for `load_hf` (default: the default device).
    Raises CheckpointError naming a missing, unexpected or wrongly shaped leaf.
    """
    directory = Path(path).absolute()
    state = directory / STATE_DIR
    if not (directory / "config.json").exists() or not state.is_dir():
        raise CheckpointError(f"{directory}: not an orbax params directory (needs config.json and {STATE_DIR}/)")
    cfg = load_config(directory)
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(state).item_metadata.tree["params"]
    except Exception as err:  # orbax raises many types for unreadable directories
        raise CheckpointError(f"{state}: cannot read the orbax metadata ({type(err).__name__}: {err})") from err
    if dtype is None:
        dtype = np.dtype(stored["embed_tokens"].dtype)
    cfg = cfg.replace(param_dtype=np.dtype(dtype).name)
    specs = param_shapes(cfg)
    want = dict(jax.tree_util.tree_leaves_with_path(specs))
    have = dict(jax.tree_util.tree_leaves_with_path(stored))
    missing, extra = sorted(want.keys() - have.keys(), key=str), sorted(have.keys() - want.keys(), key=str)
    if missing:
        key = missing[0]
        raise CheckpointError(f"{state}: missing param {jax.tree_util.keystr(key)} "
                              f"(expected shape {list(want[key].shape)}){_more(missing)}")
    if extra:
        key = extra[0]
        raise CheckpointError(f"{state}: unexpected param {jax.tree_util.keystr(key)} "
                              f"(shape {list(have[key].shape)}){_more(extra)}")
    for key, spec in want.items():
        if tuple(have[key].shape) != tuple(spec.shape):
            raise CheckpointError(f"{state}: param {jax.tree_util.keystr(key)} has shape {list(have[key].shape)}, "
                                  f"expected {list(spec.shape)}")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(key_path: tuple, spec: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        names = tuple(str(getattr(k, "key", k)) for k in key_path)
        return jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=_sharding_for(shardings, names) or default)

    abstract = jax.tree_util.tree_map_with_path(target, specs)
    params = checkpointer.restore(state, {"params": abstract})["params"]
    checkpointer.close()
    return cfg, params
