"""Packing of integer codes into int32 words, AutoGPTQ / GPTQModel layout.

Along the packed axis the codes form one little-endian bit stream: code c occupies stream bits
[c*bits, (c+1)*bits) and word w holds stream bits [32w, 32w+32). For 2/4/8 bits this is the usual
`word |= code << (bits*j)` with 32/bits codes per word; for 3 bits it is AutoGPTQ's pattern in
which 32 codes fill 3 words and codes 10 and 21 straddle a word boundary.

  qweight [K*bits/32, N]: codes [K, N] packed along K (the input dim)
  qzeros  [G, N*bits/32]: zero codes [G, N] packed along N
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .config import SUPPORTED_BITS


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest run of codes that fills whole words."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported for packing; use one of {SUPPORTED_BITS}")
    return (32, 3) if bits == 3 else (32 // bits, 1)


def check_packable(length: int, bits: int, what: str = "packed axis") -> None:
    codes, _ = _chunk(bits)
    if length % codes != 0:
        raise ValueError(
            f"{what} has length {length}, which is not a multiple of {codes}: "
            f"{bits}-bit codes are packed {codes} at a time"
        )


@partial(jax.jit, static_argnames=("bits", "axis"))
def pack(codes: jax.Array, bits: int, axis: int = 0) -> jax.Array:
    """Pack integer codes along `axis` into int32 words (codes are taken modulo 2**bits)."""
    n_codes, n_words = _chunk(bits)
    x = jnp.moveaxis(jnp.asarray(codes), axis, 0)
    check_packable(x.shape[0], bits)
    rest = x.shape[1:]
    x = (x.astype(jnp.uint32) & (2**bits - 1)).reshape((-1, n_codes) + rest)
    words = [jnp.zeros((x.shape[0],) + rest, jnp.uint32) for _ in range(n_words)]
    for c in range(n_codes):
        w, s = divmod(c * bits, 32)
        words[w] = words[w] | (x[:, c] << s)  # high bits past 32 are dropped here ...
        if s + bits > 32:
            words[w + 1] = words[w + 1] | (x[:, c] >> (32 - s))  # ... and land in the next word
    out = jnp.stack(words, axis=1).reshape((-1,) + rest)
    return jnp.moveaxis(jax.lax.bitcast_convert_type(out, jnp.int32), 0, axis)


@partial(jax.jit, static_argnames=("bits", "axis"))
def unpack(packed: jax.Array, bits: int, axis: int = 0) -> jax.Array:
    """Exact inverse of `pack`: int32 codes in [0, 2**bits)."""
    n_codes, n_words = _chunk(bits)
    x = jnp.moveaxis(jnp.asarray(packed), axis, 0)
    if x.dtype != jnp.int32:
        raise ValueError(f"packed words must be int32, got {x.dtype}")
    if x.shape[0] % n_words != 0:
        raise ValueError(f"{bits}-bit packed axis has {x.shape[0]} words, not a multiple of {n_words}")
    rest = x.shape[1:]
    x = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape((-1, n_words) + rest)
    codes = []
    for c in range(n_codes):
        w, s = divmod(c * bits, 32)
        v = x[:, w] >> s
        if s + bits > 32:
            v = v | (x[:, w + 1] << (32 - s))
        codes.append(v & (2**bits - 1))
    out = jnp.stack(codes, axis=1).reshape((-1,) + rest).astype(jnp.int32)
    return jnp.moveaxis(out, 0, axis)


def pack_qweight(codes_kn: jax.Array, bits: int) -> jax.Array:
    """codes [K, N] -> qweight [K*bits/32, N]."""
    return pack(codes_kn, bits=bits, axis=0)


def unpack_qweight(qweight: jax.Array, bits: int) -> jax.Array:
    """qweight [K*bits/32, N] -> codes [K, N]."""
    return unpack(qweight, bits=bits, axis=0)


def pack_qzeros(zeros_gn: jax.Array, bits: int) -> jax.Array:
    """zero codes [G, N] -> qzeros [G, N*bits/32]."""
    return pack(zeros_gn, bits=bits, axis=1)


def unpack_qzeros(qzeros: jax.Array, bits: int) -> jax.Array:
    """qzeros [G, N*bits/32] -> zero codes [G, N]."""
    return unpack(qzeros, bits=bits, axis=1)
