"""SpQR-format dequantize(+sparse)-and-matmul for decode-sized activations: Mosaic GPU (Hopper) Pallas kernel + jnp
reference.

Computation (y = x @ W; W[k, n] from SpQR's stored parts, see jaxquant/formats_spqr.py):

    dense part   W_d[k, n] = scale[g, n] * code[k, n] + nb[g, n]       (g = the 16-column group of k)
                 scale[g, n] = (cs[g, n] - z_s) * s_s,  zero[g, n] = (cz[g, n] - z_z) * s_z,  nb = -(scale * zero)
                 with cs / cz the 3-bit first-level statistic codes and (s_s, z_s, s_z, z_z) the float16 second-level
                 parameters of the 16-row block of n;
    outliers     W[k, n] = value at the stored CSR positions (the value replaces the dense one): the sparse product
                 adds (value - W_d[k, n]) * x[k] into the same output.

    x [M, K] (bfloat16 or float16, M <= 64 on the kernel path) -> y [M, N] in x's dtype, accumulated in float32.

Like gptq_matmul, the kernel computes y^T = W^T x^T with the weight as the 64-row register A operand of ``wgmma``
and the activations as its N operand (8..64 wide) from shared memory, over an ``emit_pipeline`` of TMA copies.

Why the statistics are decoded in the kernel (bench/NOTES_kernels.md, SpQR section): float16 scale + zero per group
of 16 would add 2 bits per weight (5 bits in all, <= 3.2x less than bf16); the 3-bit codes + float16 second level
add 0.375 + 0.25, so the dense part is 3.625 bits per weight. Decoding them is cheap only if each thread decodes
few statistics: the kernel permutes K at load time so that in every 64-column chunk each thread's 16 columns of a
row are exactly one group of 16 (thread t of a quad holds group 4 * chunk + t). One thread then decodes one
(scale, nb) pair for each of its two rows per chunk (4 float32 statistics for 32 weights), and the activations are
gathered into the same column order once per call (M x K; it also applies SpQR's act-order permutation).

Kernel layout (built once at load time by :func:`pack`, a :class:`SpQRKernelWeight` pytree; K_pad = K rounded up to
256, N_pad = N rounded up to 64):

  qweight [N_pad/64, K_pad/64, bits, 128] int32: per 64x64 tile of W^T, ``bits`` words per thread holding the codes
      of its wgmma A fragment (same thread/pair order as gptq_matmul). Each 16-bit half holds the codes of one
      element of every pair: 3-bit codes at bits 0, 3, 6, 9, 12 of three halves (pairs 0-14), pair 15 in their
      bit 15; 2/4-bit codes at bits * i. A code is read without a shift when it already sits inside the mantissa
      (``v = magic | (word & mask)`` is the float ``magic + code * 2**k``), otherwise after one shift shared with
      its neighbours; ``fma(v, 2**-k, -magic * 2**-k)`` then gives the exact code.
  stats   [N_pad/64, K_pad/256, 3, 128] int16: per thread and 4 chunks, 16 fields of 3 bits (scale code, zero code
      of row r, then of row r + 8, for each chunk) in the same 5-per-half + bit-15 layout.
  qq      [N_pad/16, K_pad/8] int32: per 16-row block and 16-column group, (s_s | z_s << 16), (s_z | z_z << 16) as
      float16 bit patterns.
  kidx    [K_pad] int32: input column feeding each kernel column (K = a zero column for padding).
  sp_buckets, sp_rows, sp_inv: the outliers as value - W_d (float16) at kernel columns (int16/int32), in up to
      4 row-length buckets: bucket b holds rows of up to L_b outliers as dense [n_b, L_b] column / value arrays
      (ELL, padding value 0); sp_rows [T] the output row of each bucket row (buckets in order), sp_inv [N_pad]
      each output row's position among them (T = none). On the GPU the product runs in pallas_kernels/spqr_outliers.py
      (one writer per output row: deterministic); the XLA form (sparse_product: gathers and row reductions, no
      scatter) is the CPU reference and the ``outliers="xla"`` option.
  sp_csr  (sparse_format="csr" instead of the buckets): (values float32 [nnz], kernel columns int32 [nnz],
      row_ptr int32 [N_pad+1]) for cuSPARSE through jax.experimental.sparse (which takes float32 only).

Register arithmetic per thread and chunk: 4 statistics in float32 (``cvt`` of the float16 parameters, then the
reference's ``(code - zero) * scale`` with round-to-nearest, no contraction), rounded to the activation dtype as
splatted pairs; per bf16x2 pair of weights: mask (and at most one shared shift) into the magic float, one exact fma to
the code, one fma ``code * scale + nb`` (one rounding). :func:`dequantize_padded` and :func:`reference_matmul` compute
the same values in jnp (the last fma through a round-to-odd float32 sum, so it is exact), so the CPU tests can check
the kernel's layout and register logic bit for bit. Against the float32 SpQR reconstruction the dense weights differ
by ~1 unit of the activation dtype (nb carries the rounding of scale * zero): rel err ~3.5e-3 in bf16.

Measured on an H100 (bench/results/kernels.md, section "SpQR outlier product"): 8192x28672 with 1% outliers (3.95
stored bits) at M = 1: the dense kernel 50.3 us (3.1x the bf16 XLA GEMV); the whole path 62.8 us (2.5x) with the
outlier kernels of spqr_outliers.py, 75.2 us (2.1x) with the XLA outlier product.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .gptq_matmul import MAX_CLUSTER, fused_output_ok, gather_columns, launch_kernel, or_and, resolve_fused
from .gptq_matmul import store_output
from .gptq_matmul import CHUNK, MAX_KERNEL_M, KernelWeightShape, _i32, _m_pad, _round_up, _thread_coords
from .gptq_matmul import _MANTISSA, _extract_plan, call_with_output, check_kernel_input, pick_blocks
from .spqr_outliers import outlier_product_add, outlier_sums_mgpu

KERNEL_BITS = (2, 3, 4)
GROUP = 16  # input columns per first-level group in the kernel layout (SpQR's beta1 must be a multiple)
ROW_BLOCK = 16  # output rows per second-level block in the kernel layout (SpQR's beta2 must be a multiple)
STAT_BITS = 3  # first-level statistic codes are stored in 3-bit fields (qq bits 1..3)
STAT_CHUNKS = 4  # chunks of 64 columns whose statistics share one 3 x int16 block per thread
K_ALIGN = CHUNK * STAT_CHUNKS  # 256
MAX_BUCKETS = 4  # row-length buckets of the outlier ELL arrays
OUTLIER_PATHS = ("kernel", "mgpu", "xla")
# The outlier product on the GPU: "kernel" = spqr_outliers.outlier_product_add (Triton lowering, any M, adds in
# place), "mgpu" = spqr_outliers.outlier_sums_mgpu at M = 1 (Mosaic GPU, shared-memory gathers; larger M as
# "kernel"), "xla" = the XLA gathers of sparse_product. JAXQUANT_SPQR_OUTLIERS overrides the default.
# Measured (H100, 8192x28672 3-bit, 1 % outliers, M = 1, bench/kernels_launch.py): path 61.5 us "mgpu" vs 72.9
# "kernel" in one run, 62.8 us "mgpu" vs 75.2 "xla" in another (kernels.md, NOTES_kernels.md).
OUTLIERS_DEFAULT = os.environ.get("JAXQUANT_SPQR_OUTLIERS", "mgpu")
ELL_ALIGN = 8  # bucket row lengths are multiples of this
_F32_MAGIC = 0x4B000000  # float32 2**23: (magic | c << s) - 2**23 = c * 2**s exactly for s + 3 <= 23


# ------------------------------------------------------------------------------------------------- bit layouts
def _half_fields(bits: int) -> list[list[tuple[int, int, int, int]]]:
    """For each of the 16 codes of one 16-bit half: [(word, src_bit, width, code_bit)] making up the code."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"the SpQR kernel supports {KERNEL_BITS}-bit weight codes, got bits={bits}")
    if bits == 3:
        return [[(P // 5, 3 * (P % 5), 3, 0)] for P in range(15)] + [[(i, 15, 1, i) for i in range(3)]]
    per = 16 // bits
    return [[(P // per, bits * (P % per), bits, 0)] for P in range(16)]


def _stat_plan(f: int):
    """Statistic field f (0..15) of a 3 x 16-bit block, read into float32 magic 2**23: (k, [(word, shift, mask)]) with
    (magic | OR((word >> shift) & mask)) - 2**23 = code * 2**k."""
    fields = _half_fields(STAT_BITS)[f]
    if len(fields) == 1:
        (word, src, width, _), = fields
        return src, [(word, 0, (2**width - 1) << src)]
    return 0, [(word, src - cb, (2**width - 1) << cb) for word, src, width, cb in fields]


def _pack_halves(vals, bits: int, xp=np):
    """vals [..., 16] codes of one half -> [..., bits] uint32 words holding 16 bits each (the _half_fields layout);
    xp = numpy or jax.numpy (large weights are packed on the device)."""
    words = [xp.zeros(vals.shape[:-1], xp.uint32) for _ in range(bits)]
    for P, fields in enumerate(_half_fields(bits)):
        for word, src, width, code_bit in fields:
            part = (vals[..., P].astype(xp.uint32) >> code_bit) & (2**width - 1)
            words[word] = words[word] | (part << src)
    return xp.stack(words, axis=-1)


def _read_halves(words, bits: int, mantissa: int, xp=np):
    """Inverse of _pack_halves through the kernel's extraction plans, on uint32 words holding two halves (or one):
    [..., bits] -> [..., 16] codes of each half as code << k (k from the plan, both halves)."""
    out = []
    for fields in _half_fields(bits):
        k, parts = _extract_plan(fields, bits, mantissa)
        v = xp.zeros(words.shape[:-1], xp.uint32)
        for word, shift, mask in parts:
            w = words[..., word].astype(xp.uint32)
            v = v | (((w >> shift) if shift >= 0 else (w << -shift)) & xp.uint32(mask))
        out.append(v)
    return xp.stack(out, axis=-1)


def _fragment_owner():
    """(thread, pair, element) [64, 64] holding each element (row, col) of a 64x64 W^T tile (inverse of
    _thread_coords)."""
    row, col = _thread_coords()
    tid = np.broadcast_to(np.arange(128)[:, None, None], row.shape)
    pair = np.broadcast_to(np.arange(16)[None, :, None], row.shape)
    elem = np.broadcast_to(np.arange(2)[None, None, :], row.shape)
    out = [np.zeros((CHUNK, CHUNK), np.int64) for _ in range(3)]
    for o, v in zip(out, (tid, pair, elem)):
        o[row, col] = v
    return tuple(out)


def kernel_column_source(k_pad: int) -> np.ndarray:
    """[k_pad] group-order column (position in SpQR's quantization order) of every kernel column.

    Kernel column 16j + 8h + 2t + e of chunk c is held by lane t (of a quad) as element e of pair (j, h); it takes
    group-order column 64c + 16t + 4j + 2h + e, so lane t's 16 columns of a row are group 4c + t.
    """
    p = np.arange(k_pad)
    c, i = p // CHUNK, p % CHUNK
    j, h, t, e = i // 16, (i % 16) // 8, (i % 8) // 2, i % 2
    return CHUNK * c + 16 * t + 4 * j + 2 * h + e


# ------------------------------------------------------------------------------------------------ arithmetic (jnp)
def _f16_bits(a) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.asarray(a, jnp.float16), jnp.uint16).astype(jnp.uint32)


def _round_to_odd_sum(p: jax.Array, q: jax.Array) -> jax.Array:
    """p + q in float32 rounded to odd (exact sums unchanged): rounding this to a 16-bit float is the correctly
    rounded p + q (float32 keeps >= 2 more bits), i.e. what a fused multiply-add in the 16-bit dtype returns."""
    s = p + q
    bb = s - p
    err = (p - (s - bb)) + (q - bb)  # TwoSum: s + err == p + q exactly
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    fix = (err != 0) & ((bits & 1) == 0)
    away = jnp.sign(err) == jnp.sign(s)  # the exact sum lies further from zero than s
    bits = jnp.where(fix, bits + jnp.where(away, 1, -1), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def statistics_f32(cs, cz, s_s, z_s, s_z, z_z):
    """The kernel's float32 (scale, nb = -(scale * zero)) from the statistic codes and float16 second level."""
    f32 = jnp.float32
    scale = (cs.astype(f32) - z_s.astype(f32)) * s_s.astype(f32)
    zero = (cz.astype(f32) - z_z.astype(f32)) * s_z.astype(f32)
    return scale, -(scale * zero)


def dense_values(codes, scale_lp, nb_lp, dtype) -> jax.Array:
    """round_dtype(code * scale + nb) with one rounding (scale / nb already in the 16-bit dtype)."""
    p = codes.astype(jnp.float32) * scale_lp.astype(jnp.float32)  # exact: <= 4 + 11 significant bits
    return _round_to_odd_sum(p, nb_lp.astype(jnp.float32)).astype(dtype)


# ------------------------------------------------------------------------------------------------ kernel-layout pytree
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["qweight", "stats", "qq", "kidx", "sp_buckets", "sp_rows", "sp_inv", "sp_csr"],
    meta_fields=["bits", "in_features", "out_features", "dtype_name"],
)
@dataclasses.dataclass(frozen=True)
class SpQRKernelWeight(KernelWeightShape):
    """A SpQR weight in the kernel layout (module docstring); ``matmul`` runs the Pallas kernel on GPU."""

    qweight: jax.Array
    stats: jax.Array
    qq: jax.Array
    kidx: jax.Array
    sp_buckets: tuple  # ((cols [n_b, L_b], vals [n_b, L_b]), ...)
    sp_rows: jax.Array
    sp_inv: jax.Array
    sp_csr: tuple  # () or (values f32 [nnz], cols i32 [nnz], row_ptr i32 [N_pad+1])
    bits: int
    in_features: int
    out_features: int
    dtype_name: str

    @property
    def sparse_slots(self) -> int:
        """Outlier entries stored, ELL padding included."""
        return sum(int(c.size) for c, _ in self.sp_buckets)

    @property
    def nbytes(self) -> int:
        arrays = (self.qweight, self.stats, self.qq, self.kidx, self.sp_rows, self.sp_inv) + tuple(
            a for bucket in self.sp_buckets for a in bucket) + tuple(self.sp_csr)
        return sum(a.size * a.dtype.itemsize for a in arrays)

    @property
    def dense_nbytes(self) -> int:
        """Bytes the kernel streams (codes, statistic codes, second level)."""
        return sum(a.size * a.dtype.itemsize for a in (self.qweight, self.stats, self.qq))

    def avg_bits(self) -> float:
        """Bits per weight of everything the kernel path reads (layout padding included)."""
        return 8 * self.nbytes / (self.in_features * self.out_features)

    # -------------------------------------------------------------------------------------------- unpacking
    def codes_kn(self) -> jax.Array:
        """Weight codes [K_pad, N_pad] in kernel column order."""
        return _codes_kn(self)

    def statistics_codes(self) -> tuple[jax.Array, jax.Array]:
        """(scale codes, zero codes) [K_pad/16, N_pad] per kernel group (group 4c + t of chunk c) and row."""
        return _statistics_codes(self)

    def _codes_kn(self) -> jax.Array:
        words = jax.lax.bitcast_convert_type(self.qweight, jnp.uint32)  # [Nt, Kt, bits, 128]
        mant = _MANTISSA[self.dtype_name]
        vals = _read_halves(jnp.moveaxis(words, 2, -1), self.bits, mant, jnp)  # [Nt, Kt, 128, 16]
        ks = jnp.asarray([_extract_plan(f, self.bits, mant)[0] for f in _half_fields(self.bits)], jnp.uint32)
        vals = jnp.stack([(vals & 0xFFFF) >> ks, (vals >> 16) >> ks], axis=-1)  # [Nt, Kt, 128, 16, 2]
        nt, kt = words.shape[:2]
        tid, pair, elem = _fragment_owner()  # [64 rows, 64 cols] each
        tiles = vals[:, :, tid, pair, elem]  # [Nt, Kt, 64, 64]: one gather (scatters compile slowly on CPU)
        return tiles.astype(jnp.int32).transpose(0, 2, 1, 3).reshape(nt * CHUNK, kt * CHUNK).T

    def _statistics_codes(self) -> tuple[jax.Array, jax.Array]:
        words = jax.lax.bitcast_convert_type(self.stats, jnp.uint16).astype(jnp.uint32)  # [Nt, Kb, 3, 128]
        vals = _read_halves(jnp.moveaxis(words, 2, -1), STAT_BITS, 23, jnp)  # [Nt, Kb, 128, 16]; shifts 0
        vals = (vals >> jnp.asarray([_stat_plan(f)[0] for f in range(16)], jnp.uint32)).astype(jnp.int32)
        nt, kb = words.shape[:2]
        # Owner of (kernel group G = 16 kb + 4 cc + t, row n = 64 nt + 16 a + 8 h + b): tile nt, block kb, thread
        # 32 a + 4 b + t, field 4 cc + 2 h (+ 1: the zero code). Every index is a separate axis, so this is a
        # reshape + transpose; a gather with numpy indices made XLA constant-fold a [G, N, 4] index array (minutes
        # of compile time per 7B model).
        v = vals.reshape(nt, kb, 4, 8, 4, STAT_CHUNKS, 2, 2)  # [nt, kb, a, b, t, cc, h, code]
        cs, cz = (v[..., code].transpose(1, 5, 4, 0, 2, 6, 3).reshape(kb * STAT_CHUNKS * 4, nt * CHUNK)
                  for code in (0, 1))
        return cs, cz

    def second_level(self) -> tuple[jax.Array, ...]:
        """(s_s, z_s, s_z, z_z) float16 [N_pad/16, K_pad/16] per row block and kernel group."""
        w = jax.lax.bitcast_convert_type(self.qq, jnp.uint32).reshape(self.n_pad // ROW_BLOCK, -1, 2)
        half = lambda a: jax.lax.bitcast_convert_type(a.astype(jnp.uint16), jnp.float16)
        return half(w[..., 0] & 0xFFFF), half(w[..., 0] >> 16), half(w[..., 1] & 0xFFFF), half(w[..., 1] >> 16)

    def dequantize_padded(self) -> jax.Array:
        """Dense part W_d [K_pad, N_pad] in kernel column order, in the activation dtype, as the kernel computes it."""
        return _dequantize_padded(self)

    def _dequantize_padded(self) -> jax.Array:
        cs, cz = self._statistics_codes()
        s_s, z_s, s_z, z_z = (jnp.repeat(a.T, ROW_BLOCK, axis=1) for a in self.second_level())  # [G_k, N_pad]
        scale, nb = statistics_f32(cs, cz, s_s, z_s, s_z, z_z)
        g = kernel_column_source(self.k_pad) // GROUP  # the group of each kernel column (lane t of chunk c: 4c + t)
        return dense_values(self._codes_kn(), scale.astype(self.dtype)[g], nb.astype(self.dtype)[g], self.dtype)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """W [K, N] in the original input order, outliers included (for checks; the kernel never builds it)."""
        w = self.dequantize_padded().astype(jnp.float32) + self.sparse_dense()
        dense = jnp.zeros((self.in_features + 1, self.n_pad), jnp.float32).at[self.kidx].set(w)
        return dense[: self.in_features, : self.out_features].astype(dtype)

    def sparse_dense(self) -> jax.Array:
        """The outlier corrections as a dense [K_pad, N_pad] float32 matrix (kernel column order)."""
        out = jnp.zeros((self.k_pad, self.n_pad), jnp.float32)
        start = 0
        for cols, vals in self.sp_buckets:
            rows = jnp.broadcast_to(self.sp_rows[start:start + cols.shape[0], None], cols.shape)
            out = out.at[cols.astype(jnp.int32), rows].add(vals.astype(jnp.float32))
            start += cols.shape[0]
        if self.sp_csr:
            data, cols, row_ptr = self.sp_csr
            rows = jnp.repeat(jnp.arange(self.n_pad), jnp.diff(row_ptr), total_repeat_length=data.shape[0])
            out = out.at[cols, rows].add(data)
        return out

    def prepare_activations(self, x2d: jax.Array, m_pad: int) -> jax.Array:
        """x [M, K] -> [m_pad, K_pad] in kernel column order (one gather over M x K, zero padding)."""
        return jnp.pad(gather_columns(x2d.astype(self.dtype), self.kidx), ((0, m_pad - x2d.shape[0]), (0, 0)))

    def matmul(self, x: jax.Array, *, use_kernel: Optional[bool] = None, config: Optional["KernelConfig"] = None):
        """x [..., K] -> x @ W [..., N] in x's dtype, accumulated in float32.

        The Pallas kernel (+ the XLA sparse product) runs when ``use_kernel`` (default: the default backend is a GPU,
        x's dtype is the packed dtype and M = prod(leading dims) <= 64); otherwise the XLA reference.
        """
        lead, k = x.shape[:-1], x.shape[-1]
        if k != self.in_features:
            raise ValueError(f"x has {k} input features, the weight expects {self.in_features}")
        m = math.prod(lead)
        if use_kernel is None:
            use_kernel = jax.default_backend() == "gpu" and x.dtype == self.dtype and 1 <= m <= MAX_KERNEL_M
        y = _jit_spqr_matmul(x.reshape(m, k), self, config) if use_kernel else reference_matmul(x.reshape(m, k),
                                                                                               self)
        return y.reshape(*lead, self.out_features)


# One compile per shape (the decoders are many small ops: slow eagerly).
_dequantize_padded = jax.jit(SpQRKernelWeight._dequantize_padded)
_codes_kn = jax.jit(SpQRKernelWeight._codes_kn)
_statistics_codes = jax.jit(SpQRKernelWeight._statistics_codes)


# ---------------------------------------------------------------------------------------------------------- packing
@functools.partial(jax.jit, static_argnames=("n_pad", "bits"))
def _pack_codes(codes_kn, kidx, *, n_pad: int, bits: int) -> jax.Array:
    """codes [K, N] -> qweight [N_pad/64, K_pad/64, bits, 128] int32 (kernel column order, per-thread words)."""
    K, N = codes_kn.shape
    k_pad = kidx.shape[0]
    codes_u = codes_kn.astype(jnp.uint32)
    codes_ext = jnp.concatenate([codes_u, jnp.zeros((1, N), jnp.uint32)], axis=0)[kidx]  # [K_pad, N]
    codes_nk = jnp.pad(codes_ext.T, ((0, n_pad - N), (0, 0)))
    nt, kt = n_pad // CHUNK, k_pad // CHUNK
    row, col = _thread_coords()
    tiles = codes_nk.reshape(nt, CHUNK, kt, CHUNK).transpose(0, 2, 1, 3)
    lo = _pack_halves(tiles[:, :, row[..., 0], col[..., 0]], bits, jnp)  # [Nt, Kt, 128, bits]
    hi = _pack_halves(tiles[:, :, row[..., 1], col[..., 1]], bits, jnp)
    return jax.lax.bitcast_convert_type(jnp.moveaxis(lo | (hi << 16), -1, 2), jnp.int32)


@functools.partial(jax.jit, static_argnames=("dtype_name",))
def _outlier_dense_values(codes, cs, cz, s_s, z_s, s_z, z_z, *, dtype_name: str):
    dtype = jnp.dtype(dtype_name)
    scale, nb = statistics_f32(cs, cz, s_s, z_s, s_z, z_z)
    return dense_values(codes, scale.astype(dtype), nb.astype(dtype), dtype).astype(jnp.float32)


def pack(codes_kn, scale_codes, zero_codes, scale_qq, zero_qq, perm, row_ptr, col_idx, values, *, bits: int,
         group_size: int, qq_groupsize: int, dtype=jnp.bfloat16, sparse_format: str = "ell") -> SpQRKernelWeight:
    """Convert a SpQR weight (plain unpacked arrays) into the kernel layout; done once at load time.

    codes_kn [K, N] weight codes (original column order); scale_codes / zero_codes [G, N] first-level statistic
    codes (< 8); scale_qq / zero_qq [G, N/qq_groupsize, 2] float16 (scale, zero) of the second level; perm [K] the
    act-order permutation (group g holds columns perm[g*group_size:(g+1)*group_size]) or None / empty; the outliers
    as CSR over W[out = N, in = K] (row_ptr [N+1], col_idx [nnz], values [nnz], replacing the dense value).
    group_size and qq_groupsize must be multiples of 16 (statistics are repeated to 16-column / 16-row blocks).
    sparse_format: "ell" (row-length buckets, XLA gathers; float16 values, int16 columns) or "csr" (float32 /
    int32 CSR for cuSPARSE).
    """
    if sparse_format not in ("ell", "csr"):
        raise ValueError(f"sparse_format must be 'ell' or 'csr', got {sparse_format!r}")
    dtype_name = jnp.dtype(dtype).name
    if dtype_name not in _MANTISSA:
        raise ValueError(f"the SpQR kernel computes in bfloat16 or float16, got {dtype_name}")
    _half_fields(bits)  # validates bits
    codes_kn = jnp.asarray(codes_kn)
    if codes_kn.ndim != 2:
        raise ValueError(f"codes must be [K, N], got shape {codes_kn.shape}")
    K, N = codes_kn.shape
    if group_size % GROUP or K % group_size:
        raise ValueError(f"the SpQR kernel needs a group_size that is a multiple of {GROUP} and divides "
                         f"in_features={K}; got group_size={group_size}")
    if qq_groupsize % ROW_BLOCK or N % qq_groupsize:
        raise ValueError(f"the SpQR kernel needs a qq_groupsize that is a multiple of {ROW_BLOCK} and divides "
                         f"out_features={N}; got qq_groupsize={qq_groupsize}")
    G = K // group_size
    scale_codes, zero_codes = (np.asarray(jax.device_get(a)) for a in (scale_codes, zero_codes))
    scale_qq, zero_qq = (np.asarray(jax.device_get(a)).astype(np.float16) for a in (scale_qq, zero_qq))
    for name, a, shape in (("scale_codes", scale_codes, (G, N)), ("zero_codes", zero_codes, (G, N)),
                           ("scale_qq", scale_qq, (G, N // qq_groupsize, 2)),
                           ("zero_qq", zero_qq, (G, N // qq_groupsize, 2))):
        if a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    for name, a in (("scale_codes", scale_codes), ("zero_codes", zero_codes)):
        if a.size and (a.min() < 0 or a.max() >= 2**STAT_BITS):
            raise ValueError(f"{name} must be {STAT_BITS}-bit codes (second-level statistics of at most "
                             f"{STAT_BITS} bits); got values in [{a.min()}, {a.max()}]")
    if codes_kn.size and (int(codes_kn.min()) < 0 or int(codes_kn.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for bits={bits}")
    perm = None if perm is None else np.asarray(jax.device_get(perm)).astype(np.int64)
    if perm is None or perm.size == 0:
        perm = np.arange(K)
    elif perm.shape != (K,) or not np.array_equal(np.sort(perm), np.arange(K)):
        raise ValueError(f"perm must be a permutation of 0..{K - 1} (or empty for the identity order)")

    k_pad, n_pad = _padded_k(K), _round_up(N, CHUNK)
    q_of_p = kernel_column_source(k_pad)  # group-order position of each kernel column
    kidx = np.where(q_of_p < K, perm[np.minimum(q_of_p, K - 1)], K)  # input column of each kernel column

    # Weight codes in kernel column order -> per-thread words (jnp: on the device for large weights).
    qweight = _pack_codes(codes_kn, jnp.asarray(kidx, jnp.int32), n_pad=n_pad, bits=bits)
    nt = n_pad // CHUNK

    # Statistics per 16-column kernel group (group-order block q // 16) and row, padded with code 0 / params 0.
    n_groups = k_pad // GROUP
    src_group = np.arange(n_groups) * GROUP // group_size  # SpQR group of each kernel group (>= G: padding)
    real = src_group < G

    def by_group(a, fill=0):
        out = np.full((n_groups,) + a.shape[1:], fill, a.dtype)
        out[real] = a[src_group[real]]
        return out

    cs = np.zeros((n_groups, n_pad), np.uint32)
    cz = np.zeros_like(cs)
    cs[:, :N], cz[:, :N] = by_group(scale_codes), by_group(zero_codes)
    tid = np.arange(128)
    r, t = 16 * (tid // 32) + (tid % 32) // 4, tid % 4
    kb = k_pad // K_ALIGN
    fields = np.zeros((nt, kb, 128, 16), np.uint32)
    n_lo = CHUNK * np.arange(nt)[:, None, None] + r  # [Nt, 1, 128]
    for cc in range(STAT_CHUNKS):
        g = ((4 * np.arange(kb)[:, None] + cc) * 4 + t)[None]  # [1, Kb, 128] kernel group of (block, thread)
        for half, rows in ((0, n_lo), (1, n_lo + 8)):
            fields[..., 4 * cc + 2 * half] = cs[g, rows]
            fields[..., 4 * cc + 2 * half + 1] = cz[g, rows]
    stats = np.moveaxis(_pack_halves(fields, STAT_BITS).astype(np.uint16), -1, 2).view(np.int16)  # [Nt, Kb, 3, 128]

    # Second level per 16-row block and kernel group: (s_s | z_s << 16), (s_z | z_z << 16).
    n_blocks = n_pad // ROW_BLOCK
    blk_src = np.arange(N // ROW_BLOCK) * ROW_BLOCK // qq_groupsize
    qq_bits = np.zeros((n_blocks, n_groups, 4), np.uint32)
    for i, (a, j) in enumerate(((scale_qq, 0), (scale_qq, 1), (zero_qq, 0), (zero_qq, 1))):
        qq_bits[: N // ROW_BLOCK, :, i] = by_group(a[..., j].view(np.uint16))[:, blk_src].T
    qq = (qq_bits[..., 0::2] | (qq_bits[..., 1::2] << 16)).reshape(n_blocks, n_groups * 2).view(np.int32)

    w = SpQRKernelWeight(qweight=qweight, stats=jnp.asarray(stats), qq=jnp.asarray(qq),
                         kidx=jnp.asarray(kidx, jnp.int32), sp_buckets=(), sp_rows=jnp.zeros((0,), jnp.int32),
                         sp_inv=jnp.zeros((n_pad,), jnp.int32), sp_csr=(),
                         bits=bits, in_features=K, out_features=N, dtype_name=dtype_name)
    return _with_outliers(w, row_ptr, col_idx, values, codes_kn, cs, cz, qq_bits, sparse_format)


def _with_outliers(w: SpQRKernelWeight, row_ptr, col_idx, values, codes_kn, cs, cz, qq_bits,
                   sparse_format="ell") -> SpQRKernelWeight:
    """Attach the outliers as slices of (kernel column, value - W_d) sorted by output row."""
    K, N = w.in_features, w.out_features
    row_ptr, col_idx = (np.asarray(jax.device_get(a)).astype(np.int64) for a in (row_ptr, col_idx))
    values = np.asarray(jax.device_get(values)).astype(np.float32)
    nnz = values.shape[0]
    if row_ptr.shape != (N + 1,) or col_idx.shape != (nnz,) or row_ptr[0] != 0 or row_ptr[-1] != nnz \
            or np.any(np.diff(row_ptr) < 0):
        raise ValueError(f"outliers must be a CSR over W[out={N}, in={K}]: row_ptr [N+1] rising from 0 to nnz, "
                         f"col_idx / values [nnz]; got row_ptr {row_ptr.shape}, col_idx {col_idx.shape}, "
                         f"values {values.shape}")
    if nnz == 0:
        return w
    if col_idx.min() < 0 or col_idx.max() >= K:
        raise ValueError(f"outlier column index out of range [0, {K})")
    rows = np.repeat(np.arange(N), np.diff(row_ptr))
    inv = np.empty(K, np.int64)
    kidx = np.asarray(w.kidx)
    real = kidx < K
    inv[kidx[real]] = np.nonzero(real)[0]
    p = inv[col_idx]  # kernel column of each outlier
    # The kernel's dense value at each outlier position (same arithmetic as dequantize_padded).
    g = kernel_column_source(w.k_pad)[p] // GROUP
    blk = rows // ROW_BLOCK
    half = lambda b: jnp.asarray(b.astype(np.uint16).view(np.float16))
    dense = _outlier_dense_values(codes_kn[jnp.asarray(col_idx), jnp.asarray(rows)], jnp.asarray(cs[g, rows]),
                                  jnp.asarray(cz[g, rows]), *(half(qq_bits[blk, g, i]) for i in range(4)),
                                  dtype_name=w.dtype_name)
    delta = (values - np.asarray(dense)).astype(np.float16)
    if sparse_format == "csr":
        order = np.lexsort((p, rows))  # columns sorted within rows (kernel order)
        ptr = np.zeros(w.n_pad + 1, np.int32)
        ptr[1:N + 1] = row_ptr[1:]
        ptr[N + 1:] = nnz
        return dataclasses.replace(w, sp_csr=(jnp.asarray(delta[order].astype(np.float32)),
                                              jnp.asarray(p[order].astype(np.int32)), jnp.asarray(ptr)))
    # Row-length buckets (ELL per bucket): boundaries at quantiles of the row lengths, at most MAX_BUCKETS.
    counts = np.diff(row_ptr)
    within = np.arange(nnz) - row_ptr[rows]
    used = np.nonzero(counts)[0]
    lengths = _round_up_array(counts[used], ELL_ALIGN)
    bounds = np.unique(np.quantile(lengths, np.linspace(0, 1, MAX_BUCKETS + 1)[1:], method="higher"))
    bucket_of_row = np.searchsorted(bounds, lengths)  # lengths <= bounds[b]
    col_dtype = np.int16 if w.k_pad <= 2**15 else np.int32
    buckets, order = [], []
    for b, length in enumerate(bounds):
        brows = used[bucket_of_row == b]
        if brows.size == 0:
            continue
        position = np.full(N, -1, np.int64)
        position[brows] = np.arange(brows.size)
        sel = position[rows] >= 0
        cols = np.zeros((brows.size, int(length)), col_dtype)
        vals = np.zeros((brows.size, int(length)), np.float16)
        cols[position[rows[sel]], within[sel]] = p[sel]
        vals[position[rows[sel]], within[sel]] = delta[sel]
        buckets.append((jnp.asarray(cols), jnp.asarray(vals)))
        order.append(brows)
    sp_rows = np.concatenate(order).astype(np.int32)
    sp_inv = np.full(w.n_pad, sp_rows.size, np.int32)
    sp_inv[sp_rows] = np.arange(sp_rows.size)
    return dataclasses.replace(w, sp_buckets=tuple(buckets), sp_rows=jnp.asarray(sp_rows),
                               sp_inv=jnp.asarray(sp_inv))


def _padded_k(K: int) -> int:
    """K rounded up to 256; from 16 blocks of 256 on, to a multiple of 4 blocks, so that K can be split 4 ways
    (11008 = 43 * 256 otherwise runs on only N/64 CTAs: measured 30 us vs 14.6 us for the transposed shape)."""
    blocks = -(-K // K_ALIGN)
    if blocks >= 16:
        blocks = _round_up(blocks, 4)
    return blocks * K_ALIGN


def _round_up_array(a: np.ndarray, b: int) -> np.ndarray:
    return -(-a // b) * b


# ------------------------------------------------------------------------------------------------------ references
def sparse_product(xk: jax.Array, w: SpQRKernelWeight) -> Optional[jax.Array]:
    """Outlier corrections for prepared activations xk [M, K_pad]: float32 [M, N_pad] (None if no outliers).
    Per bucket one XLA gather-multiply-row-reduction, then one gather back to output rows (no scatter)."""
    if w.sp_csr:
        from jax.experimental import sparse as jsparse
        mat = jsparse.CSR(w.sp_csr, shape=(w.n_pad, w.k_pad))
        if xk.shape[0] == 1:
            return (mat @ xk[0].astype(jnp.float32))[None]
        return (mat @ xk.T.astype(jnp.float32)).T
    if not w.sp_buckets:
        return None
    parts = [jnp.sum(xk[:, cols.astype(jnp.int32)].astype(jnp.float32) * vals.astype(jnp.float32), axis=-1)
             for cols, vals in w.sp_buckets]  # [M, n_b]
    return jnp.concatenate(parts + [jnp.zeros((xk.shape[0], 1), jnp.float32)], axis=1)[:, w.sp_inv]


def _finish(partials: jax.Array, sparse: Optional[jax.Array], m: int, n: int, dtype) -> jax.Array:
    total = partials.sum(0)[:n, :m].T
    if sparse is not None:
        total = total + sparse[:m, :n]
    return total.astype(dtype)


def reference_matmul(x2d: jax.Array, w: SpQRKernelWeight) -> jax.Array:
    """Pure-jnp x [M, K] @ W -> [M, N] in x's dtype: the kernel's dense values in one XLA matmul plus the sparse
    product (also the large-M path on GPU)."""
    m = x2d.shape[0]
    xk = w.prepare_activations(x2d, m)
    # XLA:CPU has no bf16 x bf16 -> f32 dot thunk; float32 operands give the same products (exact in float32).
    op_dtype = jnp.float32 if jax.default_backend() == "cpu" else xk.dtype
    dense = jnp.matmul(xk.astype(op_dtype), w.dequantize_padded().astype(op_dtype), preferred_element_type=jnp.float32)
    return _finish(dense.T[None], sparse_product(xk, w), m, w.out_features, x2d.dtype)


def reference_matmul_tiled(x2d: jax.Array, w: SpQRKernelWeight, config: "KernelConfig") -> jax.Array:
    """The kernel's block decomposition in jnp: per (output tile, k split, pipeline step) the blocks of qweight /
    stats / qq the kernel's index maps select, decoded from those blocks alone, float32 partials summed over splits.
    For CPU tests of the tiling logic."""
    m = x2d.shape[0]
    m_pad = _m_pad(m)
    cfg = config.resolved(w, m)
    xk = w.prepare_activations(x2d, m_pad)
    steps = w.k_pad // cfg.tile_k // cfg.k_splits
    rows = CHUNK * cfg.n_sub
    out = jnp.zeros((cfg.k_splits, w.n_pad, m_pad), jnp.float32)
    for n_idx in range(w.n_pad // rows):
        for split in range(cfg.k_splits):
            acc = jnp.zeros((rows, m_pad), jnp.float32)
            for step in range(steps):
                kb = split * steps + step
                k0, k1 = kb * cfg.tile_k, (kb + 1) * cfg.tile_k
                blk = dataclasses.replace(
                    w, qweight=w.qweight[n_idx * cfg.n_sub:(n_idx + 1) * cfg.n_sub, k0 // CHUNK:k1 // CHUNK],
                    stats=w.stats[n_idx * cfg.n_sub:(n_idx + 1) * cfg.n_sub, k0 // K_ALIGN:k1 // K_ALIGN],
                    qq=w.qq[n_idx * rows // ROW_BLOCK:(n_idx + 1) * rows // ROW_BLOCK, k0 // 8:k1 // 8],
                    kidx=w.kidx[k0:k1])
                a = blk.dequantize_padded()  # [tile_k, rows]
                acc = acc + jnp.matmul(a.T.astype(jnp.float32), xk[:, k0:k1].T.astype(jnp.float32),
                                       preferred_element_type=jnp.float32)
            out = out.at[split, n_idx * rows:(n_idx + 1) * rows].set(acc)
    return _finish(out, sparse_product(xk, w), m, w.out_features, x2d.dtype)


# ---------------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Block sizes: ``tile_k`` input columns per pipeline step (a multiple of 256), ``stages`` TMA buffers in flight,
    ``k_splits`` CTAs sharing one output tile's K range (float32 partials summed afterwards), ``n_sub`` 64-row
    output tiles per CTA. None = heuristic."""

    tile_k: Optional[int] = None
    stages: Optional[int] = None
    k_splits: Optional[int] = None
    n_sub: Optional[int] = None
    fused: Optional[bool] = None  # the single-kernel launch (gptq_matmul.launch_kernel); None = its default
    outliers: Optional[str] = None  # one of OUTLIER_PATHS; None = OUTLIERS_DEFAULT

    def resolved(self, w: SpQRKernelWeight, m: int = 1, num_sms: int = 132) -> "KernelConfig":
        """Fill in None fields: as gptq_matmul (tile_k up to 512 and 3 stages at M_pad <= 16, up to 256 and 2
        stages above; the most CTAs up to ~3.5 per SM with >= 4 steps per split, then the largest tile_k, then the
        fewest splits)."""
        small_m = _m_pad(m) <= 16
        stages = self.stages or (3 if small_m else 2)
        n_sub = self.n_sub or 1
        ctas_n = w.n_pad // CHUNK // n_sub
        target = int(3.5 * num_sms)
        fused = resolve_fused(self.fused, self.k_splits, w.out_features)
        max_splits = MAX_CLUSTER if fused else 16
        best = pick_blocks([t for t in ([self.tile_k] if self.tile_k else ([512, 256] if small_m else [256]))
                            if not (t % K_ALIGN or w.k_pad % t)], w.k_pad, ctas_n, target, self.k_splits, max_splits)
        if best is None:
            raise ValueError(f"tile_k={self.tile_k} does not fit: it must be a multiple of {K_ALIGN} dividing "
                             f"K_pad={w.k_pad}")
        tile_k, k_splits = best
        cfg = dataclasses.replace(self, tile_k=tile_k, k_splits=k_splits, n_sub=n_sub, stages=stages, fused=fused,
                                  outliers=self.outliers or OUTLIERS_DEFAULT)
        cfg.check(w)
        return cfg

    def check(self, w: SpQRKernelWeight) -> None:
        if self.outliers not in OUTLIER_PATHS:
            raise ValueError(f"outliers={self.outliers!r}: expected one of {OUTLIER_PATHS}")
        if self.fused and not fused_output_ok(self.k_splits, w.out_features, jnp.float32):
            raise ValueError(f"the fused launch needs k_splits <= {MAX_CLUSTER} and N a multiple of 4, got "
                             f"k_splits={self.k_splits}, N={w.out_features}")
        if self.tile_k % K_ALIGN or w.k_pad % self.tile_k:
            raise ValueError(f"tile_k={self.tile_k} must be a multiple of {K_ALIGN} dividing K_pad={w.k_pad}")
        steps = w.k_pad // self.tile_k
        if steps % self.k_splits:
            raise ValueError(f"k_splits={self.k_splits} must divide the {steps} pipeline steps (K_pad/tile_k)")
        if (w.n_pad // CHUNK) % self.n_sub:
            raise ValueError(f"n_sub={self.n_sub} must divide the {w.n_pad // CHUNK} 64-row output tiles")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")


# ---------------------------------------------------------------------------------------------------------- kernel
def spqr_matmul(x2d: jax.Array, w: SpQRKernelWeight, *, config: Optional[KernelConfig] = None,
                out_init: Optional[jax.Array] = None, _variant: str = "full") -> jax.Array:
    """Pallas Mosaic GPU kernel (dense part) + XLA sparse product: x [M, K] (M <= 64, w's dtype) @ W -> [M, N].

    ``out_init`` (tests / benchmark): the buffer the kernel writes in place (pass it NaN-filled to prove every output
    tile is written): float32 [k_splits, N_pad, M_pad] partials, or float32 y [M, N] (dense part) with the fused
    launch (``gptq_matmul.output_buffer_shape``).
    """
    m = check_kernel_input(x2d, w, "SpQR")
    cfg = (config or KernelConfig()).resolved(w, m)
    xk = w.prepare_activations(x2d, _m_pad(m))
    out = spqr_matmul_partials(xk, w, cfg, out_init=out_init, _variant=_variant, m=m)
    if cfg.outliers != "xla" and w.sp_buckets and _variant != "nosparse":
        dense = out if cfg.fused else out.sum(0)[:w.out_features, :m].T  # float32 [m, N]
        if cfg.outliers == "mgpu" and m == 1:
            sums = outlier_sums_mgpu(xk, w.sp_buckets)  # [T + 1], entry T = 0 (rows without outliers)
            return (dense + sums[w.sp_inv[:w.out_features]][None]).astype(x2d.dtype)
        # M = 1: xk's first row as it is; larger M: x^T, so that one gathered column's M values are contiguous.
        y = outlier_product_add(dense, xk[:m].T if m > 1 else xk, w.sp_buckets, w.sp_rows, kmajor=m > 1)
        return y.astype(x2d.dtype)
    sparse = sparse_product(xk[:m], w) if _variant != "nosparse" else None
    if cfg.fused:
        return (out if sparse is None else out + sparse[:m, :w.out_features]).astype(x2d.dtype)
    return _finish(out, sparse, m, w.out_features, x2d.dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def _jit_spqr_matmul(x2d: jax.Array, w: SpQRKernelWeight, config: Optional[KernelConfig] = None) -> jax.Array:
    """spqr_matmul under jit: a model's call sites share one lowering of the kernel."""
    return spqr_matmul(x2d, w, config=config)


def spqr_matmul_partials(xk: jax.Array, w: SpQRKernelWeight, cfg: KernelConfig, *,
                         out_init: Optional[jax.Array] = None, _variant: str = "full",
                         m: Optional[int] = None) -> jax.Array:
    """The bare dense kernel: prepared activations xk [M_pad, K_pad] -> float32 partials [k_splits, N_pad, M_pad],
    or with ``cfg.fused`` the float32 dense product y [m, N] (m = the real rows, default M_pad)."""
    m_pad = xk.shape[0]
    m = m_pad if m is None else m
    fused_out = (m, w.out_features, "float32") if cfg.fused else None
    call = _build_call(m_pad, w.k_pad, w.n_pad, w.bits, w.dtype_name, cfg.tile_k, cfg.stages, cfg.k_splits,
                       cfg.n_sub, out_init is not None, _variant, fused_out)
    args = [xk, w.qweight, w.stats, w.qq]
    return call_with_output(call, args, out_init, cfg, w, m, jnp.float32)


@functools.lru_cache(maxsize=None)
def _build_call(m_pad, k_pad, n_pad, bits, dtype_name, tile_k, stages, k_splits, n_sub, aliased, variant="full",
                fused_out=None):
    """variant (measurements only): "full" / "nosparse" (same kernel); "nostats" skips the statistics arithmetic
    (wrong results; isolates its cost). fused_out: see ``gptq_matmul.launch_kernel``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = jnp.dtype(dtype_name)
    rows = CHUNK * n_sub
    steps = k_pad // tile_k // k_splits
    dequant = _make_dequant(bits, tile_k, dtype_name, skip_stats=variant == "nostats")
    swizzle = 128
    x_transforms = (plgpu.TilingTransform((8, swizzle // dtype.itemsize)), plgpu.SwizzleTransform(swizzle))

    def body(x_gmem, w_gmem, st_gmem, qq_gmem, out_gmem):
        n_idx = jax.lax.axis_index("n")
        split = jax.lax.axis_index("split")
        k0 = split * steps
        in_specs = [
            plgpu.BlockSpec((m_pad, tile_k), lambda k: (0, k0 + k), transforms=x_transforms),
            plgpu.BlockSpec((n_sub, tile_k // CHUNK, bits, 128), lambda k: (n_idx, k0 + k, 0, 0)),
            plgpu.BlockSpec((n_sub, tile_k // K_ALIGN, 3, 128), lambda k: (n_idx, k0 + k, 0, 0)),
            plgpu.BlockSpec((rows // ROW_BLOCK, tile_k // 8), lambda k: (n_idx, k0 + k)),
        ]

        def acc_scope(*acc_refs):
            def step(_, x_smem, w_smem, st_smem, qq_smem):
                blocks = CHUNK // ROW_BLOCK
                a = [dequant(w_smem.at[j], st_smem.at[j], qq_smem.at[pl.ds(j * blocks, blocks), :])
                     for j in range(n_sub)]
                for j in range(n_sub):
                    plgpu.wgmma(acc_refs[j], a[j], x_smem.transpose((1, 0)))
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs,
                                max_concurrent_steps=min(stages, steps))(x_gmem, w_gmem, st_gmem, qq_gmem)
            return [acc_ref[...] for acc_ref in acc_refs]

        accs = pl.run_scoped(acc_scope, *[plgpu.ACC((CHUNK, m_pad), jnp.float32) for _ in range(n_sub)])
        store_output(accs, out_gmem, n_idx=n_idx, split=split, m_pad=m_pad, k_splits=k_splits, fused_out=fused_out)

    return launch_kernel(body, name=f"spqr_w{bits}_m{m_pad}_k{tile_k}_n{rows}", n_pad=n_pad, m_pad=m_pad,
                         rows=rows, k_splits=k_splits, aliased=aliased, fused_out=fused_out)


def _make_dequant(bits, tile_k, dtype_name, skip_stats=False):
    """inline_mgpu function: (w_smem [tile_k/64, bits, 128] i32, st_smem [tile_k/256, 3, 128] i16,
    qq_smem [4, tile_k/8] i32) -> the dequantized A operand [64, tile_k] in the WGMMA register layout."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = jnp.dtype(dtype_name)
    ret = plgpu.ShapeDtypeStruct((CHUNK, tile_k), dtype, layout=plgpu.Layout.WGMMA)
    mant = _MANTISSA[dtype_name]
    magic = float(2**mant)
    ptx_ty = "bf16x2" if dtype_name == "bfloat16" else "f16x2"

    def half2(value: float) -> int:
        return int(np.asarray(value, dtype=dtype).view(np.uint16)) * 0x00010001

    base2 = half2(magic)
    plans = [_extract_plan(f, bits, mant) for f in _half_fields(bits)]
    stat_plans = [_stat_plan(f) for f in range(16)]

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 3, return_type=ret)
    def dequant(ctx, w_ref, st_ref, qq_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, llvm, memref, vector
        import jax.experimental.mosaic.gpu as mgpu

        i32 = ir.IntegerType.get_signless(32)
        f32 = ir.F32Type.get()
        index = ir.IndexType.get()
        vec_ty = ir.VectorType.get((2,), mgpu.utils.dtype_to_ir_type(dtype))

        def ci(v):
            return arith.constant(i32, _i32(v))

        def cf(v):
            return arith.constant(f32, float(v))

        def cidx(v):
            return arith.constant(index, v)

        def asm(ret_ty, args, text, constraints):
            return llvm.inline_asm(ret_ty, args, text, constraints)

        def fma2(a, b, c):
            return asm(i32, [a, b, c], f"fma.rn.{ptx_ty} $0, $1, $2, $3;", "=r,r,r,r")

        def f32_op(op, *args):
            cons = "=f," + ",".join("f" for _ in args)
            operands = ", ".join(f"${i + 1}" for i in range(len(args)))
            return asm(f32, list(args), f"{op}.rn.f32 $0, {operands};", cons)

        def half_to_f32(word, hi):
            part = "hi" if hi else "lo"
            return asm(f32, [word], "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $1; cvt.f32.f16 $0, " + part + "; }",
                       "=f,r")

        def splat(v):  # float32 -> both halves of a 16-bit pair, round to nearest even
            return asm(i32, [v, v], f"cvt.rn.{ptx_ty}.f32 $0, $1, $2;", "=r,f,f")

        tid = mgpu.utils.thread_idx()
        lane = arith.remui(tid, ci(32))
        warp_idx = arith.index_cast(index, arith.divui(tid, ci(32)))
        quad_t = arith.remui(lane, ci(4))
        tid_idx = arith.index_cast(index, tid)

        def stat_value(words, f):
            """Field f as float32 code * 2**k (exact) and k."""
            k, parts = stat_plans[f]
            v = ci(_F32_MAGIC)
            for word, shift, mask in parts:
                w = words[word]
                if shift > 0:
                    w = arith.shrui(w, ci(shift))
                v = or_and(w, ci(mask), v)
            return f32_op("sub", arith.bitcast(f32, v), cf(2.0**23)), k

        def statistic(words, f, z, s):
            """(code - z) * s in float32 with the reference's two roundings."""
            t, k = stat_value(words, f)
            d = f32_op("fma", t, cf(2.0**-k), arith.negf(z))  # t * 2**-k is exact: one rounding of code - z
            return f32_op("mul", d, s)

        regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((CHUNK, tile_k)), dtype=object)
        stat_words = None
        for c in range(tile_k // CHUNK):
            if c % STAT_CHUNKS == 0:
                stat_words = [arith.extui(i32, memref.load(st_ref, [cidx(c // STAT_CHUNKS), cidx(p), tid_idx]))
                              for p in range(3)]
            cc = c % STAT_CHUNKS
            qcol = arith.addi(ci(8 * c), arith.muli(quad_t, ci(2)))  # (group 4c + t) * 2
            q0 = memref.load(qq_ref, [warp_idx, arith.index_cast(index, qcol)])
            q1 = memref.load(qq_ref, [warp_idx, arith.index_cast(index, arith.addi(qcol, ci(1)))])
            if skip_stats:
                scale2 = [q0, q0]
                nb2 = [q1, q1]
            else:
                s_s, z_s = half_to_f32(q0, False), half_to_f32(q0, True)
                s_z, z_z = half_to_f32(q1, False), half_to_f32(q1, True)
                scale2, nb2 = [], []
                for h in range(2):  # row r, row r + 8
                    scale = statistic(stat_words, 4 * cc + 2 * h, z_s, s_s)
                    zero = statistic(stat_words, 4 * cc + 2 * h + 1, z_z, s_z)
                    nb = arith.negf(f32_op("mul", scale, zero))
                    scale2.append(splat(scale))
                    nb2.append(splat(nb))
            words = [memref.load(w_ref, [cidx(c), cidx(p), tid_idx]) for p in range(bits)]
            shifted = {}
            for P, (k, parts) in enumerate(plans):
                j, p = divmod(P, 4)
                kc, h = 2 * j + p // 2, p % 2
                v = ci(base2)
                for word, shift, mask in parts:
                    if (word, shift) not in shifted:
                        w = words[word]
                        shifted[(word, shift)] = (arith.shrui(w, ci(shift)) if shift > 0 else
                                                  arith.shli(w, ci(-shift)) if shift < 0 else w)
                    v = or_and(shifted[(word, shift)], ci(mask), v)
                code = fma2(v, ci(half2(2.0**-k)), ci(half2(-magic * 2.0**-k)))  # exact
                wv = fma2(code, scale2[h], nb2[h])
                regs[0, c * 8 + kc, 0, 0, h, 0, 0, 0, 0] = vector.bitcast(
                    vec_ty, vector.broadcast(ir.VectorType.get((1,), i32), wv))
        return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

    return dequant
