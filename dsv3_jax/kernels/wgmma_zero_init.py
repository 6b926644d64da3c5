"""Fresh WGMMA accumulators without zero-filled registers: a block's first WGMMA overwrites (scale-d = 0).

Mosaic GPU (jax 0.10-0.11) starts every `plgpu.ACC` tile as a broadcast 0.0 pushed through an optimization
barrier, so each thread moves 0 into each of the tile's registers (64 `mov`s for a 64 x 128 FP32 tile), and
its WGMMAs always accumulate (scale-d = 1). The FP8 GEMMs take a fresh tile for every 128-wide K block
(DeepSeek's promotion to FP32 every N_C = 128), so a math warpgroup zero-fills one or two tiles per pipeline
step while it has no WGMMA in flight: run 12 found the tensor cores idle a third of the time, both warpgroups
in this phase together (bench/RESULTS.md). DeepGEMM issues a block's first WGMMA with scale-d = 0 instead.

`install()` makes Mosaic GPU's lowering do the same, for exactly that pattern:

- the optimization barrier of a constant-zero tile whose only users are WGMMA accumulator operands is
  dropped (nothing reads the zeros: the WGMMA below ignores them);
- a WGMMA whose accumulator registers are constant zeros takes undefined registers instead, and its first
  instruction compares its `use_out` immediate (1) with 1 rather than 0, so the predicate, scale-d, is false
  and the instruction writes D = A . B; the instructions after it accumulate as before.

Every other lowering is unchanged. `DSV3_WGMMA_ZERO_INIT=0` in the environment leaves Mosaic GPU as it is
(the A/B comparison of bench/RESULTS.md run 13). If this jax's Mosaic GPU lacks the functions it wraps,
`install()` changes nothing and returns False (the kernels are then correct, only slower).
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

ENV_FLAG = "DSV3_WGMMA_ZERO_INIT"
# the predicate of a WGMMA's scale-d in Mosaic GPU's inline PTX: p = (use_out != 0)
SCALE_D_PREDICATE = re.compile(r"setp\.ne\.b32 p, (\$\d+), 0;")
# ops whose result is zero when their (first / every) operand is: how a zero tile reaches its registers
ZERO_PRESERVING = frozenset({"vector.broadcast", "vector.splat", "vector.extract_strided_slice", "vector.extract",
                             "vector.shape_cast", "vector.bitcast", "llvm.bitcast", "arith.bitcast",
                             "builtin.unrealized_conversion_cast"})
_installed: dict[str, Callable[..., Any]] = {}      # name -> the original function, once installed


def _attr_is_zero(attr: Any) -> bool:
    """Whether an MLIR constant's value attribute is +0 (float, integer, or a splat of either)."""
    from jax._src.lib.mlir import ir

    for cast, zero in ((ir.FloatAttr, lambda a: a.value == 0.0 and math.copysign(1.0, a.value) > 0),
                       (ir.IntegerAttr, lambda a: a.value == 0)):
        try:
            return zero(cast(attr))
        except (ValueError, TypeError):
            continue
    try:
        dense = ir.DenseElementsAttr(attr)
    except (ValueError, TypeError):
        return False
    return dense.is_splat and _attr_is_zero(dense.get_splat_value())


def is_zero(value: Any) -> bool:
    """Whether an MLIR value is a constant +0 (scalar or splat vector), looking through broadcasts, slices,
    bitcasts and Mosaic GPU's register casts (every operand of a cast must be zero)."""
    from jax._src.lib.mlir import ir

    op = getattr(value.owner, "operation", value.owner)
    if not isinstance(op, ir.Operation):        # a block argument: a loop carry, not a fresh tile
        return False
    if op.name in ("arith.constant", "llvm.mlir.constant"):
        return _attr_is_zero(op.attributes["value"])
    if op.name == "builtin.unrealized_conversion_cast":
        return len(op.operands) > 0 and all(is_zero(v) for v in op.operands)
    return op.name in ZERO_PRESERVING and len(op.operands) > 0 and is_zero(op.operands[0])


def overwrite_first(asm_op: Any) -> None:
    """Make a Mosaic GPU WGMMA inline-asm op overwrite its accumulator: its scale-d predicate compares the
    `use_out` immediate (1) with 1, so it is false. An asm string of another form is an error (a jax whose
    WGMMA lowering changed), not a silent accumulation into undefined registers."""
    from jax._src.lib.mlir import ir

    asm = ir.StringAttr(asm_op.attributes["asm_string"]).value
    new, count = SCALE_D_PREDICATE.subn(r"setp.ne.b32 p, \1, 1;", asm)
    if count != 1 or "wgmma.mma_async" not in asm:
        raise NotImplementedError(f"unexpected WGMMA inline asm from Mosaic GPU: {asm[:200]!r}")
    asm_op.attributes["asm_string"] = ir.StringAttr.get(new)


def _first_asm(registers: np.ndarray, fresh: list[Any]) -> Any:
    """The inline-asm op of the first WGMMA instruction behind `registers` (the output of a chain of WGMMA
    instructions on one accumulator): walk back until the accumulator operands are the `fresh` values."""
    from jax._src.lib.mlir import ir

    value = registers.flat[0]
    while True:
        op = getattr(value.owner, "operation", value.owner)
        if not isinstance(op, ir.Operation):
            raise NotImplementedError("WGMMA accumulator chain does not start at the fresh registers")
        if op.name == "llvm.inline_asm":
            if any(op.operands[0] == f for f in fresh):
                return op
            value = op.operands[0]
        elif len(op.operands):
            value = op.operands[0]
        else:
            raise NotImplementedError(f"WGMMA accumulator chain reaches {op.name}")


def _wgmma_m64(original: Callable[..., Any]) -> Callable[..., Any]:
    """Mosaic GPU's `wgmma_m64(acc_registers, ...)`, with constant-zero FP32 accumulators replaced by undefined
    registers and the first instruction overwriting them."""
    def wgmma_m64(acc: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import llvm

        if not (str(ir.VectorType(acc.flat[0].type).element_type) == "f32"
                and all(is_zero(r) for r in acc.flat)):
            return original(acc, *args, **kwargs)
        undefined = np.empty(acc.shape, dtype=object)
        for index, reg in np.ndenumerate(acc):
            undefined[index] = llvm.mlir_undef(reg.type)
        out = original(undefined, *args, **kwargs)
        overwrite_first(_first_asm(out, list(undefined.flat)))
        return out

    return wgmma_m64


def _optimization_barrier_rule(original: Callable[..., Any]) -> Callable[..., Any]:
    """Mosaic GPU's lowering of `mosaic_gpu.optimization_barrier`, dropping the barrier (its operands pass
    through) when every operand is a constant zero and every use of every result is a WGMMA's accumulator."""
    def rule(ctx: Any, op: Any) -> Any:
        wgmma_name = _mosaic_modules()[0].WGMMAOp.OPERATION_NAME
        only_wgmma_accumulators = all(
            use.owner.name == wgmma_name and use.operand_number == 0 for result in op.results for use in result.uses)
        if len(op.results) and only_wgmma_accumulators and all(is_zero(v) for v in op.operands):
            return list(op.operands)
        return original(ctx, op)

    return rule


def _mosaic_modules() -> tuple[Any, Any, Any]:
    """Mosaic GPU's dialect, its Python lowering and its WGMMA module (the package's `wgmma` is a function)."""
    core, lowering, wgmma = (importlib.import_module(f"jax.experimental.mosaic.gpu.{name}")
                             for name in ("core", "dialect_lowering", "wgmma"))
    return core.dialect, lowering, wgmma


def install() -> bool:
    """Wrap Mosaic GPU's WGMMA and optimization-barrier lowerings (once per process); False where this jax
    lacks them or `DSV3_WGMMA_ZERO_INIT=0` is set."""
    if os.environ.get(ENV_FLAG, "1") == "0":
        return False
    if _installed:
        return True
    try:
        mgpu_dialect, dialect_lowering, wgmma = _mosaic_modules()
    except (ImportError, AttributeError):
        return False
    barrier = getattr(mgpu_dialect, "OptimizationBarrierOp", None)
    rules = getattr(dialect_lowering, "_lowerings", {})
    if barrier is None or barrier.OPERATION_NAME not in rules or not hasattr(wgmma, "wgmma_m64"):
        return False
    _installed["wgmma_m64"], _installed["barrier"] = wgmma.wgmma_m64, rules[barrier.OPERATION_NAME]
    wgmma.wgmma_m64 = _wgmma_m64(_installed["wgmma_m64"])
    rules[barrier.OPERATION_NAME] = _optimization_barrier_rule(_installed["barrier"])
    return True


def uninstall() -> None:
    """Restore Mosaic GPU's own lowerings (tests compare both)."""
    if not _installed:
        return
    mgpu_dialect, dialect_lowering, wgmma = _mosaic_modules()
    wgmma.wgmma_m64 = _installed.pop("wgmma_m64")
    dialect_lowering._lowerings[mgpu_dialect.OptimizationBarrierOp.OPERATION_NAME] = _installed.pop("barrier")
