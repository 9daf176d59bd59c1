"""Stored form of a SpQR weight: bit-packed codes, second-level quantized group statistics, fp16 outliers in CSR.

What is stored is what the reference's ``save_quantization`` keeps (codes, the 3-bit codes of the group scales and
zeros, the fp16 scale and zero of each second-level group, the outliers as a sparse fp16 matrix, the permutation),
bit-packed. For a weight W[out = N, in = K] with groups of ``group_size`` (= beta1) input columns and second-level
groups of ``qq_groupsize`` (= beta2) output rows, G = K / group_size:

    qweight      [K*bits/32, N]        int32    weight codes, packed along K (the input dim; AutoGPTQ layout),
                                                 columns in the model's original order (not the act-order one)
    scale_codes  [G, N*qq_scale_bits/32] int32  codes of the first-level scales, packed along N
    zero_codes   [G, N*qq_zero_bits/32]  int32  codes of the first-level (fractional) zero points, packed along N
    scale_qq     [G, N/qq_groupsize, 2] float16 (scale, zero) of the second-level quantizer of the scales
    zero_qq      [G, N/qq_groupsize, 2] float16 (scale, zero) of the second-level quantizer of the zeros
    row_ptr      [N+1] int32, col_idx [nnz] int16 (int32 when K > 32768), values [nnz] float16:
                 the outliers as CSR over W[out, in] (jaxquant.sparse), column indices in the original order
    perm         [K] int16/int32: the act-order permutation (perm[j] = original column quantized j-th), which says
                 which group each column belongs to; [0] (empty) for the identity order

Group g holds the columns perm[g*group_size : (g+1)*group_size]. Dequantization (all in float32, in exactly the
order the algorithm computed it, so the result equals the algorithm's own reconstruction bit for bit):

    scale[g, n] = s_s * (scale_code[g, n] - z_s)      with (s_s, z_s) = scale_qq[g, n // qq_groupsize]
    zero[g, n]  = s_z * (zero_code[g, n] - z_z)       with (s_z, z_z) = zero_qq[g, n // qq_groupsize]
    W[k, n]     = scale[g, n] * (code[k, n] - zero[g, n]),  g the group of column k,
    W[k, n]     = the outlier value where (n, k) is stored in the CSR (it replaces the dense value).

Outliers replace the dense value instead of being added to it: the zero point is fractional, so no code dequantizes
to exactly 0; the code stored at an outlier's position is the code of 0 (as the reference stores it).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .formats import register_format
from .grid import dequantize_codes
from .packing import check_packable, pack, pack_qweight, unpack, unpack_qweight
from .sparse import CSR, check_csr, csr_to_dense, index_dtype, set_entries_transposed

_ARRAYS = ("qweight", "scale_codes", "zero_codes", "scale_qq", "zero_qq", "row_ptr", "col_idx", "values", "perm")


def spqr_average_bits(bits: int, group_size: int, qq_scale_bits: int, qq_zero_bits: int, qq_groupsize: int,
                      outlier_fraction: float = 0.0, stat_bits: int = 16) -> float:
    """The paper's (and reference ``get_average_number_of_bits``') accounting of average bits per parameter:

        bits + (qq_scale_bits + qq_zero_bits) / group_size + 2 * 2 * stat_bits / (group_size * qq_groupsize)
             + 32 * outlier_fraction

    (a 16-bit second-level scale and zero for both statistics, per group_size x qq_groupsize tile; 16-bit value +
    16-bit column index per outlier). It leaves out the CSR row pointers (32 bits per output row) and the
    permutation (16 bits per input column), which ``SpQRWeight.avg_bits()`` counts; unrounded (the reference rounds
    to 2 decimals).
    """
    return (bits + (qq_scale_bits + qq_zero_bits) / group_size + 2 * 2 * stat_bits / (group_size * qq_groupsize)
            + 32 * outlier_fraction)


@register_format
@partial(
    jax.tree_util.register_dataclass,
    data_fields=list(_ARRAYS),
    meta_fields=["bits", "group_size", "qq_scale_bits", "qq_zero_bits", "qq_groupsize", "in_features",
                 "out_features"],
)
@dataclasses.dataclass(frozen=True)
class SpQRWeight:
    """A SpQR-quantized linear weight; see the module docstring for the layout. K = in, N = out."""

    qweight: jax.Array
    scale_codes: jax.Array
    zero_codes: jax.Array
    scale_qq: jax.Array
    zero_qq: jax.Array
    row_ptr: jax.Array
    col_idx: jax.Array
    values: jax.Array
    perm: jax.Array
    bits: int
    group_size: int
    qq_scale_bits: int
    qq_zero_bits: int
    qq_groupsize: int
    in_features: int
    out_features: int

    @classmethod
    def from_parts(cls, codes, scale_codes, zero_codes, scale_qq, zero_qq, outliers: CSR, perm, *, bits: int,
                   group_size: int, qq_scale_bits: int, qq_zero_bits: int, qq_groupsize: int):
        """Build from unpacked arrays in the algorithms' (torch) layout: codes [N, K] (original column order),
        scale_codes / zero_codes [G, N], scale_qq / zero_qq [G, N/qq_groupsize, 2], outliers a CSR of shape (N, K),
        perm [K] or None (identity order)."""
        codes = jnp.asarray(codes)
        N, K = codes.shape
        check_packable(K, bits, "in_features")
        check_packable(N, qq_scale_bits, "out_features")
        check_packable(N, qq_zero_bits, "out_features")
        if tuple(outliers.shape) != (N, K):
            raise ValueError(f"outlier CSR has shape {outliers.shape}, expected ({N}, {K})")
        perm = np.zeros(0, index_dtype(K)) if perm is None else np.asarray(perm).astype(index_dtype(K))
        weight = cls(
            qweight=pack_qweight(codes.T, bits),
            scale_codes=pack(jnp.asarray(scale_codes), bits=qq_scale_bits, axis=1),
            zero_codes=pack(jnp.asarray(zero_codes), bits=qq_zero_bits, axis=1),
            scale_qq=jnp.asarray(scale_qq, jnp.float16),
            zero_qq=jnp.asarray(zero_qq, jnp.float16),
            row_ptr=outliers.row_ptr, col_idx=outliers.col_idx, values=outliers.values,
            perm=jnp.asarray(perm),
            bits=bits, group_size=group_size, qq_scale_bits=qq_scale_bits, qq_zero_bits=qq_zero_bits,
            qq_groupsize=qq_groupsize, in_features=K, out_features=N,
        )
        weight.check_shapes()
        return weight

    # ------------------------------------------------------------------------------------------------ shapes
    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    @property
    def nnz(self) -> int:
        """Number of outliers."""
        return int(self.values.shape[0])

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    def expected_shapes(self) -> dict:
        K, N, G, qqg = self.in_features, self.out_features, self.num_groups, self.qq_groupsize
        return {"qweight": ((K * self.bits // 32, N), jnp.int32),
                "scale_codes": ((G, N * self.qq_scale_bits // 32), jnp.int32),
                "zero_codes": ((G, N * self.qq_zero_bits // 32), jnp.int32),
                "scale_qq": ((G, N // qqg, 2), jnp.float16), "zero_qq": ((G, N // qqg, 2), jnp.float16),
                "row_ptr": ((N + 1,), jnp.int32)}

    def check_shapes(self) -> None:
        """Raise ValueError naming the array if the stored arrays do not fit the static fields (a corrupt file)."""
        K, N, gs, qqg = self.in_features, self.out_features, self.group_size, self.qq_groupsize
        if gs <= 0 or K % gs or qqg <= 0 or N % qqg:
            raise ValueError(f"group_size {gs} must divide in_features {K} and qq_groupsize {qqg} out_features {N}")
        for name, (shape, dtype) in self.expected_shapes().items():
            a = getattr(self, name)
            if tuple(a.shape) != shape or a.dtype != dtype:
                raise ValueError(f"{name} is {a.dtype.name}{list(a.shape)}, expected {jnp.dtype(dtype).name}"
                                 f"{list(shape)} for a {K}x{N} SpQR weight (bits {self.bits}, group {gs}, "
                                 f"statistics {self.qq_scale_bits}/{self.qq_zero_bits} bits in groups of {qqg})")
        if self.col_idx.dtype not in (jnp.int16, jnp.int32) or (self.col_idx.dtype == jnp.int16 and K > 2**15):
            raise ValueError(f"col_idx has dtype {self.col_idx.dtype.name}, expected int16 (<= 32768 inputs) or int32")
        if not jnp.issubdtype(self.values.dtype, jnp.floating):
            raise ValueError(f"values has dtype {self.values.dtype.name}, expected float16")
        check_csr(self.row_ptr, self.col_idx, self.values, (N, K))
        perm = np.asarray(self.perm)
        if perm.shape not in ((0,), (K,)) or perm.dtype.kind != "i":
            raise ValueError(f"perm is {perm.dtype.name}{list(perm.shape)}, expected an integer [{K}] or [0]")
        if perm.size and not np.array_equal(np.sort(perm.astype(np.int64)), np.arange(K)):
            raise ValueError(f"perm is not a permutation of 0..{K - 1}")

    # --------------------------------------------------------------------------------------------- unpacking
    def codes(self) -> jax.Array:
        """Weight codes [K, N] (original column order)."""
        return unpack_qweight(self.qweight, self.bits)

    def group_index(self) -> jax.Array:
        """Group of each input column, [K] int32."""
        K = self.in_features
        if self.perm.shape[0] == 0:
            return jnp.arange(K, dtype=jnp.int32) // self.group_size
        position = jnp.zeros(K, jnp.int32).at[self.perm.astype(jnp.int32)].set(jnp.arange(K, dtype=jnp.int32))
        return position // self.group_size

    def _statistic(self, packed, qq, bits) -> jax.Array:
        codes = unpack(packed, bits=bits, axis=1)  # [G, N]
        G, N = codes.shape
        grouped = codes.reshape(G, N // self.qq_groupsize, self.qq_groupsize)
        qq = qq.astype(jnp.float32)
        return dequantize_codes(grouped, qq[..., 0:1], qq[..., 1:2]).reshape(G, N)

    def statistics(self) -> tuple[jax.Array, jax.Array]:
        """First-level (scale, zero) [G, N] float32, as dequantized from their second-level codes."""
        return (self._statistic(self.scale_codes, self.scale_qq, self.qq_scale_bits),
                self._statistic(self.zero_codes, self.zero_qq, self.qq_zero_bits))

    def outliers(self) -> CSR:
        return CSR(self.row_ptr, self.col_idx, self.values, (self.out_features, self.in_features))

    def outlier_mask(self) -> jax.Array:
        """[N, K] bool, True at the stored outliers."""
        return csr_to_dense(self.row_ptr, self.col_idx, jnp.ones(self.values.shape, jnp.float32),
                            (self.out_features, self.in_features)) > 0

    # ---------------------------------------------------------------------------------------------- compute
    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Dense weight [K, N] (Flax kernel layout), computed in float32 then cast; jittable.

        Called eagerly (as the pipeline does) it equals the algorithm's reconstruction bit for bit. Inside a larger
        jitted program XLA may fuse the statistics into the last step and contract code - s_z * (c_z - z_z) into one
        fused multiply-add, which can move a value by an ulp or so (measured: relative differences ~1e-6).
        """
        scale, zero = self.statistics()
        g = self.group_index()
        dense = dequantize_codes(self.codes(), scale[g], zero[g])
        if self.nnz:
            dense = set_entries_transposed(dense, self.row_ptr, self.col_idx, self.values)
        return dense.astype(dtype)

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., K] -> x @ W [..., N] in x's dtype, accumulated in float32 (reference path: dequantize + dot)."""
        y = jnp.matmul(x, self.dequantize(x.dtype), preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST)
        return y.astype(x.dtype)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).size * getattr(self, name).dtype.itemsize for name in _ARRAYS)

    def avg_bits(self) -> float:
        """Stored bits per weight, measured from the arrays (codes, statistics, outliers with their row pointers,
        permutation). Compare ``spqr_average_bits`` (the paper's formula) via ``paper_avg_bits()``."""
        return 8 * self.nbytes / (self.in_features * self.out_features)

    def paper_avg_bits(self) -> float:
        """``spqr_average_bits`` for this weight's settings and its actual outlier fraction."""
        return spqr_average_bits(self.bits, self.group_size, self.qq_scale_bits, self.qq_zero_bits,
                                 self.qq_groupsize, self.nnz / (self.in_features * self.out_features))
