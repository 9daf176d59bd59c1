"""SqueezeLLM (LUT) kernel layout and tiling logic on the CPU (the Mosaic GPU kernel itself runs in bench/kernels.py
on a GPU: its in-register lookup is an ``inline_mgpu`` block, which Pallas' GPU interpreter cannot run).

Oracles are float64 numpy: W[k, n] = round_dtype(lut[n, code[k, n]]) (the table rounded to the kernel dtype), the
kept sparse weights replacing the table value at their positions, and y = x @ W. The kernel's register arithmetic is
emulated per thread with an independent numpy implementation of PTX ``prmt`` / ``lop3`` semantics.
"""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import lut_matmul as lm

NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def random_lut(rng, K, N, bits, nnz_frac=0.0):
    """codes [K, N], ascending float16 tables [N, 2**bits] and an optional CSR (row_ptr, col_idx, values) over
    W[out, in] of kept float16 weights."""
    codes = rng.integers(0, 2**bits, (K, N))
    lut = np.sort(rng.standard_normal((N, 2**bits)) * 0.02, axis=1).astype(np.float16)
    sparse = None
    if nnz_frac:
        mask = rng.random((N, K)) < nnz_frac
        r, c = np.nonzero(mask)
        row_ptr = np.zeros(N + 1, np.int32)
        np.cumsum(np.bincount(r, minlength=N), out=row_ptr[1:])
        values = (rng.standard_normal(r.size) * 0.1).astype(np.float16)
        sparse = (row_ptr, c.astype(np.int16), values)
    return codes, lut, sparse


def oracle_weight(codes, lut, sparse, dtype_name):
    """W [K, N] float64: the table rounded to the kernel dtype, kept weights (float16 as stored) at their spots."""
    table = lut.astype(np.float32).astype(NP_DTYPES[dtype_name]).astype(np.float64)
    w = np.take_along_axis(table.T, codes, axis=0)
    if sparse is not None:
        row_ptr, col_idx, values = sparse
        rows = np.repeat(np.arange(len(row_ptr) - 1), np.diff(row_ptr))
        w[col_idx.astype(np.int64), rows] = values.astype(np.float64)
    return w


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


CASES = [  # K, N, bits, dtype, sparse fraction
    (256, 64, 4, "bfloat16", 0.0),
    (200, 72, 4, "float16", 0.01),  # K and N not multiples of the block sizes
    (384, 128, 3, "bfloat16", 0.005),
    (96, 64, 3, "float16", 0.0),
]


@pytest.mark.parametrize("K,N,bits,dtype,frac", CASES)
def test_pack_roundtrip_and_dequantize(rng, K, N, bits, dtype, frac):
    codes, lut, sparse = random_lut(rng, K, N, bits, frac)
    w = lm.pack(codes, lut, bits=bits, sparse=sparse, dtype=dtype)
    assert w.qweight.shape == (w.n_pad // 64, w.k_pad // 64, bits, 128) and w.k_pad % 256 == 0
    assert w.lutw.shape == (w.n_pad, 2**bits // 2) and w.nnz == (0 if sparse is None else len(sparse[2]))
    kernel_codes = np.asarray(w.codes_kn())
    np.testing.assert_array_equal(kernel_codes[:K, :N], codes)
    assert not kernel_codes[K:].any() and not kernel_codes[:, N:].any()  # padding: code 0
    table = np.asarray(w.table().astype(jnp.float32))
    np.testing.assert_array_equal(table[:N], lut.astype(np.float32).astype(NP_DTYPES[dtype]).astype(np.float32))
    assert not table[N:].any()  # padded rows: zero tables
    np.testing.assert_array_equal(np.asarray(w.dequantize(jnp.float32)), oracle_weight(codes, lut, sparse, dtype))


def _prmt(a, b, sel):
    """PTX prmt.b32 (default mode), elementwise on uint32 arrays: byte i of the result is byte (s & 7) of {b, a}
    (a = bytes 0-3), or its sign bit replicated when s & 8, with s = nibble i of sel's low 16 bits."""
    src = (b.astype(np.uint64) << 32) | a.astype(np.uint64)
    out = np.zeros(np.broadcast(a, b, sel).shape, np.uint64)
    for i in range(4):
        s = (np.asarray(sel, np.uint64) >> (4 * i)) & 0xF
        byte = (src >> (8 * (s & 7))) & 0xFF
        byte = np.where(s & 8, np.where(byte & 0x80, 0xFF, 0x00), byte)
        out |= byte.astype(np.uint64) << (8 * i)
    return out.astype(np.uint32)


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for bit in range(8):  # bit index = 4*a + 2*b + c of the truth table
        ta, tb, tc = (bit >> 2) & 1, (bit >> 1) & 1, bit & 1
        if (lut >> bit) & 1:
            term = (a if ta else ~a) & (b if tb else ~b) & (c if tc else ~c)
            out |= term
    return out


def emulate_kernel_dequant(w: lm.LUTKernelWeight, n_tile: int, k_chunk: int) -> np.ndarray:
    """The kernel's register arithmetic (``_make_dequant``) in numpy for one 64x64 tile, from the raw words: returns
    the W^T tile [64 rows n, 64 cols k] as the bf16x2 / f16x2 registers would hold it."""
    dt = NP_DTYPES[w.dtype_name]
    words = np.asarray(w.qweight[n_tile, k_chunk]).view(np.uint32)  # [bits, 128]
    t = np.arange(128)
    row_r = 16 * (t // 32) + (t % 32) // 4
    lutw = np.asarray(w.lutw[n_tile * 64:(n_tile + 1) * 64]).view(np.uint32)
    tables = [lutw[row_r], lutw[row_r + 8]]  # [128, 2**bits / 2] per row half
    m7 = np.uint32(0x77777777)
    sels = [wd & m7 for wd in words[: min(w.bits, 4)]]
    if w.bits == 3:
        sels.append(((words[0] >> 3) & np.uint32(0x11111111)) | ((words[1] >> 2) & np.uint32(0x22222222))
                    | ((words[2] >> 1) & np.uint32(0x44444444)))
    row, col = lm._thread_coords()
    tile = np.full((64, 64), np.nan)

    def store(P, v):
        halves = np.stack([v & 0xFFFF, v >> 16], axis=-1).astype(np.uint16).view(dt).astype(np.float64)
        tile[row[:, P, :], col[:, P, :]] = halves

    for j in range(4):
        sel_h = [sels[j], sels[j] >> 16]
        if w.bits == 4:
            shifted = words[j] << np.uint32(4)
            masks = [_prmt(shifted, words[j], np.uint32(ms)) for ms in lm._MASK_SEL]
        for h in range(2):
            tb = tables[h]
            if w.bits == 4:
                lo = _lop3(_prmt(tb[:, 0], tb[:, 1], sel_h[h]), _prmt(tb[:, 2], tb[:, 3], sel_h[h]), masks[h],
                           lm._LOP3_SELECT)
                hi = _lop3(_prmt(tb[:, 4], tb[:, 5], sel_h[h]), _prmt(tb[:, 6], tb[:, 7], sel_h[h]), masks[h],
                           lm._LOP3_SELECT)
            else:
                lo, hi = _prmt(tb[:, 0], tb[:, 1], sel_h[h]), _prmt(tb[:, 2], tb[:, 3], sel_h[h])
            store(4 * j + h, _prmt(lo, hi, np.uint32(lm._INTERLEAVE[0])))
            store(4 * j + h + 2, _prmt(lo, hi, np.uint32(lm._INTERLEAVE[1])))
    return tile


@pytest.mark.parametrize("K,N,bits,dtype,frac", CASES)
def test_register_lookup_emulation(rng, K, N, bits, dtype, frac):
    """Bit-exact: the kernel's prmt / lop3 sequence on the packed words and table planes reproduces the table
    values (the dense part; the sparse part is added outside the kernel) of every tile."""
    codes, lut, _ = random_lut(rng, K, N, bits)
    w = lm.pack(codes, lut, bits=bits, dtype=dtype)
    dense = oracle_weight(np.pad(codes, ((0, w.k_pad - K), (0, w.n_pad - N))),
                          np.pad(lut, ((0, w.n_pad - N), (0, 0))), None, dtype)
    for n_tile in range(w.n_pad // 64):
        for k_chunk in range(w.k_pad // 64):
            tile = emulate_kernel_dequant(w, n_tile, k_chunk)
            assert not np.isnan(tile).any()  # every element of the A fragment is produced by some thread
            np.testing.assert_array_equal(tile, dense[k_chunk * 64:(k_chunk + 1) * 64, n_tile * 64:(n_tile + 1) * 64].T)


def test_prmt_emulation_follows_ptx():
    """The numpy prmt used as the oracle's instruction model, on hand-checked PTX examples."""
    a, b = np.uint32(0x33221100), np.uint32(0x77665544)
    assert _prmt(a, b, np.uint32(0x3210)) == a and _prmt(a, b, np.uint32(0x7654)) == b
    assert _prmt(a, b, np.uint32(0x0415)) == np.uint32(0x00441155)
    assert _prmt(np.uint32(0x0000807F), b, np.uint32(0x0898)) == np.uint32(0x7F00FF00)  # sign-replicate mode


@pytest.mark.parametrize("K,N,bits,dtype,frac", CASES)
def test_reference_matmul(rng, K, N, bits, dtype, frac):
    codes, lut, sparse = random_lut(rng, K, N, bits, frac)
    w = lm.pack(codes, lut, bits=bits, sparse=sparse, dtype=dtype)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    xq = jnp.asarray(x, dtype)
    want = np.asarray(xq.astype(jnp.float32), np.float64) @ oracle_weight(codes, lut, sparse, dtype)
    got = jax.jit(lambda x, w: w.matmul(x))(xq, w)  # CPU: the dispatch takes the reference path
    assert got.shape == (2, 3, N) and got.dtype == xq.dtype
    assert rel_err(got, want) < 8e-3


@pytest.mark.parametrize("tile_k,stages,k_splits", [(64, 2, 1), (128, 4, 2), (256, 3, None)])
def test_tiled_reference_matches(rng, tile_k, stages, k_splits):
    """The kernel's block decomposition (qweight / table index maps, split-K partials, M and K padding, the sparse
    product added by the wrapper) reproduces the float64 oracle."""
    K, N, bits = 1000, 128, int(rng.choice([3, 4]))
    codes, lut, sparse = random_lut(rng, K, N, bits, 0.003)
    w = lm.pack(codes, lut, bits=bits, sparse=sparse, dtype="bfloat16")
    x = jnp.asarray(rng.standard_normal((int(rng.integers(1, 65)), K)), jnp.bfloat16)
    cfg = lm.KernelConfig(tile_k=tile_k, stages=stages, k_splits=k_splits)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ oracle_weight(codes, lut, sparse, "bfloat16")
    got = lm.reference_matmul_tiled(x, w, cfg)
    assert rel_err(got, want) < 8e-3
    # Sparse deltas restore the kept float16 values: the bf16 rounding of the table does not reach them.
    assert np.abs(np.asarray(w.dequantize()) - oracle_weight(codes, lut, sparse, "bfloat16")).max() == 0


def test_sparse_ell_and_overflow(rng):
    """Kept weights in padded rows (ELL) plus the overflow of the fullest rows (COO): both reach the product, the
    padding adds nothing, every kept value comes back exactly."""
    K, N, bits = 320, 96, 4
    codes, lut, _ = random_lut(rng, K, N, bits)
    mask = rng.random((N, K)) < 0.02
    mask[int(rng.integers(N))] = rng.random(K) < 0.5  # one crowded row: most of it overflows the ELL width
    r, c = np.nonzero(mask)
    row_ptr = np.zeros(N + 1, np.int32)
    np.cumsum(np.bincount(r, minlength=N), out=row_ptr[1:])
    sparse = (row_ptr, c.astype(np.int32), (rng.standard_normal(r.size) * 0.1).astype(np.float16))
    w = lm.pack(codes, lut, bits=bits, sparse=sparse)
    R = w.ell_cols.shape[1]
    assert w.nnz == r.size and 0 < w.sp_delta.shape[0] and R * N + w.sp_delta.shape[0] >= r.size
    assert R < np.diff(row_ptr).max()
    want_w = oracle_weight(codes, lut, sparse, "bfloat16")
    np.testing.assert_array_equal(np.asarray(w.dequantize()), want_w)
    x = jnp.asarray(rng.standard_normal((3, K)), jnp.bfloat16)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ want_w
    got = lm.reference_matmul_tiled(x, w, lm.KernelConfig(tile_k=64, stages=2, k_splits=1))
    assert rel_err(got, want) < 8e-3
    dense_only = np.asarray(x.astype(jnp.float32), np.float64) @ oracle_weight(codes, lut, None, "bfloat16")
    sparse_part = np.asarray(w.sparse_product(x), np.float64)
    np.testing.assert_allclose(sparse_part, want - dense_only, atol=1e-4 * np.abs(want).max())


def test_errors(rng):
    codes, lut, sparse = random_lut(rng, 256, 64, 4, 0.01)
    with pytest.raises(ValueError, match="bits=2"):
        lm.pack(codes % 4, lut[:, :4], bits=2)
    with pytest.raises(ValueError, match="lut must have shape"):
        lm.pack(codes, lut[:, :8], bits=4)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        lm.pack(codes, lut[:, :8], bits=3)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        lm.pack(codes, lut, bits=4, dtype=jnp.float32)
    with pytest.raises(ValueError, match="CSR over W"):
        lm.pack(codes, lut, bits=4, sparse=(sparse[0][:-1], sparse[1], sparse[2]))
    w = lm.pack(codes, lut, bits=4, sparse=sparse)
    with pytest.raises(ValueError, match="1..64 activation rows"):
        lm.lut_matmul(jnp.zeros((65, 256), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="input features"):
        lm.lut_matmul(jnp.ones((1, 200), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="packed for bfloat16"):
        lm.lut_matmul(jnp.ones((1, 256), jnp.float16), w)
    with pytest.raises(ValueError, match="tile_k=96"):
        lm.KernelConfig(tile_k=96).resolved(w)


def test_prepare_for_kernels(rng):
    from jaxquant.formats_lut import LUTQuantizedWeight
    from jaxquant.kernel_layout import prepare_for_kernels
    from jaxquant.sparse import csr_from_mask

    N, K = 72, 192
    codes, lut, _ = random_lut(rng, K, N, 3)
    dense = rng.standard_normal((N, K)).astype(np.float32) * 0.1
    csr = csr_from_mask(dense, rng.random((N, K)) < 0.01)
    qw = LUTQuantizedWeight.from_codes(codes.T, lut, csr, bits=3)
    out = prepare_for_kernels({"layer": {"kernel": qw}, "norm": {"scale": jnp.ones(4)}})
    kw = out["layer"]["kernel"]
    assert isinstance(kw, lm.LUTKernelWeight) and kw.bits == 3 and kw.nnz == csr.nnz
    x = jnp.asarray(rng.standard_normal((5, K)), jnp.bfloat16)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(qw.dequantize(jnp.float32), np.float64)
    assert rel_err(kw.matmul(x), want) < 1e-2


@pytest.mark.parametrize("M,frac", [(65, 0.0), (130, 0.0), (300, 0.0), (130, 0.004)])
def test_prefill_dispatch(rng, monkeypatch, M, frac):
    """GPU dispatch by M (kernel stubbed by its tiled reference: the CPU cannot run it): dense weights take 64-row
    kernel chunks up to PREFILL_CHUNKED_MAX_M, sparse weights and larger M the dequantize-once reference; all equal
    the float64 oracle."""
    K, N, bits = 320, 72, int(rng.choice([3, 4]))
    codes, lut, sparse = random_lut(rng, K, N, bits, frac)
    w = lm.pack(codes, lut, bits=bits, sparse=sparse, dtype="bfloat16")
    calls = []

    def fake_kernel(x2d, w, config=None, partial_sums=False):
        assert x2d.shape[0] <= lm.MAX_KERNEL_M and not partial_sums
        calls.append(x2d.shape[0])
        return lm.reference_matmul_tiled(x2d, w, config or lm.KernelConfig())

    monkeypatch.setattr(lm, "_jit_lut_matmul", fake_kernel)
    monkeypatch.setattr(lm, "PREFILL_CHUNKED_MAX_M", 128)  # both prefill branches at small M
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    got = w.matmul(x, use_kernel=True)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ oracle_weight(codes, lut, sparse, "bfloat16")
    chunked = M <= lm.PREFILL_CHUNKED_MAX_M and not w.nnz
    assert calls == ([64] * (M // 64) + ([M % 64] if M % 64 else []) if chunked else [])
    assert got.shape == (M, N) and rel_err(got, want) < 8e-3


@pytest.mark.parametrize("N,bits,M,tile_k,ctas,fused,frac", [
    (250, 4, 1, 128, 7, False, 0.0),  # stream-K: units split between CTAs, partial slots
    (250, 3, 5, 64, 3, False, 0.004),  # sparse part added by the wrapper
    (248, 4, 9, 256, None, True, 0.0),  # fused: whole units per CTA (16-byte output rows)
    (248, 3, 3, 128, 1, True, 0.0),  # fused, one CTA, unpadded x
])
def test_ws_tiled_reference_matches(rng, N, bits, M, tile_k, ctas, fused, frac):
    """The ws variant for LUT weights (two 64-row tiles per CTA, each with its own 64 rows' tables, stream-K units,
    NaN-poisoned partial slots; x unpadded and staged at M < 8, padded with direct_x=False) reproduces the float64
    oracle; the one-warpgroup LUT kernel has no unpadded path."""
    K = 700  # K and N not multiples of the block sizes (N_pad 256: two 128-row units)
    codes, lut, sparse = random_lut(rng, K, N, bits, frac)
    w = lm.pack(codes, lut, bits=bits, sparse=sparse, dtype="bfloat16")
    cfg = lm.KernelConfig(variant="ws", tile_k=tile_k, ctas=ctas, fused=fused or None)
    rc = cfg.resolved(w, M)
    assert rc.variant == "ws" and rc.n_sub == 1 and rc.direct_x == (M < 8) and not rc.post_scale
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ oracle_weight(codes, lut, sparse, "bfloat16")
    got = lm.reference_matmul_tiled(x, w, cfg)
    assert got.shape == (M, N) and rel_err(got, want) < 8e-3
    if M < 8:
        padded = dataclasses.replace(cfg, direct_x=False)
        assert not padded.resolved(w, M).direct_x
        assert rel_err(lm.reference_matmul_tiled(x, w, padded), want) < 8e-3
        with pytest.raises(ValueError, match="direct_x"):
            lm.KernelConfig(direct_x=True, tile_k=tile_k).resolved(w, M)  # the one-warpgroup kernel


@pytest.mark.parametrize("bits,M,fields,frac", [
    (4, 1, dict(), 0.0),  # the one-warpgroup kernel
    (4, 3, dict(variant="ws", tile_k=256), 0.0),  # ws stream-K
    (3, 1, dict(variant="ws", tile_k=128, fused=True), 0.0),  # ws fused (y in bf16)
    (3, 16, dict(variant="ws", fused=True), 0.01),  # ws fused, float32 y + the XLA sparse part
])
def test_kernels_lower_for_cuda(rng, bits, M, fields, frac):
    """The Mosaic GPU LUT kernel builders trace and lower for CUDA on the CPU (compiling and running need the GPU:
    bench/kernels_launch.py --smoke*)."""
    K, N = 1024, 384
    codes, lut, sparse = random_lut(rng, K, N, bits, frac)
    w = lm.pack(codes, lut, bits=bits, sparse=sparse, dtype="bfloat16")
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    config = lm.KernelConfig(**fields)
    text = jax.jit(lambda x, w: lm.lut_matmul(x, w, config=config)).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert f"lut_w{bits}_m" in text and "mosaic_gpu" in text
    assert ("_ws" in text) == ("variant" in fields)


def test_ws_default_rule(rng, monkeypatch):
    """LUT weights default to the stream-K ws kernel at M < 8 (x unpadded) where every SM gets >=
    LUT_WS_UNPADDED_MIN_STEPS_PER_SM (unit, 256-column step) pairs, 4-bit ones also at M_pad <= 16 from 8 pairs per SM;
    tile_k 512 where the 512-column pairs give >= WS_STREAM_512_MIN_STEPS_PER_SM per SM. Larger M, smaller shapes
    and explicit configs keep the one-warpgroup kernel."""
    from pallas_kernels import gptq_matmul as gm

    K, N = 4096, 66 * 128  # 66 units x 16 steps of 256 = 8 x 132 pairs; 66 x 8 steps of 512 = 528 pairs
    codes, lut, _ = random_lut(rng, K, N, 4)
    w = lm.pack(codes, lut, bits=4)
    for m in (1, 16):
        cfg = lm.KernelConfig().resolved(w, m)
        assert cfg.variant == "ws" and not cfg.fused and cfg.ctas == 132 and cfg.tile_k == 256
        assert cfg.direct_x == (m < 8)
    assert lm.KernelConfig().resolved(w, 1, num_sms=20).tile_k == 512  # 528 >= 24 x 20
    assert lm.KernelConfig().resolved(w, 17).variant is None
    assert lm.KernelConfig(tile_k=256).resolved(w, 1).variant is None
    w3 = lm.pack(codes % 8, lut[:, :8], bits=3)
    for m in (1, 7):
        cfg = lm.KernelConfig().resolved(w3, m)
        assert cfg.variant == "ws" and cfg.tile_k == 256 and cfg.direct_x and not cfg.fused
    assert lm.KernelConfig().resolved(w3, 1, num_sms=20).tile_k == 512
    assert lm.KernelConfig().resolved(w3, 8).variant is None  # padded x: not measured faster
    assert lm.KernelConfig(direct_x=False).resolved(w3, 1).variant is None
    small3 = lm.pack(codes[:, :24 * 128] % 8, lut[:24 * 128, :8], bits=3)  # 24 x 16 = 384 pairs < 3 x 132
    assert gm.ws_stream_tile_k(small3, 1) is None and lm.KernelConfig().resolved(small3, 1).variant is None
    narrow = lm.pack(codes[:, :65 * 128], lut[:65 * 128], bits=4)  # 65 x 16 pairs: 7.9 per SM
    assert lm.KernelConfig().resolved(narrow, 1).variant == "ws"  # unpadded x: from 3 per SM
    assert gm.ws_stream_tile_k(narrow, 8) is None and lm.KernelConfig().resolved(narrow, 8).variant is None
    small4 = lm.pack(codes[:, :24 * 128], lut[:24 * 128], bits=4)
    assert gm.ws_stream_tile_k(small4, 1) is None
    monkeypatch.setattr(gm, "WS_STREAM_DEFAULT", False)
    assert lm.KernelConfig().resolved(w, 1).variant is None
