"""Load-time conversion of quantized weights into the Pallas kernels' layouts.

``prepare_for_kernels(params)`` replaces every ``UniformQuantizedWeight`` (GPTQ / RTN) in a parameter tree by a
``pallas_kernels.gptq_matmul.GPTQKernelWeight``, whose ``matmul`` runs the Mosaic GPU kernel on a GPU (decode-sized
activations in the packed dtype) and the XLA dequantize-then-matmul reference otherwise, so the same jitted model and
generation loop run with either. ``LUTQuantizedWeight`` (SqueezeLLM) leaves become ``pallas_kernels.lut_matmul.
LUTKernelWeight`` the same way (the sparse part rides along as additive deltas), and ``SpQRWeight`` leaves
``pallas_kernels.spqr_matmul.SpQRKernelWeight`` (3-bit statistics decoded in the kernel, outliers as deltas). Run
it once after loading, outside jit (act-order row sorting needs concrete g_idx). Weights the kernels cannot take
(8-bit codes, groups that are not multiples of 64) stay as they are.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import gptq_matmul, lut_matmul, spqr_matmul

from .formats import UniformQuantizedWeight
from .formats_lut import LUTQuantizedWeight
from .formats_spqr import SpQRWeight


def to_kernel_weight(w: UniformQuantizedWeight, dtype=jnp.bfloat16) -> gptq_matmul.GPTQKernelWeight:
    """One GPTQ weight -> the kernel layout (codes re-packed per warpgroup thread, scales in ``dtype``)."""
    w.check_shapes()
    return gptq_matmul.pack(w.codes(), w.scales, w.zeros(), jax.device_get(w.g_idx), bits=w.bits, sym=w.sym,
                            dtype=dtype)


def kernel_supports(w: UniformQuantizedWeight) -> bool:
    try:
        gptq_matmul.check_packable(jax.device_get(w.g_idx), w.scales.shape[0], w.bits)
    except ValueError:
        return False
    return True


def lut_to_kernel_weight(w: LUTQuantizedWeight, dtype=jnp.bfloat16) -> lut_matmul.LUTKernelWeight:
    """One SqueezeLLM weight -> the LUT kernel layout (codes as prmt selectors, tables as byte planes in ``dtype``,
    kept weights as deltas against the rounded table)."""
    w.check_shapes()
    sparse = (w.row_ptr, w.col_idx, w.values) if w.nnz else None
    return lut_matmul.pack(w.codes(), w.lut, bits=w.bits, sparse=sparse, dtype=dtype)


def spqr_to_kernel_weight(w: SpQRWeight, dtype=jnp.bfloat16,
                          sparse_format: str = "ell") -> spqr_matmul.SpQRKernelWeight:
    """One SpQR weight -> the SpQR kernel layout (statistic codes kept 3-bit, outliers as deltas against the
    kernel's dense values; ``sparse_format`` see spqr_matmul.pack)."""
    from .packing import unpack
    w.check_shapes()
    return spqr_matmul.pack(w.codes(), unpack(w.scale_codes, bits=w.qq_scale_bits, axis=1),
                            unpack(w.zero_codes, bits=w.qq_zero_bits, axis=1), w.scale_qq, w.zero_qq, w.perm,
                            w.row_ptr, w.col_idx, w.values, bits=w.bits, group_size=w.group_size,
                            qq_groupsize=w.qq_groupsize, dtype=dtype, sparse_format=sparse_format)


def spqr_kernel_supports(w: SpQRWeight) -> bool:
    return (w.bits in spqr_matmul.KERNEL_BITS and max(w.qq_scale_bits, w.qq_zero_bits) <= spqr_matmul.STAT_BITS
            and w.group_size % spqr_matmul.GROUP == 0 and w.qq_groupsize % spqr_matmul.ROW_BLOCK == 0)


def prepare_for_kernels(params, dtype=jnp.bfloat16):
    """Every kernel-compatible ``UniformQuantizedWeight`` leaf of ``params`` -> ``GPTQKernelWeight``, every
    ``LUTQuantizedWeight`` leaf -> ``LUTKernelWeight``, every kernel-compatible ``SpQRWeight`` (2-4-bit codes,
    statistics of <= 3 bits, groups of multiples of 16) -> ``SpQRKernelWeight``."""
    kinds = (UniformQuantizedWeight, LUTQuantizedWeight, SpQRWeight)

    def convert(leaf):
        if isinstance(leaf, UniformQuantizedWeight) and kernel_supports(leaf):
            return to_kernel_weight(leaf, dtype)
        if isinstance(leaf, LUTQuantizedWeight) and leaf.bits in lut_matmul.LUT_KERNEL_BITS:
            return lut_to_kernel_weight(leaf, dtype)
        if isinstance(leaf, SpQRWeight) and spqr_kernel_supports(leaf):
            return spqr_to_kernel_weight(leaf, dtype)
        return leaf

    return jax.tree_util.tree_map(convert, params, is_leaf=lambda x: isinstance(x, kinds))
