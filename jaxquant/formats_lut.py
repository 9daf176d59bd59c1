"""Stored form of a non-uniformly (lookup-table) quantized linear weight with an optional sparse part: SqueezeLLM.

    W[k, n] = lut[n, code[k, n]]            (k = input, n = output; one table of 2**bits values per output row)
    W[k, n] = sparse value                  where the CSR part holds an entry for (row n, column k)

Arrays (the layout of the SqueezeLLM reference's ``QuantLinearLUT``, CSR as in ``jaxquant.sparse``):

    qweight [K*bits/32, N] int32    codes packed along K (``jaxquant.packing``, AutoGPTQ bit order; 3 and 4 bits)
    lut     [N, 2**bits]   float16  per output row, ascending
    row_ptr [N + 1]        int32    CSR over W[out, in]: the weights kept in float16 (outliers, sensitive weights)
    col_idx [nnz]          int16 (K <= 32768) / int32
    values  [nnz]          float16  the kept weights themselves

The sparse entries *replace* the table value at their position (they hold the weight, not a correction). The
reference stores ``w - lut[code]`` there and adds it to the dense product; here the kept float16 values come back
exactly, and a kernel that wants the additive form computes ``values - lut[row, code]`` (``sparse_delta``).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .formats import register_format
from .packing import check_packable, pack_qweight, unpack_qweight
from .sparse import CSR, check_csr, csr_to_dense, row_ids, set_entries_transposed

LUT_BITS = (3, 4)


@register_format
@partial(
    jax.tree_util.register_dataclass,
    data_fields=["qweight", "lut", "row_ptr", "col_idx", "values"],
    meta_fields=["bits", "in_features", "out_features"],
)
@dataclasses.dataclass(frozen=True)
class LUTQuantizedWeight:
    qweight: jax.Array  # [K*bits/32, N] int32
    lut: jax.Array  # [N, 2**bits] float16
    row_ptr: jax.Array  # [N + 1] int32
    col_idx: jax.Array  # [nnz] int16/int32
    values: jax.Array  # [nnz] float16
    bits: int
    in_features: int
    out_features: int

    @classmethod
    def from_codes(cls, codes, lut, sparse: CSR | None = None, *, bits: int):
        """Build from the algorithm's arrays: codes [N, K] (W[out, in] orientation), lut [N, 2**bits], and the CSR of
        the kept weights over W[out, in] (None = no sparse part)."""
        if bits not in LUT_BITS:
            raise ValueError(f"bits={bits} is not supported by the LUT format; use one of {LUT_BITS}")
        codes = jnp.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"codes must be [out, in], got shape {codes.shape}")
        N, K = codes.shape
        check_packable(K, bits, "in_features")
        lut = jnp.asarray(lut, jnp.float16)
        if lut.shape != (N, 2**bits):
            raise ValueError(f"lut must have shape {(N, 2**bits)}, got {lut.shape}")
        if sparse is None:
            sparse = CSR(row_ptr=jnp.zeros(N + 1, jnp.int32), col_idx=jnp.zeros(0, jnp.int16),
                         values=jnp.zeros(0, jnp.float16), shape=(N, K))
        if tuple(sparse.shape) != (N, K):
            raise ValueError(f"sparse part has shape {tuple(sparse.shape)}, expected {(N, K)} (W[out, in])")
        return cls(qweight=pack_qweight(codes.T, bits), lut=lut, row_ptr=jnp.asarray(sparse.row_ptr, jnp.int32),
                   col_idx=jnp.asarray(sparse.col_idx), values=jnp.asarray(sparse.values, jnp.float16), bits=bits,
                   in_features=K, out_features=N)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @staticmethod
    def expected_shapes(K: int, N: int, bits: int, nnz: int) -> dict:
        return {"qweight": (K * bits // 32, N), "lut": (N, 2**bits), "row_ptr": (N + 1,), "col_idx": (nnz,),
                "values": (nnz,)}

    def check_shapes(self) -> None:
        """Raise ValueError if the stored arrays do not fit the static fields or the CSR is invalid."""
        K, N, b = self.in_features, self.out_features, self.bits
        if b not in LUT_BITS:
            raise ValueError(f"bits={b} is not supported by the LUT format; use one of {LUT_BITS}")
        for name, shape in self.expected_shapes(K, N, b, self.nnz).items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} has shape {got}, expected {shape} for a {K}x{N} {b}-bit LUT weight")
        check_csr(self.row_ptr, self.col_idx, self.values, (N, K))

    def codes(self) -> jax.Array:
        """Unpacked codes [K, N]."""
        return unpack_qweight(self.qweight, self.bits)

    def sparse(self) -> CSR:
        return CSR(row_ptr=self.row_ptr, col_idx=self.col_idx, values=self.values,
                   shape=(self.out_features, self.in_features))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Dense weight [K, N] (Flax kernel layout): table values, the kept weights at their positions; float32 then
        cast. Jittable (nnz is fixed by the array shapes); one compiled program per shape when called eagerly."""
        return _dequantize(self, jnp.dtype(dtype))

    def sparse_delta(self) -> jax.Array:
        """values - lut[row, code at (row, col)] in float32 [nnz]: the additive correction to the table product
        (for kernels computing ``x @ lut-dense + x @ delta-CSR``, the reference's form)."""
        rows = row_ids(self.row_ptr, self.nnz)
        cols = self.col_idx.astype(jnp.int32)
        code = self.codes()[cols, rows]
        return self.values.astype(jnp.float32) - self.lut.astype(jnp.float32)[rows, code]

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., K] -> x @ W [..., N] in x's dtype, accumulated in float32 (reference path via dequantize)."""
        y = jnp.matmul(x, self.dequantize(x.dtype), preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST)
        return y.astype(x.dtype)

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.qweight, self.lut, self.row_ptr, self.col_idx,
                                                        self.values))

    def avg_bits(self) -> float:
        """Stored bits per weight: codes, tables and the whole CSR (row pointers, column indices, values)."""
        return 8 * self.nbytes / (self.in_features * self.out_features)


@partial(jax.jit, static_argnames=("bits",))
def _table_values(qweight, lut, bits):
    """lut[n, code[k, n]] as [K, N] float32: one compiled program per layer shape."""
    return jnp.take_along_axis(lut.astype(jnp.float32).T, unpack_qweight(qweight, bits), axis=0)


def _dequantize(w: LUTQuantizedWeight, dtype) -> jax.Array:
    dense = _table_values(w.qweight, w.lut, w.bits)  # [K, N]
    if w.nnz:
        dense = set_entries_transposed(dense, w.row_ptr, w.col_idx, w.values)
    return dense.astype(dtype)


def sparse_to_dense(w: LUTQuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The sparse part alone as a dense W[out, in] (zeros elsewhere)."""
    return csr_to_dense(w.row_ptr, w.col_idx, w.values, (w.out_features, w.in_features), dtype)


def sparse_mask(w: LUTQuantizedWeight) -> np.ndarray:
    """Boolean W[out, in] mask of the kept positions (host numpy)."""
    mask = np.zeros((w.out_features, w.in_features), bool)
    rows = np.repeat(np.arange(w.out_features), np.diff(np.asarray(w.row_ptr)))
    mask[rows, np.asarray(w.col_idx, np.int64)] = True
    return mask
