"""Stored form of a uniformly quantized linear weight (AutoGPTQ / GPTQModel tensors)."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp

from .packing import check_packable, pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["qweight", "qzeros", "scales", "g_idx"],
    meta_fields=["bits", "group_size", "sym", "in_features", "out_features"],
)
@dataclasses.dataclass(frozen=True)
class UniformQuantizedWeight:
    """W[k, n] = scales[g, n] * (code[k, n] - zero[g, n]) with g = g_idx[k]; K = in, N = out.

    qzeros holds the plain zero codes (GPTQ "v2" convention). GPTQ "v1" checkpoints (the original
    AutoGPTQ format) store zero - 1 in qzeros; add 1 when importing those.
    """

    qweight: jax.Array  # [K*bits/32, N] int32, codes packed along K
    qzeros: jax.Array  # [G, N*bits/32] int32, zero codes packed along N
    scales: jax.Array  # [G, N]
    g_idx: jax.Array  # [K] int32, group of each input column
    bits: int
    group_size: int  # -1 = per channel (G = 1)
    sym: bool
    in_features: int
    out_features: int

    @classmethod
    def from_codes(cls, codes, scales, zeros, g_idx, *, bits: int, group_size: int, sym: bool):
        """Build from unpacked arrays in the algorithms' (torch) layout.

        codes [N, K] integer codes of W[out, in]; scales, zeros [G, N]; g_idx [K].
        """
        codes = jnp.asarray(codes)
        N, K = codes.shape
        check_packable(K, bits, "in_features")
        check_packable(N, bits, "out_features")
        scales = jnp.asarray(scales)
        G = scales.shape[0]
        if scales.shape != (G, N) or jnp.shape(zeros) != (G, N) or jnp.shape(g_idx) != (K,):
            raise ValueError(
                f"expected scales/zeros [G, {N}] and g_idx [{K}], got {scales.shape}, "
                f"{jnp.shape(zeros)}, {jnp.shape(g_idx)}"
            )
        return cls(
            qweight=pack_qweight(codes.T, bits),
            qzeros=pack_qzeros(jnp.asarray(zeros), bits),
            scales=scales,
            g_idx=jnp.asarray(g_idx, jnp.int32),
            bits=bits,
            group_size=group_size,
            sym=sym,
            in_features=K,
            out_features=N,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    def codes(self) -> jax.Array:
        """Unpacked codes [K, N]."""
        return unpack_qweight(self.qweight, self.bits)

    def zeros(self) -> jax.Array:
        """Unpacked zero codes [G, N]."""
        return unpack_qzeros(self.qzeros, self.bits)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Dense weight [K, N] (Flax kernel layout), computed in float32 then cast."""
        zero = self.zeros().astype(jnp.float32)[self.g_idx]
        scale = self.scales.astype(jnp.float32)[self.g_idx]
        return (scale * (self.codes().astype(jnp.float32) - zero)).astype(dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., K] -> x @ W [..., N] in x's dtype, accumulated in float32."""
        y = jnp.matmul(
            x,
            self.dequantize(x.dtype),
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        )
        return y.astype(x.dtype)

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.qweight, self.qzeros, self.scales, self.g_idx))

    def avg_bits(self) -> float:
        """Stored bits per weight, including scales, zeros and g_idx."""
        return 8 * self.nbytes / (self.in_features * self.out_features)
