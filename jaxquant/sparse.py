"""CSR storage of the few weights that a method keeps in 16-bit floats (SpQR outliers, SqueezeLLM's sparse part).

The sparse matrix is laid over the weight in the algorithms' orientation, W[out, in]: row r is output channel r,
so one row's entries feed one output (the layout of SpQR's and SqueezeLLM's CUDA kernels). Arrays:

    row_ptr [rows + 1] int32   entries of row r are [row_ptr[r], row_ptr[r+1])
    col_idx [nnz]      int16 when cols <= 32768 (SpQR stores int16), else int32; sorted within a row
    values  [nnz]      float16 (or any float dtype the caller asks for)

Building a CSR (``csr_from_mask``) is host-side numpy, since nnz depends on the data; everything that reads one
(``csr_to_dense``, ``csr_matmul``) is jittable with nnz fixed by the array shapes. Quantized-weight formats store
these three arrays as their own fields (so checkpoints see plain arrays) and call these functions.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


def index_dtype(cols: int):
    """Narrowest column-index dtype for a row of ``cols`` entries: int16 up to 32768 columns, else int32."""
    return np.int16 if cols <= 2**15 else np.int32


@partial(jax.tree_util.register_dataclass, data_fields=["row_ptr", "col_idx", "values"], meta_fields=["shape"])
@dataclasses.dataclass(frozen=True)
class CSR:
    row_ptr: jax.Array  # [rows + 1] int32
    col_idx: jax.Array  # [nnz] int16/int32
    values: jax.Array  # [nnz] float16
    shape: tuple  # (rows, cols)

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.row_ptr, self.col_idx, self.values))

    def to_dense(self, dtype=jnp.float32) -> jax.Array:
        return csr_to_dense(self.row_ptr, self.col_idx, self.values, self.shape, dtype)

    def check(self) -> None:
        check_csr(self.row_ptr, self.col_idx, self.values, self.shape)


def csr_from_mask(dense, mask, value_dtype=np.float16) -> CSR:
    """CSR of ``dense[mask]`` (row-major order), values cast to ``value_dtype``. Host-side: nnz is data-dependent."""
    dense, mask = np.asarray(dense), np.asarray(mask, bool)
    if dense.ndim != 2 or dense.shape != mask.shape:
        raise ValueError(f"dense {dense.shape} and mask {mask.shape} must be the same 2-D shape")
    rows, cols = dense.shape
    r, c = np.nonzero(mask)  # row-major, so columns are sorted within each row
    row_ptr = np.zeros(rows + 1, np.int32)
    np.cumsum(np.bincount(r, minlength=rows), out=row_ptr[1:])
    # device_put, not jnp.asarray: the latter compiles an identity program per (data-dependent) shape in JAX 0.10
    return CSR(row_ptr=jax.device_put(row_ptr), col_idx=jax.device_put(c.astype(index_dtype(cols))),
               values=jax.device_put(dense[r, c].astype(value_dtype)), shape=(rows, cols))


def check_csr(row_ptr, col_idx, values, shape) -> None:
    """Raise ValueError naming the problem if the arrays are not a valid CSR of ``shape`` (e.g. a corrupt file)."""
    rows, cols = shape
    row_ptr, col_idx = np.asarray(row_ptr), np.asarray(col_idx)
    nnz = np.shape(values)[0] if np.ndim(values) == 1 else None
    if row_ptr.shape != (rows + 1,):
        raise ValueError(f"CSR row_ptr has shape {row_ptr.shape}, expected ({rows + 1},)")
    if nnz is None or col_idx.shape != (nnz,):
        raise ValueError(f"CSR col_idx {col_idx.shape} and values {np.shape(values)} must be 1-D of equal length")
    if row_ptr[0] != 0 or row_ptr[-1] != nnz or np.any(np.diff(row_ptr) < 0):
        raise ValueError(f"CSR row_ptr must rise from 0 to nnz={nnz}; got {row_ptr[0]}..{row_ptr[-1]}")
    if nnz and (col_idx.min() < 0 or col_idx.max() >= cols):
        raise ValueError(f"CSR column index out of range [0, {cols})")


def row_ids(row_ptr: jax.Array, nnz: int) -> jax.Array:
    """Row of every stored entry, [nnz] int32 (jittable: nnz is static)."""
    rows = row_ptr.shape[0] - 1
    return jnp.repeat(jnp.arange(rows, dtype=jnp.int32), jnp.diff(row_ptr), total_repeat_length=nnz)


try:  # public name, present in the JAX versions used here; the private one is the fallback
    _Tracer = jax.core.Tracer
except AttributeError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer


@jax.jit
def _set_at(dense, cols, rows, values):
    return dense.at[cols, rows].set(values.astype(dense.dtype))


def set_entries_transposed(dense, row_ptr, col_idx, values) -> jax.Array:
    """``dense`` [cols, rows] (a Flax kernel, the transpose of the CSR's W[rows, cols]) with the stored entries set.

    Traced (inside jit): one scatter. Eager (a quantization pipeline, tests): the entry count differs in every layer
    and eager jnp ops compile once per shape and keep every program (in a SpQR pipeline on SmolLM2 that was ~17
    programs per linear and ~0.5-1.3 GB more host memory per layer), so the rows come from numpy and the entries are
    padded to the next power of two by repeating the first one (setting it again changes nothing): one compiled
    program per size class, and the data stay on the device."""
    if any(isinstance(a, _Tracer) for a in (dense, row_ptr, col_idx, values)):
        rows = row_ids(row_ptr, values.shape[0])
        return dense.at[col_idx.astype(jnp.int32), rows].set(values.astype(dense.dtype))
    row_ptr = np.asarray(row_ptr)
    nnz = int(row_ptr[-1])
    if nnz == 0:
        return dense
    rows = np.repeat(np.arange(row_ptr.shape[0] - 1, dtype=np.int32), np.diff(row_ptr))
    cols, vals = np.asarray(col_idx).astype(np.int32), np.asarray(values)
    pad = (1 << (nnz - 1).bit_length()) - nnz
    if pad:
        rows, cols, vals = (np.concatenate([a, np.repeat(a[:1], pad)]) for a in (rows, cols, vals))
    return _set_at(dense, cols, rows, vals)


@partial(jax.jit, static_argnames=("shape", "dtype"))
def csr_to_dense(row_ptr, col_idx, values, shape, dtype=jnp.float32) -> jax.Array:
    """Dense [rows, cols] with the stored values and zeros elsewhere."""
    r = row_ids(row_ptr, values.shape[0])
    return jnp.zeros(shape, dtype).at[r, col_idx.astype(jnp.int32)].set(values.astype(dtype))


@partial(jax.jit, static_argnames=("rows",))
def csr_matmul(x: jax.Array, row_ptr, col_idx, values, rows: int) -> jax.Array:
    """x [..., cols] @ S^T -> [..., rows] for S[rows, cols] in CSR, accumulated in float32.

    This is the weight-orientation product of a linear layer: S holds entries of W[out, in], x is the layer input.
    """
    nnz = values.shape[0]
    if nnz == 0:
        return jnp.zeros(x.shape[:-1] + (rows,), jnp.float32)
    r = row_ids(row_ptr, nnz)
    prod = x[..., col_idx.astype(jnp.int32)].astype(jnp.float32) * values.astype(jnp.float32)  # [..., nnz]
    lead = prod.shape[:-1]
    out = jax.ops.segment_sum(prod.reshape(-1, nnz).T, r, num_segments=rows)  # [rows, prod rows]
    return out.T.reshape(lead + (rows,))
