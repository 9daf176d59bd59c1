"""Uniform min/max quantization grid (the reference GPTQ `Quantizer`, weight mode, mse=False).

All functions work on a batch of rows: the last axis is reduced, every leading axis is a row
(an output channel, or an output channel of one group). `scale` and `zero` must broadcast
against `w` in `quantize_codes` / `dequantize_codes`, e.g. `scale[..., None]` for rows.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.jit, static_argnames=("bits", "sym"))
def find_params(w_rows: jax.Array, bits: int, sym: bool) -> tuple[jax.Array, jax.Array]:
    """Per-row (scale, zero), each of shape w_rows.shape[:-1], float32.

    The range always contains 0; all-zero rows get [-1, 1] so that scale > 0.
    `zero` is an integer-valued float: round(-xmin/scale), or 2**(bits-1) when sym.
    Note (as in the reference): on the sym grid a row's most negative value maps to exactly
    -(maxq+1)/2 + 1/2 grid steps, a rounding tie that float rounding of scale breaks.
    """
    maxq = 2**bits - 1
    x = jnp.asarray(w_rows, jnp.float32)
    xmin = jnp.minimum(x.min(-1), 0.0)
    xmax = jnp.maximum(x.max(-1), 0.0)
    if sym:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        # As the reference: only rows with a negative minimum are mirrored.
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(empty, -1.0, xmin)
    xmax = jnp.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = jnp.full_like(scale, (maxq + 1) / 2)
    else:
        zero = jnp.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    """Integer codes clamp(round(w/scale) + zero, 0, maxq) as int32."""
    q = jnp.clip(jnp.round(w / scale) + zero, 0, maxq)
    return q.astype(jnp.int32)


def dequantize_codes(q: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """scale * (q - zero) in float32 (q and zero are exact integers in float32)."""
    return scale * (q.astype(jnp.float32) - jnp.asarray(zero, jnp.float32))
