"""Unpadded activations at M < 8 (``KernelConfig.direct_x``) on the CPU: the staging plan of the kernel's SMEM copy
against the hardware's 128-byte swizzle, the staged tiles against the padded x, the kernel's block decomposition in
jnp against a float64 oracle, and the dispatch (default rule, errors, what reaches the kernel). The Mosaic GPU kernel
itself runs on a GPU only (``bench/kernels_launch.py --smoke-direct``).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import gptq_matmul as gm
from test_kernels import oracle_weight, random_gptq, rel_err

INTS = dict(div=lambda a, b: a // b, rem=lambda a, b: a % b)


def swizzled_chunk(tile_k_col: int, row: int) -> tuple[int, int]:
    """(tile, physical 16-byte chunk) of logical element (row, col) of a 16-bit (8, 64)-tiled tile under the
    hardware's 128-byte swizzle: byte address bits [4:7) XOR bits [7:10)."""
    addr = (tile_k_col // 64) * 1024 + row * 128 + (tile_k_col % 64) * 2
    swz = addr ^ (((addr >> 7) & 7) << 4)
    return swz // 1024, (swz % 128) // 16


@pytest.mark.parametrize("tile_k", [64, 128, 256, 512])
def test_staging_plan_is_the_swizzled_tile(tile_k):
    """Every raw 16-byte chunk of the m rows is copied exactly once, to the chunk the 128-byte swizzle puts it at;
    the zeroing covers exactly the rest of the tile (rows m..7), so nothing is left unwritten or written twice."""
    for m in range(1, 8):
        sources, dests = set(), []
        for e in range(m * tile_k // gm.X_VEC):
            r, c, q, qs = gm.x_stage_coords(e, tile_k, xor=lambda a, b: a ^ b, **INTS)
            sources.add((r, c, q))
            assert (c, qs) == swizzled_chunk(c * 64 + q * gm.X_VEC, r)
            assert swizzled_chunk(c * 64 + q * gm.X_VEC + gm.X_VEC - 1, r) == (c, qs)  # the chunk's last element
            dests.append((c, r, qs))
        zeros = [gm.x_zero_coords(e, m, tile_k, **INTS) for e in range((8 - m) * tile_k // gm.X_VEC)]
        zeros = [(c, r, q) for r, c, q in zeros]
        assert len(sources) == m * tile_k // gm.X_VEC
        assert all(r >= m for _, r, _ in zeros) and all(r < m for _, r, _ in dests)
        everything = dests + zeros
        assert len(everything) == len(set(everything)) == tile_k  # (tile_k / 64) tiles x 8 rows x 8 chunks
        assert all(0 <= c < tile_k // 64 and 0 <= r < 8 and 0 <= q < 8 for c, r, q in everything)


@pytest.mark.parametrize("K,act,tile_k", [(1024, False, 512), (576, False, 128), (1000, False, 256),
                                          (768, True, 256), (11008, False, 128)])
def test_staged_tiles_equal_the_padded_x(rng, K, act, tile_k):
    """The direct path's tiles (``direct_activations`` view, TMA boxes with the blocks past K zero, the staging
    plans) are the padded path's x [8, K_pad] exactly: K_pad > K, K not a multiple of 64, act-order."""
    codes, scales, zeros, g_idx = random_gptq(rng, K, 64, 4, 128, False, act)
    w = gm.pack(codes, scales, zeros, g_idx, bits=4, sym=False)
    tile_k = tile_k if w.k_pad % tile_k == 0 else 64
    m = int(rng.integers(1, 8))
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    xv = w.direct_activations(x)
    assert xv.shape == (m, (w.k_pad if act or K % 64 else K) // 64, 64)
    got = np.asarray(gm.staged_x_reference(xv, w.k_pad, tile_k))
    want = np.asarray(w.prepare_activations(x, 8).astype(jnp.float32))
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("extra", [{}, {"tile_k": 128, "k_splits": 2}, {"n_sub": 2, "tile_k": 256},
                                   {"variant": "ws", "tile_k": 128, "ctas": 2}, {"variant": "ws", "fused": True}])
def test_tiled_reference_direct_matches_oracle(rng, extra):
    """The kernel's block decomposition with the staged x (one-warpgroup kernel, k splits, n_sub, ws stream-K with
    units split between CTAs, ws fused) vs the float64 oracle, and bit-equal to the padded path's decomposition."""
    K, N, bits = 768, 384, int(rng.choice([3, 4]))  # ws at tile_k 128, 2 CTAs: 3 units of 6 steps, 9 steps a CTA
    codes, scales, zeros, g_idx = random_gptq(rng, K, N, bits, 128, bool(rng.integers(2)), bool(rng.integers(2)))
    w = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=False)
    m = int(rng.integers(1, 8))
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    cfg = gm.KernelConfig(direct_x=True, **extra)
    assert cfg.resolved(w, m).direct_x
    got = gm.reference_matmul_tiled(x, w, cfg)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ oracle_weight(codes, scales, zeros, g_idx, "bfloat16")
    assert got.shape == (m, N)
    assert rel_err(got, want) < 8e-3
    padded = gm.reference_matmul_tiled(x, w, dataclasses.replace(cfg, direct_x=False))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(padded, np.float32))


def shaped(small, K, N):
    """``small`` with the qweight shape of a K x N weight (block-size logic only: no arrays of that size)."""
    k_pad = gm.split_friendly_k_pad(gm._round_up(K, 256), 128)
    return dataclasses.replace(small, qweight=jax.ShapeDtypeStruct((N // 64, k_pad // 64, small.bits, 128), jnp.int32),
                               in_features=K, out_features=N)


@pytest.mark.parametrize("bits", [3, 4])
def test_direct_x_default_rule(rng, bits, monkeypatch):
    """Default: unpadded x at M < 8 for the ws kernel and for the one-warpgroup kernel up to
    DIRECT_X_MAX_STEPS_PER_SM CTA-steps per SM (the LLaMA-7B shapes, not 3-bit 8192x28672 with 2 splits); the padded
    x at M >= 8, for LUT weights in the one-warpgroup kernel, with direct_x=False or JAXQUANT_GPTQ_DIRECT_X=0
    (DIRECT_X_DEFAULT)."""
    from pallas_kernels import lut_matmul as lm
    small = gm.pack(*random_gptq(rng, 256, 64, bits, 128, False, False), bits=bits, sym=False)
    for K, N in ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288), (4096, 22016)):
        w = shaped(small, K, N)
        for m in (1, 7):
            cfg = gm.KernelConfig().resolved(w, m)
            assert cfg.direct_x and gm.direct_x_steps_per_sm(cfg, w) <= gm.DIRECT_X_MAX_STEPS_PER_SM
        assert not gm.KernelConfig().resolved(w, 8).direct_x and not gm.KernelConfig().resolved(w, 16).direct_x
    big = shaped(small, 8192, 28672)
    cfg = gm.KernelConfig().resolved(big, 1)
    if bits == 4:  # the ws fused default, with or without the pad
        assert cfg.variant == "ws" and cfg.fused and cfg.direct_x
        off = gm.KernelConfig(direct_x=False).resolved(big, 1)
        assert off.variant == "ws" and off.fused and not off.direct_x
    else:  # the stream-K ws default of 3-bit codes at M < 8 (measured with the unpadded x only)
        assert cfg.variant == "ws" and cfg.direct_x and cfg.post_scale
        # without it: the one-warpgroup kernel at 256 / 2 splits, 448 tiles x 32 steps / 132 SMs = 109 > 64
        off = gm.KernelConfig(direct_x=False).resolved(big, 1)
        assert off.variant is None and not off.direct_x and gm.direct_x_steps_per_sm(off, big) > 64
        assert gm.KernelConfig(k_splits=2).resolved(big, 1).variant is None
        assert not gm.KernelConfig(k_splits=2).resolved(big, 1).direct_x
    monkeypatch.setattr(gm, "DIRECT_X_DEFAULT", False)
    assert not gm.KernelConfig().resolved(shaped(small, 4096, 4096), 1).direct_x
    assert gm.KernelConfig(direct_x=True).resolved(shaped(small, 4096, 4096), 1).direct_x
    monkeypatch.setattr(gm, "DIRECT_X_DEFAULT", True)
    with pytest.raises(ValueError, match="direct_x"):
        gm.KernelConfig(direct_x=True).resolved(small, 8)
    lut = lm.pack(rng.integers(0, 16, (256, 64)), rng.standard_normal((64, 16)).astype(np.float16), bits=4)
    assert not gm.KernelConfig().resolved(lut, 1).direct_x
    with pytest.raises(ValueError, match="direct_x"):
        gm.KernelConfig(direct_x=True).resolved(lut, 1)


def test_kernel_gets_the_unpadded_view(rng, monkeypatch):
    """What reaches the kernel builder: with direct_x the [M, K/64, 64] view of x itself (a reshape: no pad in the
    program) and direct_m = M; without it the padded [8, K_pad]. The kernels are replaced by stand-ins that return
    the output buffer's shape (the Mosaic GPU kernel does not run on the CPU)."""
    K, N, m = 576, 256, int(rng.integers(1, 8))
    w = gm.pack(*random_gptq(rng, K, N, 4, 128, False, False), bits=4, sym=False)
    seen = []

    def fake_builder(*args, **kwargs):
        def call(x, *rest):
            seen.append((x.shape, kwargs["direct_m"]))
            cfg = gm.KernelConfig().resolved(w, m)
            shape, dt = gm.output_buffer_shape(cfg, w.n_pad, N, m, w.dtype)
            return jnp.zeros(shape, dt)
        return call

    monkeypatch.setattr(gm, "_build_call", fake_builder)
    monkeypatch.setattr(gm, "_build_ws_call", fake_builder)
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x: gm.gptq_matmul(x, w))(x)
    assert seen[-1] == ((m, K // 64, 64), m)
    assert " pad[" not in str(jaxpr)  # the printed program, nested jits included
    jaxpr = jax.make_jaxpr(lambda x: gm.gptq_matmul(x, w, config=gm.KernelConfig(direct_x=False)))(x)
    assert seen[-1] == ((8, w.k_pad), 0)
    assert " pad[" in str(jaxpr)
