"""GPTQ kernel layout and tiling logic on the CPU (the Mosaic GPU kernel itself runs in bench/kernels.py on a GPU:
its in-register dequantization is an ``inline_mgpu`` block, which Pallas' GPU interpreter cannot run).

Oracles are float64 numpy: W[k, n] = round_dtype(round_dtype(scale[g, n]) * (code[k, n] - zero[g, n])), the value
the kernel's two fused multiply-adds produce with scaled weights (the ws kernel), and y = x @ W; the one-warpgroup
kernel's default (post_scale) leaves out the outer rounding (test_post_scale_block_product).
"""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import gptq_matmul as gm

NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def random_gptq(rng, K, N, bits, group, sym, act):
    G = 1 if group == -1 else -(-K // group)
    codes = rng.integers(0, 2**bits, (K, N))
    scales = rng.uniform(0.005, 0.02, (G, N)).astype(np.float32)
    zeros = np.full((G, N), 2 ** (bits - 1)) if sym else rng.integers(0, 2**bits, (G, N))
    g_idx = np.zeros(K, np.int64) if group == -1 else np.arange(K) // group
    if act:
        g_idx = rng.permutation(g_idx)
    return codes, scales, zeros, g_idx


def oracle_weight(codes, scales, zeros, g_idx, dtype_name):
    dt = NP_DTYPES[dtype_name]
    s = scales.astype(dt).astype(np.float64)[g_idx]
    return (s * (codes - zeros[g_idx])).astype(dt).astype(np.float64)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


CASES = [  # K, N, bits, group, sym, act, dtype
    (256, 64, 4, 128, False, False, "bfloat16"),
    (576, 72, 4, 128, True, False, "bfloat16"),  # short last group, N not a multiple of 64
    (384, 64, 3, 128, False, True, "bfloat16"),  # act-order
    (320, 128, 3, 64, True, False, "float16"),
    (200, 64, 2, -1, False, False, "bfloat16"),  # per channel, K not a multiple of 64
    (512, 96, 2, 128, False, True, "float16"),
]


@pytest.mark.parametrize("layout", gm.LAYOUTS)
@pytest.mark.parametrize("K,N,bits,group,sym,act,dtype", CASES)
def test_layout_roundtrip_and_dequantize(rng, K, N, bits, group, sym, act, dtype, layout):
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, bits, group, sym, act)
    w = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=sym, dtype=dtype, layout=layout)
    assert w.layout == layout
    assert w.qweight.shape == (w.n_pad // 64, w.k_pad // 64, bits, 128) and w.k_pad % gm.K_ALIGN == 0
    assert (w.nbias is None) == sym and (w.perm is None) == (not act)
    # Codes come back exactly in kernel row order (act-order rows sorted by group, padding rows zero).
    src = np.arange(w.k_pad) if w.perm is None else np.asarray(w.perm)
    kernel_codes = np.asarray(w.codes_kn())
    real = src < K
    np.testing.assert_array_equal(kernel_codes[real, :N], codes[src[real]])
    if act:  # every group is contiguous in kernel order
        rows_group = np.where(real, g_idx[np.minimum(src, K - 1)], -1)
        assert np.all(rows_group[real] == np.nonzero(real)[0] // w.group)
    np.testing.assert_array_equal(np.asarray(w.dequantize(jnp.float32)),
                                  oracle_weight(codes, scales, zeros, g_idx, dtype))


def emulate_kernel_dequant(w: gm.GPTQKernelWeight, n_tile: int, k_chunk: int) -> np.ndarray:
    """The kernel's register arithmetic in numpy for one 64x64 tile: the extraction plan's shift/mask into the
    magic float (code at bit k of the mantissa), then fma(v, 2**-k, nbias_k) with nbias_k = fma(nbias, 1,
    magic - magic * 2**-k) (k = 0: fma(v, 1, nbias)) and fma(., scale, -0), every step rounded to the half-precision
    dtype. Returns W^T tile [64 rows n, 64 cols k]."""
    dt = NP_DTYPES[w.dtype_name]
    rnd = lambda a: np.asarray(a, np.float64).astype(dt).astype(np.float64)
    magic = gm._MAGIC[w.dtype_name]
    words = np.asarray(w.qweight[n_tile, k_chunk]).view(np.uint32)  # [bits, 128]
    base = np.uint32(gm._half_bits(gm._MAGIC[w.dtype_name], w.dtype_name) * 0x00010001)
    group_row = (k_chunk * 64) // w.group
    cols = slice(n_tile * 64, (n_tile + 1) * 64)
    scale = np.asarray(w.scales[group_row, cols]).astype(np.float64)
    nbias = (np.asarray(w.nbias[group_row, cols]).astype(np.float64) if w.nbias is not None
             else np.full(64, -(gm._MAGIC[w.dtype_name] + 2 ** (w.bits - 1))))
    row, col = gm._thread_coords()
    tile = np.full((64, 64), np.nan)
    for P, fields in enumerate(gm._fields(w.bits, w.layout)):
        k, parts = gm._extract_plan(fields, w.bits, gm._MANTISSA[w.dtype_name])
        v = np.full(128, base, np.uint32)
        for plane, shift, mask in parts:
            part = words[plane] >> shift if shift >= 0 else words[plane] << -shift
            v |= part & np.uint32(mask)
        halves = np.stack([v & 0xFFFF, v >> 16], axis=-1).astype(np.uint16).view(dt).astype(np.float64)  # [128, 2]
        r = row[:, P, :]
        nb_k = rnd(nbias[r] + (magic - magic * 2.0**-k))
        d = rnd(halves * 2.0**-k + nb_k)  # exact small integers: code - zero
        assert np.array_equal(d, halves * 2.0**-k - magic * 2.0**-k + nbias[r] + magic)
        tile[r, col[:, P, :]] = rnd(d * scale[r])  # fma(d, scale, -0): one rounding
    return tile


@pytest.mark.parametrize("K,N,bits,group,sym,act,dtype,layout", [c + ("halves",) for c in CASES] + [
    c + ("planes",) for c in CASES if c[2] == 3])
def test_register_arithmetic(rng, K, N, bits, group, sym, act, dtype, layout):
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, bits, group, sym, act)
    w = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=sym, dtype=dtype, layout=layout)
    dense = np.asarray(w.dequantize_padded().astype(jnp.float32)).astype(np.float64)  # [K_pad, N_pad]
    for n_tile in range(w.n_pad // 64):
        for k_chunk in (0, w.k_pad // 64 - 1, int(rng.integers(w.k_pad // 64))):
            tile = emulate_kernel_dequant(w, n_tile, k_chunk)
            assert not np.isnan(tile).any()  # every element of the A fragment is produced by some thread
            np.testing.assert_array_equal(tile, dense[k_chunk * 64:(k_chunk + 1) * 64, n_tile * 64:(n_tile + 1) * 64].T)


@pytest.mark.parametrize("K,N,bits,group,sym,act,dtype", CASES)
def test_reference_matmul(rng, K, N, bits, group, sym, act, dtype):
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, bits, group, sym, act)
    w = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=sym, dtype=dtype)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    xq = jnp.asarray(x, dtype)
    want = np.asarray(xq.astype(jnp.float32), np.float64) @ oracle_weight(codes, scales, zeros, g_idx, dtype)
    got = jax.jit(lambda x, w: w.matmul(x))(xq, w)  # CPU: the dispatch takes the reference path
    assert got.shape == (2, 3, N) and got.dtype == xq.dtype
    assert rel_err(got, want) < 8e-3


@pytest.mark.parametrize("tile_k,stages,k_splits", [(64, 2, 1), (128, 4, 2), (256, 3, None), (256, 2, 4)])
def test_tiled_reference_matches(rng, tile_k, stages, k_splits):
    """The kernel's block decomposition (index maps of qweight / scales / nbias, groups per step, split-K partials,
    M and K padding) reproduces the plain reference."""
    K, N, bits, group = 1024, 128, int(rng.choice([3, 4])), int(rng.choice([64, 128, 256, 512]))
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, bits, group, False, bool(rng.integers(2)))
    w = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=False, dtype="bfloat16")
    x = jnp.asarray(rng.standard_normal((int(rng.integers(1, 65)), K)), jnp.bfloat16)
    cfg = gm.KernelConfig(tile_k=tile_k, stages=stages, k_splits=k_splits)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ oracle_weight(codes, scales, zeros, g_idx, "bfloat16")
    got = gm.reference_matmul_tiled(x, w, cfg)
    assert rel_err(got, want) < 8e-3
    assert rel_err(got, gm.reference_matmul(x, w)) < 8e-3


@pytest.mark.parametrize("tile_k", [64, 128, 256, 512])
def test_post_scale_block_product(rng, tile_k):
    """One pipeline step of one output tile as the kernel computes it. post_scale: the wgmma's exact code - zero
    integers times x per group, the group scales applied to the float32 product: equal to the float64 oracle with the
    unrounded scale * (code - zero) weights up to float32 accumulation. Scaled weights (the ws default): the weights
    rounded once to bf16, so their error is that rounding's (>= 100x larger)."""
    K, N, bits = 1024, 128, int(rng.choice([3, 4]))  # (2-bit: scale * (code - zero) is exact in bf16)
    group = int(rng.choice([64, 128, 256, 1024]))
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, bits, group, bool(rng.integers(2)), False)
    w = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=bool(np.all(zeros == 2 ** (bits - 1))), dtype="bfloat16")
    tile, kb = int(rng.integers(0, N // 64)), int(rng.integers(0, K // tile_k))
    x = jnp.asarray(rng.standard_normal((8, tile_k)), jnp.bfloat16)
    rows, ks = slice(tile * 64, (tile + 1) * 64), slice(kb * tile_k, (kb + 1) * tile_k)
    s64 = scales.astype(ml_dtypes.bfloat16).astype(np.float64)[g_idx][ks, rows]  # the stored (bf16) scales
    w_exact = s64 * (codes - zeros[g_idx])[ks, rows]  # [tile_k, 64]
    want = (np.asarray(x.astype(jnp.float32), np.float64) @ w_exact).T  # [64, 8]
    post = gm._block_product(w, tile, kb, tile_k, x, post_scale=True)
    scaled = gm._block_product(w, tile, kb, tile_k, x, post_scale=False)
    assert post.shape == scaled.shape == (64, 8) and post.dtype == jnp.float32
    assert rel_err(post, want) < 2e-6
    assert 1e-4 < rel_err(scaled, want) < 8e-3


def test_config_heuristic_and_errors(rng):
    codes, scales, zeros, g_idx = random_gptq(rng, 4096, 4096, 4, 128, False, False)
    w = gm.pack(codes, scales, zeros, g_idx, bits=4, sym=False)
    for m in (1, 16, 64):
        cfg = gm.KernelConfig().resolved(w, m)
        cfg.check(w)
        assert (4096 // cfg.tile_k) // cfg.k_splits >= 4  # every split keeps a pipeline to run
        assert (4096 // 64 // cfg.n_sub) * cfg.k_splits >= 3 * 132  # several CTAs per SM
    with pytest.raises(ValueError, match="n_sub=3"):
        gm.KernelConfig(n_sub=3).resolved(w)
    with pytest.raises(ValueError, match="tile_k=96"):
        gm.KernelConfig(tile_k=96).resolved(w)
    with pytest.raises(ValueError, match="k_splits=3"):
        gm.KernelConfig(tile_k=256, k_splits=3).resolved(w)
    x = jnp.zeros((65, 4096), jnp.bfloat16)
    with pytest.raises(ValueError, match="1..64 activation rows"):
        gm.gptq_matmul(x, w)
    with pytest.raises(ValueError, match="input features"):
        gm.gptq_matmul(jnp.ones((1, 4000), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="packed for bfloat16"):
        gm.gptq_matmul(jnp.ones((1, 4096), jnp.float16), w)


def test_pack_rejects_unsupported(rng):
    codes, scales, zeros, g_idx = random_gptq(rng, 256, 64, 4, 32, False, False)
    with pytest.raises(ValueError, match="multiples of 64"):
        gm.pack(codes, scales, zeros, g_idx, bits=4, sym=False)
    codes, scales, zeros, g_idx = random_gptq(rng, 256, 64, 4, 128, False, False)
    with pytest.raises(ValueError, match="8-bit|bits=8"):
        gm.pack(codes, scales, zeros, g_idx, bits=8, sym=False)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        gm.pack(codes, scales, zeros, g_idx, bits=4, sym=False, dtype=jnp.float32)
    with pytest.raises(ValueError, match="g_idx"):
        gm.pack(codes, scales, zeros, g_idx[:-1], bits=4, sym=False)


def test_prepare_for_kernels(rng):
    from jaxquant.config import QuantConfig
    from jaxquant.formats import UniformQuantizedWeight
    from jaxquant.kernel_layout import prepare_for_kernels
    from jaxquant.rtn import rtn

    W = rng.standard_normal((96, 256)).astype(np.float32)  # [out, in]
    params = {"a": {"kernel": rtn(W, QuantConfig(bits=4, group_size=128))},
              "b": {"kernel": rtn(W, QuantConfig(bits=8, group_size=128))},  # 8-bit: stays on the reference path
              "c": {"kernel": rtn(W, QuantConfig(bits=3, group_size=32))},  # group 32: stays as well
              "norm": {"scale": jnp.ones(4)}}
    out = prepare_for_kernels(params)
    assert isinstance(out["a"]["kernel"], gm.GPTQKernelWeight)
    assert isinstance(out["b"]["kernel"], UniformQuantizedWeight)
    assert isinstance(out["c"]["kernel"], UniformQuantizedWeight)
    x = jnp.asarray(rng.standard_normal((5, 256)), jnp.bfloat16)
    want = params["a"]["kernel"].matmul(x.astype(jnp.float32))
    assert rel_err(out["a"]["kernel"].matmul(x), want) < 1e-2


@pytest.mark.parametrize("M", [65, 130, 300])
def test_prefill_chunked_matches_oracle(rng, M):
    """Prefill path 1: the kernel's block decomposition (reference_matmul_tiled) over 64-row chunks of x, odd M."""
    K, N, bits = 512, 128, int(rng.choice([3, 4]))
    act = bool(rng.integers(2))
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, bits, 128, False, act)
    w = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=False, dtype="bfloat16")
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    sizes = []

    def chunk_fn(xc, w):
        sizes.append(xc.shape[0])
        return gm.reference_matmul_tiled(xc, w, gm.KernelConfig())

    got = gm.chunked_matmul(x, w, chunk_fn)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ oracle_weight(codes, scales, zeros, g_idx, "bfloat16")
    assert sizes == [64] * (M // 64) + ([M % 64] if M % 64 else [])
    assert got.shape == (M, N) and got.dtype == jnp.bfloat16
    assert rel_err(got, want) < 8e-3


@pytest.mark.parametrize("M", [1, 65, 128, 130, 300])
def test_prefill_dispatch(rng, monkeypatch, M):
    """GPU dispatch by M (kernel stubbed by its tiled reference, as the CPU cannot run it): M <= 64 one kernel call,
    up to PREFILL_CHUNKED_MAX_M (set to 128 here) 64-row chunks, above that the dequantize-once path; all
    equal the oracle."""
    K, N = 384, 72
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, 4, 128, bool(rng.integers(2)), False)
    w = gm.pack(codes, scales, zeros, g_idx, bits=4, sym=False, dtype="bfloat16")
    calls = []

    def fake_kernel(x2d, w, config=None, partial_sums=False):
        assert x2d.shape[0] <= gm.MAX_KERNEL_M and not partial_sums
        calls.append(x2d.shape[0])
        return gm.reference_matmul_tiled(x2d, w, config or gm.KernelConfig())

    monkeypatch.setattr(gm, "_jit_gptq_matmul", fake_kernel)
    monkeypatch.setattr(gm, "PREFILL_CHUNKED_MAX_M", 128)  # both prefill branches at small M
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    got = w.matmul(x, use_kernel=True)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ oracle_weight(codes, scales, zeros, g_idx, "bfloat16")
    if M <= gm.PREFILL_CHUNKED_MAX_M:
        assert calls == [64] * (M // 64) + ([M % 64] if M % 64 else [])
    else:
        assert calls == []
    assert rel_err(got, want) < 8e-3


def test_dequant_nk_matches_oracle(rng):
    """Prefill path 2: the gather/scatter-free W^T decode equals the float64 oracle exactly (act-order, padding)."""
    K, N, bits = 448, 136, int(rng.choice([2, 3, 4]))
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, bits, 64, False, True)
    w = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=False, dtype="bfloat16")
    wt = np.asarray(w.dequantize_nk_padded().astype(jnp.float32), np.float64)  # [N_pad, K_pad] kernel row order
    src = np.asarray(w.perm)
    real = src < K
    oracle = oracle_weight(codes, scales, zeros, g_idx, "bfloat16")
    np.testing.assert_array_equal(wt[:N][:, real], oracle[src[real]].T)
    assert np.all(wt[:, ~real] == 0) and np.all(wt[N:] == 0)


def test_int3_layouts_fields_and_instruction_count():
    """Both 3-bit layouts place every code bit exactly once (16 pairs x 3 bits in 3 planes of 2 x 16 bits); the
    "halves" layout reads 15 of 16 pairs with one masked field (the point of it: fewer integer instructions)."""
    for layout in gm.LAYOUTS:
        seen = set()
        for fields in gm._fields(3, layout):
            assert sum(width for _, _, width, _ in fields) == 3
            for plane, shift, width, _ in fields:
                for b in range(shift, shift + width):
                    assert (plane, b) not in seen and b < 16
                    seen.add((plane, b))
        assert len(seen) == 48
    for dtype in ("bfloat16", "float16"):
        plans = [gm._extract_plan(f, 3, gm._MANTISSA[dtype]) for f in gm._fields(3, "halves")]
        assert sum(len(parts) for _, parts in plans) == 18
        assert all(k + 3 <= gm._MANTISSA[dtype] for k, _ in plans)  # code * 2**k stays inside the mantissa
        shifts = {(plane, shift) for _, parts in plans for plane, shift, _ in parts if shift}
        assert len(shifts) <= 9  # shared shifts (bf16: 2 per plane + 3 for pair 15)
    with pytest.raises(ValueError, match="layout"):
        gm._fields(3, "nibbles")


def test_fused_launch_config(rng, monkeypatch):
    """The fused (single-kernel) launch: k_splits capped at one cluster (8), explicit fused=True rejected where the
    output rows would not be 16-byte aligned, the default follows FUSED_DEFAULT, and the out_init buffer is y."""
    codes, scales, zeros, g_idx = random_gptq(rng, 4096, 64, 4, 128, False, False)
    w = gm.pack(codes, scales, zeros, g_idx, bits=4, sym=False)
    assert gm.KernelConfig(fused=False).resolved(w, 1).k_splits == 16  # one 64-row tile: as many splits as allowed
    cfg = gm.KernelConfig(fused=True).resolved(w, 1)
    assert cfg.fused and cfg.k_splits == gm.MAX_CLUSTER
    assert gm.output_buffer_shape(cfg, w.n_pad, 64, 3, jnp.bfloat16) == ((3, 64), jnp.dtype(jnp.bfloat16))
    cfg_p = gm.KernelConfig(fused=False).resolved(w, 3)
    assert gm.output_buffer_shape(cfg_p, w.n_pad, 64, 3, jnp.bfloat16) == ((16, 64, 8), jnp.dtype(jnp.float32))
    for default in (False, True):
        monkeypatch.setattr(gm, "FUSED_DEFAULT", default)
        assert gm.KernelConfig().resolved(w, 1).fused == default
    odd = gm.pack(*random_gptq(rng, 256, 70, 4, 128, False, False), bits=4, sym=False)
    assert not gm.KernelConfig().resolved(odd, 1).fused  # N = 70: bf16 rows of 140 bytes
    with pytest.raises(ValueError, match="fused"):
        gm.KernelConfig(fused=True, tile_k=128, k_splits=16).resolved(w, 1)


@pytest.mark.parametrize("bits", [3, 4])
def test_measured_heuristic_exceptions(rng, bits):
    """GPTQ 4-bit with >= 3 output tiles per SM at M <= 16: one split, fused (no partial sum); 3-bit: tile_k <= 256;
    a LUT weight of the same shape keeps the plain heuristic; explicit fields still win."""
    from pallas_kernels import lut_matmul as lm
    K, N = 1024, 64 * 3 * 132
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, bits, 128, False, False)
    w = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=False)
    for m in (1, 16, 64):
        cfg = gm.KernelConfig().resolved(w, m)
        if bits == 4 and m <= 16:
            assert cfg.k_splits == 1 and cfg.fused and cfg.tile_k == 512
        else:
            assert not cfg.fused and cfg.tile_k <= 256
    assert gm.KernelConfig(k_splits=2).resolved(w, 1).fused is False
    small = gm.pack(*random_gptq(rng, K, 64 * 132, bits, 128, False, False), bits=bits, sym=False)
    assert not gm.KernelConfig().resolved(small, 1).fused
    lut = lm.pack(rng.integers(0, 16, (K, N)), rng.standard_normal((N, 16)).astype(np.float16), bits=4)
    assert not gm.KernelConfig().resolved(lut, 1).fused


@pytest.mark.parametrize("bits", [3, 4])
def test_decode_blocks_rule(rng, bits, monkeypatch):
    """The decode-sized GPTQ rule (opt-in, JAXQUANT_GPTQ_DECODE_RULE=1) on the LLaMA-7B shapes (M <= 16): tile_k 256
    and the fewest splits giving >= 1.9 CTAs per SM (one split = the fused single kernel); not where that grid
    exceeds 3 CTAs per SM (3-bit 8192x28672), nor at M_pad > 16, for LUT weights or with explicit fields."""
    from pallas_kernels import lut_matmul as lm
    monkeypatch.setattr(gm, "DECODE_RULE", True)
    small = gm.pack(*random_gptq(rng, 256, 64, bits, 128, False, False), bits=bits, sym=False)

    def shaped(K, N):  # block-size logic only: shapes without arrays
        k_pad = gm.split_friendly_k_pad(gm._round_up(K, 256), 128)
        return dataclasses.replace(small, qweight=jax.ShapeDtypeStruct((N // 64, k_pad // 64, bits, 128), jnp.int32),
                                   in_features=K, out_features=N)

    want = {(4096, 12288): (256, 2, False), (4096, 22016): (256, 1, True), (4096, 4096): (256, 4, False),
            (11008, 4096): (256, 4, False), (4096, 11008): (256, 2, False)}
    for (K, N), pick in want.items():
        w = shaped(K, N)
        assert gm.decode_blocks(w)[:2] == pick[:2]
        for m in (1, 9, 16):
            cfg = gm.KernelConfig().resolved(w, m)
            assert (cfg.tile_k, cfg.k_splits, cfg.fused, cfg.variant) == (*pick, None)
        assert gm.KernelConfig().resolved(w, 17).tile_k != 256 or gm.KernelConfig().resolved(w, 17).k_splits != pick[1]
        assert gm.KernelConfig(tile_k=128).resolved(w, 1).tile_k == 128
        assert not gm.KernelConfig(fused=False).resolved(w, 1).fused
    big = shaped(8192, 28672)  # 448 tiles: one split would be 3.4 CTAs per SM
    assert gm.decode_blocks(big) is None
    cfg = gm.KernelConfig().resolved(big, 1)
    assert (cfg.variant == "ws") if bits == 4 else (cfg.tile_k, cfg.k_splits) == (256, 2)
    assert gm.decode_blocks(shaped(1024, 64)) is None  # one tile: no split count reaches 1.9 CTAs per SM
    lut = lm.pack(rng.integers(0, 16, (256, 64)), rng.standard_normal((64, 16)).astype(np.float16), bits=4)
    lut = dataclasses.replace(lut, qweight=jax.ShapeDtypeStruct((22016 // 64, 64, 4, 128), jnp.int32),
                              in_features=4096, out_features=22016)
    assert gm.KernelConfig().resolved(lut, 1).k_splits != 1  # LUT weights keep their own measured heuristic


def test_lut_measured_exceptions(rng):
    """Dense 3-bit LUT at M = 8 (padded x) where the heuristic takes 2 splits: the cluster launch at tile_k 256; at
    M < 8 the stream-K ws kernel at tile_k 512; LUT at M_pad = 16: tile_k <= 256; 4-bit LUT at M_pad <= 16: the
    stream-K ws kernel at tile_k 512 on this shape (the configs measured), the one-warpgroup kernel's blocks
    unchanged where a config field rules the ws kernel out."""
    from pallas_kernels import lut_matmul as lm
    K, N = 8192, 28672  # for the block-size logic only: shapes without arrays

    def shaped(bits):
        small = lm.pack(rng.integers(0, 2**bits, (256, 64)), rng.standard_normal((64, 2**bits)).astype(np.float16),
                        bits=bits)
        return dataclasses.replace(small, qweight=jax.ShapeDtypeStruct((N // 64, K // 64, bits, 128), jnp.int32),
                                   in_features=K, out_features=N)

    lut3, lut4 = shaped(3), shaped(4)
    cfg = gm.KernelConfig().resolved(lut3, 8)
    assert (cfg.variant, cfg.tile_k, cfg.k_splits, cfg.fused) == (None, 256, 2, True)
    cfg = gm.KernelConfig().resolved(lut3, 1)
    assert (cfg.variant, cfg.tile_k, cfg.ctas, cfg.k_splits) == ("ws", 512, 128, 2) and cfg.direct_x and not cfg.fused
    assert not gm.KernelConfig().resolved(lut3, 9).fused and gm.KernelConfig().resolved(lut3, 9).tile_k == 256
    assert gm.KernelConfig(fused=False).resolved(lut3, 8).fused is False
    cfg4 = gm.KernelConfig().resolved(lut4, 1)
    assert (cfg4.variant, cfg4.tile_k, cfg4.stages, cfg4.ctas, cfg4.k_splits) == ("ws", 512, 4, 128, 2)
    assert not cfg4.fused
    cfg4 = gm.KernelConfig().resolved(lut4, 16)
    assert (cfg4.variant, cfg4.tile_k, cfg4.stages) == ("ws", 512, 3)
    cfg4 = gm.KernelConfig(fused=False).resolved(lut4, 1)
    assert (cfg4.variant, cfg4.tile_k, cfg4.k_splits, cfg4.fused) == (None, 512, 2, False)
    assert gm.KernelConfig(fused=False).resolved(lut4, 16).tile_k == 256


@pytest.mark.parametrize("group", [128, -1])
def test_k_padding_allows_four_splits(rng, group):
    """K = 11008 (43 x 256) is padded to 11264 so that tile_k 256 splits 4 ways (the heuristic is no longer left with
    tile_k 64); the padding rows contribute nothing."""
    K, N = 11008, 64
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, 4, group, False, False)
    w = gm.pack(codes, scales, zeros, g_idx, bits=4, sym=False)
    assert w.k_pad == 11264 and (w.k_pad // 256) % 4 == 0
    wide = dataclasses.replace(w, qweight=jax.ShapeDtypeStruct((64, w.k_pad // 64, 4, 128), jnp.int32),
                               out_features=4096)  # the 11008x4096 down projection, for the block-size logic only
    cfg = gm.KernelConfig().resolved(wide, 1)
    assert cfg.tile_k >= 128 and cfg.k_splits >= 4  # not the 64-column fallback of 43 x 256
    x = jnp.asarray(rng.standard_normal((2, K)), jnp.bfloat16)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ oracle_weight(codes, scales, zeros, g_idx, "bfloat16")
    assert rel_err(gm.reference_matmul_tiled(x, w, gm.KernelConfig(tile_k=256, k_splits=4)), want) < 8e-3
    assert gm.pack(*random_gptq(rng, 2048 + 256, N, 4, 128, False, False), bits=4, sym=False).k_pad == 2304


@pytest.mark.parametrize("units,spu", [(7, 8), (224, 16), (3, 5), (2, 1), (172, 8), (32, 22)])
def test_ws_schedule_covers_every_step_once(rng, units, spu):
    """The ws kernel's stream-K schedule (``ws_plan`` / ``ws_step``, shared by the kernel and its jnp emulation),
    for even and uneven grids: every (unit, k-step) pair runs exactly once in consecutive per-CTA ranges, every
    (unit, slot) partial is written exactly once (by the unit's piece in that CTA, or as zeros by its head CTA), a
    flush ends every piece, and a CTA's repeated last pair (grid padding) is never stored."""
    total = units * spu
    grids = {1, min(132, total), total} | {int(c) for c in rng.integers(1, total + 1, size=4)}
    for ctas in sorted(grids):
        q, r, slots = gm.ws_plan(units, spu, ctas)
        ran, written = np.zeros((units, spu), int), np.zeros((units, slots), int)
        for cta in range(ctas):
            piece, last_g = [], None
            for t in range(q + (r > 0)):
                unit, k, flush, slot, pieces = gm.ws_step(t, cta, units, spu, ctas)
                g = unit * spu + k
                if last_g is not None and g == last_g:  # the padding step repeats the last pair, unstored
                    assert t == q and cta >= r and not flush and not piece
                    continue
                assert last_g is None or g == last_g + 1
                last_g = g
                ran[unit, k] += 1
                piece.append((unit, k))
                if flush:
                    assert {u for u, _ in piece} == {unit}  # one unit per piece
                    assert (slot == 0) == (piece[0][1] == 0) and 0 <= slot < pieces <= slots
                    written[unit, slot] += 1
                    if slot == 0:
                        written[unit, pieces:] += 1
                    piece = []
            assert not piece
        assert (ran == 1).all() and (written == 1).all(), (ctas, q, r)
    assert gm.ws_plan(172, 8, 132) == (10, 56, 2) and gm.ws_plan(224, 16, 112)[2] == 1
    with pytest.raises(ValueError, match="ctas=0"):
        gm.ws_plan(units, spu, 0)


@pytest.mark.parametrize("K,N,bits,M,tile_k,ctas,fused", [(512, 840, 4, 3, 128, 4, False),
                                                         (512, 256, 3, 9, 128, None, False),
                                                         (1024, 200, 4, 1, None, None, False),
                                                         (1024, 840, 4, 5, None, None, True),
                                                         (512, 384, 3, 2, 128, 1, True),
                                                         (1024, 256, 4, 2, 128, 7, False)])  # 3 CTAs per unit
def test_ws_tiled_reference_matches(rng, K, N, bits, M, tile_k, ctas, fused):
    """The ws variant's decomposition (two 64-row tiles per CTA, units split between CTAs, partial slots, the
    accumulator reset by a multiply with 0; fused: whole units per CTA, y written directly) reproduces the oracle;
    bad grids / shapes / warpgroup counts are rejected by name."""
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, bits, 128, bool(rng.integers(2)), False)
    w = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=False, dtype="bfloat16")
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    cfg = gm.KernelConfig(variant="ws", tile_k=tile_k, ctas=ctas, fused=fused or None)
    rc = cfg.resolved(w, M)
    assert rc.k_splits == (1 if fused else gm.ws_plan(w.n_pad // 128, w.k_pad // rc.tile_k, rc.ctas)[2])
    assert rc.fused == fused and rc.ctas >= 1 and rc.wgs == 2
    if fused:
        assert (w.n_pad // 128) % rc.ctas == 0
    want = np.asarray(x.astype(jnp.float32), np.float64) @ oracle_weight(codes, scales, zeros, g_idx, "bfloat16")
    got = gm.reference_matmul_tiled(x, w, cfg)
    assert rel_err(got, want) < 8e-3
    assert gm.output_buffer_shape(rc, w.n_pad, N, M, jnp.bfloat16)[0] == ((M, N) if fused else
                                                                          (rc.k_splits, w.n_pad, gm._m_pad(M)))
    with pytest.raises(ValueError, match="wgs"):
        gm.KernelConfig(variant="ws", wgs=4).resolved(w, M)
    with pytest.raises(ValueError, match="ctas=100000"):
        gm.KernelConfig(variant="ws", tile_k=128, ctas=100000).resolved(w, M)
    with pytest.raises(ValueError, match="variant"):
        gm.KernelConfig(variant="wx").resolved(w, M)
    odd = gm.pack(*random_gptq(rng, 256, 136, 4, 128, False, False), bits=4, sym=False)  # N_pad = 192
    with pytest.raises(ValueError, match="multiple of 128"):
        gm.KernelConfig(variant="ws").resolved(odd, 1)


def test_ws_stream_ctas(rng):
    """The default stream-K grid keeps the longest CTA's step count of the SM-count grid and shrinks only to an even
    split (no padding steps) of >= WS_EVEN_GRID_MIN_STEPS steps per CTA; other pair counts keep the SM count."""
    for pairs in [int(p) for p in rng.integers(1, 20000, size=200)] + [1, 131, 132, 133, 264]:
        for sms in (132, int(rng.integers(1, 200))):
            full = min(sms, pairs)
            ctas = gm.ws_stream_ctas(pairs, sms)
            assert 1 <= ctas <= full and -(-pairs // ctas) == -(-pairs // full)
            q, r, _ = gm.ws_plan(pairs, 1, ctas)
            assert ctas == full or (r == 0 and pairs == q * ctas and q >= gm.WS_EVEN_GRID_MIN_STEPS)
    # 8192x28672 at tile_k 512 (224 units x 16): 28 steps on 128 CTAs; 4096x12288 at 256 (96 x 16, 12 steps): 132
    assert gm.ws_stream_ctas(224 * 16) == 128 and gm.ws_stream_ctas(96 * 16) == 132
    assert gm.ws_stream_ctas(32 * 43) == 132 and gm.ws_stream_ctas(172 * 16) == 132  # 11008x4096, 4096x22016
    assert gm.ws_stream_ctas(66 * 16) == 132 and gm.ws_stream_ctas(100) == 100


def test_plain_decode_rule(rng, monkeypatch):
    """GPTQ 3- and 4-bit at M < 8 on the unpadded x where the stream-K ws launch has >= 8 steps per SM and
    ``decode_blocks`` splits K >= 4 ways (the LLaMA-7B down projection, 11008x4096): a call that stages x as it is
    takes the one-warpgroup kernel at (256, 4) with 4 stages and the scales after the wgmma; with a norm or SwiGLU to
    stage (``staged``), at M = 8, on the padded x, where K splits fewer ways (q/k/v, gate/up) or the grid is small
    (o_proj), for explicit configs or with the switch off, the previous defaults stay."""
    small = gm.pack(*random_gptq(rng, 256, 64, 4, 128, False, False), bits=4, sym=False)

    def shaped(K, N, bits=4):  # block-size logic only: shapes without arrays
        k_pad = gm.split_friendly_k_pad(gm._round_up(K, 256), 128)
        return dataclasses.replace(small, qweight=jax.ShapeDtypeStruct((N // 64, k_pad // 64, bits, 128), jnp.int32),
                                   in_features=K, out_features=N, bits=bits)

    down = shaped(11008, 4096)
    for m in (1, 7):
        cfg = gm.KernelConfig().resolved(down, m)
        assert (cfg.variant, cfg.tile_k, cfg.k_splits, cfg.stages) == (None, 256, 4, gm.PLAIN_DECODE_STAGES)
        assert cfg.post_scale and cfg.direct_x and not cfg.fused
        assert gm.KernelConfig().resolved(down, m, staged=True).variant == "ws"
        assert gm.KernelConfig(direct_x=True).resolved(down, m).variant is None  # direct_x alone keeps it plain
        assert gm.KernelConfig(direct_x=False).resolved(down, m).variant == "ws"  # measured unpadded only
    assert gm.KernelConfig().resolved(down, 8).variant == "ws"  # padded x
    monkeypatch.setattr(gm, "DIRECT_X_DEFAULT", False)
    assert gm.KernelConfig().resolved(down, 1).variant == "ws"
    monkeypatch.setattr(gm, "DIRECT_X_DEFAULT", True)
    assert gm.KernelConfig(stages=3).resolved(down, 1).k_splits != 4  # explicit fields: the general search
    for K, N in ((4096, 12288), (4096, 22016)):
        assert gm.plain_decode_blocks(shaped(K, N), 1) is None
        assert gm.KernelConfig().resolved(shaped(K, N), 1).variant == "ws"
    down3 = shaped(11008, 4096, bits=3)
    cfg = gm.KernelConfig().resolved(down3, 1)
    assert (cfg.variant, cfg.tile_k, cfg.k_splits, cfg.stages, cfg.post_scale) == (None, 256, 4, 4, True)
    assert gm.KernelConfig().resolved(down3, 1, staged=True).tile_k != 256  # the 3-bit default (128 / 3 / 8)
    assert gm.plain_decode_blocks(shaped(4096, 4096), 1) is None  # too few (unit, step) pairs for the ws launch
    monkeypatch.setattr(gm, "PLAIN_DECODE_DEFAULT", False)
    assert gm.KernelConfig().resolved(down, 1).variant == "ws"
    assert gm.KernelConfig().resolved(down3, 1).tile_k != 256


def test_plain_decode_rule_skips_staged_calls(rng, monkeypatch):
    """``gptq_matmul`` asks for the plain-x rule only when it has no RMSNorm to hand the kernel, and then runs the
    config the rule names (traced and lowered for CUDA on the CPU)."""
    w = gm.pack(*random_gptq(rng, 1024, 512, 4, 128, False, False), bits=4, sym=False)
    asked = []

    def rule(w, m, num_sms=132, direct_x=None):
        asked.append(m)
        return (256, 4)

    monkeypatch.setattr(gm, "plain_decode_blocks", rule)
    x = jnp.asarray(rng.standard_normal((1, 1024)), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 1024), jnp.bfloat16)
    plain = jax.jit(lambda x, w: gm.gptq_matmul(x, w)).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert asked == [1] and "gptq_w4_m8_k256_n64" in plain
    jax.jit(lambda x, w, s: gm.gptq_matmul(x, w, rms_norm=(s, 1e-5))).trace(x, w, scale).lower(
        lowering_platforms=("cuda",))
    assert asked == [1]


def test_ws_default_rule(rng, monkeypatch):
    """The fused ws launch is the default only for GPTQ 4-bit at M_pad = 8 on shapes whose whole 128-row units fill
    >= 80% of the SMs (8192x28672: 112 of 132), the stream-K one where the (unit, step) pairs give every SM >= 8
    steps; M = 16, 3-bit, smaller shapes and explicit configs keep the old kernel."""
    big = gm.pack(*random_gptq(rng, 512, 28672, 4, 128, False, False), bits=4, sym=False)
    assert gm.ws_default_ok(big)
    cfg = gm.KernelConfig().resolved(big, 1)
    assert cfg.variant == "ws" and cfg.fused and cfg.ctas == 112 and cfg.tile_k == 512 and cfg.stages == 3
    assert gm.KernelConfig().resolved(big, 8).variant == "ws"
    assert gm.KernelConfig().resolved(big, 16).variant is None
    assert gm.KernelConfig(tile_k=256).resolved(big, 1).variant is None
    monkeypatch.setattr(gm, "WS_DEFAULT", False)
    assert gm.KernelConfig().resolved(big, 1).variant is None
    monkeypatch.setattr(gm, "WS_DEFAULT", True)
    int3 = gm.pack(*random_gptq(rng, 512, 28672, 3, 128, False, False), bits=3, sym=False)
    assert gm.KernelConfig().resolved(int3, 1).variant is None  # 224 (unit, 512-column step) pairs: too few
    # 3-bit at M < 8 where the 512-column pairs give every SM >= 24: stream-K at tile_k 512, scales after the wgmma
    int3 = gm.pack(*random_gptq(rng, 4096, 66 * 128, 3, 128, False, False), bits=3, sym=False)  # 528 pairs
    cfg = gm.KernelConfig().resolved(int3, 3, num_sms=22)
    assert cfg.variant == "ws" and cfg.tile_k == 512 and cfg.post_scale and cfg.direct_x and cfg.ctas == 22
    assert gm.KernelConfig().resolved(int3, 3, num_sms=23).variant is None  # 528 < 24 x 23
    assert gm.KernelConfig().resolved(int3, 8, num_sms=22).variant is None  # padded x
    assert gm.KernelConfig(direct_x=False).resolved(int3, 3, num_sms=22).variant is None
    odd = gm.pack(*random_gptq(rng, 512, 64 * 3 * 132, 4, 128, False, False), bits=4, sym=False)  # 198 units
    assert not gm.ws_default_ok(odd) and gm.KernelConfig().resolved(odd, 1).variant is None
    # stream-K partials where every SM gets >= 8 (unit, 256-column step) pairs: 66 units x 16 steps = 8 x 132
    wide = gm.pack(*random_gptq(rng, 4096, 66 * 128, 4, 128, False, False), bits=4, sym=False)
    cfg = gm.KernelConfig().resolved(wide, 3)
    assert gm.ws_stream_ok(wide) and not gm.ws_default_ok(wide)
    assert cfg.variant == "ws" and not cfg.fused and cfg.ctas == 132 and cfg.tile_k == 256 and cfg.k_splits == 2
    assert gm.KernelConfig().resolved(wide, 16).variant is None
    assert gm.KernelConfig(k_splits=4).resolved(wide, 1).variant is None
    monkeypatch.setattr(gm, "WS_STREAM_DEFAULT", False)
    assert gm.KernelConfig().resolved(wide, 1).variant is None
    narrow = gm.pack(*random_gptq(rng, 4096, 65 * 128, 4, 128, False, False), bits=4, sym=False)
    assert not gm.ws_stream_ok(narrow) and gm.KernelConfig().resolved(narrow, 1).variant is None


def test_call_with_output_appends_only_a_buffer_of_the_kernels_output_shape(rng):
    """The poisoned-output path shared by the three kernels: out_init is appended to the kernel's arguments only if
    it is the buffer ``output_buffer_shape`` names (partials or y), anything else is rejected by name."""
    codes, scales, zeros, g_idx = random_gptq(rng, 1024, 128, 4, 128, False, False)
    w = gm.pack(codes, scales, zeros, g_idx, bits=4, sym=False)
    seen = []
    call = lambda *args: seen.append(args) or "out"  # noqa: E731
    x = jnp.asarray(rng.standard_normal((8, 1024)), jnp.bfloat16)
    for fused, m in ((False, 3), (True, 5)):
        cfg = gm.KernelConfig(fused=fused).resolved(w, m)
        shape, dt = gm.output_buffer_shape(cfg, w.n_pad, w.out_features, m, jnp.bfloat16)
        poison = jnp.full(shape, jnp.nan, dt)
        assert gm.call_with_output(call, [x, w.qweight], poison, cfg, w, m, jnp.bfloat16) == "out"
        assert len(seen[-1]) == 3 and seen[-1][2] is poison and seen[-1][0] is x
        assert gm.call_with_output(call, [x, w.qweight], None, cfg, w, m, jnp.bfloat16) == "out"
        assert len(seen[-1]) == 2
        with pytest.raises(ValueError, match="out_init must be"):
            gm.call_with_output(call, [x], poison[..., :-1], cfg, w, m, jnp.bfloat16)
        with pytest.raises(ValueError, match="out_init must be"):
            gm.call_with_output(call, [x], poison.astype(jnp.float16), cfg, w, m, jnp.bfloat16)
    assert len(seen) == 4  # the rejected buffers never reached the kernel


def test_lop3_truth_table_is_and_or(rng, monkeypatch):
    """The kernels' PTX ``lop3`` tables, evaluated bit by bit as PTX defines immLut (bit index 4a + 2b + c) on random
    words: LOP3_AND_OR (``gm.or_and``, the code-field extraction) is (a & b) | c and the LUT kernel's byte select is
    (a & ~c) | (b & c); both forms of ``or_and`` lower for CUDA, the PTX ``lop3`` only where DEQUANT_LOP3 is on."""
    from pallas_kernels import lut_matmul as lm
    a, b, c = (rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32) for _ in range(3))
    bit = lambda v, i: (v >> np.uint32(i)) & np.uint32(1)  # noqa: E731

    def ptx_lop3(table):
        out = np.zeros_like(a)
        for i in range(32):
            index = (bit(a, i) << np.uint32(2)) | (bit(b, i) << np.uint32(1)) | bit(c, i)
            out |= ((np.uint32(table) >> index) & np.uint32(1)) << np.uint32(i)
        return out

    np.testing.assert_array_equal(ptx_lop3(gm.LOP3_AND_OR), (a & b) | c)
    np.testing.assert_array_equal(ptx_lop3(lm._LOP3_SELECT), (a & ~c) | (b & c))
    assert (gm.LOP3_AND_OR, lm._LOP3_SELECT) == (0xEA, 0xD8)  # the values the measured kernels ran
    w = gm.pack(*random_gptq(rng, 512, 128, 3, 128, False, False), bits=3, sym=False)
    x = jnp.asarray(rng.standard_normal((1, 512)), jnp.bfloat16)
    for on in (True, False):
        monkeypatch.setattr(gm, "DEQUANT_LOP3", on)
        text = jax.jit(lambda x, w: gm.gptq_matmul(x, w)).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text and ("lop3.b32" in text) == on


@pytest.mark.parametrize("bits,M,fields", [
    (3, 1, dict()),  # one warpgroup, scales after the wgmma (default), unpadded x
    (4, 16, dict(tile_k=256, k_splits=2)),  # two groups per step, padded x
    (4, 1, dict(post_scale=False)),
    (4, 5, dict(variant="ws", tile_k=256)),  # ws stream-K, scaled weights (its default)
    (3, 2, dict(variant="ws", tile_k=128, post_scale=True, fused=True)),
])
def test_kernels_lower_for_cuda(rng, bits, M, fields):
    """The Mosaic GPU kernel builders trace and lower for CUDA on the CPU (the PTX compile and the run need the GPU:
    bench/kernels_launch.py --smoke*): a builder change that no longer traces fails here, in CI."""
    K, N = 1024, 384
    w = gm.pack(*random_gptq(rng, K, N, bits, 128, False, False), bits=bits, sym=False)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    config = gm.KernelConfig(**fields)
    rc = config.resolved(w, M)
    assert rc.post_scale == fields.get("post_scale", rc.variant != "ws" or bits == 3)
    text = jax.jit(lambda x, w: gm.gptq_matmul(x, w, config=config)).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert f"gptq_w{bits}_m" in text and "mosaic_gpu" in text


def test_partial_sums_leave_the_kernel_slots_unsummed(rng):
    """``matmul(partial_sums=True)`` on the kernel path returns the launch's float32 partial slots for a consumer to
    sum (the decode-attention kernel); a fused launch, the reference path and prefill sizes return y itself."""
    K, N = 1024, 384
    w = gm.pack(*random_gptq(rng, K, N, 4, 128, False, False), bits=4, sym=False)
    x = jnp.asarray(rng.standard_normal((1, 1, K)), jnp.bfloat16)
    stream = gm.KernelConfig(variant="ws", tile_k=256)

    def shape_of(config, use_kernel=True, x=x):
        return jax.eval_shape(lambda x: w.matmul(x, use_kernel=use_kernel, config=config, partial_sums=True), x)

    out = shape_of(stream)
    slots = stream.resolved(w, 1).k_splits
    assert isinstance(out, gm.PartialSums) and (out.rows, out.features, out.dtype_name) == (1, N, "bfloat16")
    assert slots >= 2 and out.partials.shape == (slots, w.n_pad, 8) and out.partials.dtype == jnp.float32
    for y in (shape_of(gm.KernelConfig(variant="ws", tile_k=256, fused=True)), shape_of(stream, use_kernel=False),
              shape_of(None, x=jnp.zeros((2, 100, K), jnp.bfloat16))):
        assert not isinstance(y, gm.PartialSums) and y.shape[-1] == N
    # value(): the sum over the slots, the real rows / columns, transposed, rounded once
    p = rng.standard_normal((3, 448, 8)).astype(np.float32)
    got = np.asarray(gm.PartialSums(jnp.asarray(p), 5, 400, "bfloat16").value(), np.float64)
    want = p.astype(np.float64).sum(0)[:400, :5].T
    np.testing.assert_allclose(got, want.astype(ml_dtypes.bfloat16).astype(np.float64), rtol=2.0 ** -7)
