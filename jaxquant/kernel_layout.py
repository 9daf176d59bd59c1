"""Load-time conversion of quantized weights into the Pallas kernels' layouts.

``prepare_for_kernels(params)`` replaces every ``UniformQuantizedWeight`` (GPTQ / RTN) in a parameter tree by a
``pallas_kernels.gptq_matmul.GPTQKernelWeight``, whose ``matmul`` runs the Mosaic GPU kernel on a GPU (decode-sized
activations in the packed dtype) and the XLA dequantize-then-matmul reference otherwise, so the same jitted model and
generation loop run with either. ``LUTQuantizedWeight`` (SqueezeLLM) leaves become ``pallas_kernels.lut_matmul.
LUTKernelWeight`` the same way (the sparse part rides along as additive deltas). Run it once after loading, outside jit
(act-order row sorting needs concrete g_idx). Weights the kernels cannot take (8-bit codes, groups that are not
multiples of 64) stay as they are.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import gptq_matmul, lut_matmul

from .formats import UniformQuantizedWeight
from .formats_lut import LUTQuantizedWeight


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


def prepare_for_kernels(params, dtype=jnp.bfloat16):
    """Every kernel-compatible ``UniformQuantizedWeight`` leaf of ``params`` -> ``GPTQKernelWeight``, every
    ``LUTQuantizedWeight`` leaf -> ``LUTKernelWeight``."""
    kinds = (UniformQuantizedWeight, LUTQuantizedWeight)

    def convert(leaf):
        if isinstance(leaf, UniformQuantizedWeight) and kernel_supports(leaf):
            return to_kernel_weight(leaf, dtype)
        if isinstance(leaf, LUTQuantizedWeight) and leaf.bits in lut_matmul.LUT_KERNEL_BITS:
            return lut_to_kernel_weight(leaf, dtype)
        return leaf

    return jax.tree_util.tree_map(convert, params, is_leaf=lambda x: isinstance(x, kinds))
