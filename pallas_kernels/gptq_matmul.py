"""GPTQ-format dequantize-and-matmul for decode-sized activations: Mosaic GPU (Hopper) Pallas kernel + jnp reference.

Computation (y = x @ W, W[k, n] = scales[g, n] * (code[k, n] - zero[g, n]), g = group of row k):

    x [M, K] (bfloat16 or float16, M <= 64 on the kernel path)  ->  y [M, N] in x's dtype, accumulated in float32.

The kernel computes the transposed product y^T = W^T x^T so that the weight is the 64-row A operand of the Hopper
``wgmma`` instruction (dequantized in registers) and the few activation rows are its N operand (8..64 wide): the
tensor cores do no wasted work at batch 1, and the weight bytes (the only large stream) are read exactly once.

Kernel layout (built once at load time by :func:`pack`, a :class:`GPTQKernelWeight` pytree):

  qweight [N_pad/64, K_pad/64, bits, 128] int32: for every 64x64 tile of W^T (64 output rows x 64 input columns)
      ``bits`` planes of one 32-bit word per thread of the warpgroup. Thread t holds exactly the 32 codes of its
      ``wgmma`` A-fragment registers (rows 16*(t//32) + (t%32)//4 (+8), columns 2*(t%4) (+1, +8, +9) of each 16-wide
      k slice); the two codes of one bf16x2 register sit at bits s and 16+s of the same word, so one shift and one
      mask put both into place (``_fields`` lists every position; the reference decodes through the same table).
      3-bit codes (layout "halves", the default): five codes per 16-bit half at bits 0, 3, .., 12 of the three planes
      (pairs 0-14) and pair 15 spread over the three bit-15s; the first layout ("planes": a 2-bit plane pair + a
      plane of high bits, two fields per code) stays selectable in ``pack``.
  scales  [G_k, N_pad] in the activation dtype; group of input column k is k // group (group = a multiple of 64).
  nbias   [G_k, N_pad] = -(magic + zero), asymmetric weights only (symmetric: zero = 2**(bits-1), a constant).
  perm    [K_pad] int32 or None: activation column feeding each kernel row (act-order weights are sorted by group at
      pack time; value K = a zero column for padding). None when the rows are already in group order.

Dequantization in registers (per bf16x2 / f16x2 register, 2 weights): ``v = ((word >> s) & mask) | magic`` (one PTX
``lop3`` per field, ``or_and``) is the float ``magic + code * 2**k`` (magic = 128 for bf16, 1024 for f16;
``_extract_plan``: a code is shifted only as far as needed to lie inside the mantissa, at bit k, so neighbouring codes
share one shift and the first ones need none),
then ``w = fma(fma(v, 2**-k, nbias_k), scale, -0)`` with nbias_k = -(magic * 2**-k + zero) (derived once per group):
an exact ``code - zero`` and one rounding of ``scale * (code - zero)``, the same value as the reference's float32
product rounded to the activation dtype. With ``KernelConfig.post_scale`` (the default of the one-warpgroup kernel)
the second FMA is dropped: the wgmma multiplies the exact ``code - zero`` (one wgmma per group of the step) and
``_make_scale_add`` applies each group's scales to the float32 product (one FMA per accumulator element instead of one
per weight pair, and no rounding of the weights).

Kernel grid: (N_pad/(64*n_sub) output tiles, k_splits); each CTA (one warpgroup) streams its K range through an
``emit_pipeline`` of TMA copies (``stages`` deep, ``tile_k`` columns a step). Launch (``launch_kernel``, shared with
the LUT and SpQR kernels): with k_splits > 1 each CTA writes a float32 partial [64*n_sub, M_pad] and the wrapper sums
them (one small XLA fusion with the transpose and the cast); with one split (the default for 4-bit weights with
>= 3 output tiles per SM at M <= 16) the kernel stores y [M, N] itself ("fused": the call is one kernel; a cluster
variant for k_splits > 1 exists but measured slower). Measured on an H100 (bench/NOTES_kernels.md, CUPTI device
time, same-run bf16): 8192x28672 g128 at M = 1: int4 52.4 us path = 3.01x the bf16 XLA GEMV (kernel 50.9 us,
2.45 TB/s), int3 46.1 us = 3.42x (kernel 42.7 us).

Warp-specialized variant (``KernelConfig(variant="ws")``, ``build_ws_kernel``, the GPTQ and LUT formats entering
through their side inputs, dequantization and product; ``_build_ws_call`` here): a persistent grid of CTAs with one
TMA-issuing warpgroup and two compute warpgroups (each one 64-row tile of a 128-row unit, sharing the activation
tile); stream-K float32 partial slots (any grid: CTAs run q or q + 1 consecutive (unit, k-step) pairs, ``ws_plan``),
or (``fused``) whole units per CTA with y stored by the warpgroups. Defaults for GPTQ 4-bit at M_pad = 8: fused on
shapes like 8192x28672 (``ws_default_ok``: 50.4 us path = 3.16x bf16 vs 52.0 us = 3.06x for the one-warpgroup kernel
in the same run, bench/NOTES_kernels.md, "Warp-specialized kernel"); stream-K on 132 CTAs where every SM gets >= 8
steps (``ws_stream_ok``: the LLaMA-7B q/k/v, gate/up and down shapes, e.g. 4096x22016 22.5 vs 26.7 us path; decode
step 2.40 vs 2.55 ms at batch 1, bench/results/decode.md). GPTQ 3-bit at M < 8 on shapes like 8192x28672: stream-K
at tile_k 512 with the scales after the wgmma (``ws_stream_tile_k``: 42.5 vs 45.2 us path at M = 1).

Activations at M < 8 (``KernelConfig.direct_x``): x [M, K] reaches the kernel unpadded (no XLA pad op before the
call): each step's TMA copies plain [M, tile_k/64, 64] boxes and every compute warpgroup stages the M rows into a
zeroed, swizzled [8, tile_k] SMEM tile for its wgmma (``_make_x_stage``). Default for the ws kernel and for the
one-warpgroup kernel up to DIRECT_X_MAX_STEPS_PER_SM; H100, same run: 8192x28672 int4 M = 1 (ws fused) 47.4 us path
= 3.34x bf16 vs 50.5 us = 3.14x with the pad; LLaMA-7B layer shapes -1.0..-1.8 us per call (bench/NOTES_kernels.md,
"Unpadded activations").
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

KERNEL_BITS = (2, 3, 4)
CHUNK = 64  # K and N granularity of the layout (one wgmma A tile is 64 x 64 at 128-byte swizzle)
K_ALIGN = 256  # K_pad is a multiple of this, so every tile_k in (64, 128, 256) divides it
MAX_KERNEL_M = 64  # activation rows one kernel call takes (the wgmma N operand); larger M: see below
# Prefill (M > MAX_KERNEL_M) on GPU: up to PREFILL_CHUNKED_MAX_M rows the kernel runs over 64-row chunks (the weight
# is re-read per chunk), above it the weight is dequantized once (scatter-free decode of the kernel layout) for one
# XLA matmul. Measured (H100, CUPTI device time, int4 g128, `bench/kernels.py --prefill-paths`, 2026-11-22): the
# chunks win at every M measured, 128..2048 on 8192x28672 (M = 128: 175 us vs 9058 us dequantize-once; M = 2048:
# 3005 vs 10203) and on 4096x11008 (49 vs 1746; 833 vs 1997). Beyond 2048 not measured: the two measured lines
# (chunks ~1.47 / 0.41 us per row, dequantize-once ~8.9 / 1.7 ms + 0.6 / 0.13 us per row) cross near M = 10000 and
# M = 6200, so the chunks are kept up to 4096. This decode is slow in XLA (9 ms for 8192x28672, ~35x a copy of its
# 0.6 GB): the XLA dequantize + matmul of the AutoGPTQ arrays, not available from this layout, beat the chunks at
# 4096x11008 M = 2048 (612 vs 833 us); a faster one-pass decode (e.g. a Pallas kernel) would move the threshold down.
PREFILL_CHUNKED_MAX_M = 4096
_MAGIC = {"bfloat16": 128.0, "float16": 1024.0}
_MANTISSA = {"bfloat16": 7, "float16": 10}  # magic = 2**mantissa


# ------------------------------------------------------------------------------------------------- register layout
def _thread_coords() -> tuple[np.ndarray, np.ndarray]:
    """(row, col) [128 threads, 16 pairs, 2 elements] inside a 64x64 tile of W^T for every code a thread holds.

    Pair P = 4*j + p is register p of k-slice j in the order of Mosaic GPU's WGMMA layout (wgmma A fragment):
    p = 0: (row r, cols c, c+1), 1: (r+8, c..), 2: (r, c+8..), 3: (r+8, c+8..) with r = 16*warp + lane//4,
    c = 16*j + 2*(lane % 4).
    """
    t = np.arange(128)[:, None, None]
    pair = np.arange(16)[None, :, None]
    elem = np.arange(2)[None, None, :]
    warp, lane = t // 32, t % 32
    j, p = pair // 4, pair % 4
    row = 16 * warp + lane // 4 + 8 * (p % 2)
    col = 16 * j + 8 * (p // 2) + 2 * (lane % 4) + elem
    return np.broadcast_to(row, (128, 16, 2)), np.broadcast_to(col, (128, 16, 2))


LAYOUTS = ("halves", "planes")  # code layouts; they differ for 3-bit codes only (module docstring)
DEFAULT_LAYOUT = "halves"  # measured faster than "planes" at every shape and M (bench/NOTES_kernels.md)


def _fields(bits: int, layout: str = DEFAULT_LAYOUT) -> list[list[tuple[int, int, int, int]]]:
    """For each pair P: the bit fields [(plane, word_shift, width, code_shift)] that make up its two codes.

    Element e of the pair sits at bit ``16*e + word_shift`` of ``plane``; ``code_shift`` is where those ``width``
    bits go inside the code. Decoding pair P: OR over fields of ((word[plane] >> word_shift) & mask) << code_shift
    (with both 16-bit halves at once); the kernel reads them through ``_extract_plan``.

    3-bit layouts: "halves" = five 3-bit codes per 16-bit half at bits 0, 3, .., 12 of planes 0-2 (pairs 0-14) and
    pair 15 spread over the three bit-15s; "planes" (the first kernel's layout) = a 2-bit plane pair + a plane of
    high bits (two fields per code: about twice the integer instructions).
    """
    if bits not in KERNEL_BITS:
        raise ValueError(f"the GPTQ kernel supports {KERNEL_BITS}-bit codes, got bits={bits}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown GPTQ kernel code layout {layout!r}; expected one of {LAYOUTS}")
    out = []
    for P in range(16):
        if bits == 4:
            out.append([(P // 4, 4 * (P % 4), 4, 0)])
        elif bits == 2:
            out.append([(P // 8, 2 * (P % 8), 2, 0)])
        elif layout == "halves":
            out.append([(P // 5, 3 * (P % 5), 3, 0)] if P < 15 else [(i, 15, 1, i) for i in range(3)])
        else:  # 3 bits, "planes": low 2 bits as for 2-bit codes, the high bit in plane 2 at bit P
            out.append([(P // 8, 2 * (P % 8), 2, 0), (2, P, 1, 2)])
    return out


def _extract_plan(fields, bits: int, mantissa: int):
    """How the kernel reads one pair (both halves at once) into the mantissa of the magic float: (k, [(plane,
    shift, mask)]) with ``v = magic_bits | OR((word[plane] >> shift) & mask)`` = the float magic + code * 2**k.

    A single field is moved only as far as needed to fit the mantissa: the shift is a multiple of the window
    W = mantissa + 1 - bits (so neighbouring codes share one shifted word) and the code lands at bit k < W; a
    negative shift is a left shift. Several fields (split codes) are assembled at k = 0."""
    if len(fields) == 1:
        (plane, src, width, _), = fields
        window = mantissa + 1 - bits
        shift = window * (src // window)
        k = src - shift
        return k, [(plane, shift, ((2**width - 1) << k) * 0x00010001)]
    return 0, [(plane, src - code_bit, ((2**width - 1) << code_bit) * 0x00010001)
               for plane, src, width, code_bit in fields]


def _pack_tiles(codes_nk: jax.Array, bits: int, layout: str = DEFAULT_LAYOUT) -> jax.Array:
    """codes [N_pad, K_pad] (W^T) -> qweight [N_pad/64, K_pad/64, bits, 128] int32 (module docstring layout)."""
    n, k = codes_nk.shape
    row, col = _thread_coords()
    tiles = codes_nk.astype(jnp.uint32).reshape(n // CHUNK, CHUNK, k // CHUNK, CHUNK).transpose(0, 2, 1, 3)
    vals = tiles[:, :, row, col]  # [Nt, Kt, 128, 16, 2]
    planes = [jnp.zeros(vals.shape[:3], jnp.uint32) for _ in range(bits)]
    for P, fields in enumerate(_fields(bits, layout)):
        for plane, word_shift, width, code_shift in fields:
            part = (vals[:, :, :, P, :] >> code_shift) & (2**width - 1)  # [Nt, Kt, 128, 2]
            planes[plane] = planes[plane] | (part[..., 0] << word_shift) | (part[..., 1] << (16 + word_shift))
    words = jnp.stack(planes, axis=2)  # [Nt, Kt, bits, 128]
    return jax.lax.bitcast_convert_type(words, jnp.int32)


def _unpack_tiles(qweight: jax.Array, bits: int, layout: str = DEFAULT_LAYOUT) -> jax.Array:
    """Exact inverse of _pack_tiles through the kernel's own bit extraction: qweight -> codes [N_pad, K_pad] int32."""
    nt, kt = qweight.shape[:2]
    words = jax.lax.bitcast_convert_type(qweight, jnp.uint32)  # [Nt, Kt, bits, 128]
    pairs = []
    for fields in _fields(bits, layout):
        v = jnp.zeros((nt, kt, 128), jnp.uint32)
        for plane, word_shift, width, code_shift in fields:
            mask = (2**width - 1) * 0x00010001
            v = v | (((words[:, :, plane] >> word_shift) & mask) << code_shift)
        pairs.append(jnp.stack([v & 0xFFFF, v >> 16], axis=-1))
    return _fragments_to_nk(jnp.stack(pairs, axis=3).astype(jnp.int32))


def _fragments_to_nk(vals: jax.Array) -> jax.Array:
    """[Nt, Kt, 128 threads, 16 pairs, 2] in the wgmma A-fragment order of _thread_coords -> [Nt*64, Kt*64] (W^T).

    A pure reshape + transpose (no scatter: XLA's scatter made the prefill path 68x slower than bf16 on the H100):
    thread t = 32*warp + 4*lq + lr and pair P = 4*j + 2*ph + pr sit at row 16*warp + 8*pr + lq and column
    16*j + 8*ph + 2*lr + e of the 64x64 tile."""
    nt, kt = vals.shape[:2]
    v = vals.reshape(nt, kt, 4, 8, 4, 4, 2, 2, 2)  # (Nt, Kt, warp, lq, lr, j, ph, pr, e)
    return v.transpose(0, 2, 7, 3, 1, 5, 6, 4, 8).reshape(nt * CHUNK, kt * CHUNK)


# ------------------------------------------------------------------------------------------------ kernel-layout pytree
class KernelWeightShape:
    """Shape properties shared by the kernel-layout weights (GPTQ, LUT, SpQR): qweight [N_pad/64, K_pad/64, ...],
    ``in_features`` / ``out_features`` (K, N) and the activation dtype's name."""

    takes_rms_norm = False  # ``matmul`` has the ``rms_norm`` argument (the ws kernel can fuse the norm: GPTQ, LUT)
    takes_partial_sums = False  # ``matmul`` has the ``partial_sums`` argument (GPTQ, LUT)
    stages_swiglu = False  # the SwiGLU staging measured faster than XLA's SiLU * up for this format (LUT; see GPTQ)

    @property
    def fuses_rms_norm(self) -> bool:
        """Whether models hand this weight's ``matmul`` an RMSNorm's input and scale (models.common.NormedInput)
        instead of the normalised x: ``takes_rms_norm`` and FUSED_NORM_DEFAULT."""
        return self.takes_rms_norm and FUSED_NORM_DEFAULT

    @property
    def takes_swiglu_slots(self) -> bool:
        """Whether models hand this weight's ``matmul`` a ``SwiGLUSlots`` (models.common.swiglu_slots_layout):
        ``stages_swiglu`` and SWIGLU_STAGING_DEFAULT. (GPTQ and LUT ``matmul`` take one either way.)"""
        return self.stages_swiglu and SWIGLU_STAGING_DEFAULT

    @property
    def shape(self) -> tuple[int, int]:
        return (self.in_features, self.out_features)

    @property
    def dtype(self):
        return jnp.dtype(self.dtype_name)

    @property
    def k_pad(self) -> int:
        return self.qweight.shape[1] * CHUNK

    @property
    def n_pad(self) -> int:
        return self.qweight.shape[0] * CHUNK

    def direct_activations(self, x2d: jax.Array) -> jax.Array:
        """x [M, K] -> the unpadded view [M, K_x/64, 64] the kernels' direct_x path reads (``_make_x_stage``): x
        itself when K is a multiple of 64 (a bitcast; the kernel's TMA zero-fills the columns K..K_pad), else x
        with its columns padded to K_pad; act-order GPTQ weights gather x into kernel row order ([M, K_pad])."""
        m, k = x2d.shape
        x2d = x2d.astype(self.dtype)
        perm = getattr(self, "perm", None)
        if perm is not None:
            x2d = gather_columns(x2d, perm)
        elif k % CHUNK:
            x2d = jnp.pad(x2d, ((0, 0), (0, self.k_pad - k)))
        return x2d.reshape(m, x2d.shape[1] // CHUNK, CHUNK)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["qweight", "scales", "nbias", "perm"],
    meta_fields=["bits", "group", "in_features", "out_features", "dtype_name", "layout"],
)
@dataclasses.dataclass(frozen=True)
class GPTQKernelWeight(KernelWeightShape):
    """A GPTQ weight in the kernel layout (module docstring); ``matmul`` runs the Pallas kernel on GPU.

    Shapes: qweight [N_pad/64, K_pad/64, bits, 128] int32, scales / nbias [G_k, N_pad], perm [K_pad] or None;
    K = in_features, N = out_features, K_pad = G_k * group (a multiple of 256), N_pad = ceil(N / 64) * 64.
    """

    qweight: jax.Array
    scales: jax.Array
    nbias: Optional[jax.Array]
    perm: Optional[jax.Array]
    bits: int
    group: int
    in_features: int
    out_features: int
    dtype_name: str
    layout: str = DEFAULT_LAYOUT  # bit layout of the codes (``_fields``); matters for 3-bit codes only
    takes_rms_norm = True
    takes_partial_sums = True
    # ``matmul`` takes a SwiGLUSlots, but the models do not hand it one: on the H100 (LLaMA-7B decode MLP at M = 1,
    # bench/NOTES_kernels.md, "SwiGLU staging") the norm-fused gate/up kernel storing "mn" slots ran 1.2 us slower
    # (21.8 -> 23.0 us) and the down kernel's staging 0.9 us slower, which ate the 1.7 us XLA kernel they save
    # (37.7 vs 37.6-37.8 us per layer); since then an unstaged down projection runs the one-warpgroup kernel
    # (``plain_decode_blocks``, ~0.8 us faster than the ws launch the staging needs)
    stages_swiglu = False

    @property
    def nbytes(self) -> int:
        arrays = [a for a in (self.qweight, self.scales, self.nbias, self.perm) if a is not None]
        return sum(a.size * a.dtype.itemsize for a in arrays)

    def codes_kn(self) -> jax.Array:
        """Codes [K_pad, N_pad] in kernel row order (rows sorted by group for act-order weights)."""
        return _unpack_tiles(self.qweight, self.bits, self.layout).T

    def dequantize_nk_padded(self) -> jax.Array:
        """W^T [N_pad, K_pad] (kernel row order along K) in the activation dtype: round(scale * (code - zero)),
        elementwise over the decoded codes (no gather, no scatter): the dequantize-once prefill path."""
        magic = _MAGIC[self.dtype_name]
        codes = _unpack_tiles(self.qweight, self.bits, self.layout).astype(jnp.float32)  # [N_pad, K_pad]
        codes = codes.reshape(self.n_pad, self.k_pad // self.group, self.group)
        nbias = (self.nbias.astype(jnp.float32).T[:, :, None] if self.nbias is not None
                 else jnp.float32(-(magic + 2 ** (self.bits - 1))))
        w = (codes + magic + nbias) * self.scales.astype(jnp.float32).T[:, :, None]  # exact code - zero, one rounding
        return w.astype(self.dtype).reshape(self.n_pad, self.k_pad)

    def dequantize_padded(self) -> jax.Array:
        """W [K_pad, N_pad] in kernel row order, in the activation dtype: round(scale * (code - zero))."""
        return self.dequantize_nk_padded().T

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Dense W [K, N] in the original input order (for checks; the kernel never builds it)."""
        w = self.dequantize_padded().astype(dtype)
        if self.perm is None:
            return w[: self.in_features, : self.out_features]
        dense = jnp.zeros((self.in_features + 1, self.n_pad), dtype).at[self.perm].set(w)
        return dense[: self.in_features, : self.out_features]

    def prepare_activations(self, x2d: jax.Array, m_pad: int) -> jax.Array:
        """x [M, K] -> [m_pad, K_pad] in kernel row order: the act-order gather over M x K and zero padding."""
        m, k = x2d.shape
        x2d = x2d.astype(self.dtype)
        if self.perm is not None:
            return jnp.pad(gather_columns(x2d, self.perm), ((0, m_pad - m), (0, 0)))
        return jnp.pad(x2d, ((0, m_pad - m), (0, self.k_pad - k)))

    def matmul(self, x: jax.Array, *, use_kernel: Optional[bool] = None, config: Optional["KernelConfig"] = None,
               rms_norm=None, partial_sums: bool = False):
        """x [..., K] -> x @ W [..., N] in x's dtype, accumulated in float32.

        With ``use_kernel`` (default: the default backend is a GPU and x's dtype is the packed dtype), M =
        prod(leading dims) rows go to: M <= MAX_KERNEL_M: the Pallas kernel; M <= PREFILL_CHUNKED_MAX_M: the kernel
        over 64-row chunks; larger M: dequantize once + one XLA matmul (``dequant_matmul``). Without: the XLA
        reference (the same dequantize-once computation). ``rms_norm`` = (scale [K], eps): rms_norm_rows(x) @ W,
        the norm inside the kernel where ``fused_norm_ok`` (M <= MAX_KERNEL_M), else applied to x first.
        ``partial_sums``: where the kernel leaves partial slots, return them unsummed (``PartialSums`` of [M, N];
        True / "nm", or "mn": ``gptq_matmul``). x may be a ``SwiGLUSlots`` (the kernel computes it while staging
        where ``swiglu_staging_ok``, else XLA does first).
        """
        if isinstance(x, SwiGLUSlots):
            y = swiglu_matmul(x, self, use_kernel, config, gptq_matmul_partials)
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
            y = _jit_gptq_matmul(x2d, self, config, *(rms_norm or ()), partial_sums=partial_sums)
            if isinstance(y, PartialSums):
                return y
        elif m <= PREFILL_CHUNKED_MAX_M:
            y = chunked_matmul(x2d, self, functools.partial(_jit_gptq_matmul, config=config))
        else:
            y = _jit_dequant_matmul(x2d, self)
        return y.reshape(*lead, self.out_features)


def _row_plan(g_idx: np.ndarray, G: int):
    """Kernel row order for input columns with groups g_idx [K]: (group, K_pad, src_rows [K_pad], perm or None).

    src_rows[r] is the input column feeding kernel row r (K = padding). Rows keep their order when the groups are
    contiguous runs of one size (the last may be shorter); otherwise (act-order) they are sorted by group and every
    group gets ``group`` slots. Raises ValueError for layouts the kernel cannot take.
    """
    g_idx = g_idx.astype(np.int64)
    K = g_idx.shape[0]
    if K == 0 or g_idx.min() < 0 or g_idx.max() >= G:
        raise ValueError(f"g_idx must be non-empty with values in [0, {G})")
    counts = np.bincount(g_idx, minlength=G)
    if G == 1:
        # Per output channel: one group spanning the padded K.
        group = k_pad = split_friendly_k_pad(_round_up(K, K_ALIGN), K_ALIGN)
        return group, k_pad, np.arange(k_pad), None
    if counts.max() % CHUNK:
        raise ValueError(f"the GPTQ kernel needs group sizes that are multiples of {CHUNK}; the largest group has "
                         f"{counts.max()} rows")
    group = int(counts.max())
    k_pad = split_friendly_k_pad(_round_up(G * group, math.lcm(group, K_ALIGN)), group)
    if np.all(np.diff(g_idx) >= 0) and np.all(counts[:-1] == group):
        return group, k_pad, np.arange(k_pad), None
    order = np.argsort(g_idx, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(K) - starts[g_idx[order]] + g_idx[order] * group
    src_rows = np.full(k_pad, K, np.int64)
    src_rows[slot] = order
    return group, k_pad, src_rows, jnp.asarray(src_rows, jnp.int32)


def split_friendly_k_pad(k_pad: int, group: int) -> int:
    """From 16 blocks of K_ALIGN on, K_pad rounded up to a multiple of 4 blocks (and of ``group``), so that K splits 4
    ways at tile_k 256: K = 11008 = 43 x 256 otherwise left only tile_k 64 (GPTQ / LUT 11008x4096 kernel 18.6 / 19.5 us
    at 1.3 TB/s on the H100) or one split (SpQR's measured 30 us -> 13.4 us with this padding, +2.3% bytes)."""
    if k_pad // K_ALIGN >= 16:
        return _round_up(k_pad, math.lcm(group, 4 * K_ALIGN))
    return k_pad


def check_packable(g_idx, num_groups: int, bits: int) -> None:
    """Raise ValueError (naming the problem) if a GPTQ weight with these groups / bits cannot use the kernel."""
    _fields(bits)
    _row_plan(np.asarray(g_idx), num_groups)


def pack(codes_kn, scales, zeros, g_idx, *, bits: int, sym: bool, dtype=jnp.bfloat16,
         layout: str = DEFAULT_LAYOUT) -> GPTQKernelWeight:
    """Convert a GPTQ weight (unpacked arrays) into the kernel layout; done once at load time.

    codes_kn [K, N] integer codes, scales / zeros [G, N] (zeros are plain zero codes), g_idx [K] group of each input
    column (any order: act-order rows are sorted by group here and ``perm`` gathers x's columns to match).
    ``sym`` with every zero equal to 2**(bits-1) drops the zero array (the kernel uses the constant).
    ``layout``: the code bit layout (``_fields``; "planes" keeps the first kernel's 3-bit layout for comparison).
    g_idx must be concrete (it decides the static row order); the other arrays may live on any device.
    """
    dtype_name = jnp.dtype(dtype).name
    if dtype_name not in _MAGIC:
        raise ValueError(f"the GPTQ kernel computes in bfloat16 or float16, got {dtype_name}")
    _fields(bits, layout)  # validates bits and layout
    codes_kn = jnp.asarray(codes_kn)
    K, N = codes_kn.shape
    scales = jnp.asarray(scales)
    G = scales.shape[0]
    if scales.shape != (G, N) or jnp.shape(zeros) != (G, N) or np.shape(g_idx) != (K,):
        raise ValueError(f"expected scales / zeros [G, {N}] and g_idx [{K}], got {scales.shape}, "
                         f"{jnp.shape(zeros)}, {np.shape(g_idx)}")
    group, k_pad, src_rows, perm = _row_plan(np.asarray(g_idx), G)
    n_pad = _round_up(N, CHUNK)
    g_k = k_pad // group

    codes_ext = jnp.concatenate([codes_kn.astype(jnp.int32), jnp.zeros((1, N), jnp.int32)], axis=0)
    codes_pad = jnp.pad(codes_ext[jnp.asarray(np.minimum(src_rows, K))], ((0, 0), (0, n_pad - N)))
    qweight = _pack_tiles(codes_pad.T, bits, layout)

    def by_group(a, fill):
        a = jnp.asarray(a)
        return jnp.pad(a, ((0, g_k - G), (0, n_pad - N)), constant_values=fill)

    magic = _MAGIC[dtype_name]
    scales_k = by_group(scales.astype(jnp.float32), 0.0).astype(dtype)
    zeros = jnp.asarray(zeros)
    sym_zero = 2 ** (bits - 1)
    try:  # symmetric weights whose zeros are all 2**(bits-1) need no zero array (concrete zeros only)
        drop_zeros = sym and bool(jnp.all(zeros == sym_zero))
    except jax.errors.ConcretizationTypeError:
        drop_zeros = False
    nbias = None if drop_zeros else (-(by_group(zeros.astype(jnp.float32), sym_zero) + magic)).astype(dtype)
    return GPTQKernelWeight(qweight=qweight, scales=scales_k, nbias=nbias, perm=perm, bits=bits, group=group,
                            in_features=K, out_features=N, dtype_name=dtype_name, layout=layout)


def gather_columns(x2d: jax.Array, index: jax.Array) -> jax.Array:
    """x [M, K] -> x[:, index] [M, len(index)], where index == K selects a zero column (kernel padding)."""
    return jnp.concatenate([x2d, jnp.zeros((x2d.shape[0], 1), x2d.dtype)], axis=1)[:, index]


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


# ------------------------------------------------------------------------------------------------------ references
def dequant_matmul(x2d: jax.Array, w: GPTQKernelWeight) -> jax.Array:
    """Pure-jnp x [M, K] @ W -> [M, N] in x's dtype: dequantize the kernel layout once into W^T [N_pad, K_pad]
    (elementwise decode + transpose, no scatter), one XLA matmul contracting K (the reference, and the large-M path
    on GPU)."""
    xk = w.prepare_activations(x2d, x2d.shape[0]).astype(x2d.dtype)
    # matmul with a transposed operand (XLA folds it into the GEMM); a plain dot_general contracting W^T's minor
    # dim has no bf16 x bf16 -> f32 CPU thunk in jax 0.10
    y = jnp.matmul(xk, w.dequantize_nk_padded().astype(x2d.dtype).T, preferred_element_type=jnp.float32)
    return y[:, : w.out_features].astype(x2d.dtype)


reference_matmul = dequant_matmul


def chunked_matmul(x2d: jax.Array, w, chunk_fn, chunk: int = MAX_KERNEL_M) -> jax.Array:
    """x [M, K] (any M >= 1) -> [M, N]: ``chunk_fn(x_rows, w)`` over consecutive ``chunk``-row slices (the last one
    shorter), concatenated. On GPU chunk_fn is the jitted kernel (one lowering shared by every chunk); tests pass
    a reference. Shared by the GPTQ / LUT / SpQR weights."""
    m = x2d.shape[0]
    if m < 1:
        raise ValueError(f"chunked_matmul needs at least one activation row, got {m}")
    ys = [chunk_fn(x2d[i:i + chunk], w) for i in range(0, m, chunk)]
    return ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=0)


def reference_matmul_tiled(x2d: jax.Array, w: GPTQKernelWeight, config: "KernelConfig") -> jax.Array:
    """The kernel's exact block decomposition in jnp: per (output tile, k split, pipeline step) the same blocks of
    qweight / scales / nbias the kernel's index maps select, decoded with the kernel's bit fields, float32 partials
    summed over splits as the wrapper does. For CPU tests of the tiling logic."""
    m = x2d.shape[0]
    m_pad = _m_pad(m)
    cfg = config.resolved(w, m)
    if cfg.direct_x:
        xk = staged_x_reference(w.direct_activations(x2d), w.k_pad, cfg.tile_k).astype(w.dtype)
    else:
        xk = w.prepare_activations(x2d, m_pad)
    if cfg.variant == "ws":
        partials = reference_ws_partials(xk, w, cfg, lambda tile, k, x_blk: _block_product(
            w, tile, k, cfg.tile_k, x_blk, cfg.post_scale))
        return _finish(partials, m, w.out_features, x2d.dtype)
    steps = w.k_pad // cfg.tile_k // cfg.k_splits
    out = jnp.zeros((cfg.k_splits, w.n_pad, m_pad), jnp.float32)
    rows = CHUNK * cfg.n_sub
    for n_idx in range(w.n_pad // rows):  # CTA grid (n, split), as the kernel's mesh
        for split in range(cfg.k_splits):
            accs = [jnp.zeros((CHUNK, m_pad), jnp.float32) for _ in range(cfg.n_sub)]
            for step in range(steps):
                kb = split * steps + step
                x_blk = xk[:, kb * cfg.tile_k:(kb + 1) * cfg.tile_k]
                for j in range(cfg.n_sub):
                    accs[j] = accs[j] + _block_product(w, n_idx * cfg.n_sub + j, kb, cfg.tile_k, x_blk,
                                                       cfg.post_scale)
            out = out.at[split, n_idx * rows:(n_idx + 1) * rows].set(jnp.concatenate(accs, axis=0))
    return _finish(out, m, w.out_features, x2d.dtype)


def _decoded_block(w: GPTQKernelWeight, tile: int, kb: int, tile_k: int, scaled: bool = True) -> jax.Array:
    """The dequantized A operand [64, tile_k] of output tile ``tile`` at pipeline step ``kb`` (kernel arithmetic:
    the float32 product rounded once to w's dtype); ``scaled=False``: the exact integers code - zero."""
    gps = max(1, tile_k // w.group)
    magic = _MAGIC[w.dtype_name]
    srow = _scale_block_index(kb, tile_k, w.group) * gps
    cols = slice(tile * CHUNK, (tile + 1) * CHUNK)
    grp = (jnp.arange(tile_k) // CHUNK * CHUNK) // w.group if gps > 1 else jnp.zeros(tile_k, jnp.int32)
    codes = _unpack_tiles(w.qweight[tile:tile + 1, kb * tile_k // CHUNK:(kb + 1) * tile_k // CHUNK],
                          w.bits, w.layout).astype(jnp.float32)
    nb = (jnp.float32(-(magic + 2 ** (w.bits - 1))) if w.nbias is None
          else w.nbias[srow:srow + gps, cols].astype(jnp.float32).T[:, grp])
    if not scaled:
        return (codes + magic + nb).astype(w.dtype)
    return ((codes + magic + nb) * w.scales[srow:srow + gps, cols].astype(jnp.float32).T[:, grp]).astype(w.dtype)


def _block_product(w: GPTQKernelWeight, tile: int, kb: int, tile_k: int, x_blk: jax.Array,
                   post_scale: bool) -> jax.Array:
    """One pipeline step of one 64-row output tile, float32 [64, M_pad], as the kernel computes it: the dequantized
    block times x_blk^T, or (``post_scale``) per group the exact integers code - zero times x_blk^T, scaled by the
    group's scales in float32 and summed."""
    if not post_scale:
        return jnp.matmul(_decoded_block(w, tile, kb, tile_k), x_blk.T, preferred_element_type=jnp.float32)
    d = _decoded_block(w, tile, kb, tile_k, scaled=False)
    gps, gk = max(1, tile_k // w.group), min(tile_k, w.group)
    srow = _scale_block_index(kb, tile_k, w.group) * gps
    acc = jnp.zeros((CHUNK, x_blk.shape[0]), jnp.float32)
    for g in range(gps):
        part = slice(g * gk, (g + 1) * gk)
        prod = jnp.matmul(d[:, part], x_blk[:, part].T, preferred_element_type=jnp.float32)
        acc = acc + prod * w.scales[srow + g, tile * CHUNK:(tile + 1) * CHUNK].astype(jnp.float32)[:, None]
    return acc


def reference_ws_partials(xk, w, cfg: "KernelConfig", block_product) -> jax.Array:
    """The ws kernel's stream-K schedule in jnp (``ws_step``) -> float32 partial slots [slots, N_pad, M_pad]: per CTA
    and grid step the warpgroups' 64-row tiles (``block_product(tile, k_block, x_blk)`` -> float32 [64, M_pad], as
    the kernel computes it; a CTA's repeated last pair included, unstored), accumulators stored to their partial slot
    at each flush and then reset (multiplied by 0, as the kernel does), zeros into the slots a unit's pieces do not
    fill. Unwritten partials stay NaN, so a schedule gap fails the tests. Shared by the GPTQ and LUT references."""
    spu = w.k_pad // cfg.tile_k
    units = w.n_pad // (cfg.wgs * CHUNK)
    q, r, slots = ws_plan(units, spu, cfg.ctas)
    out = jnp.full((slots, w.n_pad, xk.shape[0]), jnp.nan, jnp.float32)
    for cta in range(cfg.ctas):
        accs = [jnp.zeros((CHUNK, xk.shape[0]), jnp.float32) for _ in range(cfg.wgs)]
        for t in range(q + (r > 0)):
            unit, k, flush, slot, pieces = ws_step(t, cta, units, spu, cfg.ctas)
            assert not cfg.fused or (slot == 0 and pieces == 1)  # fused: whole units only
            x_blk = xk[:, k * cfg.tile_k:(k + 1) * cfg.tile_k]
            for wg in range(cfg.wgs):
                tile = unit * cfg.wgs + wg
                rows = slice(tile * CHUNK, (tile + 1) * CHUNK)
                accs[wg] = accs[wg] + block_product(tile, k, x_blk)
                if flush:
                    out = out.at[slot, rows].set(accs[wg])
                    if slot == 0:
                        out = out.at[pieces:, rows].set(0.0)
                    accs[wg] = accs[wg] * 0.0
    return out


def staged_x_reference(xv: jax.Array, k_pad: int, tile_k: int) -> jax.Array:
    """The direct_x path's activation tiles in numpy, built through the kernel's own plans: per step a [m, tile_k/64,
    64] TMA box of the view xv [m, K_x/64, 64] (blocks past K_x zero, as TMA fills them), ``x_zero_coords`` and
    ``x_stage_coords`` into a NaN-poisoned physical [tile_k/64, 8, 64] swizzled tile, read back in the wgmma's
    logical order (chunk q of row r at physical chunk q ^ r). Returns the tiles side by side, [8, k_pad] (what the
    padded path's x would be), NaN where the plans leave a hole."""
    xv = np.asarray(xv.astype(jnp.float32))
    m, kx_blocks, _ = xv.shape
    blocks = np.zeros((m, k_pad // CHUNK, CHUNK), np.float32)
    blocks[:, :kx_blocks] = xv[:, : k_pad // CHUNK]
    ints = dict(div=lambda a, b: a // b, rem=lambda a, b: a % b)
    out = []
    for kb in range(k_pad // tile_k):
        raw = blocks[:, kb * tile_k // CHUNK:(kb + 1) * tile_k // CHUNK]
        phys = np.full((tile_k // CHUNK, 8, CHUNK), np.nan, np.float32)
        for e in range((8 - m) * tile_k // X_VEC):
            r, c, q = x_zero_coords(e, m, tile_k, **ints)
            phys[c, r, q * X_VEC:(q + 1) * X_VEC] = 0.0
        for e in range(m * tile_k // X_VEC):
            r, c, q, qs = x_stage_coords(e, tile_k, xor=lambda a, b: a ^ b, **ints)
            phys[c, r, qs * X_VEC:(qs + 1) * X_VEC] = raw[r, c, q * X_VEC:(q + 1) * X_VEC]
        rows = np.arange(8)[:, None]
        cols = np.arange(tile_k)[None, :]
        out.append(phys[cols // CHUNK, rows, ((cols % CHUNK) // X_VEC ^ rows) * X_VEC + cols % X_VEC])
    return jnp.asarray(np.concatenate(out, axis=1))


def _finish(partials: jax.Array, m: int, n: int, dtype, layout: str = "nm") -> jax.Array:
    if layout == "mn":  # slots [P, M, N_pad] (``build_ws_kernel``'s ``slots_mn``)
        return partials.sum(0)[:m, :n].astype(dtype)
    return partials.sum(0)[:n, :m].T.astype(dtype)


SLOT_LAYOUTS = ("nm", "mn")  # partial slots [P, N_pad, M_pad] (every launch) / [P, M, N_pad] (ws stream-K only)


def slot_layout(partial_sums) -> Optional[str]:
    """The slot layout a ``partial_sums`` argument asks for: False / None -> None (y itself), True -> "nm", or a
    name from SLOT_LAYOUTS."""
    if partial_sums is False or partial_sums is None:
        return None
    layout = "nm" if partial_sums is True else partial_sums
    if layout not in SLOT_LAYOUTS:
        raise ValueError(f"partial_sums must be a bool or one of {SLOT_LAYOUTS}, got {partial_sums!r}")
    return layout


@functools.partial(jax.tree_util.register_dataclass, data_fields=["partials"],
                   meta_fields=["rows", "features", "dtype_name", "layout"])
@dataclasses.dataclass(frozen=True)
class PartialSums:
    """y [rows, features] = x @ W before its last sum: a kernel's float32 partial slots (stream-K / split-K), y = the
    sum over the slots, rounded to ``dtype_name`` (``value``). ``layout`` "nm": slots [P, N_pad, M_pad] (every
    launch); "mn": [P, M, N_pad] (the ws stream-K kernel's ``slots_mn``: a row of y is contiguous, which the
    SwiGLU staging of the next kernel reads, ``SwiGLUSlots``). A consumer that reads the slots itself
    (``pallas_kernels.decode_attention``, ``SwiGLUSlots``) saves the XLA kernel that would sum them."""

    partials: jax.Array
    rows: int
    features: int
    dtype_name: str
    layout: str = "nm"

    def value(self) -> jax.Array:
        return _finish(self.partials, self.rows, self.features, self.dtype_name, self.layout)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SiLU(gate) * up as the models compute it (LLaMA's MLP), in the inputs' dtype."""
    return jax.nn.silu(gate) * up


@functools.partial(jax.tree_util.register_dataclass, data_fields=["sums"], meta_fields=["inter", "lead"])
@dataclasses.dataclass(frozen=True)
class SwiGLUSlots:
    """The input of an MLP's down projection not computed yet: SiLU(gate) * up [*lead, inter] of a fused [gate | up]
    projection's output ``sums`` (a PartialSums of [rows, >= 2 inter] features; gate = features 0..inter-1, up =
    inter..2 inter-1). A ws kernel weight computes it while staging its activations (``swiglu_staging_ok``: the
    "mn" slots, M < 8), which saves the XLA kernel that sums the slots and applies SiLU * up; ``value`` is that XLA
    computation, for every other path."""

    sums: PartialSums
    inter: int
    lead: tuple

    @property
    def shape(self) -> tuple:
        return (*self.lead, self.inter)

    @property
    def dtype(self):
        return jnp.dtype(self.sums.dtype_name)

    def value(self) -> jax.Array:
        y = self.sums.value()
        return swiglu(y[:, :self.inter], y[:, self.inter:2 * self.inter]).reshape(self.shape)


def _m_pad(m: int) -> int:
    return max(8, _round_up(m, 8))


def _scale_block_index(k_block, tile_k: int, group: int):
    """Block index (in units of groups_per_step rows) of the scales / nbias block for pipeline step k_block."""
    if group >= tile_k:
        return k_block // (group // tile_k) if isinstance(k_block, int) else jax.lax.div(k_block, group // tile_k)
    return k_block


# ------------------------------------------------------------------------------------------- unpadded activations
# KernelConfig.direct_x: x [M < 8, K] goes to the GPTQ kernels unpadded (no XLA pad before every call). Its rows reach
# SMEM as plain [M, tile_k/64, 64] TMA boxes and each compute warpgroup stages them per step into a zeroed, swizzled
# [8, tile_k] tile (``_make_x_stage``): Mosaic GPU's tiled TMA cannot fill an 8-row swizzled tile from fewer gmem rows,
# and jax 0.11.2's wgmma takes no untiling view of a (tile_k/64, 8, 64) TMA box (bench/NOTES_kernels.md).
# JAXQUANT_GPTQ_DIRECT_X=0 turns the default off (the padded x everywhere; explicit configs still choose).
DIRECT_X_DEFAULT = os.environ.get("JAXQUANT_GPTQ_DIRECT_X", "1") != "0"
# KernelConfig.post_scale default for the one-warpgroup GPTQ kernel: on. H100, same runs, M = 1 path us (post_scale
# vs scaled weights; bench/NOTES_kernels.md, "Scales after the wgmma"): int3 8192x28672 45.52 vs 46.02, 4096x22016
# 21.14 vs 22.72, 11008x4096 13.89 vs 14.27; int4 M = 16 52.18 vs 52.72; rel err 2.2e-3 vs 2.7e-3. The ws kernel keeps
# the scaled weights: 48.42 vs 47.30 us (ws-f, tile_k 512), stream-K tile_k 256 within +-1%.
POST_SCALE = os.environ.get("JAXQUANT_GPTQ_POST_SCALE", "1") != "0"
DEQUANT_LOP3 = os.environ.get("JAXQUANT_GPTQ_LOP3", "1") != "0"  # "0": the field extraction as LLVM and + or
# "0": the models apply their RMSNorms in XLA before GPTQ kernel weights (``fuses_rms_norm``) instead of handing the
# kernel the norm's input and scale (``kernel_norm``)
FUSED_NORM_DEFAULT = os.environ.get("JAXQUANT_FUSED_NORM", "1") != "0"
# The staging costs each compute warpgroup a fence and a barrier per pipeline step, so the one-warpgroup kernel takes
# the unpadded x by default only up to this many CTA-steps per SM (output tiles x K steps / SMs). Measured (H100,
# bench/NOTES_kernels.md "Unpadded activations"): the LLaMA-7B layer shapes (16-43 per SM) path -1.0..-1.8 us
# (pad gone, kernel -0.3..+0.5 us); 8192x28672 3-bit (109 per SM) kernel +2.6 us, path +1.4 us. The ws kernel
# (8192x28672 4-bit: 32 steps per CTA, 112 CTAs) takes it always (path 47.4 vs 50.5 us).
DIRECT_X_MAX_STEPS_PER_SM = 64


def direct_x_steps_per_sm(cfg, w, num_sms: int = 132) -> float:
    """Pipeline steps per SM of the one-warpgroup kernel under a resolved cfg: output tiles x K steps / SMs (the
    k_splits cancel). Each step of the direct_x path pays one staging fence + barrier."""
    return (w.n_pad // (CHUNK * cfg.n_sub)) * (w.k_pad // cfg.tile_k) / num_sms


def _is_lut(w) -> bool:
    """Whether w is a lut_matmul.LUTKernelWeight (no import: lut_matmul imports this module)."""
    return hasattr(w, "lutw")


def direct_x_ok(w, m: int, variant: Optional[str] = None) -> bool:
    """Whether x [m, K] can go to w's kernel unpadded: 1 <= m < 8 (one 8-row wgmma N tile), a 16-bit dtype (64-column
    rows = one 128-byte swizzle span), and a kernel that stages x: both GPTQ kernels, the ws kernel of LUT weights."""
    kernel_ok = isinstance(w, GPTQKernelWeight) or (_is_lut(w) and variant == "ws")
    return kernel_ok and 1 <= m < 8 and jnp.dtype(w.dtype).itemsize == 2


# ------------------------------------------------------------------------------------- warp-specialized schedule
KERNEL_VARIANTS = ("ws",)
WS_COMPUTE_WGS = 2  # compute warpgroups per CTA, each owns one 64-row output tile of the CTA's 128-row unit
WS_WGS = (2,)  # compute warpgroup counts the builder takes (4 compiled but hung on the H100: ``_resolved_ws``)
WS_MEMORY_REGISTERS = 40  # registers per thread of the TMA-issuing warpgroup (setmaxnreg)
# The fused ws launch is the default for GPTQ 4-bit at M_pad = 8 where whole 128-row units fill at least this share
# of the SMs (and the one-split rule below applies). Measured (H100, bench/kernels_launch.py, same run, 8192x28672
# M = 1): path 50.43 us (kernel 48.96, 112 CTAs) vs 52.03 (50.64) for the one-warpgroup kernel = 3.16x vs 3.06x bf16.
WS_DEFAULT = True
WS_DEFAULT_MIN_SM_SHARE = 0.8
WS_SMEM_BYTES = 220 * 1024  # pipeline buffers + output staging (of the 227 KB a CTA may use)


def ws_staging_bytes(m_pad: int, wgs: int = WS_COMPUTE_WGS, direct_tile_k: int = 0) -> int:
    """Output staging of the ws kernel: per compute warpgroup two float32 [64, m_pad] tiles (the accumulator and a
    zero tile, or the accumulator and its transposed cast); with unpadded x (``direct_tile_k`` = tile_k) also its
    16-bit [8, tile_k] activation tile."""
    return 2 * wgs * CHUNK * m_pad * 4 + wgs * 8 * direct_tile_k * 2


def ws_stage_bytes(m_pad: int, tile_k: int, w, wgs: int = WS_COMPUTE_WGS) -> int:
    """Shared memory of one ws pipeline stage: the activation tile, wgs 64-row weight tiles, and the side inputs:
    GPTQ scales (+ nbias), or the unit's LUT tables (int32 [wgs * 64, 2**bits / 2])."""
    item = jnp.dtype(w.dtype).itemsize
    if _is_lut(w):
        side = wgs * CHUNK * w.lutw.shape[1] * 4
    else:
        side = (1 + (w.nbias is not None)) * max(1, tile_k // w.group) * wgs * CHUNK * item
    return m_pad * tile_k * item + wgs * (tile_k // CHUNK) * w.bits * 128 * 4 + side


def ws_default_ok(w, num_sms: int = 132) -> bool:
    """Whether the fused ws launch can be the default for w: N_pad in 128-row units, K_pad in 512-column steps,
    and the largest divisor of the unit count <= num_sms (whole units per CTA) fills >= WS_DEFAULT_MIN_SM_SHARE of
    the SMs (8192x28672: 224 units on 112 CTAs = 85%)."""
    rows = WS_COMPUTE_WGS * CHUNK
    if w.n_pad % rows or w.k_pad % 512 or (w.group % 512 and 512 % w.group):
        return False
    units = w.n_pad // rows
    ctas = max(p for p in range(1, min(num_sms, units) + 1) if units % p == 0)
    return ctas >= WS_DEFAULT_MIN_SM_SHARE * num_sms


WS_EVEN_GRID = os.environ.get("JAXQUANT_WS_EVEN_GRID", "1") != "0"  # "0": ``ws_stream_ctas`` = the SM count
WS_EVEN_GRID_MIN_STEPS = 24  # steps per CTA from which the default stream-K grid may shrink to an even split


def ws_stream_ctas(pairs: int, num_sms: int = 132) -> int:
    """The default grid of the stream-K ws kernel for ``pairs`` (unit, k-step) pairs: the SM count (at most the
    pairs); where that gives every CTA >= WS_EVEN_GRID_MIN_STEPS steps and the pairs split evenly over fewer CTAs at
    the same steps per CTA, that smaller grid, so no CTA runs a padding step (``ws_plan``). Measured (H100, M = 1,
    path us, same call, bench/NOTES_kernels.md "Even stream-K grids"): 8192x28672 (3584 pairs at tile_k 512, 28
    steps) on 128 vs 132 CTAs: GPTQ 3-bit 41.66 vs 42.77, lut4 57.57 vs 58.26, lut3 39.02 vs 39.47. At the LLaMA-7B
    q/k/v shape (1536 pairs at tile_k 256, 12 steps) the 128-CTA grid was faster alone (GPTQ 4-bit 14.35 vs 14.85)
    but the decode step slower (2.475 / 2.499 vs 2.363 / 2.416 ms, SqueezeLLM 3-bit 2.332 / 2.368 vs 2.147 /
    2.160), hence the step floor. ``JAXQUANT_WS_EVEN_GRID=0``: the SM count always."""
    ctas = min(num_sms, pairs)
    steps = -(-pairs // ctas)
    if WS_EVEN_GRID and steps >= WS_EVEN_GRID_MIN_STEPS and pairs % steps == 0:
        return pairs // steps
    return ctas


def _idiv(a, b: int):
    """a // b for a >= 0: python ints (tests, reference) or traced int32 (the kernel)."""
    return a // b if isinstance(a, (int, np.integer)) else jax.lax.div(a, jnp.asarray(b, a.dtype))


def _select(c, a, b):
    """a if c else b, for a python bool or a traced one."""
    return (a if c else b) if isinstance(c, (bool, np.bool_)) else jnp.where(c, a, b)


def _ws_cta_of(g, q: int, r: int):
    """The CTA that runs flat step g when the first r CTAs run q + 1 steps and the others q."""
    edge = r * (q + 1)
    if isinstance(g, (int, np.integer)):
        return g // (q + 1) if g < edge else r + (g - edge) // q
    return jnp.where(g < edge, _idiv(g, q + 1), r + _idiv(jnp.maximum(g - edge, 0), q))  # q >= 1 (ws_plan)


def ws_plan(units: int, steps_per_unit: int, ctas: int) -> tuple[int, int, int]:
    """The ws kernel's stream-K split of the units * steps_per_unit flat (unit, k-step) pairs over ``ctas`` CTAs:
    the first r CTAs run q + 1 consecutive pairs, the others q (q, r = divmod(pairs, ctas)), so any grid up to the
    SM count works, not only divisors (LLaMA-7B gate/up: 172 units x 8 steps on 132 CTAs, 10-11 steps each).
    Returns (q, r, slots): ``slots`` = the most CTAs one unit is spread over = the float32 partial slots."""
    total = units * steps_per_unit
    if not 1 <= ctas <= total:
        raise ValueError(f"ctas={ctas} must be in 1..{total} (the (unit, step) pairs)")
    q, r = divmod(total, ctas)
    slots = max(_ws_cta_of(u * steps_per_unit + steps_per_unit - 1, q, r) - _ws_cta_of(u * steps_per_unit, q, r) + 1
                for u in range(units))
    return q, r, slots


# The stream-K ws launch (partial slots, one CTA per SM, tile_k 256) is the default for GPTQ 4-bit at M_pad = 8
# where the fused one does not apply and the (unit, 256-column step) pairs give every SM at least this many steps. Measured
# (H100, bench/kernels_launch.py, same run, M = 1, path / kernel us, stream-K vs the one-warpgroup kernel):
# 4096x22016 22.53 / 20.83 vs 26.69 / 25.25, 4096x12288 15.04 / 13.78 vs 15.74 / 14.34, 11008x4096 13.70 / 12.45 vs
# 14.18 / 12.83; 4096x4096 (3.9 steps per SM) 8.06 / 6.85 vs 7.36 / 6.02 (so it keeps the old kernel).
WS_STREAM_TILE_K = 256
WS_STREAM_MIN_STEPS_PER_SM = 8
# "0": the one-warpgroup kernel where the stream-K ws defaults (GPTQ 4-bit, LUT 4-bit) would apply
WS_STREAM_DEFAULT = os.environ.get("JAXQUANT_GPTQ_WS_STREAM", "1") != "0"
# Except (``plain_decode_blocks``) where the kernel stages x as it is (no RMSNorm or SwiGLU to apply while staging,
# which only the ws kernel does), the (unit, step) pairs would give the ws launch every SM >= 8 steps
# (``ws_stream_ok``) and ``decode_blocks`` splits K at least PLAIN_DECODE_MIN_SPLITS ways (LLaMA-7B down_proj,
# 11008x4096): there GPTQ 3- and 4-bit weights run the one-warpgroup kernel with the scales after the wgmma, at
# decode_blocks' tile_k / k_splits and PLAIN_DECODE_STAGES stages. H100, 11008x4096 M = 1, kernel us: 4-bit 11.68 vs
# 12.42-12.54 for the ws launch (2026-11-24 07:23Z, kernels.md "ws step probes"); 4-bit 11.58-11.62, 3-bit 11.10 vs
# 12.54 at the 3-bit default 128 / 3 / 8 (2026-11-25 01:3xZ, kernels.md "Plain-x decode rule"). In the GPTQ 4-bit
# LLaMA-7B decode step down_proj 372.9-375.0 vs 400.7-401.4 us per step and all kernels 2095.6-2098.6 vs
# 2124.6-2125.0 us (2026-11-25, decode_step_levers.md "... the plain-x decode rule"). Measured with the unpadded x
# only, so it needs direct_x. "0" turns it off.
PLAIN_DECODE_DEFAULT = os.environ.get("JAXQUANT_GPTQ_PLAIN_DECODE", "1") != "0"
PLAIN_DECODE_MIN_SPLITS = 4
PLAIN_DECODE_STAGES = 4


def plain_decode_blocks(w, m: int, num_sms: int = 132, direct_x: Optional[bool] = None
                        ) -> Optional[tuple[int, int]]:
    """(tile_k, k_splits) of the one-warpgroup kernel for a GPTQ 3- or 4-bit weight at 1 <= M < 8 on the unpadded x
    (``direct_x``: the config's field) where ``ws_stream_ok`` and ``decode_blocks`` splits K at least
    PLAIN_DECODE_MIN_SPLITS ways; None elsewhere. The caller applies it only to calls without a fused norm or SwiGLU
    (``KernelConfig.resolved(staged=False)``)."""
    unpadded = (DIRECT_X_DEFAULT if direct_x is None else direct_x) and direct_x_ok(w, m)
    if not (PLAIN_DECODE_DEFAULT and isinstance(w, GPTQKernelWeight) and w.bits in (3, 4) and unpadded
            and ws_stream_ok(w, num_sms)):
        return None
    blocks = decode_blocks(w, num_sms)
    return blocks if blocks and blocks[1] >= PLAIN_DECODE_MIN_SPLITS else None


# The same stream-K ws launch is the default for three more weight kinds (``ws_stream_tile_k``); H100,
# bench/kernels_launch.py, same runs, path us (NOTES_kernels.md "LUT weights in the ws kernel" and "3-bit weights in
# the ws kernel"):
# - LUT 4-bit at M_pad <= 16 where ``ws_stream_ok`` (its 16-entry lookup keeps the one-warpgroup kernel issue-bound;
#   two compute warpgroups per SM measured faster at most of these shapes), one warpgroup / ws 512 / ws 256:
#   8192x28672 M = 1 59.01 / 58.50 / -, M = 16 61.33 / 58.75 / -; 4096x22016 M = 1 30.82 / 28.99 / 27.68, M = 16
#   29.41 / 27.84 / 28.13; 4096x12288 19.94 / 20.10 / 18.72, M = 16 18.35 / 18.59 / 18.51; 11008x4096 18.37 / 19.81 /
#   18.31, M = 16 20.38 / 20.13 / 18.85. With the unpadded x at M < 8, lut4 M = 1 unpadded vs padded: 8192x28672
#   58.34 vs 58.62, 4096x22016 26.56 vs 27.78, 4096x12288 17.14 vs 18.66, 11008x4096 16.00 vs 18.43.
# - LUT 3-bit (and 4-bit below 8 pairs per SM) at M < 8 (x unpadded) where the (unit, 256-column step) pairs give
#   every SM >= LUT_WS_UNPADDED_MIN_STEPS_PER_SM, lut3 M = 1 one warpgroup / ws 512 / ws 256: 8192x28672 41.49 / 39.15
#   / 42.42; 4096x22016 23.34 / 19.66 / 19.25; 4096x12288 15.43 / 13.66 / 12.96; 11008x4096 14.56 / 13.74 / 12.50;
#   4096x4096 8.83 / 8.00 / 7.42 (M = 4 alike; sparse lut3 8192x28672 54.29 / 51.54 / 54.50); lut4 4096x4096 M = 1
#   10.53 / - / 8.90, M = 4 10.62 / - / 9.18. At M = 16 (padded x) lut3 stays faster in the one-warpgroup kernel
#   (8192x28672 43.71 vs 45.47; lut4 4096x4096 9.65 vs 9.60).
# - GPTQ 3-bit at M < 8 where tile_k 512 applies (below), with the scales after the wgmma (post_scale, the default of
#   3-bit weights in the ws kernel): 8192x28672 M = 1 45.22 (one warpgroup) vs 42.54 (ws 512) / 46.10 (ws 256),
#   M = 4 45.58 vs 42.30. The 7B decode shapes keep the one-warpgroup kernel (within +-1 us either way).
# tile_k 512 where the (unit, 512-column step) pairs give every SM >= WS_STREAM_512_MIN_STEPS_PER_SM, else 256.
WS_STREAM_512_MIN_STEPS_PER_SM = 24
LUT_WS_UNPADDED_MIN_STEPS_PER_SM = 3  # 4096x4096 (3.9 per SM) measured faster in the ws kernel for LUT (not int4)


def ws_stream_tile_k(w, m: int, num_sms: int = 132, direct_x: Optional[bool] = None) -> Optional[int]:
    """The tile_k of the stream-K ws launch where it is w's default at M rows (the rules above), or None where w
    keeps the one-warpgroup kernel (or the fused ws launch, ``ws_default_ok``, decided before). ``direct_x``: the
    config's field (False: the 3-bit rules, measured with the unpadded x only, do not apply)."""
    gptq = isinstance(w, GPTQKernelWeight) and not DECODE_RULE  # the opt-in decode rule wins for GPTQ weights
    lut, m_pad = _is_lut(w), _m_pad(m)
    tile_512 = ws_pairs(w, 512) >= WS_STREAM_512_MIN_STEPS_PER_SM * num_sms
    unpadded = (DIRECT_X_DEFAULT if direct_x is None else direct_x) and direct_x_ok(w, m, "ws")
    if w.bits == 4 and gptq and m_pad == 8 and ws_stream_ok(w, num_sms):
        return WS_STREAM_TILE_K
    if lut and ((unpadded and ws_stream_ok(w, num_sms, LUT_WS_UNPADDED_MIN_STEPS_PER_SM))
                or (w.bits == 4 and m_pad <= 16 and ws_stream_ok(w, num_sms))):
        return 512 if tile_512 else 256
    if w.bits == 3 and gptq and unpadded and tile_512 and ws_stream_ok(w, num_sms):
        return 512
    return None


def ws_pairs(w, tile_k: int) -> int:
    """The (128-row unit, tile_k-column step) pairs of w in the ws kernel, or 0 where tile_k does not fit w."""
    rows = WS_COMPUTE_WGS * CHUNK
    if w.n_pad % rows or w.k_pad % tile_k or (w.group % tile_k and tile_k % w.group):
        return 0
    return (w.n_pad // rows) * (w.k_pad // tile_k)


def ws_stream_ok(w, num_sms: int = 132, min_steps_per_sm: float = WS_STREAM_MIN_STEPS_PER_SM) -> bool:
    """Whether the stream-K ws launch fits w at tile_k 256 with every SM getting >= ``min_steps_per_sm`` (unit,
    step) pairs (see WS_STREAM_MIN_STEPS_PER_SM)."""
    return ws_pairs(w, WS_STREAM_TILE_K) >= max(1, min_steps_per_sm * num_sms)


def ws_step(t, cta, units: int, steps_per_unit: int, ctas: int):
    """Stream-K schedule of the ws kernel (``ws_plan``), for python ints (tests, reference) or traced int32 (the
    kernel). The grid has q + (r > 0) steps; a CTA with only q pairs repeats its last pair at step q (an L2 hit; the
    result is not stored). Step t of CTA ``cta`` -> (unit, k, flush, slot, pieces): ``flush`` = the accumulator is
    stored after this step (unit end or the CTA's last pair) and reset; ``slot`` = the partial slot it goes to (the
    CTA's index among the unit's CTAs: 0 holds the unit's first step); ``pieces`` = how many CTAs share the unit (the
    slot-0 CTA also writes zeros into slots pieces..slots-1)."""
    q, r = divmod(units * steps_per_unit, ctas)
    n = _select(cta < r, q + 1, q)
    start = cta * q + (min(cta, r) if isinstance(cta, (int, np.integer)) else jnp.minimum(cta, r))
    valid = t < n
    g = start + _select(valid, t, n - 1)
    unit = _idiv(g, steps_per_unit)
    k = g - unit * steps_per_unit
    first = unit * steps_per_unit
    head_cta = _ws_cta_of(first, q, r)
    slot = cta - head_cta
    pieces = _ws_cta_of(first + steps_per_unit - 1, q, r) - head_cta + 1
    flush = valid & ((k == steps_per_unit - 1) | (t == n - 1))
    return unit, k, flush, slot, pieces


# ---------------------------------------------------------------------------------------------------------- config
def pick_blocks(tile_ks, k_pad: int, ctas_n: int, target: int, k_splits, max_splits: int):
    """(tile_k, k_splits) for the kernels' block-size heuristics, or None when ``tile_ks`` (the candidates that fit
    the weight) is empty: the most CTAs up to ``target``, then the larger tile, then fewer splits; splits divide
    the K steps and leave each split >= 4 steps (``k_splits``: fixed by the config)."""
    best = None
    for tile_k in tile_ks:
        steps = k_pad // tile_k
        splits = [k_splits] if k_splits else [
            s for s in (1, 2, 4, 8, 16) if steps % s == 0 and (steps // s >= 4 or s == 1) and s <= max_splits]
        for s in splits:
            score = (min(ctas_n * s, target), tile_k, -s)
            if best is None or score > best[0]:
                best = (score, tile_k, s)
    return None if best is None else best[1:]


def call_with_output(call, args, out_init, cfg, w, m: int, out_dtype, slots_mn: bool = False):
    """``call(*args)``; with ``out_init`` (tests / benchmarks: a NaN-poisoned buffer the aliased kernel writes in
    place) appended after checking it against ``output_buffer_shape``."""
    if out_init is not None:
        shape, dt = output_buffer_shape(cfg, w.n_pad, w.out_features, m, out_dtype, slots_mn)
        if out_init.shape != shape or out_init.dtype != dt:
            raise ValueError(f"out_init must be {dt} {shape}, got {out_init.dtype} {out_init.shape}")
        args = [*args, out_init]
    return call(*args)


def check_kernel_input(x2d, w, kernel: str) -> int:
    """M of x [M, K] after the checks of every kernel entry point: K matches, 1 <= M <= MAX_KERNEL_M, x in the
    dtype the weight was packed for."""
    m, k = x2d.shape
    if k != w.in_features:
        raise ValueError(f"x has {k} input features, the weight expects {w.in_features}")
    if not 1 <= m <= MAX_KERNEL_M:
        raise ValueError(f"the {kernel} kernel takes 1..{MAX_KERNEL_M} activation rows, got {m}")
    if x2d.dtype != w.dtype:
        raise ValueError(f"x is {x2d.dtype} but the weight was packed for {w.dtype}")
    return m


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Block sizes: ``tile_k`` input columns per pipeline step (a multiple of 64), ``stages`` TMA buffers in flight,
    ``k_splits`` CTAs sharing one output tile's K range (float32 partials summed afterwards), ``n_sub`` 64-row output
    tiles per CTA (they share each activation tile: fewer activation bytes per weight byte, more registers).
    None = heuristic."""

    tile_k: Optional[int] = None
    stages: Optional[int] = None
    k_splits: Optional[int] = None
    n_sub: Optional[int] = None
    fused: Optional[bool] = None  # the single-kernel launch (``launch_kernel``); None = FUSED_DEFAULT where it fits
    # "ws": the warp-specialized, persistent, stream-K kernel (``build_ws_kernel``; GPTQ and LUT weights); None: the
    # one-warpgroup kernel. ``ctas``: the ws grid (None: ``ws_stream_ctas``, or with ``fused`` the most that divide the
    # units).
    variant: Optional[str] = None
    ctas: Optional[int] = None
    wgs: Optional[int] = None  # ws: compute warpgroups per CTA (2 or 4), each one 64-row output tile
    # Unpadded activations at M < 8 (``direct_x_ok``; both GPTQ kernels, the LUT ws kernel): x [M, K] goes to the
    # kernel as it is (no XLA pad) and each step stages its M rows into a zeroed [8, tile_k] SMEM tile
    # (``_make_x_stage``). None = the default (DIRECT_X_DEFAULT where direct_x_ok), False = the padded x.
    direct_x: Optional[bool] = None
    # GPTQ: the wgmma multiplies the exact integers code - zero and the group scales are applied to its float32
    # product (``_make_scale_add``) instead of to every weight before it. None = POST_SCALE for the one-warpgroup
    # kernel, off for the ws kernel.
    post_scale: Optional[bool] = None

    @property
    def leaves_blocks_open(self) -> bool:
        """No field but ``direct_x`` / ``post_scale`` given: the launch and block sizes are the defaults' choice."""
        return dataclasses.replace(self, direct_x=None, post_scale=None) == KernelConfig()

    def groups_per_step(self, w: GPTQKernelWeight) -> int:
        return max(1, self.tile_k // w.group)

    def _resolved_ws(self, w, m: int, num_sms: int) -> "KernelConfig":
        """The ws variant: tile_k up to 512 (M_pad <= 16) / 256, stages up to 4 within WS_SMEM_BYTES, ctas =
        ``ws_stream_ctas`` (the SM count, or an even split of the (unit, step) pairs over fewer), k_splits = the
        partial slots of that stream-K split (``ws_plan``); fused: whole units per CTA, ctas the most <= num_sms
        dividing the units, k_splits = 1."""
        if not (isinstance(w, GPTQKernelWeight) or _is_lut(w)):
            raise ValueError("the warp-specialized variant exists for GPTQ and LUT kernel weights only")
        wgs = self.wgs or WS_COMPUTE_WGS
        if wgs not in WS_WGS:
            # 4 compute warpgroups hung on the H100 (jax 0.11.2; likely setmaxnreg: 4 x 112 registers for the
            # compute warpgroups + 40 for the memory one do not fit the register pool of a 640-thread launch)
            raise ValueError(f"the warp-specialized variant takes wgs in {WS_WGS} compute warpgroups, got wgs={wgs}")
        if w.n_pad % (wgs * CHUNK):
            raise ValueError(f"the warp-specialized variant needs N_pad a multiple of {wgs * CHUNK}, got {w.n_pad}")
        m_pad = _m_pad(m)
        # 4 compute warpgroups get 112 registers a thread (setmaxnreg): a 64 x 512 A fragment alone takes 128
        tiles = [512, 256, 128, 64] if m_pad <= 16 else [256, 128, 64]
        tiles = [self.tile_k] if self.tile_k else tiles[1:] if wgs == 4 else tiles
        tiles = [t for t in tiles if t % CHUNK == 0 and w.k_pad % t == 0 and (w.group % t == 0 or t % w.group == 0)]
        if not tiles:
            raise ValueError(f"tile_k={self.tile_k} does not fit K_pad={w.k_pad} / group {w.group}")
        tile_k = tiles[0]
        per_stage = ws_stage_bytes(m_pad, tile_k, w, wgs)
        stages = self.stages or max(2, min(4, (WS_SMEM_BYTES - ws_staging_bytes(m_pad, wgs)) // per_stage))
        units, spu = w.n_pad // (wgs * CHUNK), w.k_pad // tile_k
        fused = bool(self.fused)
        if fused:  # whole units per CTA: each warpgroup stores its y tile itself (no partial slots, no XLA sum)
            ctas = self.ctas or max(p for p in range(1, min(num_sms, units) + 1) if units % p == 0)
        else:
            ctas = self.ctas or ws_stream_ctas(units * spu, num_sms)
        slots = 1 if fused else ws_plan(units, spu, ctas)[2]  # ws_plan names a grid outside 1..pairs
        cfg = dataclasses.replace(self, tile_k=tile_k, stages=stages, k_splits=slots, n_sub=1,
                                  fused=fused, ctas=ctas, wgs=wgs)
        cfg.check(w, m)
        return cfg

    def _check_ws(self, w, m: int) -> None:
        units, spu = w.n_pad // (self.wgs * CHUNK), w.k_pad // self.tile_k
        ws_plan(units, spu, self.ctas)  # raises for a grid outside 1..pairs
        if self.fused and (units % self.ctas or not fused_output_ok(1, w.out_features, w.dtype)):
            raise ValueError(f"the fused ws launch needs ctas={self.ctas} dividing the {units} units and 16-byte "
                             f"output rows (N={w.out_features})")
        if (self.stages * ws_stage_bytes(_m_pad(m), self.tile_k, w, self.wgs)
                + ws_staging_bytes(_m_pad(m), self.wgs, self.tile_k if self.direct_x else 0) > WS_SMEM_BYTES):
            raise ValueError(f"stages={self.stages} x tile_k={self.tile_k} exceed {WS_SMEM_BYTES} bytes of shared "
                             f"memory at M_pad={_m_pad(m)}")

    def resolved(self, w: GPTQKernelWeight, m: int = 1, num_sms: int = 132, staged: bool = False) -> "KernelConfig":
        """``_resolved_blocks`` (the block sizes, launch and variant) with ``direct_x`` filled in: None ->
        DIRECT_X_DEFAULT where ``direct_x_ok`` (the ws kernel; the one-warpgroup kernel up to
        DIRECT_X_MAX_STEPS_PER_SM CTA-steps per SM); True where it is not ok raises. ``staged``: the call asks the
        kernel to apply an RMSNorm or a SwiGLU while staging x (the ws kernel's), so ``plain_decode_blocks`` does
        not apply."""
        blocks = None if staged or not self.leaves_blocks_open else plain_decode_blocks(w, m, num_sms, self.direct_x)
        if blocks:  # the one-warpgroup kernel where the x staged as it is measured faster (PLAIN_DECODE_DEFAULT)
            base = dataclasses.replace(self, tile_k=blocks[0], k_splits=blocks[1], stages=PLAIN_DECODE_STAGES)
            return base.resolved(w, m, num_sms)  # its blocks are set: the rule does not apply again
        cfg = self._resolved_blocks(w, m, num_sms)
        direct = self.direct_x
        if direct is None:
            direct = DIRECT_X_DEFAULT and direct_x_ok(w, m, cfg.variant) and (
                cfg.variant == "ws" or direct_x_steps_per_sm(cfg, w, num_sms) <= DIRECT_X_MAX_STEPS_PER_SM)
        elif direct and not direct_x_ok(w, m, cfg.variant):
            raise ValueError(f"direct_x (unpadded activations) needs a GPTQ kernel weight (or a LUT one in the ws "
                             f"kernel) in a 16-bit dtype and M < 8, got {type(w).__name__} "
                             f"{jnp.dtype(w.dtype).name}, variant {cfg.variant}, M = {m}")
        post_scale = self.post_scale
        if post_scale is None:  # the ws kernel keeps the scaled weights of 4-bit codes (post_scale measured slower
            # there at tile_k 512); 3-bit codes measured faster with it in both kernels
            post_scale = POST_SCALE and (cfg.variant != "ws" or w.bits == 3)
        post_scale = isinstance(w, GPTQKernelWeight) and post_scale
        cfg = dataclasses.replace(cfg, direct_x=bool(direct), post_scale=post_scale)
        cfg.check(w, m)
        return cfg

    def _resolved_blocks(self, w: GPTQKernelWeight, m: int = 1, num_sms: int = 132) -> "KernelConfig":
        """Fill in None fields as measured best on an H100 for 8192x28672 (bench/NOTES_kernels.md): M_pad <= 16:
        tile_k up to 512 with 3 stages; larger M: tile_k up to 256 with 2 stages (the activation tile grows with M);
        n_sub = 1 (2 sub-tiles ran slower at M = 64: register pressure). Among the valid tile_k / k_splits, the most
        CTAs up to ~3.5 per SM (small CTAs keep more TMA copies in flight and shorten the tail) with >= 4 pipeline
        steps per split, then the largest tile_k, then the fewest splits. ``fused`` (None: FUSED_DEFAULT where the
        output allows it) limits k_splits to MAX_CLUSTER. Measured exceptions (bench/NOTES_kernels.md): GPTQ 4-bit at
        M_pad <= 16 with >= ONE_SPLIT_MIN_TILES_PER_SM output tiles per SM runs one split, fused (one kernel); at
        M_pad = 8 the ws kernel where ``ws_default_ok`` (fused) or ``ws_stream_ok`` (stream-K partials); LUT
        weights at M < 8 (4-bit ones at M_pad <= 16), GPTQ 3-bit at M < 8 the stream-K ws kernel where
        ``ws_stream_tile_k`` names a tile;
        GPTQ 3-bit at M_pad <= 16 takes tile_k <= 256; other GPTQ weights at M_pad <= 16 take ``decode_blocks``
        where it applies (the LLaMA-7B decode shapes). ``variant="ws"``: see ``_resolved_ws``."""
        if self.variant is not None:
            if self.variant not in KERNEL_VARIANTS:
                raise ValueError(f"unknown kernel variant {self.variant!r}; expected one of {KERNEL_VARIANTS}")
            return self._resolved_ws(w, m, num_sms)
        small_m = _m_pad(m) <= 16
        stages = self.stages or (3 if small_m else 2)
        n_sub = self.n_sub or 1
        ctas_n = w.n_pad // CHUNK // n_sub
        gptq = isinstance(w, GPTQKernelWeight)
        lut = _is_lut(w)
        one_split = (gptq and w.bits == 4 and small_m and self.fused is None and self.k_splits is None
                     and ctas_n >= ONE_SPLIT_MIN_TILES_PER_SM * num_sms and fused_output_ok(1, w.out_features, w.dtype))
        plain = self.leaves_blocks_open
        if WS_DEFAULT and one_split and _m_pad(m) == 8 and plain and ws_default_ok(w, num_sms):
            return KernelConfig(variant="ws", fused=True, tile_k=512, stages=3)._resolved_blocks(w, m, num_sms)
        if WS_STREAM_DEFAULT and plain and (stream_tile_k := ws_stream_tile_k(w, m, num_sms, self.direct_x)):
            return KernelConfig(variant="ws", tile_k=stream_tile_k)._resolved_blocks(w, m, num_sms)
        decode = None
        if (DECODE_RULE and gptq and small_m and not one_split and self.tile_k is None and self.k_splits is None
                and self.fused is None and n_sub == 1):
            decode = decode_blocks(w, num_sms)
            if decode and decode[1] == 1 and not fused_output_ok(1, w.out_features, w.dtype):
                decode = None
        if decode:
            tile_k, k_splits = decode
            cfg = dataclasses.replace(self, tile_k=tile_k, k_splits=k_splits, n_sub=n_sub, stages=stages,
                                      fused=k_splits == 1)
            cfg.check(w)
            return cfg
        fused = True if one_split else resolve_fused(self.fused, self.k_splits, w.out_features)
        max_splits = 1 if one_split else MAX_CLUSTER if fused else 16
        # tile_k 256 where measured faster than 512 (H100, 8192x28672): 3-bit GPTQ codes at M_pad <= 16 (M = 1
        # kernel 42.7 vs 45.3 us), LUT codes at M_pad = 16 (lut3 path 43.6 vs 47.1 us, lut4 61.5 vs 64.2)
        tiles = [512, 256, 128, 64] if small_m else [256, 128, 64]
        if small_m and ((gptq and w.bits == 3) or (lut and _m_pad(m) > 8)):
            tiles = [256, 128, 64]
        target = int(3.5 * num_sms)
        best = pick_blocks([t for t in ([self.tile_k] if self.tile_k else tiles)
                            if not (w.k_pad % t or (w.group % t and t % w.group))],
                           w.k_pad, ctas_n, target, self.k_splits, max_splits)
        if best is None:
            raise ValueError(f"tile_k={self.tile_k} does not fit: it must be a multiple of {CHUNK} dividing "
                             f"K_pad={w.k_pad}, and it and the kernel group size {w.group} must divide one another")
        tile_k, k_splits = best
        if (lut and w.bits == 3 and not w.nnz and _m_pad(m) == 8 and k_splits == 2 and self.fused is None
                and self.tile_k is None and w.k_pad % 512 == 0 and w.k_pad // 512 >= 4
                and fused_output_ok(2, w.out_features, w.dtype)):
            # dense 3-bit LUT at M_pad = 8 with 2 splits: the cluster launch at tile_k 256 (8192x28672 M = 1, three
            # runs: 41.6-41.7 us path vs 42.2-42.4 for 512 / 2 splits + the XLA partial sum)
            tile_k, fused = 256, True
        cfg = dataclasses.replace(self, tile_k=tile_k, k_splits=k_splits, n_sub=n_sub, stages=stages, fused=fused)
        cfg.check(w)
        return cfg

    def check(self, w: GPTQKernelWeight, m: int = 1) -> None:
        if self.variant == "ws":
            return self._check_ws(w, m)
        if self.tile_k % CHUNK or w.k_pad % self.tile_k:
            raise ValueError(f"tile_k={self.tile_k} must be a multiple of {CHUNK} dividing K_pad={w.k_pad}")
        if w.group % self.tile_k and self.tile_k % w.group:
            raise ValueError(f"tile_k={self.tile_k} and the kernel group size {w.group} must divide one another")
        steps = w.k_pad // self.tile_k
        if steps % self.k_splits:
            raise ValueError(f"k_splits={self.k_splits} must divide the {steps} pipeline steps (K_pad/tile_k)")
        if (w.n_pad // CHUNK) % self.n_sub:
            raise ValueError(f"n_sub={self.n_sub} must divide the {w.n_pad // CHUNK} 64-row output tiles")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.fused and not fused_output_ok(self.k_splits, w.out_features, jnp.float32):
            raise ValueError(f"the fused launch needs k_splits <= {MAX_CLUSTER} and N a multiple of 4, got "
                             f"k_splits={self.k_splits}, N={w.out_features}")


def resolve_fused(fused: Optional[bool], k_splits: Optional[int], n: int) -> bool:
    """The ``fused`` field of a resolved config (shared by the GPTQ / LUT / SpQR configs): None -> FUSED_DEFAULT
    when N allows 16-byte rows in every output dtype (N % 8 == 0) and a given k_splits fits one cluster."""
    if fused is not None:
        return fused
    return FUSED_DEFAULT and n % 8 == 0 and (k_splits is None or k_splits <= MAX_CLUSTER)


# ---------------------------------------------------------------------------------------------------------- kernel
def gptq_matmul(x2d: jax.Array, w: GPTQKernelWeight, *, config: Optional[KernelConfig] = None,
                out_init: Optional[jax.Array] = None, _variant: str = "full", rms_norm=None,
                partial_sums=False):
    """Pallas Mosaic GPU kernel: x [M, K] (M <= 64, w's dtype) @ W -> [M, N] in x's dtype (with ``partial_sums``, a
    ``PartialSums`` instead where the launch leaves partial slots: True / "nm", or "mn", the layout the ws stream-K
    launch can store, ``slots_mn_ok``; other launches leave "nm" slots).

    ``out_init`` (tests / benchmark): the buffer the kernel writes in place (pass it NaN-filled to prove every
    output tile is written), of ``output_buffer_shape`` (float32 partials, or y itself with the fused launch).
    ``rms_norm`` = (scale [K], eps): computes ``rms_norm_rows(x, scale, eps) @ W``; the norm runs inside the kernel
    where ``fused_norm_ok`` (else in XLA before it).
    """
    layout = slot_layout(partial_sums)
    m = check_kernel_input(x2d, w, "GPTQ")
    cfg = (config or KernelConfig()).resolved(w, m, staged=rms_norm is not None)
    x2d, norm = kernel_norm(x2d, w, cfg, m, rms_norm)
    xk = w.direct_activations(x2d) if cfg.direct_x else w.prepare_activations(x2d, _m_pad(m))
    mn = layout == "mn" and slots_mn_ok(cfg)
    out = gptq_matmul_partials(xk, w, cfg, out_init=out_init, _variant=_variant, m=m, norm=norm, slots_mn=mn)
    if cfg.fused:
        return out
    sums = PartialSums(out, m, w.out_features, jnp.dtype(x2d.dtype).name, "mn" if mn else "nm")
    return sums if layout else sums.value()


def slots_mn_ok(cfg) -> bool:
    """Whether a resolved config's launch can store "mn" partial slots: the ws stream-K kernel."""
    return cfg.variant == "ws" and not cfg.fused


# The SwiGLU staging (``SwiGLUSlots``): "0" makes the models keep SiLU * up in XLA (``takes_swiglu_slots``) and the
# kernel weights compute a SwiGLUSlots' value in XLA (the same-run comparison in bench/results/decode_step_levers.md)
SWIGLU_STAGING_DEFAULT = os.environ.get("JAXQUANT_SWIGLU_STAGING", "1") != "0"


def swiglu_staging_ok(cfg, w, g: "SwiGLUSlots") -> bool:
    """Whether a resolved config's kernel for w computes g itself while staging its activations
    (``build_ws_kernel``'s ``swiglu``): the ws kernel on the unpadded path (M < 8), "mn" slots of exactly [gate |
    up] (N_pad = 2 I, I a multiple of 64: the slots split into a gate half and an up half without a copy) in w's
    dtype, w taking I inputs in input order without a sparse part, and the slot blocks fitting the shared memory."""
    sums, m = g.sums, g.sums.rows
    if not (SWIGLU_STAGING_DEFAULT and cfg.variant == "ws" and cfg.direct_x and sums.layout == "mn" and 1 <= m < 8
            and getattr(w, "perm", None) is None and not getattr(w, "nnz", 0) and w.in_features == g.inter
            and g.inter % CHUNK == 0 and sums.partials.shape[2] == 2 * g.inter and sums.dtype_name == w.dtype_name):
        return False
    m_pad, slots = _m_pad(m), sums.partials.shape[0]
    x_bytes = m_pad * cfg.tile_k * w.dtype.itemsize  # the activation block ws_stage_bytes counts
    stage = ws_stage_bytes(m_pad, cfg.tile_k, w, cfg.wgs) - x_bytes + 2 * slots * m * cfg.tile_k * 4
    return cfg.stages * stage + ws_staging_bytes(m_pad, cfg.wgs, cfg.tile_k) <= WS_SMEM_LIMIT


def swiglu_kernel_input(g: "SwiGLUSlots") -> tuple[jax.Array, int]:
    """(the "mn" slots [P, M, 2 I] viewed [P, M, 2, I/64, 64] (a bitcast), the kernel's ``swiglu`` = P)."""
    p, rows, _ = g.sums.partials.shape
    return g.sums.partials.reshape(p, rows, 2, g.inter // CHUNK, CHUNK), p


def swiglu_matmul(g: "SwiGLUSlots", w, use_kernel: Optional[bool], config, partials_fn):
    """SiLU(gate) * up @ W for a weight's ``matmul`` given a SwiGLUSlots: the format's bare kernel ``partials_fn``
    (``gptq_matmul_partials`` / ``lut_matmul_partials``) with the SwiGLU staging, jitted, where
    ``swiglu_staging_ok``; else None (the caller takes g's XLA value)."""
    m = g.sums.rows
    if use_kernel is None:
        use_kernel = jax.default_backend() == "gpu" and g.dtype == w.dtype
    if not (use_kernel and 1 <= m < 8 and g.inter == w.in_features):
        return None
    cfg = (config or KernelConfig()).resolved(w, m, staged=True)
    if not swiglu_staging_ok(cfg, w, g):
        return None
    return _jit_swiglu_matmul(g.sums.partials, w, cfg, g.inter, m, partials_fn).reshape(*g.lead, w.out_features)


@functools.partial(jax.jit, static_argnames=("cfg", "inter", "rows", "partials_fn"))
def _jit_swiglu_matmul(slots: jax.Array, w, cfg: KernelConfig, inter: int, rows: int, partials_fn) -> jax.Array:
    """``swiglu_matmul``'s kernel call: slots = a fused gate/up projection's "mn" slots of ``rows`` rows, cfg
    resolved -> y [rows, N]."""
    g = SwiGLUSlots(PartialSums(slots, rows, slots.shape[2], w.dtype_name, "mn"), inter, (rows,))
    xk, swiglu = swiglu_kernel_input(g)
    out = partials_fn(xk, w, cfg, m=rows, swiglu=swiglu)
    return out if cfg.fused else PartialSums(out, rows, w.out_features, w.dtype_name).value()


def rms_norm_rows(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF LLaMA's RMSNorm over the last axis, in x's dtype: bf16(bf16(x * rsqrt(mean(x^2) + eps)) * scale), the
    mean and rsqrt in float32 (the reference of the kernels' fused norm)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


WS_SMEM_LIMIT = 227 * 1024  # shared memory one CTA may use on the H100
FUSED_NORM_MAX_M = 1  # rows up to which the ws kernel fuses an RMSNorm (bench/NOTES_kernels.md, "Fused RMSNorm")


def fused_norm_ok(cfg, w, m: int) -> bool:
    """Whether a resolved config's kernel applies an RMSNorm to x while staging it (``build_ws_kernel``'s
    ``norm``): the ws kernel on the unpadded x, at most FUSED_NORM_MAX_M rows, w in input order (no act-order gather
    of x) without a sparse part (an XLA product that needs the normalised x), and room in shared memory for the
    norm's per-step scale blocks and scratch."""
    if (cfg.variant != "ws" or not cfg.direct_x or getattr(w, "perm", None) is not None or getattr(w, "nnz", 0)
            or m > FUSED_NORM_MAX_M):
        return False
    m_pad = _m_pad(m)
    smem = (cfg.stages * ws_stage_bytes(m_pad, cfg.tile_k, w, cfg.wgs) + ws_staging_bytes(m_pad, cfg.wgs, cfg.tile_k)
            + cfg.stages * cfg.tile_k * w.dtype.itemsize + cfg.wgs * NORM_SCRATCH * 4)
    return smem <= WS_SMEM_LIMIT


def kernel_norm(x2d: jax.Array, w, cfg, m: int, rms_norm):
    """(x, norm) for a kernel call with an optional RMSNorm = (scale [K], eps) on x: where ``fused_norm_ok``, x
    unchanged and the kernel's ``norm`` = (scale as [K_x/64, 64], K, eps); else the norm applied here (XLA) and
    None."""
    if rms_norm is None:
        return x2d, None
    scale, eps = rms_norm
    if jnp.shape(scale) != (w.in_features,):
        raise ValueError(f"the RMSNorm scale must be [{w.in_features}] (the input features), got {jnp.shape(scale)}")
    if not fused_norm_ok(cfg, w, m):
        return rms_norm_rows(x2d, scale, eps), None
    return x2d, (w.direct_activations(jnp.reshape(scale, (1, -1)))[0], w.in_features, float(eps))


def nan_output_buffer(cfg, n_pad: int, n: int, m: int, dtype, slots_mn: bool = False) -> jax.Array:
    """A NaN-filled ``out_init`` for a resolved config (tests / benchmark: unwritten output tiles show as NaN)."""
    shape, dt = output_buffer_shape(cfg, n_pad, n, m, dtype, slots_mn)
    return jnp.full(shape, jnp.nan, dt)


def output_buffer_shape(cfg, n_pad: int, n: int, m: int, dtype,
                        slots_mn: bool = False) -> tuple[tuple[int, ...], jnp.dtype]:
    """(shape, dtype) of the buffer a resolved config's kernel writes: float32 partials [k_splits, N_pad, M_pad]
    ([k_splits, M, N_pad] with ``slots_mn``, M_pad rows on the padded-x path), or y [M, N] in ``dtype`` (the fused
    launch)."""
    if cfg.fused:
        return (m, n), jnp.dtype(dtype)
    if slots_mn:
        return (cfg.k_splits, m if cfg.direct_x else _m_pad(m), n_pad), jnp.dtype(jnp.float32)
    return (cfg.k_splits, n_pad, _m_pad(m)), jnp.dtype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "norm_eps", "partial_sums"))
def _jit_gptq_matmul(x2d: jax.Array, w: GPTQKernelWeight, config: Optional[KernelConfig] = None,
                     norm_scale: Optional[jax.Array] = None, norm_eps: Optional[float] = None,
                     partial_sums=False):
    """gptq_matmul under jit: the layer's call sites (and the prefill chunks) share one lowering of the kernel."""
    return gptq_matmul(x2d, w, config=config, rms_norm=None if norm_scale is None else (norm_scale, norm_eps),
                       partial_sums=partial_sums)


_jit_dequant_matmul = jax.jit(dequant_matmul)


def gptq_matmul_partials(xk: jax.Array, w: GPTQKernelWeight, cfg: "KernelConfig", *,
                         out_init: Optional[jax.Array] = None, _variant: str = "full",
                         m: Optional[int] = None, norm=None, slots_mn: bool = False,
                         swiglu=None) -> jax.Array:
    """The bare kernel: prepared activations xk [M_pad, K_pad] (kernel row order; with ``cfg.direct_x`` the
    unpadded view [m, K_x/64, 64] of ``direct_activations``) -> float32 partials [k_splits, N_pad, M_pad] ([k_splits,
    M, N_pad] with ``slots_mn``: ``output_buffer_shape``), or with ``cfg.fused`` y [m, N] in w's dtype (m = the real
    rows, default M_pad); cfg must be resolved. ``norm``: the fused RMSNorm of ``kernel_norm``; ``swiglu`` = P: xk
    is a fused gate/up projection's P "mn" slots of m rows, [P, M, 2, I/64, 64] (``swiglu_kernel_input``)."""
    direct_m, m_pad, m = ws_rows(xk, cfg, m, swiglu)
    fused_out = (m, w.out_features, w.dtype_name) if cfg.fused else None
    if norm and not fused_norm_ok(cfg, w, m):
        raise ValueError("the fused RMSNorm needs the ws kernel on the unpadded x (fused_norm_ok)")
    if cfg.variant == "ws":
        call = _build_ws_call(m_pad, w.k_pad, w.n_pad, w.group, w.bits, w.dtype_name, w.nbias is not None,
                              cfg.tile_k, cfg.stages, cfg.ctas, out_init is not None, w.layout, cfg.wgs, fused_out,
                              direct_m=direct_m, variant=_variant, post_scale=bool(cfg.post_scale),
                              norm=norm and norm[1:], slots_mn=slots_mn, swiglu=swiglu)
    else:
        call = _build_call(m_pad, w.k_pad, w.n_pad, w.scales.shape[0], w.group, w.bits, w.dtype_name,
                           w.nbias is not None, cfg.tile_k, cfg.stages, cfg.k_splits, cfg.n_sub, out_init is not None,
                           _variant, w.layout, fused_out, direct_m=direct_m, post_scale=bool(cfg.post_scale))
    args = [xk, w.qweight, w.scales] + ([w.nbias] if w.nbias is not None else []) + ([norm[0]] if norm else [])
    return call_with_output(call, args, out_init, cfg, w, m, w.dtype, slots_mn)


def ws_rows(xk: jax.Array, cfg, m: Optional[int], swiglu) -> tuple[int, int, int]:
    """(direct_m, m_pad, m) of a bare kernel call (``gptq_matmul_partials``): the unpadded rows (0 for the padded
    x), the kernel's padded rows and the real rows; a SwiGLU source brings m itself."""
    if swiglu:
        if cfg.variant != "ws" or not cfg.direct_x or m is None:
            raise ValueError("the SwiGLU staging runs in the ws kernel on the unpadded path, with m given")
        return m, _m_pad(m), m
    direct_m = xk.shape[0] if cfg.direct_x else 0
    m_pad = _m_pad(direct_m) if cfg.direct_x else xk.shape[0]
    return direct_m, m_pad, (direct_m or m_pad) if m is None else m


def _i32(v: int) -> int:
    """A 32-bit pattern as the signed value MLIR's i32 constants take."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def _half_bits(value: float, dtype_name: str) -> int:
    return int(np.asarray(value, dtype=jnp.dtype(dtype_name)).view(np.uint16))


@functools.lru_cache(maxsize=None)
def _build_call(m_pad, k_pad, n_pad, g_k, group, bits, dtype_name, has_bias, tile_k, stages, k_splits, n_sub,
                aliased, variant="full", layout=DEFAULT_LAYOUT, fused_out=None, direct_m=0, post_scale=False):
    """variant (measurements only): "full"; "nodeq" skips the dequantization arithmetic (wrong results; isolates
    memory + wgmma time). fused_out: None (float32 partials) or (m, n, out dtype name): see ``launch_kernel``.
    direct_m: 0 (x padded to [m_pad, K_pad]) or the rows m < 8 of the unpadded view of ``direct_activations``, staged
    per step into a zeroed [8, tile_k] tile (``_make_x_stage``)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = jnp.dtype(dtype_name)
    rows = CHUNK * n_sub
    steps = k_pad // tile_k // k_splits
    gps = max(1, tile_k // group)
    products = _Products(bits, tile_k, group, gps, dtype_name, has_bias, m_pad, variant, layout, post_scale)
    if direct_m:
        zero_x, stage_x = _make_x_stage(direct_m, tile_k, dtype_name)

    def body(*refs):
        x_gmem, w_gmem, s_gmem = refs[:3]
        b_gmem = refs[3] if has_bias else None
        out_gmem = refs[-1]
        n_idx = jax.lax.axis_index("n")
        split = jax.lax.axis_index("split")
        k0 = split * steps

        def scale_index(k):
            return (_scale_block_index(k0 + k, tile_k, group), n_idx)

        in_specs = [
            (direct_x_block_spec(direct_m, tile_k, lambda k: k0 + k) if direct_m
             else x_block_spec(m_pad, tile_k, dtype, lambda k: k0 + k)),
            plgpu.BlockSpec((n_sub, tile_k // CHUNK, bits, 128), lambda k: (n_idx, k0 + k, 0, 0)),
            plgpu.BlockSpec((gps, rows), scale_index),
        ] + ([plgpu.BlockSpec((gps, rows), scale_index)] if has_bias else [])

        def acc_scope(*scoped):
            acc_refs, x_pad = (scoped[:-1], scoped[-1]) if direct_m else (scoped, None)

            def step(_, x_smem, w_smem, s_smem, *b_smem):
                # Dequantize every sub-tile first, then issue the wgmmas and wait (once; with post_scale once per
                # sub-tile): the A registers of one step are never overwritten while a wgmma may still read them.
                cols = [pl.ds(j * CHUNK, CHUNK) for j in range(n_sub)]
                a = [products.dequant(w_smem.at[j], s_smem.at[:, cols[j]], *(b.at[:, cols[j]] for b in b_smem))
                     for j in range(n_sub)]
                if direct_m:  # the step's m rows -> the wgmma's [8, tile_k] tile (rows m..7 stay zero)
                    stage_x(x_smem, x_pad)  # after the dequantization (measured faster than before it)
                    x_smem = x_pad
                if not post_scale:
                    for j in range(n_sub):
                        plgpu.wgmma(acc_refs[j], a[j], x_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(0)
                    return
                for j in range(n_sub):
                    acc_refs[j][...] = products.accumulate(acc_refs[j][...], a[j], x_smem, s_smem.at[:, cols[j]])

            if direct_m:
                zero_x(x_pad)
            gmem = [x_gmem, w_gmem, s_gmem] + ([b_gmem] if has_bias else [])
            plgpu.emit_pipeline(step, grid=(steps,), in_specs=in_specs, max_concurrent_steps=min(stages, steps))(*gmem)
            return [acc_ref[...] for acc_ref in acc_refs]

        scoped = [plgpu.ACC((CHUNK, m_pad), jnp.float32) for _ in range(n_sub)]
        if direct_m:
            scoped.append(plgpu.SMEM((m_pad, tile_k), dtype, transforms=x_smem_transforms(dtype)))
        accs = pl.run_scoped(acc_scope, *scoped)
        store_output(accs, out_gmem, n_idx=n_idx, split=split, m_pad=m_pad, k_splits=k_splits, fused_out=fused_out)

    return launch_kernel(body, name=f"gptq_w{bits}_m{m_pad}_k{tile_k}_n{rows}", n_pad=n_pad, m_pad=m_pad,
                         rows=rows, k_splits=k_splits, aliased=aliased, fused_out=fused_out)


@functools.lru_cache(maxsize=None)
def _build_ws_call(m_pad, k_pad, n_pad, group, bits, dtype_name, has_bias, tile_k, stages, ctas, aliased,
                   layout=DEFAULT_LAYOUT, wgs=WS_COMPUTE_WGS, fused_out=None, direct_m=0, variant="full",
                   post_scale=False, norm=None, slots_mn=False, swiglu=None):
    """The warp-specialized GPTQ kernel (``KernelConfig(variant="ws")``, ``build_ws_kernel``): per step the scales
    (+ nbias) blocks of the CTA's unit; ``variant``, ``post_scale``: as in ``_build_call``; ``norm``: the fused
    RMSNorm's (K, eps); ``slots_mn``, ``swiglu``: as in ``build_ws_kernel``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows = wgs * CHUNK
    gps = max(1, tile_k // group)
    products = _Products(bits, tile_k, group, gps, dtype_name, has_bias, m_pad, variant, layout, post_scale,
                         wg_local=True)

    def side_specs(unit_k):
        def s_map(t):
            unit, k = unit_k(t)
            return (_scale_block_index(k, tile_k, group), unit)

        return [plgpu.BlockSpec((gps, rows), s_map) for _ in range(1 + has_bias)]

    def dequant(w_ref, side, cols):
        s_smem, *b_smem = side
        return products.dequant(w_ref, s_smem.at[:, cols], *(b.at[:, cols] for b in b_smem))

    def product(acc, a, x_smem, side, cols):
        if post_scale:
            return products.accumulate(acc, a, x_smem, side[0].at[:, cols])
        return ws_wgmma(acc, a, x_smem)

    return build_ws_kernel(
        m_pad=m_pad, k_pad=k_pad, n_pad=n_pad, bits=bits, dtype_name=dtype_name, tile_k=tile_k, stages=stages,
        ctas=ctas, aliased=aliased, wgs=wgs, fused_out=fused_out, direct_m=direct_m, side_specs=side_specs,
        dequant=dequant, product=product, norm=norm, slots_mn=slots_mn, swiglu=swiglu,
        name=f"gptq_w{bits}_m{m_pad}_k{tile_k}_ws{ctas}x{wgs}" + ws_name_suffix(norm, slots_mn, swiglu))


def ws_name_suffix(norm, slots_mn: bool, swiglu) -> str:
    """The kernel-name suffix of the ws kernel's options (profiles tell the launches apart by name)."""
    return ("_rmsnorm" if norm else "") + ("_mn" if slots_mn else "") + ("_swiglu" if swiglu else "")


def ws_wgmma(acc, a, x_smem):
    """acc + a @ x_tile^T through one wgmma (float32 [64, M_pad], WGMMA layout) and its wait."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, a, x_smem.transpose((1, 0)))

    return pl.run_state(mma)(plgpu.ACC.init(acc))


def build_ws_kernel(*, m_pad, k_pad, n_pad, bits, dtype_name, tile_k, stages, ctas, aliased, wgs, fused_out,
                    direct_m, side_specs, dequant, product, name, norm=None, slots_mn=False, swiglu=None):
    """The warp-specialized kernel of every weight format: a persistent grid of ``ctas`` CTAs of ``wgs`` + 1
    warpgroups: one issues the TMA copies (``emit_pipeline_warp_specialized``, ``stages`` buffers), the ``wgs`` others
    dequantize + wgmma, each its own 64-row output tile of the CTA's unit (the activation tile is shared). Work is
    split stream-K (``ws_plan`` / ``ws_step``): each CTA runs q or q + 1 consecutive (unit, k-step) pairs across unit
    boundaries; the accumulators go to float32 partial slots [slots, n_pad, m_pad] that the wrapper sums. With
    ``fused_out`` (m, n, out dtype name) every CTA runs whole units and each warpgroup stores its y tile (transposed,
    cast, TMA-clipped to [m, n]) itself: the call is one kernel. ``direct_m``: as in ``_build_call`` (each compute
    warpgroup stages the shared raw activation rows into its own [8, tile_k] tile).

    The format enters through three functions: ``side_specs(unit_k)`` -> the BlockSpecs of the inputs after x and
    the codes [wgs, tile_k/64, bits, 128] (``unit_k(t)`` -> the step's (unit, k block)); ``dequant(w_ref, side_refs,
    cols)`` -> the A operand(s) of the warpgroup whose 64 rows of the unit are ``cols``; ``product(acc, a, x_smem,
    side_refs, cols)`` -> the new float32 accumulator (``ws_wgmma`` for a plain product).

    ``norm`` = (K, eps) (with ``direct_m``): x is the input of an RMSNorm whose scale [K_x/64, 64] comes as one more
    input after the side inputs (one [tile_k/64, 64] block per step); before its pipeline each compute warpgroup sums
    the squares of x's rows (``_make_row_rms``) and every step's staging normalises the step's block
    (``_make_x_stage``), so the normalised x never goes through global memory (the norm's two XLA kernels fewer per
    decode step).

    ``slots_mn`` (stream-K, not fused): the partial slots go out as [slots, rows, n_pad], rows = ``direct_m`` (else
    m_pad), each thread storing its accumulator elements of the real rows straight from its registers
    (``_make_store_mn``), so a row of y is contiguous for the next kernel's ``swiglu`` staging. ``swiglu`` = P (with
    ``direct_m``, no ``norm``): x is not an activation but a fused [gate | up] projection's P "mn" slots [P, m, 2 I],
    viewed [P, m, 2, I/64, 64] float32; every step TMA-copies the
    step's gate block [P, m, 1, tile_k/64, 64] and its up block (index 0 / 1 of the third axis; the blocks past I,
    where K_pad > I, are zero-filled by TMA, so SiLU(0) * 0 = 0 there) and each compute warpgroup stages SiLU(gate) *
    up from them (``_make_swiglu_stage``), so SiLU * up never goes through global memory."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = jnp.dtype(dtype_name)
    rows = wgs * CHUNK
    spu = k_pad // tile_k
    units = n_pad // rows
    q, r, slots = ws_plan(units, spu, ctas)
    grid = q + (r > 0)
    if norm and not direct_m:
        raise ValueError("the fused RMSNorm needs the unpadded activations (direct_x)")
    if swiglu and (norm or not direct_m):
        raise ValueError("the SwiGLU staging needs the unpadded activation path (direct_x) and no fused norm")
    if slots_mn and fused_out:
        raise ValueError("slots_mn is a layout of the stream-K partial slots; the fused launch stores y")
    if direct_m:
        zero_x, stage_x = _make_x_stage(direct_m, tile_k, dtype_name, wg_local=True, norm=bool(norm))
    if swiglu:
        stage_swiglu = _make_swiglu_stage(direct_m, tile_k, dtype_name, swiglu)
    n_x = 2 if swiglu else 1  # pipeline inputs before the codes: x, or the gate and up blocks of the slots
    if norm:
        row_rms = _make_row_rms(direct_m, k_true=norm[0], eps=norm[1])
    out_dtype = jnp.dtype(fused_out[2]) if fused_out else jnp.dtype(jnp.float32)
    transpose = _make_cluster_reduce(CHUNK, m_pad, 1, out_dtype.name, wg_local=True) if fused_out else None
    mn_rows = direct_m or m_pad  # the rows "mn" slots hold
    store_mn, zero_mn = _make_store_mn(mn_rows, m_pad) if slots_mn else (None, None)

    def body(x_gmem, w_gmem, *refs):
        side_gmem, out_gmem = refs[:-1], refs[-1]
        norm_gmem = []
        if norm:
            side_gmem, norm_gmem = side_gmem[:-1], side_gmem[-1:]
        cta = jax.lax.axis_index("n")

        def unit_k(t):
            unit, k, *_ = ws_step(t, cta, units, spu, ctas)
            return unit, k

        def w_map(t):
            unit, k = unit_k(t)
            return (unit, k, 0, 0)

        if swiglu:  # the gate block and the up block of the step's k block
            x_specs = [plgpu.BlockSpec((swiglu, direct_m, 1, tile_k // CHUNK, CHUNK),
                                       lambda t, half=half: (0, 0, half, unit_k(t)[1], 0)) for half in (0, 1)]
        elif direct_m:
            x_specs = [direct_x_block_spec(direct_m, tile_k, lambda t: unit_k(t)[1])]
        else:
            x_specs = [x_block_spec(m_pad, tile_k, dtype, lambda t: unit_k(t)[1])]
        in_specs = [
            *x_specs,
            plgpu.BlockSpec((wgs, tile_k // CHUNK, bits, 128), w_map),
            *side_specs(unit_k),
        ] + ([plgpu.BlockSpec((tile_k // CHUNK, CHUNK), lambda t: (unit_k(t)[1], 0))] if norm else [])

        def scope(acc_smem, o_smem, *x_pad):
            wg = jax.lax.axis_index("wg")

            def step(idx, *refs):
                x_smem, w_smem, *rest = (refs[:n_x], *refs[n_x:])
                *side, acc = rest
                norm_smem = []
                if norm:  # the step's block of the norm's scale
                    side, norm_smem = side[:-1], side[-1:]
                with jax.named_scope("step"):
                    return ws_pipeline_step(idx, x_smem, w_smem, side, norm_smem, acc)

            def ws_pipeline_step(idx, x_smem, w_smem, side, norm_smem, acc):
                (t,) = idx
                unit, k, flush, slot, pieces = ws_step(t, cta, units, spu, ctas)
                cols = pl.ds(wg * CHUNK, CHUNK)
                a = dequant(w_smem.at[wg], side, cols)
                if swiglu:  # SiLU(gate) * up of the step's slot blocks -> this warpgroup's [8, tile_k] tile
                    stage_swiglu(*x_smem, x_pad[0])
                    x_smem = x_pad[0].at[wg]
                elif direct_m:  # this warpgroup's [8, tile_k] tile from the shared raw rows (rows m..7 stay zero)
                    stage_x(x_smem[0], *norm_smem, x_pad[0], *x_pad[1:])
                    x_smem = x_pad[0].at[wg]
                else:
                    x_smem = x_smem[0]
                acc = product(acc, a, x_smem, side, cols)
                row0 = (unit * wgs + wg) * CHUNK

                @pl.when(flush)
                def _():
                    if slots_mn:  # straight from the registers; the head piece also zeroes the empty slots
                        store_mn(acc, out_gmem.at[slot, :, pl.ds(row0, CHUNK)])
                        for extra in range(1, slots):
                            @pl.when((slot == 0) & (pieces <= extra))
                            def _():
                                zero_mn(out_gmem.at[extra, :, pl.ds(row0, CHUNK)])
                        return
                    if not fused_out:
                        ws_store_partial(acc, acc_smem, o_smem, out_gmem, wg=wg, row0=row0, slot=slot, pieces=pieces,
                                         slots=slots)
                        return
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # see ws_store_partial
                    acc_smem.at[wg][...] = acc
                    transpose(acc_smem.at[wg], o_smem.at[wg])  # warpgroup barrier, y^T tile -> y tile, cast
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[wg], out_gmem.at[pl.ds(cta * 0, m_pad), pl.ds(row0, CHUNK)])

                return acc * jnp.where(flush, 0.0, 1.0).astype(jnp.float32)  # reset after a flush

            def compute(eval_pipeline):
                with jax.named_scope("prologue"):
                    if direct_m:
                        zero_x(x_pad[0])
                    if norm:  # 1 / rms of x's rows -> x_pad[1], read by every step's staging
                        row_rms(x_gmem, x_pad[1])
                    zeros = plgpu.layout_cast(jnp.full((CHUNK, m_pad), 0, jnp.float32), plgpu.Layout.WGMMA)
                    if not (fused_out or slots_mn):
                        o_smem.at[wg][...] = zeros  # the zero tile for the slots a unit's pieces leave
                eval_pipeline(zeros)
                with jax.named_scope("epilogue"):
                    plgpu.wait_smem_to_gmem(0)

            pipeline = plgpu.emit_pipeline_warp_specialized(
                step, grid=(grid,), memory_registers=WS_MEMORY_REGISTERS, in_specs=in_specs,
                max_concurrent_steps=min(stages, grid), wg_axis="wg", num_compute_wgs=wgs, compute_context=compute)
            pipeline(*[x_gmem] * n_x, w_gmem, *side_gmem, *norm_gmem)

        o_type = (plgpu.SMEM((wgs, m_pad, CHUNK), out_dtype) if fused_out
                  else plgpu.SMEM((wgs, CHUNK, m_pad), jnp.float32))
        x_pad_type = [plgpu.SMEM((wgs, m_pad, tile_k), dtype, transforms=x_smem_transforms(dtype))] if direct_m else []
        if norm:  # per warpgroup: 4 warps x 8 rows of partial sums, then the rows' 1 / rms
            x_pad_type.append(plgpu.SMEM((wgs, NORM_SCRATCH), jnp.float32))
        pl.run_scoped(scope, plgpu.SMEM((wgs, CHUNK, m_pad), jnp.float32), o_type, *x_pad_type, collective_axes="wg")

    out_type = (jax.ShapeDtypeStruct(fused_out[:2], out_dtype) if fused_out
                else jax.ShapeDtypeStruct((slots, mn_rows, n_pad) if slots_mn else (slots, n_pad, m_pad), jnp.float32))
    mesh = plgpu.Mesh(grid=(ctas,), grid_names=("n",), num_threads=wgs + 1, thread_name="wg")
    return mesh_kernel(body, out_type=out_type, mesh=mesh, name=name + ("f" if fused_out else ""), aliased=aliased,
                       trace_ranges=6 * grid + 8)  # scope ranges per warpgroup (a step's conds re-enter "step")


def ws_store_partial(acc, acc_smem, o_smem, out_gmem, *, wg, row0, slot, pieces, slots: int) -> None:
    """A stream-K ws warpgroup's flush: its float32 [64, M_pad] accumulator -> partial slot ``slot`` of out [slots,
    N_pad, M_pad] at rows row0.. (TMA store through acc_smem[wg]); the unit's head CTA (slot 0) also stores the zero
    tile o_smem[wg] into the slots its unit's ``pieces`` leave empty. Shared by ``build_ws_kernel`` and the fused
    MLP (``mlp_decode``)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    # the previous flush's TMA store has read the staging buffer (this wait ends in a warpgroup barrier, so no
    # thread overwrites it earlier)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    acc_smem.at[wg][...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(acc_smem.at[wg], out_gmem.at[slot, pl.ds(row0, CHUNK), :])
    for extra in range(1, slots):
        @pl.when((slot == 0) & (pieces <= extra))
        def _():
            plgpu.copy_smem_to_gmem(o_smem.at[wg], out_gmem.at[extra, pl.ds(row0, CHUNK), :])


def _make_store_mn(rows: int, m_pad: int):
    """inline_mgpu functions (store(acc, out_ref), zero(out_ref)) of the "mn" slots (``build_ws_kernel``'s
    ``slots_mn``), run by a compute warpgroup: the float32 [64, m_pad] accumulator in the WGMMA layout (a thread holds
    rows r and r + 8, r = 16 * warp + lane // 4, and in each 8-column block the columns 2 (lane % 4) and + 1) goes
    straight from the registers to out_ref = columns row0..row0+63 of one slot, [rows, 64] in global memory: each
    thread stores its elements of the first ``rows`` columns (at M = 1: a quarter of the threads, two floats each),
    without shared memory, a fence or a barrier. ``zero`` stores 0 at the same places (the slots a unit's pieces
    leave empty)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(out_ref, value_of):
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, memref, scf

        index = ir.IndexType.get()
        tid, row_of = _fragment_rows(wg_local=True)
        col0 = arith.index_cast(index, arith.muli(arith.remui(tid, arith.constant(tid.type, 4)),
                                                  arith.constant(tid.type, 2)))
        for block in range(-(-rows // 8)):
            for half in range(2):
                for j in range(2):
                    col = arith.addi(col0, arith.constant(index, 8 * block + j))
                    if_op = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, col, arith.constant(index, rows)))
                    with ir.InsertionPoint(if_op.then_block):
                        memref.store(value_of(block, half, j), out_ref, [col, row_of[half]])
                        scf.yield_([])

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def store(ctx, acc, out_ref):
        del ctx
        from jax._src.lib.mlir.dialects import vector

        assert acc.registers.shape[1] == m_pad // 8 and acc.registers.shape[4] == 2, acc.registers.shape
        body(out_ref, lambda block, half, j: vector.extract(
            acc.registers[(0, block, 0, 0, half) + (0,) * (acc.registers.ndim - 5)], [], [j]))

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def zero(ctx, out_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith

        zero_value = arith.constant(ir.F32Type.get(), 0.0)
        body(out_ref, lambda block, half, j: zero_value)

    return store, zero


def x_smem_transforms(dtype):
    """The SMEM layout of the wgmma's activation (N) operand: (8, 64)-tiled, 128-byte-swizzled."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return (plgpu.TilingTransform((8, X_SWIZZLE // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(X_SWIZZLE))


def x_block_spec(m_pad: int, tile_k: int, dtype, k_block):
    """The activation BlockSpec of a pipeline step (``k_block(step)`` = its tile_k-column block): the padded x
    [m_pad, K_pad] as (8, 64)-tiled, 128-byte-swizzled [m_pad, tile_k] tiles."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.BlockSpec((m_pad, tile_k), lambda s: (0, k_block(s)), transforms=x_smem_transforms(dtype))


def direct_x_block_spec(m: int, tile_k: int, k_block):
    """The unpadded activation BlockSpec (``direct_x``): plain [m, tile_k/64, 64] boxes of the [m, K_x/64, 64] view
    (no tiling: any m; every box dimension <= 256 as TMA requires; blocks past K_x are zero-filled by TMA)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.BlockSpec((m, tile_k // CHUNK, CHUNK), lambda s: (0, k_block(s), 0))


X_SWIZZLE = 128  # bytes: one 64-column row of a 16-bit (8, 64) tile
X_VEC = 8  # 16-bit elements per 16-byte swizzle chunk (one vector load / store of the staging copy)


def x_stage_coords(e, tile_k: int, div, rem, xor):
    """Staging plan of the direct_x path for flat index e (python ints, or traced values through ``div`` / ``rem``
    / ``xor``): e in [0, m * tile_k / 8) names the 16-byte chunk (row r, 64-column block c, chunk q) of the raw
    [m, tile_k/64, 64] rows; it goes to chunk q ^ r of row r of tile c of the (8, 64)-tiled, 128-byte-swizzled
    [8, tile_k] tile, whose physical memref is [tile_k/64, 8, 64]. Returns (r, c, q, q ^ r)."""
    per_row = tile_k // X_VEC
    r, rest = div(e, per_row), rem(e, per_row)
    c, q = div(rest, CHUNK // X_VEC), rem(rest, CHUNK // X_VEC)
    return r, c, q, xor(q, r)


def x_zero_coords(e, m: int, tile_k: int, div, rem, add=lambda a, b: a + b):
    """Zeroing plan of the direct_x tile: e in [0, (8 - m) * tile_k / 8) -> (row r >= m, tile c, physical chunk
    q) of the [tile_k/64, 8, 64] memref (rows >= m hold no data; their chunk order does not matter)."""
    per_row = tile_k // X_VEC
    r, rest = div(e, per_row), rem(e, per_row)
    return add(r, m), div(rest, CHUNK // X_VEC), rem(rest, CHUNK // X_VEC)


def _make_x_stage(m: int, tile_k: int, dtype_name: str, wg_local: bool = False, norm: bool = False):
    """inline_mgpu functions (zero, stage) of the direct_x path, run by a whole warpgroup. ``zero(x_pad)``: rows
    m..7 of the (8, 64)-tiled, swizzled [8, tile_k] tile x_pad := 0 (once per CTA). ``stage(x_raw, x_pad)``: the
    m rows of the step's raw [m, tile_k/64, 64] TMA buffer -> rows 0..m-1 of x_pad in the swizzled layout
    (``x_stage_coords``: 16-byte loads / stores, at most ceil(m * tile_k / 1024) per thread), then the
    generic-to-async proxy fence and a warpgroup barrier, so the wgmma that follows reads the whole tile (its own
    wgmma_wait keeps the next step from overwriting it early). ``wg_local``: x_pad is [wgs, 8, tile_k], one tile
    per compute warpgroup (thread index // 128). ``norm`` (the ws kernel's fused RMSNorm, wg_local):
    ``stage(x_raw, scale, x_pad, scratch)`` also normalises on the way, bf16(bf16(x * r) * scale) as
    ``rms_norm_rows``, with r = ``scratch[wg, NORM_R + row]`` (``_make_row_rms``) and the step's [tile_k/64, 64]
    block of the norm's scale."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not 1 <= m < 8:
        raise ValueError(f"the direct_x staging takes 1..7 activation rows, got {m}")
    n_copy, n_zero = m * tile_k // X_VEC, (8 - m) * tile_k // X_VEC
    pad_type = plgpu.RefType(transforms=x_smem_transforms(jnp.dtype(dtype_name)))

    def setup():
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith
        import jax.experimental.mosaic.gpu as mgpu

        index = ir.IndexType.get()
        tid = arith.index_cast(index, mgpu.utils.thread_idx())
        c128 = arith.constant(index, 128)
        prefix = [arith.divui(tid, c128), arith.constant(index, 0)] if wg_local else [arith.constant(index, 0)]
        ops = dict(div=lambda a, b: arith.divui(a, arith.constant(index, b)),
                   rem=lambda a, b: arith.remui(a, arith.constant(index, b)))
        return arith.remui(tid, c128), prefix, ops, index

    def for_each(n, index, tid, body):
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, scf

        for i in range(-(-n // 128)):
            e = arith.addi(tid, arith.constant(index, 128 * i))
            if 128 * (i + 1) <= n:
                body(e)
                continue
            if_op = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, e, arith.constant(index, n)))
            with ir.InsertionPoint(if_op.then_block):
                body(e)
                scf.yield_([])

    @plgpu.inline_mgpu(arg_types=(pad_type,))
    def zero(ctx, pad_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, vector

        tid, prefix, ops, index = setup()
        elt = ir.MemRefType(pad_ref.type).element_type
        vec_ty = ir.VectorType.get((X_VEC,), elt)
        zeros = arith.constant(vec_ty, ir.DenseElementsAttr.get_splat(vec_ty, ir.FloatAttr.get(elt, 0.0)))

        def body(e):
            r, c, q = x_zero_coords(e, m, tile_k, add=lambda a, b: arith.addi(a, arith.constant(index, b)), **ops)
            vector.store(zeros, pad_ref, [*prefix, c, r, arith.muli(q, arith.constant(index, X_VEC))])

        for_each(n_zero, index, tid, body)

    def stage_body(raw_ref, pad_ref, scale_ref=None, rms_ref=None):
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, memref, vector
        import jax.experimental.mosaic.gpu as mgpu

        tid, prefix, ops, index = setup()
        vec_ty = ir.VectorType.get((X_VEC,), ir.MemRefType(raw_ref.type).element_type)
        f32_vec = ir.VectorType.get((X_VEC,), ir.F32Type.get())
        cvec = arith.constant(index, X_VEC)

        def body(e):
            r, c, q, qs = x_stage_coords(e, tile_k, xor=arith.xori, **ops)
            v = vector.load(vec_ty, raw_ref, [r, c, arith.muli(q, cvec)])
            if scale_ref is not None:  # bf16(bf16(x * r) * scale), as rms_norm_rows
                inv = memref.load(rms_ref, [prefix[0], arith.addi(r, arith.constant(index, NORM_R))])
                v = arith.truncf(vec_ty, arith.mulf(arith.extf(f32_vec, v), vector.broadcast(f32_vec, inv)))
                g = arith.extf(f32_vec, vector.load(vec_ty, scale_ref, [c, arith.muli(q, cvec)]))
                v = arith.truncf(vec_ty, arith.mulf(arith.extf(f32_vec, v), g))
            vector.store(v, pad_ref, [*prefix, c, r, arith.muli(qs, cvec)])

        for_each(n_copy, index, tid, body)
        mgpu.utils.commit_shared()

    if norm:
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), pad_type, plgpu.RefType()))
        def stage(ctx, raw_ref, scale_ref, pad_ref, rms_ref):
            del ctx
            stage_body(raw_ref, pad_ref, scale_ref, rms_ref)
    else:
        @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), pad_type))
        def stage(ctx, raw_ref, pad_ref):
            del ctx
            stage_body(raw_ref, pad_ref)

    return zero, stage


def swiglu_stage_coords(p, tile_k: int, div, rem, xor, scale, add):
    """Staging plan of the SwiGLU staging for pair index p (python ints, or traced values through the ops, as
    ``x_stage_coords``; ``scale(a, b)`` = a * b for a python int b, ``add`` of two values): p in [0, m * tile_k / 2)
    names columns (col, col + 1) of row r of the step's [m, tile_k/64, 64] gate / up blocks, i.e. column w = col % 64
    of their 64-column block c; both go to row r of tile c of the swizzled [8, tile_k] x tile at physical columns
    (q ^ r) * 8 + j (+ 1) (16-byte chunk q = w // 8, element j = w % 8). Returns (r, c, w, physical column)."""
    r, col = div(p, tile_k // 2), scale(rem(p, tile_k // 2), 2)
    c, w = div(col, CHUNK), rem(col, CHUNK)
    return r, c, w, add(scale(xor(div(w, X_VEC), r), X_VEC), rem(w, X_VEC))


def _make_swiglu_stage(m: int, tile_k: int, dtype_name: str, slots: int):
    """inline_mgpu ``stage(gate_raw, up_raw, x_pad)`` of the SwiGLU staging (ws kernel, every compute warpgroup,
    every step; rows m..7 of x_pad are zeroed once by ``_make_x_stage``'s zero): gate_raw / up_raw are the step's
    [P, m, 1, tile_k/64, 64] float32 blocks of a fused [gate | up] projection's "mn" partial slots; thread t of the
    warpgroup takes the column pairs p = t + 128 i (``swiglu_stage_coords``), sums each element's P slots in slot
    order, rounds gate and up to the activation dtype, applies SiLU(g) * u with every operation rounded as XLA's
    16-bit elementwise ops are (``swiglu_rounded``: e = exp(-g), d = 1 + e, s = 1 / d, g * s, * u) and stores the
    pair into its warpgroup's swizzled [8, tile_k] tile; then the proxy fence and a warpgroup barrier (as the x
    staging). Staging before the dequantization with the fence and barrier after it measured slower (H100: GPTQ
    4-bit 11008x4096 kernel 13.9 vs 13.5 us, bench/NOTES_kernels.md)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not 1 <= m < 8:
        raise ValueError(f"the SwiGLU staging takes 1..7 activation rows, got {m}")
    pad_type = plgpu.RefType(transforms=x_smem_transforms(jnp.dtype(dtype_name)))
    n_pairs = m * tile_k // 2

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), pad_type))
    def stage(ctx, gate_ref, up_ref, pad_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, scf, vector
        from jax._src.lib.mlir.dialects import math as mlir_math
        import jax.experimental.mosaic.gpu as mgpu

        index, f32 = ir.IndexType.get(), ir.F32Type.get()
        dt = ir.MemRefType(pad_ref.type).element_type
        idx = lambda v: arith.constant(index, v)  # noqa: E731
        tid_all = arith.index_cast(index, mgpu.utils.thread_idx())
        tid, wg = arith.remui(tid_all, idx(128)), arith.divui(tid_all, idx(128))
        ops = dict(div=lambda a, b: arith.divui(a, idx(b)), rem=lambda a, b: arith.remui(a, idx(b)), xor=arith.xori,
                   scale=lambda a, b: arith.muli(a, idx(b)), add=arith.addi)
        f32x2, dtx2 = ir.VectorType.get((2,), f32), ir.VectorType.get((2,), dt)
        one = arith.constant(f32, 1.0)
        rnd = lambda v: arith.extf(f32, arith.truncf(dt, v))  # noqa: E731

        def pair(p):
            r, c, w, phys = swiglu_stage_coords(p, tile_k, **ops)
            sums = []
            for ref in (gate_ref, up_ref):
                total = vector.load(f32x2, ref, [idx(0), r, idx(0), c, w])
                for s_ in range(1, slots):
                    total = arith.addf(total, vector.load(f32x2, ref, [idx(s_), r, idx(0), c, w]))
                sums.append(total)
            outs = []
            for j in range(2):
                g = rnd(vector.extract(sums[0], [], [j]))
                u = rnd(vector.extract(sums[1], [], [j]))
                sig = rnd(arith.divf(one, rnd(arith.addf(one, rnd(mlir_math.exp(arith.negf(g)))))))
                outs.append(arith.truncf(dt, arith.mulf(rnd(arith.mulf(g, sig)), u)))
            vector.store(vector.from_elements(dtx2, outs), pad_ref, [wg, idx(0), c, r, phys])

        for i in range(-(-n_pairs // 128)):
            p = arith.addi(tid, idx(128 * i))
            if 128 * (i + 1) <= n_pairs:
                pair(p)
                continue
            if_op = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, p, idx(n_pairs)))
            with ir.InsertionPoint(if_op.then_block):
                pair(p)
                scf.yield_([])
        mgpu.utils.commit_shared()

    return stage


def swiglu_rounded(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SiLU(gate) * up in gate's dtype as XLA computes ``jax.nn.silu(gate) * up`` on 16-bit inputs (every op in
    float32, rounded to the dtype after it): e = exp(-g), d = 1 + e, sig = 1 / d, s = g * sig, s * up. The SwiGLU
    staging's arithmetic (``_make_swiglu_stage``)."""
    dt = gate.dtype
    rnd = lambda v: v.astype(dt).astype(jnp.float32)  # noqa: E731
    g = gate.astype(jnp.float32)
    sig = rnd(1.0 / rnd(1.0 + rnd(jnp.exp(-g))))
    return (rnd(g * sig) * up.astype(jnp.float32)).astype(dt)


def staged_swiglu_reference(slots_mn: jax.Array, m: int, inter: int, k_pad: int, tile_k: int, dtype) -> jax.Array:
    """The SwiGLU staging's x tiles in numpy, built through its own plan (``swiglu_stage_coords``): the gate columns
    0..inter-1 and the up columns inter..2 inter-1 of "mn" slots [P, >= m, 2 inter] (rows 0..m-1, as the TMA boxes
    bring them; zero from inter to k_pad, as TMA fills the boxes past the array), summed over the slots in slot
    order, then ``swiglu_rounded`` in ``dtype``; per step the plan places the
    step's pairs into a NaN-poisoned physical [tile_k/64, 8, 64] swizzled tile whose rows m..7 are zero, read back
    in the wgmma's logical order. Returns [8, k_pad] (what the padded path's x would be), NaN where the plan leaves
    a hole."""
    sl = np.zeros((*slots_mn.shape[:2], 2, k_pad), np.float32)
    sl[..., :inter] = np.asarray(slots_mn, np.float32).reshape(*slots_mn.shape[:2], 2, inter)
    gate, up = sl[0, :m, 0], sl[0, :m, 1]
    for s_ in range(1, sl.shape[0]):
        gate, up = gate + sl[s_, :m, 0], up + sl[s_, :m, 1]
    act = np.asarray(swiglu_rounded(jnp.asarray(gate).astype(dtype), jnp.asarray(up).astype(dtype)), np.float32)
    ints = dict(div=lambda a, b: a // b, rem=lambda a, b: a % b, xor=lambda a, b: a ^ b, scale=lambda a, b: a * b,
                add=lambda a, b: a + b)
    out = []
    for kb in range(k_pad // tile_k):
        phys = np.full((tile_k // CHUNK, 8, CHUNK), np.nan, np.float32)
        phys[:, m:] = 0.0
        for p in range(m * tile_k // 2):
            r, c, w, col = swiglu_stage_coords(p, tile_k, **ints)
            k0 = kb * tile_k + c * CHUNK + w
            phys[c, r, col:col + 2] = act[r, k0:k0 + 2]
        rows, cols = np.arange(8)[:, None], np.arange(tile_k)[None, :]
        out.append(phys[cols // CHUNK, rows, ((cols % CHUNK) // X_VEC ^ rows) * X_VEC + cols % X_VEC])
    return jnp.asarray(np.concatenate(out, axis=1))


NORM_R = 32  # the fused RMSNorm's scratch [wgs, NORM_SCRATCH] float32: 4 warps x 8 rows of partial sums, then 1 / rms
NORM_SCRATCH = NORM_R + 8


def _make_row_rms(m: int, k_true: int, eps: float):
    """inline_mgpu ``row_rms(x_gmem, scratch)`` of the fused RMSNorm (ws kernel, run by each compute warpgroup
    before its pipeline): the squares of the m raw rows of x [m, K_x/64, 64] (global memory, 16-byte vectors,
    float32) summed over the thread, the warp (shuffles) and the warpgroup's 4 warps (``scratch[wg, 8 * warp +
    row]``), then ``scratch[wg, NORM_R + row]`` = rsqrt(sum / K + eps) as ``rms_norm_rows`` computes it (K = the real
    input features: the zero columns K..K_x add nothing)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
    def row_rms(ctx, x_ref, scratch_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, memref, scf, vector
        from jax._src.lib.mlir.dialects import math as mlir_math
        import jax.experimental.mosaic.gpu as mgpu

        index, f32 = ir.IndexType.get(), ir.F32Type.get()
        idx = lambda v: arith.constant(index, v)  # noqa: E731
        tid_all = arith.index_cast(index, mgpu.utils.thread_idx())
        tid, wg = arith.remui(tid_all, idx(128)), arith.divui(tid_all, idx(128))
        lane, warp = arith.remui(tid, idx(32)), arith.divui(tid, idx(32))
        n_vec = ir.MemRefType(x_ref.type).shape[1] * CHUNK // X_VEC  # 16-byte vectors per row
        vec_ty = ir.VectorType.get((X_VEC,), ir.MemRefType(x_ref.type).element_type)
        f32_vec = ir.VectorType.get((X_VEC,), f32)
        zero = arith.constant(f32, 0.0)

        def when(cond, fn):
            if_op = scf.IfOp(cond)
            with ir.InsertionPoint(if_op.then_block):
                fn()
                scf.yield_([])

        for row in range(m):
            total = zero
            for i in range(-(-n_vec // 128)):  # this thread's vectors e = tid + 128 i of the row
                e = arith.addi(tid, idx(128 * i))
                inside = arith.cmpi(arith.CmpIPredicate.ult, e, idx(n_vec))
                e = arith.select(inside, e, idx(0))
                v = arith.extf(f32_vec, vector.load(vec_ty, x_ref, [idx(row), arith.divui(e, idx(CHUNK // X_VEC)),
                                                                     arith.muli(arith.remui(e, idx(CHUNK // X_VEC)),
                                                                                idx(X_VEC))]))
                sq = arith.mulf(v, v)
                part = vector.extract(sq, [], [0])
                for j in range(1, X_VEC):
                    part = arith.addf(part, vector.extract(sq, [], [j]))
                total = arith.addf(total, part if 128 * (i + 1) <= n_vec else arith.select(inside, part, zero))
            total = mgpu.utils.warp_tree_reduce(total, arith.addf, 32)
            when(arith.cmpi(arith.CmpIPredicate.eq, lane, idx(0)),
                 lambda row=row, total=total: memref.store(
                     total, scratch_ref, [wg, arith.addi(arith.muli(warp, idx(8)), idx(row))]))
        mgpu.utils.warpgroup_barrier()

        def rms():
            total = memref.load(scratch_ref, [wg, tid])
            for w in range(1, 4):
                total = arith.addf(total, memref.load(scratch_ref, [wg, arith.addi(tid, idx(8 * w))]))
            inv = mlir_math.rsqrt(arith.addf(arith.divf(total, arith.constant(f32, float(k_true))),
                                             arith.constant(f32, float(eps))))
            memref.store(inv, scratch_ref, [wg, arith.addi(tid, idx(NORM_R))])

        when(arith.cmpi(arith.CmpIPredicate.ult, tid, idx(m)), rms)
        mgpu.utils.warpgroup_barrier()

    return row_rms


KERNEL_TRACE_DIR = os.environ.get("JAXQUANT_KERNEL_TRACE_DIR", "")  # diagnostics only: slows every kernel


def mesh_kernel(body, *, out_type, mesh, name: str, aliased: bool, trace_ranges: int = 0):
    """``pl.kernel`` of ``body`` over ``mesh`` (Mosaic GPU). ``aliased``: the poisoned-output variant (tests /
    benchmarks): the kernel writes into a Ref made from the call's last argument (the last len(out_type) arguments
    for a tuple of outputs) instead of a fresh ``out_type`` buffer, so any output element it leaves unwritten keeps
    the caller's poison. ``trace_ranges``: with
    ``JAXQUANT_KERNEL_TRACE_DIR`` set, Mosaic GPU's on-device profiler records up to this many named-scope ranges
    per warpgroup and writes a trace there after every call (``bench/ws_trace.py``)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = plgpu.CompilerParams()
    if KERNEL_TRACE_DIR and trace_ranges:  # bench/ws_trace.py: per-warpgroup timelines of the named scopes
        params = plgpu.CompilerParams(profile_space=trace_ranges, profile_dir=KERNEL_TRACE_DIR)
    if not aliased:
        return pl.kernel(body, out_type=out_type, mesh=mesh, compiler_params=params, name=name)
    in_place = pl.kernel(body, out_type=(), mesh=mesh, compiler_params=params, name=name)
    n_out = len(out_type) if isinstance(out_type, tuple) else 0  # a tuple of outputs: as many trailing arguments

    def call(*args):
        refs = [jax.new_ref(a) for a in args[len(args) - max(n_out, 1):]]
        in_place(*args[:len(args) - len(refs)], *refs)
        outs = tuple(jax.freeze(r) for r in refs)
        return outs if n_out else outs[0]

    return call


MAX_CLUSTER = 8  # CTAs per thread-block cluster (portable limit): the fused launch takes k_splits <= 8
# Cluster launch (k_splits > 1 fused) by default for configs that leave ``fused`` open: off, measured slower than
# the partials launch (H100, 8192x28672 int4 M = 1: 57.0 vs 52.1 us kernel; 4096x4096 k_splits 8: 15.7 vs 6.0 us).
FUSED_DEFAULT = False
# One split (fused launch without a cluster: the call is one kernel) for GPTQ 4-bit weights at M_pad <= 16 when the
# output tiles alone give this many CTAs per SM. Measured (H100, bench/kernels_launch.py): 8192x28672 (448 tiles)
# M = 1: 52.2 us path vs 55.4 (2 splits + partial sum), M = 16: 52.7 vs 55.8. Not for 3-bit / LUT codes (their
# integer work wants more CTAs: int3 55.1 vs 45.3 us kernel, lut3 43.8 vs 39.3) nor for fewer tiles.
ONE_SPLIT_MIN_TILES_PER_SM = 3
# Decode-sized GPTQ rule (``decode_blocks``): at M_pad <= 16, tile_k 256 and the fewest K splits that give at least
# DECODE_MIN_CTAS_PER_SM CTAs per SM (one split = the fused single kernel), unless that grid exceeds
# DECODE_MAX_CTAS_PER_SM (then the general search below). Measured (H100, bench/kernels_sweep.py, every tile_k /
# k_splits / launch on the LLaMA-7B decode shapes, 3 and 4 bits, M = 1 and 16; bench/NOTES_kernels.md "Decode
# shapes"): the best or within 0.1 us of it in 14 of 16 cases, the 7B layer's four fused linears at M = 1 62.1 vs
# 70.2 us (int4) with the previous "most CTAs up to 3.5 per SM" pick. Grids of 256 CTAs (64 tiles x 4 splits:
# 4096x4096, 11008x4096), 344 (4096x22016, one split) and 384 (4096x12288, 2 splits) measured best; the cap: 3-bit
# 8192x28672 in one split (448 CTAs = 3.4 per SM, more than one wave) 51.4 vs 46.1 us with two.
# Off by default: in the jitted 7B decode (bench/decode.py, same H100 run 2026-11-23T04:41Z, rule on vs off) the
# kernels' saving went to a slower XLA partial-sum reduction fusion (q/k/v at 2 splits: 274 us per step): GPTQ 4-bit
# 2.625 vs 2.623 ms/step, 3-bit 3.170 vs 2.944 ms/step. JAXQUANT_GPTQ_DECODE_RULE=1 turns it on.
DECODE_RULE = os.environ.get("JAXQUANT_GPTQ_DECODE_RULE", "0") != "0"
DECODE_TILE_K = 256
DECODE_MIN_CTAS_PER_SM = 1.9
DECODE_MAX_CTAS_PER_SM = 3.0


def decode_blocks(w, num_sms: int = 132):
    """(tile_k, k_splits) of the decode-sized GPTQ rule (M_pad <= 16) for w, or None where it does not apply
    (tile_k 256 does not fit K_pad / the group, or no split count lands between DECODE_MIN_CTAS_PER_SM and
    DECODE_MAX_CTAS_PER_SM CTAs per SM with >= 4 pipeline steps per split). LLaMA-7B: 4096x12288 (q/k/v fused)
    -> 256 / 2; 4096x22016 (gate/up fused) -> 256 / 1; 4096x4096 and 11008x4096 (K_pad 11264) -> 256 / 4."""
    t = DECODE_TILE_K
    if w.k_pad % t or (w.group % t and t % w.group):
        return None
    steps, ctas_n = w.k_pad // t, w.n_pad // CHUNK
    for s in (1, 2, 4, 8, 16):
        if steps % s:
            continue
        if steps // s < 4:
            return None
        if ctas_n * s >= DECODE_MIN_CTAS_PER_SM * num_sms:
            return (t, s) if ctas_n * s <= DECODE_MAX_CTAS_PER_SM * num_sms else None
    return None


def fused_output_ok(k_splits: int, n: int, out_dtype) -> bool:
    """Whether the fused launch can take this output: one cluster per output tile, and TMA needs 16-byte row
    strides of the [M, N] output."""
    return k_splits <= MAX_CLUSTER and (n * jnp.dtype(out_dtype).itemsize) % 16 == 0


def launch_partials(body, *, name: str, n_pad: int, m_pad: int, rows: int, k_splits: int, aliased: bool):
    """The first launch: see ``launch_kernel`` with fused_out=None."""
    return launch_kernel(body, name=name, n_pad=n_pad, m_pad=m_pad, rows=rows, k_splits=k_splits, aliased=aliased)


def launch_kernel(body, *, name: str, n_pad: int, m_pad: int, rows: int, k_splits: int, aliased: bool,
                  fused_out=None):
    """The kernels' shared launch. ``body`` ends with ``store_output`` (same ``fused_out``).

    fused_out None ("partials", the first launch): grid (n_pad/rows output tiles, k_splits), float32 partials
    [k_splits, n_pad, m_pad] that the wrapper sums, slices, transposes and casts (one XLA fusion).
    fused_out (m, n, out dtype name): the k_splits CTAs of one output tile form a thread-block cluster; after the K
    loop they exchange their float32 tiles through distributed shared memory, the cluster's first CTA sums them and
    TMA-stores y^T as y [m, n] in the out dtype (rows >= m and columns >= n clipped by the TMA unit): the call is one
    kernel. ``aliased``: the poisoned-output variant (tests / benchmark) that writes into a Ref made from the
    caller's last argument (float32 [k_splits, n_pad, m_pad], or [m, n] in the out dtype when fused)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if fused_out is None:
        out_type = jax.ShapeDtypeStruct((k_splits, n_pad, m_pad), jnp.float32)
        mesh = plgpu.Mesh(grid=(n_pad // rows, k_splits), grid_names=("n", "split"))
    else:
        m, n, out_dtype = fused_out
        if not fused_output_ok(k_splits, n, out_dtype):
            raise ValueError(f"the fused launch needs k_splits <= {MAX_CLUSTER} and 16-byte output rows, got "
                             f"k_splits={k_splits}, N={n} {out_dtype}")
        out_type = jax.ShapeDtypeStruct((m, n), jnp.dtype(out_dtype))
        if k_splits > 1:
            mesh = plgpu.Mesh(grid=(n_pad // rows,), grid_names=("n",), cluster=(k_splits,), cluster_names=("split",))
        else:
            mesh = plgpu.Mesh(grid=(n_pad // rows, 1), grid_names=("n", "split"))
    return mesh_kernel(body, out_type=out_type, mesh=mesh, name=name, aliased=aliased)


def store_output(accs, out_gmem, *, n_idx, split, m_pad: int, k_splits: int, fused_out=None):
    """The kernels' shared epilogue (inside the kernel body): float32 accumulators [64, m_pad] of the CTA's n_sub
    output tiles -> out_gmem, as ``launch_kernel`` describes for the same ``fused_out``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows = CHUNK * len(accs)
    if fused_out is None:
        def store(o_smem):
            for j, acc in enumerate(accs):
                o_smem[j * CHUNK:(j + 1) * CHUNK, :] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[split, pl.ds(n_idx * rows, rows), :])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store, plgpu.SMEM((rows, m_pad), jnp.float32))
        return

    out_dtype = jnp.dtype(fused_out[2])
    reduce = _make_cluster_reduce(rows, m_pad, k_splits, out_dtype.name)

    def store(red_smem, o_smem):
        for j, acc in enumerate(accs):
            red_smem[j * CHUNK:(j + 1) * CHUNK, :] = acc
        reduce(red_smem, o_smem)

        @pl.when(split == 0)
        def _():
            plgpu.commit_smem()
            # A traced row start: TMA clips the rows >= m of the [m, n] output (a static 0 would be bounds-checked
            # against m at trace time).
            row0 = n_idx * 0
            plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[pl.ds(row0, m_pad), pl.ds(n_idx * rows, rows)])
            plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM((rows, m_pad), jnp.float32), plgpu.SMEM((m_pad, rows), out_dtype))


def _make_cluster_reduce(rows: int, m_pad: int, k_splits: int, out_dtype_name: str, wg_local: bool = False):
    """inline_mgpu function (red_smem [rows, m_pad] f32 holding this CTA's tile, o_smem [m_pad, rows] out dtype):
    cluster barrier; the cluster's first CTA sums the k_splits tiles (its own + its peers' through distributed
    shared memory, in split order) and writes the transposed, cast sum into o_smem; a second cluster barrier keeps
    the peers' shared memory alive until it is read. k_splits = 1: a warpgroup barrier and the transpose."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
    def reduce(ctx, red_ref, o_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, scf
        import jax.experimental.mosaic.gpu as mgpu

        index = ir.IndexType.get()
        out_ty = mgpu.utils.dtype_to_ir_type(jnp.dtype(out_dtype_name))

        def cidx(v):
            return arith.constant(index, v)

        def cluster_sync():  # release / acquire across the cluster (all threads of every CTA)
            llvm.inline_asm(ir.Type.parse("!llvm.void"), [],
                            "barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;", "",
                            has_side_effects=True)

        if k_splits > 1:
            cluster_sync()
        else:
            mgpu.utils.warpgroup_barrier()
        leader = arith.cmpi(arith.CmpIPredicate.eq, gpu.cluster_block_id(gpu.Dimension.x), cidx(0))
        if_op = scf.IfOp(leader)
        with ir.InsertionPoint(if_op.then_block):
            srcs = [red_ref] + [mgpu.utils.get_cluster_ref(red_ref, gpu.Dimension.x, cidx(s))
                                for s in range(1, k_splits)]
            tid = mgpu.utils.thread_idx()
            if wg_local:  # several warpgroups per CTA (the ws variant): each transposes its own tile
                tid = arith.remui(tid, arith.constant(tid.type, 128))
            tid = arith.index_cast(index, tid)
            for i in range(rows * m_pad // 128):
                e = arith.addi(tid, cidx(128 * i))
                r, mm = arith.remui(e, cidx(rows)), arith.divui(e, cidx(rows))
                v = memref.load(srcs[0], [r, mm])
                for src in srcs[1:]:
                    v = arith.addf(v, memref.load(src, [r, mm]))
                if out_dtype_name != "float32":
                    v = arith.truncf(out_ty, v)
                memref.store(v, o_ref, [mm, r])
            scf.yield_([])
        if k_splits > 1:
            cluster_sync()

    return reduce


class _Products:
    """A GPTQ kernel step's arithmetic for one 64-row output tile. ``dequant(w_smem, scales, *nbias)`` -> the A
    operand: [64, tile_k] scaled weights, or with post_scale one [64, group] block of exact integers code - zero per
    group of the step; ``accumulate(acc, a, x_smem, scales)`` (post_scale only) -> acc + per group
    scale * (block @ x_block^T), float32 [64, M_pad] (one wgmma per group, one wait)."""

    def __init__(self, bits, tile_k, group, gps, dtype_name, has_bias, m_pad, variant, layout, post_scale,
                 wg_local=False):
        self.post_scale = post_scale
        self.gk = min(tile_k, group)  # columns per group within a step
        self.m_pad = m_pad
        skip = variant == "nodeq"
        if post_scale:
            self._dequant = _make_dequant(bits, self.gk, group, 1, dtype_name, has_bias, skip_arithmetic=skip,
                                          layout=layout, wg_local=wg_local, scaled=False)
            self._scale_add = _make_scale_add(m_pad, wg_local)
            self.groups = tile_k // self.gk
        else:
            self._dequant = _make_dequant(bits, tile_k, group, gps, dtype_name, has_bias, skip_arithmetic=skip,
                                          layout=layout, wg_local=wg_local)

    def dequant(self, w_ref, s_ref, *b_ref):
        if not self.post_scale:
            return self._dequant(w_ref, s_ref, *b_ref)
        from jax.experimental import pallas as pl

        chunks = self.gk // CHUNK
        return [self._dequant(w_ref.at[pl.ds(g * chunks, chunks)], s_ref.at[pl.ds(g, 1)],
                              *(b.at[pl.ds(g, 1)] for b in b_ref)) for g in range(self.groups)]

    def accumulate(self, acc, a, x_smem, s_ref):
        from jax.experimental import pallas as pl
        from jax.experimental.pallas import mosaic_gpu as plgpu

        xs = [x_smem.at[:, pl.ds(g * self.gk, self.gk)].transpose((1, 0)) for g in range(self.groups)]

        def mma(refs):
            for g in range(self.groups):
                plgpu.wgmma(refs[g], a[g], xs[g])

        zero = plgpu.layout_cast(jnp.full((CHUNK, self.m_pad), 0, jnp.float32), plgpu.Layout.WGMMA)
        prods = pl.run_state(mma)(tuple(plgpu.ACC.init(zero) for _ in range(self.groups)))
        for g in range(self.groups):
            acc = self._scale_add(acc, prods[g], s_ref.at[g])
        return acc


def _fragment_rows(wg_local: bool):
    """(thread index within the warpgroup (i32), [row r, row r + 8] (index)): the two rows of a 64-row WGMMA tile (A
    operand or accumulator) one thread holds, r = 16 * warp + lane // 4. Inside an inline_mgpu function."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    import jax.experimental.mosaic.gpu as mgpu

    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    c = lambda v: arith.constant(i32, v)  # noqa: E731
    tid = mgpu.utils.thread_idx()
    if wg_local:
        tid = arith.remui(tid, c(128))
    row0 = arith.addi(arith.muli(arith.divui(tid, c(32)), c(16)), arith.divui(arith.remui(tid, c(32)), c(4)))
    return tid, [arith.index_cast(index, row0), arith.index_cast(index, arith.addi(row0, c(8)))]


def lop3_table(f) -> int:
    """PTX ``lop3``'s immLut for the bitwise function f(a, b, c): f applied to the operand tables a = 0xF0, b = 0xCC,
    c = 0xAA."""
    return f(0xF0, 0xCC, 0xAA) & 0xFF


LOP3_AND_OR = lop3_table(lambda a, b, c: (a & b) | c)


def lop3(a, b, c, table: int):
    """One PTX ``lop3.b32`` (any bitwise function of three i32 values, ``lop3_table``) inside an inline_mgpu
    function."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    return llvm.inline_asm(ir.IntegerType.get_signless(32), [a, b, c], f"lop3.b32 $0, $1, $2, $3, {table:#x};",
                           "=r,r,r,r")


def or_and(a, mask, c):
    """``(a & mask) | c`` on i32 values inside an inline_mgpu function: one field of a packed code word put into a
    magic float's mantissa. Written as one PTX ``lop3`` (DEQUANT_LOP3): from LLVM's and + or, ptxas emitted two LOP3s
    (bench/results/ncu/sass_mix_lut4_int3_8192x28672_m1.txt: 8.6 LOP3 per 8 int3 weights where the fields need 4.5)."""
    from jax._src.lib.mlir.dialects import arith

    return lop3(a, mask, c, LOP3_AND_OR) if DEQUANT_LOP3 else arith.ori(c, arith.andi(a, mask))


def _make_dequant(bits, tile_k, group, gps, dtype_name, has_bias, skip_arithmetic=False, layout=DEFAULT_LAYOUT,
                  wg_local=False, scaled=True):
    """inline_mgpu function: (w_smem [tile_k/64, bits, 128] i32, scales [gps, 64], nbias [gps, 64]) -> the
    dequantized A operand [64, tile_k] in the WGMMA register layout. ``wg_local``: the thread index is taken modulo
    128 (kernels with several warpgroups per CTA, e.g. the warp-specialized variant). ``scaled=False``: the exact
    integers code - zero (the scales are applied to the wgmma's float32 product instead, ``_make_scale_add``; the
    scales argument is then not read)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = jnp.dtype(dtype_name)
    arg_types = (plgpu.RefType(), plgpu.RefType()) + ((plgpu.RefType(),) if has_bias else ())
    ret = plgpu.ShapeDtypeStruct((CHUNK, tile_k), dtype, layout=plgpu.Layout.WGMMA)
    magic = _MAGIC[dtype_name]
    plans = [_extract_plan(f, bits, _MANTISSA[dtype_name]) for f in _fields(bits, layout)]
    ptx_ty = "bf16x2" if dtype_name == "bfloat16" else "f16x2"
    one2 = _half_bits(1.0, dtype_name) * 0x00010001
    base2 = _half_bits(magic, dtype_name) * 0x00010001
    negzero2 = 0x80008000
    sym_nbias2 = _half_bits(-(magic + 2 ** (bits - 1)), dtype_name) * 0x00010001

    @plgpu.inline_mgpu(arg_types=arg_types, return_type=ret)
    def dequant(ctx, w_ref, s_ref, *b_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, llvm, memref, vector
        import jax.experimental.mosaic.gpu as mgpu

        i32 = ir.IntegerType.get_signless(32)
        i16 = ir.IntegerType.get_signless(16)
        index = ir.IndexType.get()
        vec_ty = ir.VectorType.get((2,), mgpu.utils.dtype_to_ir_type(dtype))

        def ci(v):
            return arith.constant(i32, _i32(v))

        def cidx(v):
            return arith.constant(index, v)

        def fma2(a, b, c):
            return llvm.inline_asm(i32, [a, b, c], f"fma.rn.{ptx_ty} $0, $1, $2, $3;", "=r,r,r,r")

        def splat2(ref, r, c):
            half = arith.bitcast(i16, memref.load(ref, [r, c]))
            v = arith.extui(i32, half)
            return arith.ori(v, arith.shli(v, ci(16)))

        tid, rows = _fragment_rows(wg_local)
        tid_idx = arith.index_cast(index, tid)

        one, base, negzero = ci(one2), ci(base2), ci(negzero2)
        regs = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((CHUNK, tile_k)), dtype=object)
        scale_cache, nbk_cache = {}, {}
        for c in range(tile_k // CHUNK):
            words = [memref.load(w_ref, [cidx(c), cidx(p), tid_idx]) for p in range(bits)]
            gr = (c * CHUNK) // group if gps > 1 else 0
            if gr not in scale_cache:
                s2 = [splat2(s_ref, cidx(gr), r) for r in rows] if scaled else None
                nb2 = [splat2(b_ref[0], cidx(gr), r) for r in rows] if has_bias else [ci(sym_nbias2)] * 2
                scale_cache[gr] = (s2, nb2)
            s2, nb2 = scale_cache[gr]
            shifted = {}
            for P, (k, parts) in enumerate(plans):
                j, p = divmod(P, 4)
                kc, h = 2 * j + p // 2, p % 2
                if skip_arithmetic:
                    regs[0, c * 8 + kc, 0, 0, h, 0, 0, 0, 0] = vector.bitcast(
                        vec_ty, vector.broadcast(ir.VectorType.get((1,), i32), words[P % bits]))
                    continue
                v = base
                for plane, shift, mask in parts:
                    if (plane, shift) not in shifted:  # one shift serves every code read from the same window
                        w = words[plane]
                        shifted[(plane, shift)] = (arith.shrui(w, ci(shift)) if shift > 0 else
                                                   arith.shli(w, ci(-shift)) if shift < 0 else w)
                    v = or_and(shifted[(plane, shift)], ci(mask), v)
                if k == 0:
                    d = fma2(v, one, nb2[h])  # magic + code - (magic + zero): exact
                else:
                    # v = magic + code * 2**k: v * 2**-k - (magic * 2**-k + zero), exact; that bias is derived once
                    # per group: nbias + (magic - magic * 2**-k), exact small integers
                    key = (gr, k, h)
                    if key not in nbk_cache:
                        nbk_cache[key] = fma2(nb2[h], one, ci(_half_bits(magic - magic * 2.0**-k, dtype_name)
                                                              * 0x00010001))
                    d = fma2(v, ci(_half_bits(2.0**-k, dtype_name) * 0x00010001), nbk_cache[key])
                v = fma2(d, s2[h], negzero) if scaled else d
                regs[0, c * 8 + kc, 0, 0, h, 0, 0, 0, 0] = vector.bitcast(
                    vec_ty, vector.broadcast(ir.VectorType.get((1,), i32), v))
        return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

    return dequant


def _make_scale_add(m_pad: int, wg_local: bool = False):
    """inline_mgpu function (acc, prod, s_ref [64] scales of one group, 16-bit) -> acc + prod * s per output row,
    float32, both [64, m_pad] in the WGMMA accumulator layout (a thread holds rows r and r + 8, r = 16 * warp +
    lane // 4: the rows whose scales it loads, as the dequantization does)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    layout = plgpu.Layout.WGMMA
    ret = plgpu.ShapeDtypeStruct((CHUNK, m_pad), jnp.float32, layout=layout)

    @plgpu.inline_mgpu(arg_types=(layout, layout, plgpu.RefType()), return_type=ret)
    def scale_add(ctx, acc, prod, s_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, math as math_dialect, memref, vector
        import jax.experimental.mosaic.gpu as mgpu

        _, rows = _fragment_rows(wg_local)
        scales = [arith.extf(ir.F32Type.get(), memref.load(s_ref, [r])) for r in rows]
        regs = np.empty(prod.registers.shape, dtype=object)
        for idx, p in np.ndenumerate(prod.registers):
            sv = vector.broadcast(ir.VectorType(p.type), scales[idx[4]])  # idx[4]: row r (0) or r + 8 (1)
            regs[idx] = math_dialect.fma(p, sv, acc.registers[idx])
        return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

    return scale_add
