"""The device mesh, the logical-axis rules and the shardings of parameters, optimizer state and batches.

Mesh axes ("pipe", "data", "expert", "tensor"). Dense parts are data parallel over ("data", "expert");
routed experts are split over "expert" (`dsv3_jax.parallel.expert_parallel` moves tokens to them);
"tensor" splits heads, MLP columns, expert columns and the vocabulary (inference TP; 1 in training).
Every parameter and activation of the model carries logical axis names; `LOGICAL_RULES` maps them to
mesh axes, so a new layout is an edit of this table and the mesh shape, never of the model.

Two parameter layouts:
    compute  what the forward and backward read: the rules table (replicated over the data axes)
    state    ZeRO-1: FP32 master weights and both Adam moments additionally split over the data-parallel
             axes ("data", "expert" less the axes a leaf already uses) and "pipe", on the largest dimension
             they divide (with pipe > 1 the pipeline gathers each device's stages from it every step)
The train step gathers the state layout into the compute layout (all-gather) and reduce-scatters the
gradients back into the state layout, so each device holds 1 / (data-parallel size) of the optimizer state.

    parallel = ParallelConfig.parse("data=2,expert=4")      # -1 on one axis: the remaining devices
    mesh = make_mesh(parallel)
    with use_mesh(mesh): ...                                # activations' logical constraints + EP dispatch
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig

AXES = ("pipe", "data", "expert", "tensor")
BATCH_AXES = ("data", "expert")          # dense parts are data parallel over both

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", None),
    ("norm", None),
    ("heads", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("kv_lora_rope", None),
    ("qk_head_dim", None),
    ("kv_head_dim", None),
    ("v_head_dim", None),
    ("mlp", "tensor"),
    ("mtp_concat", None),
    ("exp", "expert"),
    ("exp_router", None),
    ("expert_mlp", "tensor"),
)


class ParallelConfigError(ValueError):
    """A mesh description that cannot be parsed or does not fit the devices."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Mesh axis sizes; at most one may be -1 (all remaining devices)."""

    pipe: int = 1
    data: int = -1
    expert: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> ParallelConfig:
        """From "data=2,expert=4" (axes not named are 1; "" means all devices data parallel)."""
        text = text.strip()
        if not text:
            return cls()
        sizes: dict[str, int] = {}
        for part in text.split(","):
            name, sep, value = (s.strip() for s in part.partition("="))
            if not sep or name not in AXES:
                raise ParallelConfigError(f"mesh {text!r}: {part.strip()!r} is not AXIS=SIZE with AXIS one of {AXES}")
            if name in sizes:
                raise ParallelConfigError(f"mesh {text!r}: axis {name!r} is given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ParallelConfigError(f"mesh {text!r}: size of {name!r} must be an integer, "
                                          f"got {value!r}") from None
        parallel = cls(**{axis: sizes.get(axis, 1) for axis in AXES})
        parallel.validate()
        return parallel

    def validate(self) -> None:
        sizes = self.sizes()
        bad = [f"{a}={s}" for a, s in sizes.items() if s < 1 and s != -1]
        if bad:
            raise ParallelConfigError(f"mesh sizes must be >= 1 or -1, got {', '.join(bad)}")
        if list(sizes.values()).count(-1) > 1:
            raise ParallelConfigError(f"at most one mesh axis may be -1, got {self.describe()}")

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    def describe(self) -> str:
        return ",".join(f"{a}={s}" for a, s in self.sizes().items())

    def resolve(self, n_devices: int) -> dict[str, int]:
        """Axis sizes with the -1 filled in so that they multiply to `n_devices` (or less, without a -1)."""
        self.validate()
        sizes = self.sizes()
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values():
            if n_devices % fixed:
                raise ParallelConfigError(f"mesh {self.describe()}: {n_devices} devices are not divisible by {fixed}")
            sizes = {a: (n_devices // fixed if s == -1 else s) for a, s in sizes.items()}
        elif fixed > n_devices:
            raise ParallelConfigError(f"mesh {self.describe()} needs {fixed} devices, only {n_devices} are visible")
        return sizes


def make_mesh(parallel: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over AXES (all axes Auto: jit partitions what the shardings do not fix).

    With no -1 and fewer devices than visible, a single process uses its first devices; several
    processes must fill every device.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parallel.resolve(len(devices))
    n = math.prod(sizes.values())
    if n < len(devices) and jax.process_count() > 1:
        raise ParallelConfigError(f"mesh {parallel.describe()} uses {n} of {len(devices)} devices; with "
                                  f"{jax.process_count()} processes it must use all of them (put -1 on one axis)")
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices[:n])


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[None]:
    """Trace under `mesh` with LOGICAL_RULES: activations get their constraints, MoE layers dispatch by all-to-all."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def batch_axes(mesh: Mesh | Any) -> tuple[str, ...]:
    """The mesh axes a batch is split over (the data-parallel axes present in the mesh)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def logical_to_mesh(spec: P) -> P:
    """Logical axis names -> mesh axes by LOGICAL_RULES (names without a rule stay unsharded)."""
    rules = dict(LOGICAL_RULES)
    return P(*(rules.get(name) if name is not None else None for name in spec))


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def param_specs(cfg: ModelConfig) -> Any:
    """Compute layout: a params-like tree of PartitionSpecs over mesh axes."""
    from dsv3_jax.model.functional import param_logical_axes  # the model imports this module (MoE dispatch)

    return jax.tree.map(logical_to_mesh, param_logical_axes(cfg), is_leaf=_is_spec)


def _used_axes(spec: P) -> set[str]:
    used: set[str] = set()
    for entry in spec:
        used.update((entry,) if isinstance(entry, str) else entry or ())
    return used


def zero_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """State layout of one leaf: `spec` plus the data-parallel axes and "pipe" it does not use, on the largest
    free dimension they divide (else on the largest free dimension one of them divides; else unchanged)."""
    candidates = (*batch_axes(mesh), *(["pipe"] if "pipe" in mesh.axis_names else []))
    free_axes = [a for a in candidates if a not in _used_axes(spec) and mesh.shape[a] > 1]
    entries = list(spec) + [None] * (len(shape) - len(spec))
    for axes in ([tuple(free_axes)] if free_axes else []) + [(a,) for a in free_axes]:
        size = math.prod(mesh.shape[a] for a in axes)
        dims = [d for d in range(len(shape)) if entries[d] is None and shape[d] % size == 0]
        if dims:
            dim = max(dims, key=lambda d: shape[d])
            entries[dim] = axes if len(axes) > 1 else axes[0]
            return P(*entries)
    return spec


def state_param_specs(cfg: ModelConfig, mesh: Mesh, shapes: Any) -> Any:
    """State (ZeRO-1) layout of the params: `zero_spec` of every leaf; `shapes` is a params-like tree."""
    return jax.tree.map(lambda spec, s: zero_spec(spec, s.shape, mesh), param_specs(cfg), shapes, is_leaf=_is_spec)


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpecs -> NamedShardings on `mesh` (same tree)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def train_state_shardings(cfg: ModelConfig, mesh: Mesh, optimizer: optax.GradientTransformation,
                          abstract_state: Any) -> Any:
    """NamedShardings of a TrainState: params and the optimizer's per-parameter leaves (moments) in the
    state layout, counters replicated. `abstract_state` is `jax.eval_shape` of the state."""
    specs = state_param_specs(cfg, mesh, abstract_state.params)
    opt_specs = optax.tree_map_params(optimizer, lambda _, spec: spec, abstract_state.opt_state, specs,
                                      transform_non_params=lambda _: P(), is_leaf=_is_spec)
    return named(mesh, abstract_state.replace(step=P(), params=specs, opt_state=opt_specs))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [batch, seq]: rows split over the data-parallel axes."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def global_batch(mesh: Mesh, local_rows: np.ndarray) -> jax.Array:
    """This process's rows of a batch -> one global array (rows of process p follow those of p - 1)."""
    sharding = batch_sharding(mesh)
    global_shape = (local_rows.shape[0] * jax.process_count(), *local_rows.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


class ParamLayouts(NamedTuple):
    """NamedShardings (params-like trees) of the two parameter layouts: `compute` and ZeRO-1 `state`."""

    compute: Any
    state: Any


def param_layouts(cfg: ModelConfig, mesh: Mesh, shapes: Any) -> ParamLayouts:
    """Both layouts of params shaped like `shapes` on `mesh`."""
    return ParamLayouts(named(mesh, param_specs(cfg)), named(mesh, state_param_specs(cfg, mesh, shapes)))
