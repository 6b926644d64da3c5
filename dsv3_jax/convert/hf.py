"""Hugging Face safetensors checkpoints <-> dsv3_jax parameter pytrees.

Layout (DeepSeek's release and transformers 5 `save_pretrained`): `config.json`, one or many
`*.safetensors` files and, when sharded, `model.safetensors.index.json`. Names and the leaves they fill:

    model.embed_tokens.weight [V, d]                 embed_tokens [V, d]
    model.norm.weight [d]                            norm.scale
    lm_head.weight [V, d]                            lm_head.kernel [d, V]
    model.layers.{i}.<block tensor>                  dense_layers/... [i] (i < first_k_dense_replace),
                                                     moe_layers/... [i - first_k_dense_replace]
    model.layers.{L+k}.<block tensor>                mtp_{k}/block/...   (L = num_hidden_layers)
    model.layers.{L+k}.{enorm,hnorm}.weight          mtp_{k}/{enorm,hnorm}.scale
    model.layers.{L+k}.eh_proj.weight [d, 2d]        mtp_{k}/eh_proj.kernel [2d, d]
    model.layers.{L+k}.shared_head.norm.weight       mtp_{k}/shared_head_norm.scale
    model.layers.{L+k}.{embed_tokens,shared_head.head}.weight   copies of the main embedding / head

Block tensors: `{input,post_attention}_layernorm.weight`, `self_attn.{q_a_proj, q_a_layernorm, q_b_proj
| q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight`, dense `mlp.{gate,up,down}_proj.weight`,
MoE `mlp.gate.weight` [E, d], `mlp.gate.e_score_correction_bias` [E], `mlp.experts.{j}.{gate,up,down}_proj.weight`,
`mlp.shared_experts.{gate,up,down}_proj.weight`.

Conventions:
- A Linear weight W [out, in] is the kernel [*in_axes, *out_axes] transposed and flattened:
  kernel = W.T.reshape(kernel.shape), e.g. q_b_proj [H*qk_head, q_lora] <-> [q_lora, H, qk_head] and
  o_proj [d, H*v_head] <-> [H, v_head, d]. Norm scales, the router bias and the embedding are stored as is.
- Routed experts: `mlp.experts.{j}.gate_proj.weight` [f, d] <-> mlp.w_gate[:, j] [d, f] (same for up; down
  [d, f] <-> w_down[:, j] [f, d]). transformers' in-memory fused form, `mlp.experts.gate_up_proj` [E, 2f, d]
  (gate rows first) and `mlp.experts.down_proj` [E, d, f], is read as well; files are written per expert.
- MTP: the HF MTP layer repeats the embedding and output head, which dsv3_jax shares with the main model.
  `load_hf` compares the copies with the main tensors (a logged warning if they differ; the main ones are
  used) and `save_hf` writes them. A checkpoint without any MTP layer (transformers does not save it) loads
  with `num_nextn_predict_layers = 0`.
- FP8 (DeepSeek's release): every Linear weight inside a decoder block (attention projections, dense MLP,
  routed and shared experts, also in the MTP block) is float8_e4m3fn with `<name>_scale_inv` float32, one per
  128 x 128 block (see `fp8_blocks`). Embedding, lm_head, norms, router gate and bias, `eh_proj` and the MTP
  copies stay bf16/fp32. `load_hf` dequantizes every weight that has a scale. With `keep_fp8=True`, a leaf
  whose tensors are all FP8 becomes `{"fp8": float8_e4m3fn [..., out, in], "scale_inv": float32 [..., S_out,
  S_in]}` in the HF (and FP8-GEMM, K-major) [out, in] orientation, stacked on the leaf's layer/expert axes;
  `dequantize_params` turns such a tree into ordinary params.
- dtypes: loaded params follow `init_params` of the returned config: kernels and the embedding in
  `dtype` (default: the config's `param_dtype`, float32), norm scales, router gate and bias in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from dsv3_jax.config import ModelConfig, load_config
from dsv3_jax.convert.fp8_blocks import BLOCK, FP8_DTYPE, dequantize_blocks, quantize_blocks, scale_shape
from dsv3_jax.model.functional import param_shapes

log = logging.getLogger(__name__)

Params = dict[str, Any]
Shardings = Any  # pytree of jax.sharding.Sharding like the params, or a callable (path tuple) -> Sharding | None

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
# DeepSeek-V3's config.json entry for its FP8 release.
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": list(BLOCK)}
_FP8_FILE_DTYPES = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")  # non-parameter buffers some older exports contain
_FP32_LEAVES = ("gate", "e_score_correction_bias")    # the router stays float32 (HF keeps it fp32 too)


class CheckpointError(ValueError):
    """A checkpoint misses a tensor, holds an unexpected one, or a tensor's shape or dtype is wrong."""


# --------------------------------------------------------------------------------------------------
# Name mapping
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
    """A param leaf under a layer (or the model) and the HF tensor holding it.

    hf: name under the HF prefix; "{j}" marks the routed-expert index (the leaf has an expert axis).
    n_in: for Linear weights, how many leading kernel axes are inputs (W [out, in] = kernel.reshape(in, out).T);
        None: stored unchanged.
    fp8: FP8-quantized in DeepSeek's release.
    """

    path: tuple[str, ...]
    hf: str
    n_in: int | None = None
    fp8: bool = False


def _norm(path: str, hf: str) -> _Entry:
    return _Entry((*path.split("/"), "scale"), f"{hf}.weight")


def _linear(path: str, hf: str, n_in: int = 1, fp8: bool = True) -> _Entry:
    return _Entry((*path.split("/"), "kernel"), f"{hf}.weight", n_in, fp8)


def _block_entries(cfg: ModelConfig, is_moe: bool) -> list[_Entry]:
    """Every tensor of one decoder layer."""
    a = "self_attn"
    entries = [_norm("input_layernorm", "input_layernorm"),
               _norm("post_attention_layernorm", "post_attention_layernorm")]
    if cfg.q_lora_rank is None:
        entries.append(_linear(f"{a}/q_proj", f"{a}.q_proj"))
    else:
        entries += [_linear(f"{a}/q_a_proj", f"{a}.q_a_proj"), _norm(f"{a}/q_a_layernorm", f"{a}.q_a_layernorm"),
                    _linear(f"{a}/q_b_proj", f"{a}.q_b_proj")]
    entries += [_linear(f"{a}/kv_a_proj_with_mqa", f"{a}.kv_a_proj_with_mqa"),
                _norm(f"{a}/kv_a_layernorm", f"{a}.kv_a_layernorm"),
                _linear(f"{a}/kv_b_proj", f"{a}.kv_b_proj"),
                _linear(f"{a}/o_proj", f"{a}.o_proj", n_in=2)]
    if not is_moe:
        return entries + [_linear(f"mlp/{p}", f"mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")]
    entries.append(_Entry(("mlp", "gate"), "mlp.gate.weight", n_in=1))
    if cfg.topk_method == "noaux_tc":
        entries.append(_Entry(("mlp", "e_score_correction_bias"), "mlp.gate.e_score_correction_bias"))
    entries += [_Entry(("mlp", f"w_{p}"), f"mlp.experts.{{j}}.{p}_proj.weight", n_in=1, fp8=True)
                for p in ("gate", "up", "down")]
    if cfg.n_shared_experts:
        entries += [_linear(f"mlp/shared_experts/{p}", f"mlp.shared_experts.{p}") for p in
                    ("gate_proj", "up_proj", "down_proj")]
    return entries


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One param leaf: its path, its entry, and the HF prefixes of the layers stacked on its leading axis.

    `stacked`: the leaf has a leading layer axis (one prefix per layer); `experts` > 0: then an expert axis.
    """

    path: tuple[str, ...]
    entry: _Entry
    prefixes: tuple[str, ...]
    stacked: bool
    experts: int

    @property
    def lead_ndim(self) -> int:
        return int(self.stacked) + int(self.experts > 0)

    def sources(self) -> list[tuple[tuple[int, ...], str]]:
        """(index into the leaf's leading axes, HF tensor name) for every tensor that fills the leaf."""
        out = []
        for li, prefix in enumerate(self.prefixes):
            layer_idx = (li,) if self.stacked else ()
            if self.experts:
                out += [((*layer_idx, j), prefix + self.entry.hf.format(j=j)) for j in range(self.experts)]
            else:
                out.append((layer_idx, prefix + self.entry.hf))
        return out


def _plan(cfg: ModelConfig) -> list[_Leaf]:
    """Every param leaf of `cfg` with the HF tensors that hold it, in checkpoint order."""
    def leaves(group: tuple[str, ...], entries: list[_Entry], prefixes: tuple[str, ...], stacked: bool):
        return [_Leaf((*group, *e.path), e, prefixes, stacked, cfg.n_routed_experts if "{j}" in e.hf else 0)
                for e in entries]

    plan = leaves((), [_Entry(("embed_tokens",), "model.embed_tokens.weight")], ("",), False)
    layer = lambda i: f"model.layers.{i}."
    if cfg.n_dense_layers:
        plan += leaves(("dense_layers",), _block_entries(cfg, False),
                       tuple(layer(i) for i in range(cfg.n_dense_layers)), True)
    if cfg.n_moe_layers:
        plan += leaves(("moe_layers",), _block_entries(cfg, True),
                       tuple(layer(i) for i in range(cfg.n_dense_layers, cfg.num_hidden_layers)), True)
    for k in range(cfg.num_nextn_predict_layers):
        index = cfg.num_hidden_layers + k
        own = [_norm("enorm", "enorm"), _norm("hnorm", "hnorm"), _linear("eh_proj", "eh_proj", fp8=False),
               _norm("shared_head_norm", "shared_head.norm")]
        plan += leaves((f"mtp_{k}",), own, (layer(index),), False)
        plan += leaves((f"mtp_{k}", "block"), _block_entries(cfg, index >= cfg.first_k_dense_replace),
                       (layer(index),), False)
    plan += leaves((), [_norm("norm", "model.norm"), _linear("lm_head", "lm_head", fp8=False)], ("",), False)
    return plan


def _mtp_copies(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(MTP copy, main tensor) name pairs: each MTP layer repeats the embedding and the output head."""
    out = []
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        out += [(prefix + "embed_tokens.weight", "model.embed_tokens.weight"),
                (prefix + "shared_head.head.weight", "lm_head.weight")]
    return out


def _hf_shape(entry: _Entry, slice_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the HF tensor holding one layer's (and expert's) slice of a leaf."""
    if entry.n_in is None:
        return tuple(slice_shape)
    return (math.prod(slice_shape[entry.n_in:]), math.prod(slice_shape[:entry.n_in]))


def _to_param(w: np.ndarray, entry: _Entry, slice_shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> leaf slice: Linear W [out, in] -> kernel [*in_axes, *out_axes]."""
    return w.reshape(slice_shape) if entry.n_in is None else w.T.reshape(slice_shape)


def _to_hf(k: np.ndarray, entry: _Entry) -> np.ndarray:
    """Leaf slice -> HF tensor: kernel [*in_axes, *out_axes] -> W [out, in]."""
    if entry.n_in is None:
        return k
    return k.reshape(math.prod(k.shape[:entry.n_in]), -1).T


def _scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def _tree_get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _tree_set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _fmt(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


# --------------------------------------------------------------------------------------------------
# Reading safetensors files
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: str          # safetensors dtype string: "BF16", "F32", "F8_E4M3", ...
    shape: tuple[int, ...]
    offset: int         # byte offset of the data in the file


@dataclasses.dataclass(frozen=True)
class _Src:
    """Where one HF tensor comes from: `name` itself, or for transformers' fused experts a slice of it."""

    name: str
    index: tuple[int, ...] = ()
    rows: slice | None = None


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
        n = struct.unpack("<Q", raw)[0]
        if n > 1 << 30 or n > path.stat().st_size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: not a safetensors file ({err})") from err
    return header, 8 + n


class _Reader:
    """The tensors of a checkpoint directory, read one at a time with `safetensors.safe_open`.

    Names, dtypes and shapes come from the files' headers. numpy has no float8 type that safetensors'
    numpy backend can build, so float8 tensors are read from their byte range with np.memmap instead.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err!r})") from err
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (directory / name).exists():
                    holds = next(t for t, f in weight_map.items() if f == name)
                    raise CheckpointError(f"{index} lists shard {name} (holding {holds!r}) but {directory / name} "
                                          f"does not exist")
        else:
            weight_map = None
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files")
        self.info: dict[str, _TensorInfo] = {}
        for name in files:
            path = directory / name
            header, start = _read_header(path)
            for tensor, meta in header.items():
                if tensor == "__metadata__":
                    continue
                if tensor in self.info:
                    raise CheckpointError(f"{directory}: tensor {tensor!r} is stored twice "
                                          f"({self.info[tensor].file.name} and {name})")
                self.info[tensor] = _TensorInfo(path, meta["dtype"], tuple(meta["shape"]),
                                                start + meta["data_offsets"][0])
        if weight_map is not None:
            for tensor, name in weight_map.items():
                if tensor not in self.info or self.info[tensor].file.name != name:
                    raise CheckpointError(f"{index} maps tensor {tensor!r} to {name}, which does not hold it")
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name].shape

    def read(self, src: _Src | str) -> np.ndarray:
        """One tensor (or its slice `src.index`, rows `src.rows`) as a numpy array in its stored dtype."""
        src = _Src(src) if isinstance(src, str) else src
        info = self.info[src.name]
        if info.dtype in _FP8_FILE_DTYPES:
            mm = np.memmap(info.file, dtype=_FP8_FILE_DTYPES[info.dtype], mode="r", offset=info.offset,
                           shape=info.shape)
            out = np.array(mm[src.index])
        else:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = self._stack.enter_context(
                    safetensors.safe_open(info.file, framework="np"))
            out = handle.get_slice(src.name)[src.index] if src.index else handle.get_tensor(src.name)
        return out if src.rows is None else out[src.rows]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a (non-float8) tensor, reading only those bytes."""
        info = self.info[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = self._stack.enter_context(
                safetensors.safe_open(info.file, framework="np"))
        return handle.get_slice(name)[start:stop]


_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts\.)(?P<j>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def _resolve(reader: _Reader, name: str, cfg: ModelConfig) -> tuple[_Src, tuple[int, ...] | None]:
    """Where `name` is stored, and the full shape of the fused tensor when it comes from one (else None)."""
    m = _EXPERT.match(name)
    fused = m and m["prefix"] + ("down_proj" if m["proj"] == "down" else "gate_up_proj")
    if name in reader or m is None or fused not in reader:
        return _Src(name), None
    j, f, d, e = int(m["j"]), cfg.moe_intermediate_size, cfg.hidden_size, cfg.n_routed_experts
    if m["proj"] == "down":
        return _Src(fused, (j,)), (e, d, f)
    rows = slice(0, f) if m["proj"] == "gate" else slice(f, 2 * f)
    return _Src(fused, (j,), rows), (e, 2 * f, d)


def _mtp_layers_present(cfg: ModelConfig, reader: _Reader) -> int:
    """How many MTP layers the checkpoint holds (any tensor under their prefix counts)."""
    layers = {int(m[1]) for m in (re.match(r"model\.layers\.(\d+)\.", n) for n in reader.info) if m}
    present = 0
    while cfg.num_hidden_layers + present in layers and present < cfg.num_nextn_predict_layers:
        present += 1
    return present


# --------------------------------------------------------------------------------------------------
# load_hf
# --------------------------------------------------------------------------------------------------

def _sharding_for(shardings: Shardings, path: tuple[str, ...]) -> Any:
    """The sharding for the leaf at `path`: from a callable, or by walking a pytree (a Sharding met on
    the way applies to the whole subtree, e.g. to both arrays of an FP8 leaf)."""
    if shardings is None:
        return None
    if not isinstance(shardings, Mapping) and callable(shardings):
        return shardings(path)
    node = shardings
    for key in path:
        if not isinstance(node, Mapping):
            break
        if key not in node:
            raise ValueError(f"shardings has no entry for param {'/'.join(path)}")
        node = node[key]
    return node


def _place(value: Any, sharding: Any) -> Any:
    """jax.device_put a finished leaf (an array or an FP8 dict) with its sharding (default device if None)."""
    if isinstance(value, dict):
        return {k: _place(v, sharding[k] if isinstance(sharding, Mapping) else sharding) for k, v in value.items()}
    return jax.device_put(value, sharding) if sharding is not None else jax.device_put(value)


def _block_size(cfg: ModelConfig) -> tuple[int, int]:
    q = cfg.quantization_config or {}
    block = q.get("weight_block_size", BLOCK)
    return int(block[0]), int(block[1])


def _check_names(reader: _Reader, cfg: ModelConfig, expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise CheckpointError naming missing tensors, then unexpected ones, then shape mismatches."""
    missing = [n for n in expected if n not in reader]
    if missing:
        listed = ", ".join(f"{n!r} (expected shape {_fmt(expected[n])})" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: missing tensor {listed}{more}")
    allowed = set(expected) | {_scale_name(n) for n in expected}
    extra = [n for n in reader.info if n not in allowed and not _IGNORED.match(n)]
    if extra:
        listed = ", ".join(f"{n!r} (shape {_fmt(reader.shape(n))}, in {reader.info[n].file.name})" for n in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise CheckpointError(f"{source}: unexpected tensor {listed}{more}; it is not part of the model "
                              f"config.json describes")
    block = _block_size(cfg)
    for name, shape in expected.items():
        if reader.shape(name) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {_fmt(reader.shape(name))} in "
                                  f"{reader.info[name].file.name}, expected {_fmt(shape)} from config.json")
        scale = _scale_name(name)
        if scale in reader:
            want = scale_shape(shape, block)
            if reader.shape(scale) != want:
                raise CheckpointError(f"{source}: tensor {scale!r} has shape {_fmt(reader.shape(scale))}, expected "
                                      f"{_fmt(want)} (one scale per {block[0]}x{block[1]} block of {_fmt(shape)})")
        elif reader.info[name].dtype in _FP8_FILE_DTYPES:
            raise CheckpointError(f"{source}: tensor {name!r} is {reader.info[name].dtype} but {scale!r} is missing")


def _load_leaf(reader: _Reader, leaf: _Leaf, srcs: list[tuple[tuple[int, ...], _Src]], spec: Any,
               keep_fp8: bool, block: tuple[int, int]) -> np.ndarray | dict[str, np.ndarray]:
    """Fill one leaf from its HF tensors: a preallocated array written layer by layer / expert by expert."""
    lead = tuple(spec.shape[:leaf.lead_ndim])
    slice_shape = tuple(spec.shape[leaf.lead_ndim:])
    scaled = [_scale_name(src.name) in reader for _, src in srcs]
    if keep_fp8 and all(scaled) and all(reader.info[src.name].dtype == "F8_E4M3" for _, src in srcs):
        hf_shape = _hf_shape(leaf.entry, slice_shape)
        out = {"fp8": np.empty(lead + hf_shape, FP8_DTYPE),
               "scale_inv": np.empty(lead + scale_shape(hf_shape, block), np.float32)}
        for idx, src in srcs:
            out["fp8"][idx] = reader.read(src)
            out["scale_inv"][idx] = reader.read(_scale_name(src.name))
        return out
    arr = np.empty(spec.shape, spec.dtype)
    for (idx, src), has_scale in zip(srcs, scaled, strict=True):
        w = reader.read(src)
        if has_scale:
            w = dequantize_blocks(w, reader.read(_scale_name(src.name)), block, np.float32)
        arr[idx] = _to_param(w, leaf.entry, slice_shape).astype(spec.dtype, copy=False)
    return arr


def _check_copies(reader: _Reader, cfg: ModelConfig, rows: int = 8192) -> None:
    """Warn when an MTP layer's embedding / head copy differs from the main one (compared in row chunks)."""
    for copy, main in _mtp_copies(cfg):
        n = reader.shape(main)[0]
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            a, b = reader.read_rows(copy, start, stop), reader.read_rows(main, start, stop)
            if not np.array_equal(a, b):
                diff = float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32))))
                log.warning("%s differs from %s (max abs difference %.3g from row %d); dsv3_jax shares the "
                            "main tensor with the MTP module and ignores the copy", copy, main, diff, start)
                break


def load_hf(path: str | os.PathLike, *, dtype: str | np.dtype | None = None, keep_fp8: bool = False,
            shardings: Shardings = None) -> tuple[ModelConfig, Params]:
    """Read an HF DeepSeek-V2/V3 checkpoint directory: (config, params).

    path: directory with config.json, *.safetensors (and model.safetensors.index.json when sharded);
        weights in bf16/fp16/fp32, or FP8 E4M3 with `*.weight_scale_inv` block scales (dequantized).
    dtype: dtype of kernels and embedding (default: the config's param_dtype); norms and router stay float32.
        The returned config has `param_dtype = dtype`, so `param_shapes(cfg)` describes the result.
    keep_fp8: keep FP8 weights as {"fp8", "scale_inv"} leaves (module docstring) instead of dequantizing.
    shardings: a pytree of jax.sharding.Sharding like the params, or a callable taking a leaf's path tuple
        (e.g. ("moe_layers", "mlp", "w_gate")) and returning a Sharding; each finished leaf is placed with
        jax.device_put. Default: the default device.

    Tensors are read one at a time; each leaf is filled in a preallocated numpy array, placed, and
    released, so the host holds at most one leaf beyond what was placed. Raises CheckpointError naming the
    tensor for a missing, unexpected or wrongly shaped tensor.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory}: no config.json")
    cfg = load_config(directory)
    dtype = np.dtype(dtype or cfg.param_dtype)
    t0 = time.time()
    with _Reader(directory) as reader:
        present = _mtp_layers_present(cfg, reader)
        if present < cfg.num_nextn_predict_layers:
            log.warning("%s: config.json has num_nextn_predict_layers=%d but the checkpoint holds %d MTP layer(s) "
                        "(transformers does not save them); loading without the missing MTP module(s)",
                        directory, cfg.num_nextn_predict_layers, present)
        block = _block_size(cfg)
        cfg = cfg.replace(num_nextn_predict_layers=present, param_dtype=dtype.name)
        specs = param_shapes(cfg)
        plan = _plan(cfg)
        resolved: dict[tuple[str, ...], list[tuple[tuple[int, ...], _Src]]] = {}
        expected: dict[str, tuple[int, ...]] = {}
        for leaf in plan:
            spec = _tree_get(specs, leaf.path)
            hf_shape = _hf_shape(leaf.entry, tuple(spec.shape[leaf.lead_ndim:]))
            resolved[leaf.path] = []
            for idx, name in leaf.sources():
                src, fused_shape = _resolve(reader, name, cfg)
                expected[src.name] = fused_shape or hf_shape
                resolved[leaf.path].append((idx, src))
        for copy, main in _mtp_copies(cfg):
            expected[copy] = expected[main]
        _check_names(reader, cfg, expected, str(directory))

        params: Params = {}
        kept_fp8 = False
        for n, leaf in enumerate(plan):
            value = _load_leaf(reader, leaf, resolved[leaf.path], _tree_get(specs, leaf.path), keep_fp8, block)
            kept_fp8 |= isinstance(value, dict)
            _tree_set(params, leaf.path, _place(value, _sharding_for(shardings, leaf.path)))
            shape = value["fp8"].shape if isinstance(value, dict) else value.shape
            log.info("[%d/%d] %s %s %s from %d tensor(s)", n + 1, len(plan), "/".join(leaf.path), _fmt(shape),
                     "fp8" if isinstance(value, dict) else value.dtype, len(resolved[leaf.path]))
            del value
        _check_copies(reader, cfg)
    if not kept_fp8:
        cfg = cfg.replace(quantization_config=None)
    log.info("loaded %s in %.1fs", directory, time.time() - t0)
    return cfg, params


def dequantize_params(cfg: ModelConfig, params: Params, dtype: str | np.dtype | None = None) -> Params:
    """Turn the {"fp8", "scale_inv"} leaves of `load_hf(..., keep_fp8=True)` into ordinary kernels."""
    specs = param_shapes(cfg.replace(param_dtype=np.dtype(dtype or cfg.param_dtype).name))
    block = _block_size(cfg)

    def convert(spec: Any, leaf: Any) -> Any:
        if not isinstance(leaf, dict):
            return leaf
        w = dequantize_blocks(np.asarray(leaf["fp8"]), np.asarray(leaf["scale_inv"]), block, np.float32)
        return jax.device_put(np.swapaxes(w, -1, -2).reshape(spec.shape).astype(spec.dtype))

    return jax.tree_util.tree_map(convert, specs, params, is_leaf=lambda x: isinstance(x, dict) and "fp8" in x)


# --------------------------------------------------------------------------------------------------
# save_hf
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory atomically: yield a temporary sibling, rename it to `path` when the block succeeds.

    Refuses (FileExistsError) an existing non-empty `path` unless `overwrite`; the old directory is
    replaced only after the new one is complete. On an exception the temporary is removed and `path` is
    untouched. (A process killed mid-write leaves only a hidden `.<name>.tmp-*` sibling.)
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclasses.dataclass
class _Unit:
    """Tensors written together (a weight and its scale): their specs, and how to compute them."""

    specs: dict[str, tuple[tuple[int, ...], np.dtype]]
    produce: Callable[[], dict[str, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in self.specs.values())


def _host(leaf: Any, idx: tuple[int, ...]) -> np.ndarray:
    """One slice of a leaf on the host (slicing on device first, so a big sharded leaf is never gathered whole)."""
    return np.asarray(leaf[idx] if idx else leaf)


def _order(name: str) -> tuple[int, int, str]:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m[1]), name)
    return (0 if name.startswith("model.embed_tokens") else 2, 0, name)


def _units(cfg: ModelConfig, params: Params, dtype: np.dtype | None, fp8: bool) -> list[_Unit]:
    specs = param_shapes(cfg)
    units: list[_Unit] = []
    for leaf in _plan(cfg):
        try:
            value = _tree_get(params, leaf.path)
        except (KeyError, TypeError):
            raise CheckpointError(f"params have no leaf {'/'.join(leaf.path)} (config {cfg.num_hidden_layers} layers, "
                                  f"{cfg.num_nextn_predict_layers} MTP)") from None
        is_fp8_leaf = isinstance(value, dict)
        want = tuple(_tree_get(specs, leaf.path).shape)
        slice_shape = want[leaf.lead_ndim:]
        hf_shape = _hf_shape(leaf.entry, slice_shape)
        got = tuple(value["fp8"].shape) if is_fp8_leaf else tuple(value.shape)
        if got != (want[:leaf.lead_ndim] + hf_shape if is_fp8_leaf else want):
            raise CheckpointError(f"param {'/'.join(leaf.path)} has shape {_fmt(got)}, the config needs {_fmt(want)}")
        if leaf.path[-1] in _FP32_LEAVES:
            out_dtype = np.dtype(np.float32)
        else:
            out_dtype = np.dtype(dtype or (ml_dtypes.bfloat16 if is_fp8_leaf else value.dtype))
        quantize = fp8 and leaf.entry.fp8
        for idx, name in leaf.sources():
            unit_specs = {name: (hf_shape, FP8_DTYPE if quantize else out_dtype)}
            if quantize:
                unit_specs[_scale_name(name)] = (scale_shape(hf_shape), np.dtype(np.float32))

            def produce(value=value, idx=idx, name=name, entry=leaf.entry, quantize=quantize, out_dtype=out_dtype):
                if isinstance(value, dict):
                    w8, s = _host(value["fp8"], idx), _host(value["scale_inv"], idx)
                    if quantize and _block_size(cfg) == BLOCK:
                        return {name: w8, _scale_name(name): s}
                    w = dequantize_blocks(w8, s, _block_size(cfg), np.float32)
                else:
                    w = _to_hf(_host(value, idx), entry)
                if quantize:
                    w8, s = quantize_blocks(w)
                    return {name: w8, _scale_name(name): s}
                return {name: np.ascontiguousarray(w.astype(out_dtype, copy=False))}

            units.append(_Unit(unit_specs, produce))
    for copy, main in _mtp_copies(cfg):
        source = next(u for u in units if main in u.specs)
        units.append(_Unit({copy: source.specs[main]},
                           lambda copy=copy, main=main, source=source: {copy: source.produce()[main]}))
    return sorted(units, key=lambda u: _order(next(iter(u.specs))))


def save_hf(cfg: ModelConfig, params: Params, path: str | os.PathLike, *, dtype: str | np.dtype | None = None,
            fp8: bool = False, max_shard_bytes: int = 5_000_000_000, overwrite: bool = False) -> Path:
    """Write params as an HF checkpoint directory in DeepSeek's layout (module docstring); returns the path.

    dtype: dtype of the written tensors (default: each leaf's own dtype); the router gate and bias are
        always float32. fp8: quantize block Linear weights to FP8 E4M3 + 128x128 `weight_scale_inv`, as in
        DeepSeek's release (config.json gets its quantization_config).
    Files: config.json, model-0000k-of-0000n.safetensors (each at most `max_shard_bytes` unless one tensor
    is larger), model.safetensors.index.json. Written into a temporary sibling and renamed when complete;
    an existing non-empty `path` is replaced only with `overwrite=True`.
    """
    if cfg.num_nextn_predict_layers and "mtp_0" not in params:
        raise CheckpointError(f"config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but params have "
                              f"no mtp_0; use cfg.replace(num_nextn_predict_layers=0) to save without MTP")
    extra = sorted(set(params) - {leaf.path[0] for leaf in _plan(cfg)})
    if extra:
        raise CheckpointError(f"params hold {extra}, which the config does not describe")
    units = _units(cfg, params, np.dtype(dtype) if dtype is not None else None, fp8)
    shards: list[list[_Unit]] = [[]]
    size = 0
    for unit in units:
        if shards[-1] and size + unit.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit.nbytes
    hf_config = cfg.to_hf_dict()
    hf_config.pop("quantization_config", None)
    if fp8:
        hf_config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    main_dtype = np.dtype(dtype) if dtype is not None else _tree_get(params, ("embed_tokens",)).dtype
    hf_config["torch_dtype"] = np.dtype(main_dtype).name

    t0 = time.time()
    with staged_directory(path, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        weight_map: dict[str, str] = {}
        total = 0
        for k, shard in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors: dict[str, np.ndarray] = {}
            for unit in shard:
                tensors.update(unit.produce())
            safetensors.numpy.save_file(tensors, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.nbytes for t in tensors.values())
            log.info("[%d/%d] wrote %s: %d tensors, %.1f MB", k + 1, len(shards), file, len(tensors),
                     sum(t.nbytes for t in tensors.values()) / 1e6)
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    log.info("saved %s (%d shards, %.1f MB) in %.1fs", path, len(shards), total / 1e6, time.time() - t0)
    return Path(path)
