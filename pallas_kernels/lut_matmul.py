"""SqueezeLLM-format (per-row lookup table) dequantize-and-matmul for decode-sized activations: Mosaic GPU (Hopper)
Pallas kernel + jnp reference.

Computation (y = x @ W, W[k, n] = lut[n, code[k, n]], plus an optional sparse part of kept weights):

    x [M, K] (bfloat16 or float16, M <= 64 on the kernel path)  ->  y [M, N] in x's dtype, accumulated in float32.

Same structure as ``gptq_matmul`` (transposed product: the dequantized weight is the 64-row A operand of ``wgmma``,
the activation rows its 8..64-wide N operand; TMA ``emit_pipeline`` over K; grid (N_pad/64, k_splits); float32
partials summed by one small XLA fusion, or, for dense 3-bit weights at M_pad = 8 with 2 splits, the cluster launch
that reduces in the kernel, ``gptq_matmul.launch_kernel``) and its block-size logic (``gptq_matmul.KernelConfig``).
What differs is the dequantization: a table lookup per weight instead of ``scale * (code - zero)``. 4-bit weights
at M_pad <= 16 and every LUT weight at M < 8 default to the warp-specialized stream-K kernel
(``gptq_matmul.build_ws_kernel``, ``_build_ws_call`` here: two compute warpgroups, each looking up its own 64 rows'
tables, which arrive with every step's TMA copies; ``gptq_matmul.ws_stream_tile_k``), with x unpadded at M < 8
(``KernelConfig.direct_x``, as the GPTQ kernels); larger M keeps the one-warpgroup kernel.

The lookup (register-resident tables, byte permutes). In the wgmma A fragment a thread holds weights of only two
output rows (r and r + 8), so it keeps both rows' tables in registers as byte planes: the low bytes of the 2**bits
16-bit table values in 2**bits / 4 words, the high bytes in as many more. ``prmt.b32 d, a, b, sel`` picks four bytes
out of the eight of (a, b) by four 3-bit selectors, i.e. it looks up four 3-bit codes at once in one byte plane:

  3-bit: L = prmt(lo[0], lo[1], sel), H = prmt(hi[0], hi[1], sel), then two prmts interleave (L, H) into two
         bf16x2 registers: 4 prmts per 4 weights.
  4-bit: the same on entries 0-7 and on 8-15, and a ``lop3`` per plane picks one of the two per byte by bit 3 of the
         code (the byte mask comes from one more prmt in sign-replicate mode: 1.5 prmts per 4 codes).

Kernel layout (built once at load time by :func:`pack`, a :class:`LUTKernelWeight` pytree):

  qweight [N_pad/64, K_pad/64, bits, 128] int32: per 64x64 tile of W^T, ``bits`` words per warpgroup thread holding
      the codes of its 32 A-fragment weights as prmt selectors: word j (k slice j of the tile) holds two selector
      groups, row r in bits 0-15 and row r + 8 in bits 16-31, four codes a group (``_fields``). 4-bit codes are plain
      nibbles; 3-bit codes sit in bits 0-2 of the nibbles of words 0-2 (k slices 0-2), and k slice 3's codes are
      spread over the nibbles' bit 3 (bit b of the code in word b), which keeps 3 bits per weight.
  lutw    [N_pad, 2**bits / 2] int32: each row's table in the kernel dtype as byte planes (low bytes of entries
      0..2**bits-1 little-endian in the first 2**bits/4 words, then the high bytes).
  sparse part (optional): the deltas kept value - table value (in the kernel dtype) at each kept position, added
      to the float32 result before the final cast (the reference's additive form), so the kept weights come back
      exactly. Stored per output row padded to R entries (ELL: ell_cols [N, R] int32, ell_delta [N, R] float32,
      padding = column 0 with delta 0; R = the 99.5th percentile of the row counts), which XLA computes as one
      gather-multiply-reduce fusion without a scatter; entries beyond R in the fullest rows as COO (sp_rows /
      sp_cols int32, sp_delta float32), added by a segment sum.

Measured on an H100 (bench/NOTES_kernels.md, SqueezeLLM, "Launch" and "3-bit weights in the ws kernel" sections),
8192x28672 at M = 1, device time: lut3 39.15 us in the ws kernel with the unpadded x (4.05x the bf16 XLA GEMV of the
same run; the one-warpgroup cluster launch 41.49 us = 3.82x), lut4 57.7-58.0 us in the ws kernel (2.73-2.74x; kernel
alone 56.0-56.2 us: the 16-entry lookup costs about as much integer issue time as the weight stream costs memory
time, see bench/NOTES_kernels.md for the instruction counts and the profile).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .gptq_matmul import KernelWeightShape, build_ws_kernel, launch_kernel, store_output, ws_wgmma
from .gptq_matmul import CHUNK, K_ALIGN, MAX_KERNEL_M, KernelConfig, _i32, _m_pad, _round_up, _thread_coords
from .gptq_matmul import _fragment_rows, reference_ws_partials, staged_x_reference
from .gptq_matmul import PartialSums, call_with_output, check_kernel_input, chunked_matmul, split_friendly_k_pad
from .gptq_matmul import fused_norm_ok, kernel_norm, rms_norm_rows
from .gptq_matmul import SwiGLUSlots, slot_layout, slots_mn_ok, swiglu_matmul, ws_name_suffix
from .gptq_matmul import lop3, lop3_table, or_and, ws_rows

# Prefill (M > MAX_KERNEL_M) on GPU for weights without a sparse part: up to this many rows the kernel runs over
# 64-row chunks, above it the XLA dequantize-once path (reference_matmul). Measured (H100, CUPTI, dense lut4
# 8192x28672, `bench/kernels.py --prefill-paths`, 2026-11-22): chunks 182 / 363 / 726 us at M = 128 / 256 / 512 vs
# 5114 / 5153 / 5283 us dequantize-once; beyond 512 not measured (linear extrapolation: crossing near M = 5200).
# Sparse weights take the dequantize-once path at M > 64 (the XLA ELL product per chunk grows with M: ~95 us at
# M = 16 on 8192x28672, bench/NOTES_kernels.md); not measured at prefill sizes.
PREFILL_CHUNKED_MAX_M = 2048

LUT_KERNEL_BITS = (3, 4)
_DTYPES = ("bfloat16", "float16")
_LOP3_SELECT = lop3_table(lambda a, b, c: (a & ~c) | (b & c))  # bytes of b where the mask c is 0xFF, else a
_MASK_SEL = (0xD9C8, 0xFBEA)  # sign-replicate prmt selectors: bit 3 of nibbles 0-3 / 4-7 of w -> byte masks
_INTERLEAVE = (0x5140, 0x7362)  # (L, H) -> bf16x2 of selector nibbles (0, 1) / (2, 3)


# ------------------------------------------------------------------------------------------------- register layout
def _groups() -> list[tuple[int, int, int, int, int]]:
    """Selector groups of one thread's 64x64 tile: (j, h, i, pair P, element e) for every code.

    Group (j, h) is k slice j, row half h (row r or r + 8); its four codes (nibble i = 0..3) are the two elements of
    A-fragment pair P = 4j + h (i = 0, 1) and of pair 4j + h + 2 (i = 2, 3), so the looked-up bytes interleave into
    those two bf16x2 registers with fixed selectors (``_INTERLEAVE``)."""
    return [(j, h, i, 4 * j + h + 2 * (i // 2), i % 2) for j in range(4) for h in range(2) for i in range(4)]


def _fields(bits: int, j: int, h: int, i: int) -> list[tuple[int, int, int, int]]:
    """Bit fields [(word, bit, width, code_shift)] holding the code of nibble i of group (j, h)."""
    if bits not in LUT_KERNEL_BITS:
        raise ValueError(f"the LUT kernel supports {LUT_KERNEL_BITS}-bit codes, got bits={bits}")
    pos = 16 * h + 4 * i
    if bits == 4:
        return [(j, pos, 4, 0)]
    if j < 3:
        return [(j, pos, 3, 0)]
    return [(b, pos + 3, 1, b) for b in range(3)]  # k slice 3: bit b of the code in bit 3 of word b's nibble


def _pack_tiles(codes_nk: jax.Array, bits: int) -> jax.Array:
    """codes [N_pad, K_pad] (W^T) -> qweight [N_pad/64, K_pad/64, bits, 128] int32 (module docstring layout)."""
    n, k = codes_nk.shape
    row, col = _thread_coords()
    tiles = codes_nk.astype(jnp.uint32).reshape(n // CHUNK, CHUNK, k // CHUNK, CHUNK).transpose(0, 2, 1, 3)
    vals = tiles[:, :, row, col]  # [Nt, Kt, 128, 16, 2]
    words = [jnp.zeros(vals.shape[:3], jnp.uint32) for _ in range(bits)]
    for j, h, i, P, e in _groups():
        for word, bit, width, code_shift in _fields(bits, j, h, i):
            words[word] = words[word] | (((vals[:, :, :, P, e] >> code_shift) & (2**width - 1)) << bit)
    return jax.lax.bitcast_convert_type(jnp.stack(words, axis=2), jnp.int32)


def _unpack_tiles(qweight: jax.Array, bits: int) -> jax.Array:
    """Exact inverse of _pack_tiles: qweight -> codes [N_pad, K_pad] int32 (bit fields, then one static gather from
    the per-thread order back to the tile's rows and columns: no scatter, so the XLA path of large M stays cheap)."""
    nt, kt = qweight.shape[:2]
    words = jax.lax.bitcast_convert_type(qweight, jnp.uint32)  # [Nt, Kt, bits, 128]
    vals = {}
    for j, h, i, P, e in _groups():
        v = jnp.zeros((nt, kt, 128), jnp.uint32)
        for word, bit, width, code_shift in _fields(bits, j, h, i):
            v = v | (((words[:, :, word] >> bit) & (2**width - 1)) << code_shift)
        vals[(P, e)] = v
    flat = jnp.stack([vals[(P, e)] for P in range(16) for e in range(2)], axis=-1).reshape(nt, kt, 128 * 32)
    tiles = flat[:, :, _tile_source_index()].reshape(nt, kt, CHUNK, CHUNK).astype(jnp.int32)
    return tiles.transpose(0, 2, 1, 3).reshape(nt * CHUNK, kt * CHUNK)


@functools.lru_cache(maxsize=None)
def _tile_source_index() -> np.ndarray:
    """For every position r * 64 + c of a 64x64 tile, its index t * 32 + 2 * P + e in the per-thread order."""
    row, col = _thread_coords()
    inv = np.empty(CHUNK * CHUNK, np.int32)
    inv[(row * CHUNK + col).ravel()] = np.arange(128 * 32)
    return inv


def _table_words(lut: jax.Array, dtype_name: str) -> jax.Array:
    """lut [N, E] -> [N, E/2] int32 byte planes of the values rounded to the kernel dtype (low bytes, high bytes)."""
    half = jax.lax.bitcast_convert_type(lut.astype(jnp.float32).astype(dtype_name), jnp.uint16).astype(jnp.uint32)
    n, e = half.shape
    planes = jnp.concatenate([half & 0xFF, half >> 8], axis=1).reshape(n, e // 2, 4)  # [N, E/2 words, 4 bytes]
    words = planes[..., 0] | (planes[..., 1] << 8) | (planes[..., 2] << 16) | (planes[..., 3] << 24)
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def _table_values(lutw: jax.Array, dtype_name: str) -> jax.Array:
    """Inverse of _table_words: [N, E/2] int32 -> table [N, E] in the kernel dtype."""
    words = jax.lax.bitcast_convert_type(lutw, jnp.uint32)
    n, w = words.shape
    planes = jnp.stack([(words >> (8 * b)) & 0xFF for b in range(4)], axis=-1).reshape(n, 2, w * 2)
    half = (planes[:, 0] | (planes[:, 1] << 8)).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(half, jnp.dtype(dtype_name))


# ------------------------------------------------------------------------------------------------ kernel-layout pytree
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["qweight", "lutw", "ell_cols", "ell_delta", "sp_rows", "sp_cols", "sp_delta"],
    meta_fields=["bits", "in_features", "out_features", "dtype_name", "nnz"],
)
@dataclasses.dataclass(frozen=True)
class LUTKernelWeight(KernelWeightShape):
    """A SqueezeLLM weight in the kernel layout (module docstring); ``matmul`` runs the Pallas kernel on GPU.

    Shapes: qweight [N_pad/64, K_pad/64, bits, 128] int32, lutw [N_pad, 2**bits/2] int32, ell_cols / ell_delta
    [N, R] (R may be 0), sp_rows / sp_cols / sp_delta [overflow] (may be empty); nnz = the kept weights in all;
    K = in_features, N = out_features, K_pad a multiple of 256,
    N_pad a multiple of 64.
    """

    qweight: jax.Array
    lutw: jax.Array
    ell_cols: jax.Array
    ell_delta: jax.Array
    sp_rows: jax.Array
    sp_cols: jax.Array
    sp_delta: jax.Array
    bits: int
    in_features: int
    out_features: int
    dtype_name: str
    nnz: int = 0

    @property
    def group(self) -> int:
        """One table per row and no groups along K: the whole padded K is one group for the block-size logic shared
        with the GPTQ kernel (``KernelConfig``)."""
        return self.k_pad

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.qweight, self.lutw, self.ell_cols, self.ell_delta,
                                                        self.sp_rows, self.sp_cols, self.sp_delta))

    def codes_kn(self) -> jax.Array:
        """Codes [K_pad, N_pad]."""
        return _unpack_tiles(self.qweight, self.bits).T

    def table(self) -> jax.Array:
        """Tables [N_pad, 2**bits] in the kernel dtype (the stored float16 values rounded to it)."""
        return _table_values(self.lutw, self.dtype_name)

    def dequantize_padded(self, dtype=None) -> jax.Array:
        """W [K_pad, N_pad]: table values, kept (sparse) weights at their positions; in ``dtype`` (default the
        kernel dtype)."""
        table = self.table().astype(jnp.float32)
        w = jnp.take_along_axis(table.T, self.codes_kn(), axis=0)  # [K_pad, N_pad]
        if self.ell_cols.shape[1]:  # padding adds 0.0 at column 0
            rows = jnp.broadcast_to(jnp.arange(self.out_features)[:, None], self.ell_cols.shape)
            w = w.at[self.ell_cols, rows].add(self.ell_delta)
        if self.sp_delta.shape[0]:
            w = w.at[self.sp_cols, self.sp_rows].add(self.sp_delta)
        return w.astype(dtype or self.dtype)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Dense W [K, N] (for checks; the kernel never builds it)."""
        return self.dequantize_padded(dtype)[: self.in_features, : self.out_features]

    def prepare_activations(self, x2d: jax.Array, m_pad: int) -> jax.Array:
        m, k = x2d.shape
        return jnp.pad(x2d.astype(self.dtype), ((0, m_pad - m), (0, self.k_pad - k)))

    def sparse_product(self, x2d: jax.Array) -> Optional[jax.Array]:
        """x @ (sparse deltas) as float32 [M, N] (None without a sparse part), in XLA: the ELL part as a gather of x's
        columns, a multiply and a row sum (one fusion), the overflow by a segment sum over output rows."""
        if not self.nnz:
            return None
        xf = x2d.astype(jnp.float32)
        y = None
        if self.ell_cols.shape[1]:
            y = (xf[:, self.ell_cols] * self.ell_delta).sum(-1)  # [M, N, R] -> [M, N]
        if self.sp_delta.shape[0]:
            contrib = xf[:, self.sp_cols] * self.sp_delta  # [M, overflow]
            extra = jax.ops.segment_sum(contrib.T, self.sp_rows, num_segments=self.out_features).T
            y = extra if y is None else y + extra
        return y

    takes_rms_norm = True
    takes_partial_sums = True

    # the models hand ``matmul`` a SwiGLUSlots (``takes_swiglu_slots``). H100, LLaMA-7B decode MLP at M = 1
    # (bench/NOTES_kernels.md, "SwiGLU staging"): CUPTI per layer 43.6-43.7 vs 44.9-45.0 us (4-bit), 33.3-33.4 vs
    # 33.6-33.8 us (3-bit); decode step, alternating runs: 2.454 / 2.453 vs 2.487 / 2.511 ms (4-bit), 1.968 / 1.957 vs
    # 2.043 / 1.963 ms (3-bit)
    stages_swiglu = True

    def matmul(self, x: jax.Array, *, use_kernel: Optional[bool] = None, config: Optional[KernelConfig] = None,
               rms_norm=None, partial_sums=False):
        """x [..., K] -> x @ W [..., N] in x's dtype, accumulated in float32.

        With ``use_kernel`` (default: the default backend is a GPU and x's dtype is the packed dtype), M =
        prod(leading dims) rows go to: M <= 64: the Pallas kernel; M <= PREFILL_CHUNKED_MAX_M and no sparse part: the
        kernel over 64-row chunks; otherwise the XLA dequantize-then-matmul reference (jitted). ``rms_norm``: as
        in ``gptq_matmul.GPTQKernelWeight.matmul``, and so are ``partial_sums`` and a ``SwiGLUSlots`` x.
        """
        if isinstance(x, SwiGLUSlots):
            y = swiglu_matmul(x, self, use_kernel, config, lut_matmul_partials)
            if y is not None:
                return y
            x = x.value()
        lead, k = x.shape[:-1], x.shape[-1]
        if k != self.in_features:
            raise ValueError(f"x has {k} input features, the weight expects {self.in_features}")
        m = math.prod(lead)
        if use_kernel is None:
            use_kernel = jax.default_backend() == "gpu" and x.dtype == self.dtype
        x2d = x.reshape(m, k)
        if rms_norm is not None and not (use_kernel and 1 <= m <= MAX_KERNEL_M):
            x2d, rms_norm = rms_norm_rows(x2d, *rms_norm), None
        if not use_kernel or m == 0:
            y = reference_matmul(x2d, self)
        elif m <= MAX_KERNEL_M:
            y = _jit_lut_matmul(x2d, self, config, *(rms_norm or ()), partial_sums=partial_sums)
            if isinstance(y, PartialSums):
                return y
        elif m <= PREFILL_CHUNKED_MAX_M and not self.nnz:
            y = chunked_matmul(x2d, self, functools.partial(_jit_lut_matmul, config=config))
        else:
            y = _jit_reference_matmul(x2d, self)
        return y.reshape(*lead, self.out_features)


def check_packable(bits: int, dtype=jnp.bfloat16) -> None:
    """Raise ValueError (naming the problem) if a LUT weight with these bits cannot use the kernel."""
    if bits not in LUT_KERNEL_BITS:
        raise ValueError(f"the LUT kernel supports {LUT_KERNEL_BITS}-bit codes, got bits={bits}")
    if jnp.dtype(dtype).name not in _DTYPES:
        raise ValueError(f"the LUT kernel computes in bfloat16 or float16, got {jnp.dtype(dtype).name}")


def pack(codes_kn, lut, *, bits: int, sparse=None, dtype=jnp.bfloat16) -> LUTKernelWeight:
    """Convert a SqueezeLLM weight (unpacked arrays) into the kernel layout; done once at load time.

    codes_kn [K, N] integer codes in [0, 2**bits), lut [N, 2**bits] (float16 as stored; rounded to ``dtype`` for
    the kernel), sparse = None or the CSR (row_ptr [N + 1], col_idx [nnz], values [nnz]) over W[out, in] of kept
    weights that *replace* the table value at their position. K is padded to a multiple of 256 and N to a multiple
    of 64 (zero activations / zero tables)."""
    dtype_name = jnp.dtype(dtype).name
    check_packable(bits, dtype)
    codes_kn = jnp.asarray(codes_kn)
    if codes_kn.ndim != 2:
        raise ValueError(f"codes must be [K, N], got shape {codes_kn.shape}")
    K, N = codes_kn.shape
    lut = jnp.asarray(lut)
    if lut.shape != (N, 2**bits):
        raise ValueError(f"lut must have shape {(N, 2**bits)} for {bits}-bit codes and N={N}, got {lut.shape}")
    try:
        lo, hi = int(jnp.min(codes_kn)), int(jnp.max(codes_kn))
    except jax.errors.ConcretizationTypeError:
        lo, hi = 0, 0
    if lo < 0 or hi >= 2**bits:
        raise ValueError(f"codes must lie in [0, {2**bits}) for bits={bits}, got values in [{lo}, {hi}]")
    k_pad, n_pad = split_friendly_k_pad(_round_up(K, K_ALIGN), K_ALIGN), _round_up(N, CHUNK)
    codes_pad = jnp.pad(codes_kn.astype(jnp.int32), ((0, k_pad - K), (0, n_pad - N)))
    qweight = _pack_tiles(codes_pad.T, bits)
    lutw = _table_words(jnp.pad(lut.astype(jnp.float32), ((0, n_pad - N), (0, 0))), dtype_name)
    rows = cols = jnp.zeros(0, jnp.int32)
    delta = jnp.zeros(0, jnp.float32)
    ell_cols, ell_delta, nnz = jnp.zeros((N, 0), jnp.int32), jnp.zeros((N, 0), jnp.float32), 0
    if sparse is not None:
        row_ptr, col_idx, values = (np.asarray(a) for a in sparse)
        nnz = values.shape[0]
        row_ptr = row_ptr.astype(np.int64)
        if row_ptr.shape != (N + 1,) or col_idx.shape != (nnz,) or row_ptr[0] != 0 or row_ptr[-1] != nnz \
                or np.any(np.diff(row_ptr) < 0) or (nnz and (col_idx.min() < 0 or col_idx.max() >= K)):
            raise ValueError(f"sparse must be a CSR over W[out, in] of shape {(N, K)}: row_ptr [{N + 1}] rising from "
                             f"0 to nnz, col_idx [nnz] in [0, {K}); got row_ptr {row_ptr.shape}, col_idx "
                             f"{col_idx.shape}, values {values.shape}")
        rows = jnp.asarray(np.repeat(np.arange(N, dtype=np.int32), np.diff(row_ptr)))
        cols = jnp.asarray(col_idx.astype(np.int32))
        table = _table_values(lutw, dtype_name).astype(jnp.float32)
        delta = np.asarray(jnp.asarray(values, jnp.float32) - table[rows, codes_pad[cols, rows]])
        ell_cols, ell_delta, rows, cols, delta = _split_ell(row_ptr, np.asarray(rows), np.asarray(cols), delta, N)
    return LUTKernelWeight(qweight=qweight, lutw=lutw, ell_cols=ell_cols, ell_delta=ell_delta, sp_rows=rows,
                           sp_cols=cols, sp_delta=delta, bits=bits, in_features=K, out_features=N,
                           dtype_name=dtype_name, nnz=int(nnz))


def _split_ell(row_ptr, rows, cols, delta, N, quantile=99.5):
    """CSR-ordered entries -> (ell_cols [N, R], ell_delta [N, R], overflow rows, cols, deltas): the first R entries of
    every row padded to R (column 0, delta 0), the rest of the fullest rows as COO."""
    counts = np.diff(row_ptr)
    R = int(np.ceil(np.percentile(counts, quantile))) if counts.size else 0
    slot = np.arange(rows.size) - row_ptr[rows]  # position of each entry within its row
    in_ell = slot < R
    ell_cols = np.zeros((N, R), np.int32)
    ell_delta = np.zeros((N, R), np.float32)
    ell_cols[rows[in_ell], slot[in_ell]] = cols[in_ell]
    ell_delta[rows[in_ell], slot[in_ell]] = delta[in_ell]
    over = ~in_ell
    return (jnp.asarray(ell_cols), jnp.asarray(ell_delta), jnp.asarray(rows[over], jnp.int32),
            jnp.asarray(cols[over], jnp.int32), jnp.asarray(delta[over], jnp.float32))


# ------------------------------------------------------------------------------------------------------ references
def reference_matmul(x2d: jax.Array, w: LUTKernelWeight) -> jax.Array:
    """Pure-jnp x [M, K] @ W -> [M, N] in x's dtype: dequantize the kernel layout (kept weights included), one XLA
    matmul (also the large-M path on GPU)."""
    xk = w.prepare_activations(x2d, x2d.shape[0]).astype(x2d.dtype)
    y = jnp.matmul(xk, w.dequantize_padded(x2d.dtype), preferred_element_type=jnp.float32)
    return y[:, : w.out_features].astype(x2d.dtype)


def reference_matmul_tiled(x2d: jax.Array, w: LUTKernelWeight, config: KernelConfig) -> jax.Array:
    """The kernel's exact block decomposition in jnp: per (output tile, k split, pipeline step) the same blocks of
    qweight / lutw the kernel's index maps select, decoded through the kernel layout, float32 partials summed over
    splits and the sparse product added as the wrapper does. For CPU tests of the tiling logic."""
    m = x2d.shape[0]
    m_pad = _m_pad(m)
    cfg = config.resolved(w, m)
    if cfg.direct_x:  # the ws kernel's staged [8, tile_k] tiles of the unpadded x
        xk = staged_x_reference(w.direct_activations(x2d), w.k_pad, cfg.tile_k).astype(w.dtype)
    else:
        xk = w.prepare_activations(x2d, m_pad)
    table = _table_values(w.lutw, w.dtype_name)  # every row's table in the kernel dtype, decoded once
    if cfg.variant == "ws":
        return _finish(reference_ws_partials(xk, w, cfg, functools.partial(_block_product, w, table, cfg.tile_k)),
                       m, w, x2d)
    steps = w.k_pad // cfg.tile_k // cfg.k_splits
    out = jnp.zeros((cfg.k_splits, w.n_pad, m_pad), jnp.float32)
    rows = CHUNK * cfg.n_sub
    for n_idx in range(w.n_pad // rows):
        for split in range(cfg.k_splits):
            accs = [jnp.zeros((CHUNK, m_pad), jnp.float32) for _ in range(cfg.n_sub)]
            for step in range(steps):
                kb = split * steps + step
                x_blk = xk[:, kb * cfg.tile_k:(kb + 1) * cfg.tile_k]
                for j in range(cfg.n_sub):
                    accs[j] = accs[j] + _block_product(w, table, cfg.tile_k, n_idx * cfg.n_sub + j, kb, x_blk)
            out = out.at[split, n_idx * rows:(n_idx + 1) * rows].set(jnp.concatenate(accs, axis=0))
    return _finish(out, m, w, x2d)


def _block_product(w: LUTKernelWeight, table: jax.Array, tile_k: int, tile: int, kb: int,
                   x_blk: jax.Array) -> jax.Array:
    """One pipeline step of 64-row output tile ``tile``, float32 [64, M_pad], as the kernel computes it: the codes
    block at k block ``kb`` decoded through the kernel layout, looked up in the tile's rows of ``table`` ([N_pad,
    2**bits] in the kernel dtype), times x_blk^T."""
    codes = _unpack_tiles(w.qweight[tile:tile + 1, kb * tile_k // CHUNK:(kb + 1) * tile_k // CHUNK], w.bits)
    a = jnp.take_along_axis(table[tile * CHUNK:(tile + 1) * CHUNK], codes, axis=1)  # [64, tile_k]
    return jnp.matmul(a, x_blk.T, preferred_element_type=jnp.float32)


def _finish(partials: jax.Array, m: int, w: LUTKernelWeight, x2d: jax.Array) -> jax.Array:
    """float32 partials [k_splits, N_pad, M_pad] (+ the sparse product) -> y [M, N] in x's dtype."""
    y = partials.sum(0)[: w.out_features, :m].T
    sparse = w.sparse_product(x2d)
    if sparse is not None:
        y = y + sparse
    return y.astype(x2d.dtype)


# ---------------------------------------------------------------------------------------------------------- kernel
def lut_matmul(x2d: jax.Array, w: LUTKernelWeight, *, config: Optional[KernelConfig] = None,
               out_init: Optional[jax.Array] = None, _variant: str = "full", rms_norm=None,
               partial_sums=False):
    """Pallas Mosaic GPU kernel: x [M, K] (M <= 64, w's dtype) @ W -> [M, N] in x's dtype (sparse part by XLA);
    ``partial_sums``: as in ``gptq_matmul.gptq_matmul`` (weights without a sparse part).

    ``out_init`` (tests / benchmark): the buffer the kernel writes in place (pass it NaN-filled to prove every
    output tile is written), of ``gptq_matmul.output_buffer_shape`` for ``kernel_out_dtype(w)`` (float32 partials
    [k_splits, N_pad, M_pad], or the fused launch's y [M, N]). ``rms_norm``: as in ``gptq_matmul.gptq_matmul``.
    """
    layout = slot_layout(partial_sums)
    m = check_kernel_input(x2d, w, "LUT")
    cfg = (config or KernelConfig()).resolved(w, m, staged=rms_norm is not None)
    x2d, norm = kernel_norm(x2d, w, cfg, m, rms_norm)  # (fused only without a sparse part, which needs the norm)
    xk = w.direct_activations(x2d) if cfg.direct_x else w.prepare_activations(x2d, _m_pad(m))
    mn = layout == "mn" and slots_mn_ok(cfg) and not w.nnz
    out = lut_matmul_partials(xk, w, cfg, out_init=out_init, _variant=_variant, m=m, norm=norm, slots_mn=mn)
    if not cfg.fused:
        if layout and not w.nnz:
            return PartialSums(out, m, w.out_features, jnp.dtype(x2d.dtype).name, "mn" if mn else "nm")
        return _finish(out, m, w, x2d)
    sparse = w.sparse_product(x2d)
    return out if sparse is None else (out + sparse).astype(x2d.dtype)


def kernel_out_dtype(w: LUTKernelWeight):
    """The fused launch's output dtype: the activation dtype, or float32 when XLA adds the sparse part after it."""
    return jnp.dtype(jnp.float32) if w.nnz else w.dtype


@functools.partial(jax.jit, static_argnames=("config", "norm_eps", "partial_sums"))
def _jit_lut_matmul(x2d: jax.Array, w: LUTKernelWeight, config: Optional[KernelConfig] = None,
                    norm_scale: Optional[jax.Array] = None, norm_eps: Optional[float] = None,
                    partial_sums=False):
    """lut_matmul under jit: call sites (and prefill chunks) share one lowering of the kernel."""
    return lut_matmul(x2d, w, config=config, rms_norm=None if norm_scale is None else (norm_scale, norm_eps),
                      partial_sums=partial_sums)


_jit_reference_matmul = jax.jit(reference_matmul)


def lut_matmul_partials(xk: jax.Array, w: LUTKernelWeight, cfg: KernelConfig, *,
                        out_init: Optional[jax.Array] = None, _variant: str = "full",
                        m: Optional[int] = None, norm=None, slots_mn: bool = False, swiglu=None) -> jax.Array:
    """The bare kernel: prepared activations xk [M_pad, K_pad] (with ``cfg.direct_x``, the ws kernel's unpadded view
    [m, K_x/64, 64] of ``direct_activations``) -> float32 partials [k_splits, N_pad, M_pad], or with ``cfg.fused``
    y [m, N] in ``kernel_out_dtype(w)`` (m = the real rows, default M_pad); cfg must be resolved; the sparse part is
    not included. ``norm``, ``slots_mn``, ``swiglu``: as in ``gptq_matmul.gptq_matmul_partials``."""
    direct_m, m_pad, m = ws_rows(xk, cfg, m, swiglu)
    out_dtype = kernel_out_dtype(w)
    fused_out = (m, w.out_features, out_dtype.name) if cfg.fused else None
    if norm and not fused_norm_ok(cfg, w, m):
        raise ValueError("the fused RMSNorm needs the ws kernel on the unpadded x (fused_norm_ok)")
    if cfg.variant == "ws":
        call = _build_ws_call(m_pad, w.k_pad, w.n_pad, w.bits, w.dtype_name, cfg.tile_k, cfg.stages, cfg.ctas,
                              out_init is not None, cfg.wgs, fused_out, _variant, direct_m, norm and norm[1:],
                              slots_mn, swiglu)
    else:
        call = _build_call(m_pad, w.k_pad, w.n_pad, w.bits, w.dtype_name, cfg.tile_k, cfg.stages, cfg.k_splits,
                           cfg.n_sub, out_init is not None, _variant, fused_out)
    args = [xk, w.qweight, w.lutw] + ([norm[0]] if norm else [])
    return call_with_output(call, args, out_init, cfg, w, m, out_dtype, slots_mn)


@functools.lru_cache(maxsize=None)
def _build_call(m_pad, k_pad, n_pad, bits, dtype_name, tile_k, stages, k_splits, n_sub, aliased, variant="full",
                fused_out=None):
    """variant (measurements only): "full"; "nolookup" skips the table lookups (wrong results; isolates memory +
    wgmma time). fused_out: see ``gptq_matmul.launch_kernel``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = jnp.dtype(dtype_name)
    rows = CHUNK * n_sub
    steps = k_pad // tile_k // k_splits
    table_words = 2**bits // 2
    dequant = _make_dequant(bits, tile_k, dtype_name, skip_lookup=variant == "nolookup")
    swizzle = 128
    x_transforms = (plgpu.TilingTransform((8, swizzle // dtype.itemsize)), plgpu.SwizzleTransform(swizzle))

    def body(x_gmem, w_gmem, t_gmem, out_gmem):
        n_idx = jax.lax.axis_index("n")
        split = jax.lax.axis_index("split")
        k0 = split * steps

        in_specs = [
            plgpu.BlockSpec((m_pad, tile_k), lambda k: (0, k0 + k), transforms=x_transforms),
            plgpu.BlockSpec((n_sub, tile_k // CHUNK, bits, 128), lambda k: (n_idx, k0 + k, 0, 0)),
        ]

        def table_scope(t_smem, barrier):
            # The CTA's tables are the same for every pipeline step: one TMA copy before the pipeline.
            plgpu.copy_gmem_to_smem(t_gmem.at[pl.ds(n_idx * rows, rows)], t_smem, barrier)
            plgpu.barrier_wait(barrier)

            def acc_scope(*acc_refs):
                def step(_, x_smem, w_smem):
                    # Dequantize every sub-tile first, then issue the wgmmas and wait once (as gptq_matmul).
                    a = [dequant(w_smem.at[j], t_smem.at[pl.ds(j * CHUNK, CHUNK)]) for j in range(n_sub)]
                    for j in range(n_sub):
                        plgpu.wgmma(acc_refs[j], a[j], x_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(0)

                plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs,
                                    max_concurrent_steps=min(stages, steps))(x_gmem, w_gmem)
                return [acc_ref[...] for acc_ref in acc_refs]

            return pl.run_scoped(acc_scope, *[plgpu.ACC((CHUNK, m_pad), jnp.float32) for _ in range(n_sub)])

        accs = pl.run_scoped(table_scope, plgpu.SMEM((rows, table_words), jnp.int32), plgpu.Barrier(num_arrivals=1))
        store_output(accs, out_gmem, n_idx=n_idx, split=split, m_pad=m_pad, k_splits=k_splits, fused_out=fused_out)

    return launch_kernel(body, name=f"lut_w{bits}_m{m_pad}_k{tile_k}_n{rows}", n_pad=n_pad, m_pad=m_pad,
                         rows=rows, k_splits=k_splits, aliased=aliased, fused_out=fused_out)


@functools.lru_cache(maxsize=None)
def _build_ws_call(m_pad, k_pad, n_pad, bits, dtype_name, tile_k, stages, ctas, aliased, wgs, fused_out=None,
                   variant="full", direct_m=0, norm=None, slots_mn=False, swiglu=None):
    """The warp-specialized kernel (``gptq_matmul.build_ws_kernel``) for LUT weights: per step the tables of the
    step's unit (one [wgs * 64, 2**bits / 2] TMA copy, an L2 hit after the unit's first step), each compute
    warpgroup looking up its 64 rows' tables. ``direct_m``: the unpadded x rows (as in the GPTQ kernels); ``norm``:
    the fused RMSNorm's (K, eps); ``slots_mn``, ``swiglu``: as in ``build_ws_kernel``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dequant = _make_dequant(bits, tile_k, dtype_name, skip_lookup=variant == "nolookup", wg_local=True)

    def side_specs(unit_k):
        return [plgpu.BlockSpec((wgs * CHUNK, 2**bits // 2), lambda t: (unit_k(t)[0], 0))]

    return build_ws_kernel(
        m_pad=m_pad, k_pad=k_pad, n_pad=n_pad, bits=bits, dtype_name=dtype_name, tile_k=tile_k, stages=stages,
        ctas=ctas, aliased=aliased, wgs=wgs, fused_out=fused_out, direct_m=direct_m, side_specs=side_specs,
        dequant=lambda w_ref, side, cols: dequant(w_ref, side[0].at[cols]),
        product=lambda acc, a, x_smem, side, cols: ws_wgmma(acc, a, x_smem), norm=norm, slots_mn=slots_mn,
        swiglu=swiglu, name=f"lut_w{bits}_m{m_pad}_k{tile_k}_ws{ctas}x{wgs}" + ws_name_suffix(norm, slots_mn, swiglu))


def _make_dequant(bits, tile_k, dtype_name, skip_lookup=False, wg_local=False):
    """inline_mgpu function: (w_smem [tile_k/64, bits, 128] i32, tables [64, 2**bits/2] i32) -> the dequantized A
    operand [64, tile_k] in the WGMMA register layout (module docstring: prmt lookups). ``wg_local``: as in
    ``gptq_matmul._make_dequant`` (several warpgroups per CTA)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = jnp.dtype(dtype_name)
    ret = plgpu.ShapeDtypeStruct((CHUNK, tile_k), dtype, layout=plgpu.Layout.WGMMA)
    table_words = 2**bits // 2

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()), return_type=ret)
    def dequant(ctx, w_ref, t_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, llvm, memref, vector
        import jax.experimental.mosaic.gpu as mgpu

        i32 = ir.IntegerType.get_signless(32)
        index = ir.IndexType.get()
        vec_ty = ir.VectorType.get((2,), mgpu.utils.dtype_to_ir_type(dtype))

        def ci(v):
            return arith.constant(i32, _i32(v))

        def cidx(v):
            return arith.constant(index, v)

        def prmt(a, b, sel):
            return llvm.inline_asm(i32, [a, b, sel], "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r")

        def select(a, b, mask):  # bytes of b where mask is 0xFF, else a
            return lop3(a, b, mask, _LOP3_SELECT)

        tid, row_idx = _fragment_rows(wg_local)
        tid_idx = arith.index_cast(index, tid)
        # Both rows' tables (byte planes) in registers: the same for every k chunk of the step.
        tables = [[memref.load(t_ref, [r, cidx(q)]) for q in range(table_words)] for r in row_idx]
        interleave = [ci(v) for v in _INTERLEAVE]
        mask_sel = [ci(v) for v in _MASK_SEL]
        nibble_mask, sixteen = ci(0x77777777), ci(16)

        regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((CHUNK, tile_k)), dtype=object)

        def put(c, P, v):
            j, p = divmod(P, 4)
            regs[0, c * 8 + 2 * j + p // 2, 0, 0, p % 2, 0, 0, 0, 0] = vector.bitcast(
                vec_ty, vector.broadcast(ir.VectorType.get((1,), i32), v))

        for c in range(tile_k // CHUNK):
            words = [memref.load(w_ref, [cidx(c), cidx(p), tid_idx]) for p in range(bits)]
            if skip_lookup:
                for P in range(16):
                    put(c, P, words[P % bits])
                continue
            if bits == 4:
                sels = [arith.andi(wd, nibble_mask) for wd in words]
            else:
                sels = [arith.andi(wd, nibble_mask) for wd in words]
                high = arith.andi(arith.shrui(words[0], ci(3)), ci(0x11111111))
                high = or_and(arith.shrui(words[1], ci(2)), ci(0x22222222), high)
                high = or_and(arith.shrui(words[2], ci(1)), ci(0x44444444), high)
                sels.append(high)
            for j in range(4):
                sel_h = [sels[j], arith.shrui(sels[j], sixteen)]
                if bits == 4:
                    shifted = arith.shli(words[j], ci(4))
                    masks = [prmt(shifted, words[j], ms) for ms in mask_sel]
                for h in range(2):
                    t = tables[h]
                    if bits == 4:
                        lo = select(prmt(t[0], t[1], sel_h[h]), prmt(t[2], t[3], sel_h[h]), masks[h])
                        hi = select(prmt(t[4], t[5], sel_h[h]), prmt(t[6], t[7], sel_h[h]), masks[h])
                    else:
                        lo = prmt(t[0], t[1], sel_h[h])
                        hi = prmt(t[2], t[3], sel_h[h])
                    put(c, 4 * j + h, prmt(lo, hi, interleave[0]))
                    put(c, 4 * j + h + 2, prmt(lo, hi, interleave[1]))
        return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

    return dequant


__all__ = ["LUTKernelWeight", "LUT_KERNEL_BITS", "KernelConfig", "check_packable", "lut_matmul",
           "lut_matmul_partials", "pack", "reference_matmul", "reference_matmul_tiled"]
