"""Run the Mosaic GPU kernels in Pallas' interpreter on jax 0.10, the newest jax the CI's package index has.

The kernels hand WGMMA its b operand K-major, as `b.at[cols].transpose((1, 0))`. jax 0.11's interpreter reads
such a view; jax 0.10's reads a WGMMA operand through index transforms only and fails on the transpose
("'TransposeTransform' object has no attribute 'indices'"). `install()` replaces 0.10's WGMMA callback by one
that reads the operand through its index transforms and then applies its trailing transposes; the kernels' code
is the same one that runs compiled on the GPU. It also takes a WGMMA's a operand from registers (a value, not a
shared-memory ref), which the grouped wgrad kernel passes, and stores the in-bounds part of a TMA store that
runs past the output's edge, as the hardware does (0.10's interpreter drops the whole store, so the rows of a
partial edge tile stayed unwritten). Out-of-bounds TMA reads, which the hardware fills with zeros, the kernels
ask the interpreter to fill with NaN (`gemm_mgpu.warp_specialized_kernel`): none may reach a stored element.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

JAX_VERSION = tuple(int(v) for v in jax.__version__.split(".")[:2])
READS_A_FROM_REGISTERS = False      # set by install() where the patch lets the interpreter take a WGMMA's a as a value


def install() -> bool:
    """Patch jax 0.10's interpreter (idempotent); True where the Mosaic GPU kernels can be interpreted."""
    global READS_A_FROM_REGISTERS
    if JAX_VERSION >= (0, 11):
        return True
    if JAX_VERSION < (0, 10):
        return False
    from jax._src import callback
    from jax._src.pallas.mosaic.interpret import utils
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks, jaxpr_interpret
    from jax._src.state.types import AbstractRef, TransposeTransform

    if getattr(gpu_callbacks.wgmma, "reads_transposed_operands", False):
        return True

    def indexed(transforms: tuple[Any, ...]) -> tuple[tuple[Any, ...], list[tuple[int, ...]]]:
        """A ref's index transforms (leaves as ints) and the transposes that follow them."""
        transforms = list(gpu_callbacks._remove_noop_transforms(transforms))
        perms = []
        while transforms and isinstance(transforms[-1], TransposeTransform):
            perms.insert(0, transforms.pop().permutation)
        return jax.tree.map(int, tuple(transforms)), perms

    def simulated(device_id, thread_id, grid_point_coords, source_info) -> tuple[Any, int, Any]:
        """The interpreter's shared memory, the calling thread's global id and its logging info."""
        memory = gpu_callbacks._get_shared_memory()
        log = utils.GPULoggingInfo(device_id=int(device_id), grid_point_coords=tuple(int(x) for x in grid_point_coords),
                                   thread_id=int(thread_id), source_info=source_info)
        return memory, memory.get_global_thread_id(int(device_id), int(thread_id)), log

    def wgmma(*, token, device_id, grid_point_coords, thread_id, acc_allocation_key_as_array, acc_transforms,
              acc_dtype, a_allocation_key_as_array, a_transforms, b_allocation_key_as_array, b_transforms,
              source_info=None, a_in_registers=False):
        memory, thread, log = simulated(device_id, thread_id, grid_point_coords, source_info)

        def read(key_array, transforms):
            index, perms = indexed(transforms)
            value, _, _ = memory.get_buffer_content(gpu_callbacks.HostAllocationKey.from_array(key_array),
                                                    utils.to_range(index), thread, logging_info=log)
            assert value is not None
            for perm in perms:
                value = np.transpose(value, perm)
            return value

        a = np.asarray(a_allocation_key_as_array) if a_in_registers else read(a_allocation_key_as_array, a_transforms)
        b = read(b_allocation_key_as_array, b_transforms)
        acc_key = gpu_callbacks.HostAllocationKey.from_array(acc_allocation_key_as_array)
        acc_range = utils.to_range(indexed(acc_transforms)[0])
        acc, _, _ = memory.get_buffer_content(acc_key, acc_range, thread, logging_info=log)
        memory.store_buffer_content(acc_key, acc_range, acc + np.matmul(a, b, dtype=acc_dtype), thread,
                                    logging_info=log)
        return token

    original_eqn = jaxpr_interpret.JaxprInterpreter._interpret_wgmma_ref_p

    def interpret_wgmma_ref(self, eqn, token, get_invals):
        """0.10's rule, with a operand in registers handed to the callback as its value."""
        if isinstance(eqn.invars[1].aval, AbstractRef):
            return original_eqn(self, eqn, token, get_invals)
        acc, a, b, *leaves = get_invals()
        trees = [eqn.params[f"{x}_transforms_tree"] or jax.tree.structure([]) for x in ("acc", "a", "b")]
        acc_transforms, a_transforms, b_transforms = jax.tree.unflatten(jax.tree_util.treedef_tuple(trees), leaves)
        return callback.io_callback(
            functools.partial(gpu_callbacks.wgmma, acc_dtype=eqn.invars[0].aval.dtype, source_info=eqn.source_info,
                              a_in_registers=True),
            gpu_callbacks.TOKEN_SHAPE_DTYPE, token=token, device_id=self.device_info.device_id,
            grid_point_coords=self.grid_point_coords, thread_id=self.thread_id, acc_allocation_key_as_array=acc,
            acc_transforms=acc_transforms, a_allocation_key_as_array=a, a_transforms=a_transforms,
            b_allocation_key_as_array=b, b_transforms=b_transforms, ordered=True), []

    def copy_smem_to_gmem(*, token, device_id, grid_point_coords, thread_id, src_allocation_key_as_array,
                          src_transforms, dst_allocation_key_as_array, dst_transforms, predicate, source_info,
                          commit_group, reduction_op):
        """0.10's TMA store, writing the part of the destination range inside the buffer."""
        if predicate is not None or reduction_op is not None:
            raise NotImplementedError("predicated or reducing TMA stores")
        memory, thread, log = simulated(device_id, thread_id, grid_point_coords, source_info)
        src_key = gpu_callbacks.HostAllocationKey.from_array(src_allocation_key_as_array)
        dst_key = gpu_callbacks.HostAllocationKey.from_array(dst_allocation_key_as_array)
        value, _, _ = memory.get_buffer_content(src_key, utils.to_range(indexed(src_transforms)[0]), thread,
                                                logging_info=log)
        dst_range = utils.to_range(indexed(dst_transforms)[0])
        shape = memory.mem[dst_key].logical_shape
        kept_range, kept_value = [], []
        for r, size in zip(dst_range, shape, strict=True):
            if isinstance(r, slice):
                stop = min(r.stop, size)
                kept_range.append(slice(r.start, stop))
                kept_value.append(slice(0, max(stop - r.start, 0)))
            else:
                kept_range.append(r)
        memory.store_buffer_content(dst_key, tuple(kept_range), np.ascontiguousarray(value[tuple(kept_value)]),
                                    thread, logging_info=log)
        return token

    wgmma.reads_transposed_operands = True
    gpu_callbacks.wgmma = wgmma
    gpu_callbacks.copy_smem_to_gmem = copy_smem_to_gmem
    jaxpr_interpret.JaxprInterpreter._interpret_wgmma_ref_p = interpret_wgmma_ref
    READS_A_FROM_REGISTERS = True
    return True
