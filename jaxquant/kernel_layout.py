"""Load-time conversion of quantized weights into the Pallas kernels' layouts.

``prepare_for_kernels(params)`` replaces every ``UniformQuantizedWeight`` (GPTQ / RTN) in a parameter tree by a
``pallas_kernels.gptq_matmul.GPTQKernelWeight``, whose ``matmul`` runs the Mosaic GPU kernel on a GPU (decode-sized
activations in the packed dtype) and the XLA dequantize-then-matmul reference otherwise, so the same jitted model and
generation loop run with either. Run it once after loading, outside jit (act-order row sorting needs concrete g_idx).
Weights the kernel cannot take (8-bit codes, groups that are not multiples of 64) stay as they are.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import gptq_matmul

from .formats import UniformQuantizedWeight


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


def prepare_for_kernels(params, dtype=jnp.bfloat16):
    """Every kernel-compatible ``UniformQuantizedWeight`` leaf of ``params`` -> ``GPTQKernelWeight``."""
    def convert(leaf):
        if isinstance(leaf, UniformQuantizedWeight) and kernel_supports(leaf):
            return to_kernel_weight(leaf, dtype)
        return leaf

    return jax.tree_util.tree_map(convert, params, is_leaf=lambda x: isinstance(x, UniformQuantizedWeight))
