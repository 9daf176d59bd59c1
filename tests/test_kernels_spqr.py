"""SpQR kernel layout, register logic and tiling on the CPU (the Mosaic GPU kernel itself runs in
bench/kernels_spqr.py on a GPU: its in-register dequantization is an ``inline_mgpu`` block, which Pallas' GPU
interpreter cannot run).

Oracles are float64 numpy: the SpQR reconstruction W = scale * (code - zero) with outliers replacing the dense
value (formats_spqr), and the kernel's own arithmetic, written out independently: float32 statistics, rounded to the
16-bit dtype, then one correctly rounded code * scale + nb per weight.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxquant.formats_spqr import SpQRWeight
from jaxquant.packing import unpack
from jaxquant.sparse import CSR
from pallas_kernels import spqr_matmul as sm

NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
PRECISION = {"bfloat16": (8, -125), "float16": (11, -13)}  # significand bits, min frexp exponent of a normal


def round_to(x, dtype_name):
    """float64 -> nearest (ties to even) value of the 16-bit dtype, as float64 (no double rounding)."""
    bits, emin = PRECISION[dtype_name]
    x = np.asarray(x, np.float64)
    _, e = np.frexp(x)
    e = np.maximum(e, emin)
    return np.ldexp(np.rint(np.ldexp(x, bits - e)), e - bits)


def random_spqr(rng, K, N, bits, group_size=16, qq_groupsize=16, act=True, outlier_frac=0.02):
    """A random SpQR weight with realistic statistics: positive scales (z_s < 0), fractional zeros."""
    G, B = K // group_size, N // qq_groupsize
    codes = rng.integers(0, 2**bits, (N, K))
    scale_codes, zero_codes = rng.integers(0, 8, (G, N)), rng.integers(0, 8, (G, N))
    scale_qq = np.stack([rng.uniform(0.5, 1.5, (G, B)) * 2e-3, -rng.uniform(1, 5, (G, B))], -1)
    zero_qq = np.stack([rng.uniform(0.3, 1.0, (G, B)) * 2 ** (bits - 3), rng.uniform(-1, 1, (G, B))], -1)
    mask = rng.random((N, K)) < outlier_frac
    r, c = np.nonzero(mask)
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=N))]).astype(np.int32)
    csr = CSR(jnp.asarray(row_ptr), jnp.asarray(c.astype(np.int16)),
              jnp.asarray((rng.standard_normal(r.size) * 0.05).astype(np.float16)), (N, K))
    perm = rng.permutation(K) if act else None
    return SpQRWeight.from_parts(codes, scale_codes, zero_codes, scale_qq.astype(np.float16),
                                 zero_qq.astype(np.float16), csr, perm, bits=bits, group_size=group_size,
                                 qq_scale_bits=3, qq_zero_bits=3, qq_groupsize=qq_groupsize)


def to_kernel(w: SpQRWeight, dtype="bfloat16") -> sm.SpQRKernelWeight:
    return sm.pack(w.codes(), unpack(w.scale_codes, bits=3, axis=1), unpack(w.zero_codes, bits=3, axis=1),
                   w.scale_qq, w.zero_qq, w.perm, w.row_ptr, w.col_idx, w.values, bits=w.bits,
                   group_size=w.group_size, qq_groupsize=w.qq_groupsize, dtype=dtype)


def oracle_kernel_dense(w: SpQRWeight, kw: sm.SpQRKernelWeight) -> np.ndarray:
    """The kernel's dense values [K_pad, N_pad] (kernel column order) from the stored SpQR arrays, float64."""
    K, N = w.in_features, w.out_features
    perm = np.asarray(w.perm).astype(np.int64) if w.perm.shape[0] else np.arange(K)
    src = sm.kernel_column_source(kw.k_pad)  # group-order position of each kernel column
    real = src < K
    codes = np.asarray(w.codes())  # [K, N]
    sc, zc = (np.asarray(unpack(a, bits=3, axis=1)) for a in (w.scale_codes, w.zero_codes))
    sqq, zqq = np.asarray(w.scale_qq, np.float32), np.asarray(w.zero_qq, np.float32)
    out = np.zeros((kw.k_pad, kw.n_pad))
    p = np.nonzero(real)[0]
    g = src[p] // w.group_size  # SpQR group of each kernel column
    n = np.arange(N)
    blk = n // w.qq_groupsize
    f32 = np.float32
    scale = (sc[g][:, n].astype(f32) - sqq[g][:, blk, 1]) * sqq[g][:, blk, 0]  # float32, as the reference
    zero = (zc[g][:, n].astype(f32) - zqq[g][:, blk, 1]) * zqq[g][:, blk, 0]
    nb = -(scale * zero)
    c = codes[perm[src[p]]].astype(np.float64)
    out[p, :N] = round_to(c * round_to(scale, kw.dtype_name) + round_to(nb, kw.dtype_name), kw.dtype_name)
    return out


def emulate_kernel_tile(kw: sm.SpQRKernelWeight, n_tile: int, chunk: int) -> np.ndarray:
    """The kernel's per-thread register arithmetic in numpy for one 64x64 tile of W^T: statistic fields through the
    float32 magic 2**23, float32 (code - z) * s, the splat rounding, then per pair the magic-float mask, the exact
    fma to the code and the fused code * scale + nb (float64 + one rounding). Returns the tile [64 n, 64 k]."""
    name = kw.dtype_name
    dt = NP_DTYPES[name]
    mant = sm._MANTISSA[name]
    words = np.asarray(kw.qweight[n_tile, chunk]).view(np.uint32)  # [bits, 128]
    st = np.asarray(kw.stats[n_tile, chunk // sm.STAT_CHUNKS]).view(np.uint16).astype(np.uint32)  # [3, 128]
    qq = np.asarray(kw.qq).view(np.uint32)
    tid = np.arange(128)
    warp, lane = tid // 32, tid % 32
    t = lane % 4
    q0 = qq[4 * n_tile + warp, 8 * chunk + 2 * t]
    q1 = qq[4 * n_tile + warp, 8 * chunk + 2 * t + 1]
    half = lambda v: (v & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
    s_s, z_s, s_z, z_z = half(q0), half(q0 >> 16), half(q1), half(q1 >> 16)

    def stat(f, z, s):
        k, parts = sm._stat_plan(f)
        v = np.full(128, sm._F32_MAGIC, np.uint32)
        for word, shift, mask in parts:
            v |= (st[word] >> shift) & np.uint32(mask)
        tk = v.view(np.float32) - np.float32(2.0**23)
        d = (tk.astype(np.float64) * 2.0**-k - z.astype(np.float64)).astype(np.float32)  # one rounding (fma)
        return d * s

    cc = chunk % sm.STAT_CHUNKS
    scale2, nb2 = [], []
    for h in range(2):
        scale = stat(4 * cc + 2 * h, z_s, s_s)
        zero = stat(4 * cc + 2 * h + 1, z_z, s_z)
        scale2.append(scale.astype(dt).astype(np.float64))  # cvt.rn splat
        nb2.append((-(scale * zero)).astype(dt).astype(np.float64))
    base = np.uint32(int(np.asarray(2.0**mant, dt).view(np.uint16)) * 0x00010001)
    row, col = sm._thread_coords()
    tile = np.full((64, 64), np.nan)
    for P, fields in enumerate(sm._half_fields(kw.bits)):
        k, parts = sm._extract_plan(fields, kw.bits, mant)
        v = np.full(128, base, np.uint32)
        for word, shift, mask in parts:
            w = words[word] >> shift if shift >= 0 else words[word] << -shift
            v |= w & np.uint32(mask)
        halves = np.stack([v & 0xFFFF, v >> 16], -1).astype(np.uint16).view(dt).astype(np.float64)  # [128, 2]
        code = round_to(halves * 2.0**-k - 2.0**mant * 2.0**-k, name)  # exact: a small integer
        assert np.array_equal(code, np.round(code))
        h = (P % 4) % 2
        wv = round_to(code * scale2[h][:, None] + nb2[h][:, None], name)
        tile[row[:, P, :], col[:, P, :]] = wv
    return tile


CASES = [  # K, N, bits, group_size, qq_groupsize, act, dtype
    (288, 96, 3, 16, 16, True, "bfloat16"),  # K and N not multiples of the blocks
    (512, 64, 3, 32, 32, False, "bfloat16"),  # statistics repeated to 16-column / 16-row blocks
    (256, 128, 4, 16, 64, True, "float16"),
    (320, 64, 2, 16, 16, False, "bfloat16"),
]


@pytest.mark.parametrize("K,N,bits,gs,qqg,act,dtype", CASES)
def test_pack_roundtrip_dequantize_and_reference(rng, K, N, bits, gs, qqg, act, dtype):
    w = random_spqr(rng, K, N, bits, gs, qqg, act)
    kw = to_kernel(w, dtype)
    assert kw.qweight.shape == (kw.n_pad // 64, kw.k_pad // 64, bits, 128) and kw.k_pad % 256 == 0
    assert kw.stats.shape == (kw.n_pad // 64, kw.k_pad // 256, 3, 128) and kw.stats.dtype == jnp.int16
    kidx = np.asarray(kw.kidx)
    real = kidx < K
    assert np.array_equal(np.sort(kidx[real]), np.arange(K)) and real.sum() == K
    # Codes come back in kernel column order; padding is code 0.
    codes = np.asarray(w.codes())
    got = np.asarray(kw.codes_kn())
    np.testing.assert_array_equal(got[real, :N], codes[kidx[real]])
    assert not got[~real].any() and not got[:, N:].any()
    # Each kernel group (lane t of chunk c: group 4c + t) holds exactly one SpQR group's 16 columns.
    perm = np.asarray(w.perm).astype(np.int64) if act else np.arange(K)
    position = np.empty(K, np.int64)
    position[perm] = np.arange(K)
    src = sm.kernel_column_source(kw.k_pad)
    np.testing.assert_array_equal(position[kidx[real]], src[real])
    kernel_group = src // 16
    spqr_group = position[kidx[real]] // gs
    cs, cz = (np.asarray(a) for a in kw.statistics_codes())
    sc, zc = (np.asarray(unpack(a, bits=3, axis=1)) for a in (w.scale_codes, w.zero_codes))
    np.testing.assert_array_equal(cs[kernel_group[real], :N], sc[spqr_group])
    np.testing.assert_array_equal(cz[kernel_group[real], :N], zc[spqr_group])
    s_s = np.asarray(kw.second_level()[0], np.float32)  # [N_pad/16, K_pad/16]
    np.testing.assert_array_equal(s_s[np.arange(N) // 16][:, kernel_group[real]].T,
                                  np.asarray(w.scale_qq, np.float32)[spqr_group][:, np.arange(N) // qqg, 0])
    # Outliers: one ELL entry per stored outlier, at its kernel column; every row with outliers in one bucket.
    rows = np.asarray(kw.sp_rows)
    assert len(kw.sp_buckets) <= sm.MAX_BUCKETS and rows.size == np.unique(rows).size
    np.testing.assert_array_equal(np.sort(rows), np.nonzero(np.diff(np.asarray(w.row_ptr)))[0])
    np.testing.assert_array_equal(np.asarray(kw.sp_inv)[rows], np.arange(rows.size))
    nz = np.asarray(kw.sparse_dense()) != 0
    want = np.zeros_like(nz)
    dense_mask = np.asarray(w.outlier_mask()).T  # [K, N]
    want[np.nonzero(real)[0], :N] = dense_mask[kidx[real]]
    assert np.all(nz <= want) and nz.sum() >= want.sum() - 2  # (a delta can round to 0 only by coincidence)

    # The kernel's dense values exactly; the whole product close to the float SpQR reference.
    np.testing.assert_array_equal(np.asarray(kw.dequantize_padded().astype(jnp.float32)),
                                  oracle_kernel_dense(w, kw))
    W = np.asarray(w.dequantize(jnp.float32), np.float64)
    Wk = np.asarray(kw.dequantize(jnp.float32), np.float64)
    assert np.linalg.norm(Wk - W) / np.linalg.norm(W) < 8e-3
    x = jnp.asarray(rng.standard_normal((2, 3, K)), dtype)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ W
    got = jax.jit(lambda x, w: w.matmul(x))(x, kw)  # CPU: the dispatch takes the reference path
    assert got.shape == (2, 3, N) and got.dtype == x.dtype
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert err < 1e-2


@pytest.mark.parametrize("K,N,bits,gs,qqg,act,dtype", CASES[:3])
def test_register_arithmetic(rng, K, N, bits, gs, qqg, act, dtype):
    w = random_spqr(rng, K, N, bits, gs, qqg, act, outlier_frac=0.0)
    kw = to_kernel(w, dtype)
    dense = np.asarray(kw.dequantize_padded().astype(jnp.float32)).astype(np.float64)
    for n_tile in range(kw.n_pad // 64):
        for chunk in sorted({0, kw.k_pad // 64 - 1, int(rng.integers(kw.k_pad // 64))}):
            tile = emulate_kernel_tile(kw, n_tile, chunk)
            assert not np.isnan(tile).any()  # every element of the A fragment is produced by some thread
            np.testing.assert_array_equal(tile, dense[chunk * 64:(chunk + 1) * 64, n_tile * 64:(n_tile + 1) * 64].T)


@pytest.mark.parametrize("tile_k,stages,k_splits,n_sub", [(256, 3, 2, 2), (512, 3, None, None)])
def test_tiled_reference(rng, tile_k, stages, k_splits, n_sub):
    """The kernel's block decomposition (index maps of qweight / stats / qq, split-K partials, M and K padding)
    reproduces the plain reference and the float SpQR product."""
    w = random_spqr(rng, 512, 128, 3, 16, 16, bool(rng.integers(2)))
    kw = to_kernel(w)
    x = jnp.asarray(rng.standard_normal((int(rng.integers(1, 65)), 512)), jnp.bfloat16)
    cfg = sm.KernelConfig(tile_k=tile_k, stages=stages, k_splits=k_splits, n_sub=n_sub)
    got = np.asarray(sm.reference_matmul_tiled(x, kw, cfg), np.float64)
    plain = np.asarray(sm.reference_matmul(x, kw), np.float64)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w.dequantize(jnp.float32), np.float64)
    assert np.linalg.norm(got - plain) / np.linalg.norm(plain) < 4e-3  # only the float32 summation order differs
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_config_and_call_errors(rng):
    w = random_spqr(rng, 4096, 256, 3, 16, 16, False, outlier_frac=0.0)
    kw = to_kernel(w)
    for m in (1, 16, 64):
        cfg = sm.KernelConfig().resolved(kw, m)
        cfg.check(kw)
        assert cfg.tile_k % 256 == 0 and (4096 // cfg.tile_k) % cfg.k_splits == 0
    # K = 43 * 256 (LLaMA's 11008) is padded to a multiple of 4 blocks so that it can be split (N/64 CTAs are few).
    import types
    assert sm._padded_k(11008) == 11264 and sm._padded_k(4096) == 4096 and sm._padded_k(300) == 512
    tall = types.SimpleNamespace(k_pad=sm._padded_k(11008), n_pad=4096, out_features=4096)
    assert sm.KernelConfig().resolved(tall, 1).k_splits >= 2
    with pytest.raises(ValueError, match="tile_k=128"):
        sm.KernelConfig(tile_k=128).resolved(kw)
    with pytest.raises(ValueError, match="k_splits=3"):
        sm.KernelConfig(tile_k=256, k_splits=3).resolved(kw)
    with pytest.raises(ValueError, match="n_sub=3"):
        sm.KernelConfig(n_sub=3).resolved(kw)
    with pytest.raises(ValueError, match="1..64 activation rows"):
        sm.spqr_matmul(jnp.ones((65, 4096), jnp.bfloat16), kw)
    with pytest.raises(ValueError, match="input features"):
        sm.spqr_matmul(jnp.ones((1, 4000), jnp.bfloat16), kw)
    with pytest.raises(ValueError, match="packed for bfloat16"):
        sm.spqr_matmul(jnp.ones((1, 4096), jnp.float16), kw)


def test_pack_rejects_bad_input(rng):
    K, N = 256, 64
    w = random_spqr(rng, K, N, 3, 16, 16, True)
    args = [np.asarray(w.codes()), np.asarray(unpack(w.scale_codes, bits=3, axis=1)),
            np.asarray(unpack(w.zero_codes, bits=3, axis=1)), w.scale_qq, w.zero_qq, w.perm, w.row_ptr, w.col_idx,
            w.values]
    kwargs = dict(bits=3, group_size=16, qq_groupsize=16)

    def call(i=None, value=None, **over):
        a = list(args)
        if i is not None:
            a[i] = value
        return sm.pack(*a, **{**kwargs, **over})

    with pytest.raises(ValueError, match="bits=8"):
        call(bits=8)
    with pytest.raises(ValueError, match="group_size"):
        call(group_size=24)
    with pytest.raises(ValueError, match="qq_groupsize"):
        call(qq_groupsize=8)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        call(dtype=jnp.float32)
    with pytest.raises(ValueError, match="scale_codes must be 3-bit"):
        call(1, args[1] + 8)  # 4-bit statistics
    with pytest.raises(ValueError, match="codes must lie"):
        call(0, args[0] + 8)
    with pytest.raises(ValueError, match="permutation"):
        call(5, np.zeros(K, np.int32))
    with pytest.raises(ValueError, match="scale_qq has shape"):
        call(3, np.asarray(w.scale_qq)[:, :2])
    with pytest.raises(ValueError, match="CSR"):
        call(6, np.asarray(w.row_ptr)[:-1])
    with pytest.raises(ValueError, match="column index out of range"):
        call(7, np.full(np.shape(w.col_idx), K, np.int32))


def test_prepare_for_kernels(rng):
    from jaxquant.kernel_layout import prepare_for_kernels

    good = random_spqr(rng, 256, 64, 3, 16, 16, True)
    four_bit_stats = SpQRWeight.from_parts(
        np.asarray(good.codes()).T, rng.integers(0, 16, (16, 64)), rng.integers(0, 16, (16, 64)), good.scale_qq,
        good.zero_qq, good.outliers(), None, bits=3, group_size=16, qq_scale_bits=4, qq_zero_bits=4,
        qq_groupsize=16)
    out = prepare_for_kernels({"a": {"kernel": good}, "b": {"kernel": four_bit_stats}})
    assert isinstance(out["a"]["kernel"], sm.SpQRKernelWeight)
    assert isinstance(out["b"]["kernel"], SpQRWeight)  # 4-bit statistics: stays on the reference path
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
    want = np.asarray(good.matmul(x.astype(jnp.float32)), np.float64)
    got = np.asarray(out["a"]["kernel"].matmul(x), np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


@pytest.mark.parametrize("m", [1, 7])
def test_csr_sparse_format_matches_ell(rng, m):
    w = random_spqr(rng, 256, 64, 3, 16, 16, True)
    args = (w.codes(), unpack(w.scale_codes, bits=3, axis=1), unpack(w.zero_codes, bits=3, axis=1), w.scale_qq,
            w.zero_qq, w.perm, w.row_ptr, w.col_idx, w.values)
    kw = {fmt: sm.pack(*args, bits=3, group_size=16, qq_groupsize=16, sparse_format=fmt) for fmt in ("ell", "csr")}
    assert kw["csr"].sp_csr and not kw["csr"].sp_buckets
    np.testing.assert_array_equal(np.asarray(kw["csr"].sparse_dense()), np.asarray(kw["ell"].sparse_dense()))
    x = jnp.asarray(rng.standard_normal((m, 256)), jnp.bfloat16)
    xk = kw["ell"].prepare_activations(x, m)
    np.testing.assert_allclose(np.asarray(sm.sparse_product(xk, kw["csr"])),
                               np.asarray(sm.sparse_product(xk, kw["ell"])), rtol=1e-5, atol=1e-6)
    # both against the dense outlier matrix (float64)
    want = np.asarray(xk, np.float64) @ np.asarray(kw["ell"].sparse_dense(), np.float64)
    np.testing.assert_allclose(np.asarray(sm.sparse_product(xk, kw["ell"])), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sparse_format"):
        sm.pack(*args, bits=3, group_size=16, qq_groupsize=16, sparse_format="coo")
