"""Round-to-nearest quantization on the min/max grid (the GPTQ paper's RTN baseline)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .config import QuantConfig
from .formats import UniformQuantizedWeight
from .grid import find_params, quantize_codes
from .packing import check_packable


@partial(jax.jit, static_argnames=("bits", "group_size", "sym"))
def rtn_codes(W: jax.Array, bits: int, group_size: int, sym: bool):
    """W [N, K] -> (codes [N, K] int32, scales [G, N], zeros [G, N] float32, g_idx [K])."""
    N, K = W.shape
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    # Zero-padding a short last group changes nothing: the grid's range always includes 0.
    Wg = jnp.pad(jnp.asarray(W, jnp.float32), ((0, 0), (0, G * gs - K))).reshape(N, G, gs)
    scale, zero = find_params(Wg, bits, sym)  # [N, G]
    codes = quantize_codes(Wg, scale[..., None], zero[..., None], 2**bits - 1).reshape(N, G * gs)[:, :K]
    g_idx = jnp.arange(K, dtype=jnp.int32) // gs
    return codes, scale.T, zero.T, g_idx


def rtn(W: jax.Array, cfg: QuantConfig) -> UniformQuantizedWeight:
    """Quantize W [out_features, in_features] (torch layout) to the nearest grid point."""
    N, K = W.shape
    cfg.validate(K)
    check_packable(K, cfg.bits, "in_features")
    check_packable(N, cfg.bits, "out_features")
    codes, scales, zeros, g_idx = rtn_codes(W, cfg.bits, cfg.group_size, cfg.sym)
    return UniformQuantizedWeight.from_codes(
        codes, scales, zeros.astype(jnp.int32), g_idx,
        bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym,
    )
