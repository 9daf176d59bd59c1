"""Uniform min/max quantization grid (the reference GPTQ `Quantizer`, weight mode, mse=False).

SpQR's reference `Quantizer` (quant_groups.py) is the same grid with two differences, selected by keyword options:
its range is the plain [min, max] of the row (`zero_in_range=False`: 0 is not forced into the range, so a group of
16 positive weights uses all its levels on them) and its zero point is left fractional (`round_zero=False`), so that
codes are `round(w / scale + zero)` (`quantize_codes_fractional`).

All functions work on a batch of rows: the last axis is reduced, every leading axis is a row
(an output channel, or an output channel of one group). `scale` and `zero` must broadcast
against `w` in `quantize_codes` / `dequantize_codes`, e.g. `scale[..., None]` for rows.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.jit, static_argnames=("bits", "sym", "zero_in_range", "round_zero"))
def find_params(w_rows: jax.Array, bits: int, sym: bool, *, zero_in_range: bool = True,
                round_zero: bool = True) -> tuple[jax.Array, jax.Array]:
    """Per-row (scale, zero), each of shape w_rows.shape[:-1], float32.

    The range always contains 0 (unless zero_in_range=False: SpQR); a row whose range is a single point (all-zero
    rows, or constant rows when 0 is not forced in) gets [-1, 1] so that scale > 0.
    `zero` is an integer-valued float: round(-xmin/scale), or 2**(bits-1) when sym (round_zero=False: -xmin/scale).
    Note (as in the reference): on the sym grid a row's most negative value maps to exactly
    -(maxq+1)/2 + 1/2 grid steps, a rounding tie that float rounding of scale breaks.
    """
    maxq = 2**bits - 1
    x = jnp.asarray(w_rows, jnp.float32)
    xmin, xmax = x.min(-1), x.max(-1)
    if zero_in_range:
        xmin, xmax = jnp.minimum(xmin, 0.0), jnp.maximum(xmax, 0.0)
    if sym:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        # As the reference: only rows with a negative minimum are mirrored.
        xmin = jnp.where(xmin < 0, -xmax, xmin)
    empty = xmin == xmax  # with 0 in the range: only all-zero rows
    xmin = jnp.where(empty, -1.0, xmin)
    xmax = jnp.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = jnp.full_like(scale, (maxq + 1) / 2)
    else:
        zero = -xmin / scale
        if round_zero:
            zero = jnp.round(zero)
    return scale, zero


def quantize_codes(w: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int) -> jax.Array:
    """Integer codes clamp(round(w/scale) + zero, 0, maxq) as int32."""
    q = jnp.clip(jnp.round(w / scale) + zero, 0, maxq)
    return q.astype(jnp.int32)


def quantize_codes_fractional(w: jax.Array, scale: jax.Array, zero: jax.Array, maxq: int,
                              eps: float = 1e-9) -> jax.Array:
    """Integer codes clamp(round(w / max(scale, eps) + zero), 0, maxq) as int32: the SpQR reference's form, where
    zero need not be an integer (it is itself quantized at the second level) and scale may come out of that second
    level as 0."""
    q = jnp.clip(jnp.round(w / jnp.maximum(scale, eps) + zero), 0, maxq)
    return q.astype(jnp.int32)


def dequantize_codes(q: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """scale * (q - zero) in float32 (q is an exact integer in float32; zero is one too, except in SpQR)."""
    return scale * (q.astype(jnp.float32) - jnp.asarray(zero, jnp.float32))
