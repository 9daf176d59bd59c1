"""Packing into the AutoGPTQ / GPTQModel int32 layout and the stored weight format."""

from __future__ import annotations

import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.config import QuantConfig
from jaxquant.formats import UniformQuantizedWeight
from jaxquant.gptq import gptq
from jaxquant.packing import pack, pack_qweight, pack_qzeros, unpack, unpack_qweight, unpack_qzeros
from jaxquant.rtn import rtn


@pytest.fixture
def seed():
    s = int(os.environ.get("JAXQUANT_TEST_SEED", secrets.randbits(32)))
    print(f"seed={s} (rerun with JAXQUANT_TEST_SEED={s})")
    return s


def bitstream_pack(codes_kn, bits):
    """Independent reference: per column, one big integer holding code c at bit c*bits."""
    K, N = codes_kn.shape
    n_words = K * bits // 32
    out = np.zeros((n_words, N), np.int64)
    for n in range(N):
        stream = 0
        for c in range(K):
            stream |= int(codes_kn[c, n]) << (c * bits)
        for w in range(n_words):
            out[w, n] = (stream >> (32 * w)) & 0xFFFFFFFF
    return out.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_and_bitstream_layout(bits, seed):
    rng = np.random.default_rng(seed)
    K, N = 96, 64
    codes = rng.integers(0, 2**bits, size=(K, N), dtype=np.int32)
    qweight = pack_qweight(codes, bits)
    assert qweight.shape == (K * bits // 32, N) and qweight.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(qweight), bitstream_pack(codes, bits), err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.asarray(unpack_qweight(qweight, bits)), codes, err_msg=f"seed={seed}")
    # qzeros: packed along N.
    zeros = rng.integers(0, 2**bits, size=(3, N), dtype=np.int32)
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (3, N * bits // 32)
    np.testing.assert_array_equal(np.asarray(qzeros), bitstream_pack(zeros.T, bits).T)
    np.testing.assert_array_equal(np.asarray(unpack_qzeros(qzeros, bits)), zeros)


def test_hand_checked_words():
    # 4 bits: codes 0..7 down one column fill one word as nibbles 0x76543210.
    q = pack(np.arange(8, dtype=np.int32)[:, None], bits=4)
    assert q.shape == (1, 1) and int(q[0, 0]) == 0x76543210
    # 8 bits: bytes, little end first.
    assert int(pack(np.array([[1], [2], [3], [0xFF]], np.int32), bits=8)[0, 0]) == np.int32(np.uint32(0xFF030201).view(np.int32))
    # 2 bits: sixteen codes of 3 set every bit.
    assert int(pack(np.full((16, 1), 3, np.int32), bits=2)[0, 0]) == -1


def test_three_bit_codes_cross_words():
    # 32 codes -> 3 words. Code 10 sits at stream bits 30..32, code 21 at bits 63..65.
    codes = np.zeros((32, 1), np.int32)
    codes[10] = 0b111
    codes[21] = 0b101
    codes[0], codes[11], codes[22] = 1, 1, 1  # first codes after each crossing start at bit 0, 1, 2
    w = np.asarray(pack(codes, bits=3))[:, 0].view(np.uint32)
    assert w[0] == (0b11 << 30) | 1  # low two bits of code 10 at the top of word 0
    assert w[1] == 0b1 | (1 << 1) | (1 << 31)  # code 10's high bit, code 11 at bit 1, code 21's low bit
    assert w[2] == 0b10 | (1 << 2)  # code 21's two high bits, code 22 at bit 2
    np.testing.assert_array_equal(np.asarray(unpack(pack(codes, bits=3), bits=3)), codes)


def test_shapes_that_do_not_pack_raise():
    with pytest.raises(ValueError, match=r"length 48, which is not a multiple of 32"):
        pack(np.zeros((48, 4), np.int32), bits=3)
    with pytest.raises(ValueError, match=r"length 6, which is not a multiple of 8"):
        pack(np.zeros((6, 4), np.int32), bits=4)
    with pytest.raises(ValueError, match=r"bits=5 is not supported"):
        pack(np.zeros((32, 4), np.int32), bits=5)
    with pytest.raises(ValueError, match=r"out_features has length 40"):
        rtn(np.ones((40, 64), np.float32), QuantConfig(bits=3, group_size=32))


def test_jit_matches_eager(seed):
    codes = np.random.default_rng(seed).integers(0, 8, size=(64, 32), dtype=np.int32)
    f = jax.jit(lambda c: unpack(pack(c, bits=3, axis=1), bits=3, axis=1))
    np.testing.assert_array_equal(np.asarray(f(codes)), codes)


@pytest.mark.parametrize("case", [dict(bits=4, group_size=128, act_order=True), dict(bits=3, group_size=-1, sym=True)])
def test_stored_format_dequantizes_to_algorithm_output(case, seed):
    rng = np.random.default_rng(seed)
    N, K = 64, 256
    W = rng.standard_normal((N, K)).astype(np.float32)
    X = rng.standard_normal((512, K)) @ (np.eye(K) + 0.2 * rng.standard_normal((K, K)))
    H = (2 / 512 * X.T @ X).astype(np.float32)
    cfg = QuantConfig(**case)
    weight, _, deq = gptq(W, H, cfg, return_dequantized=True)
    np.testing.assert_array_equal(np.asarray(weight.dequantize()), np.asarray(deq).T)

    # Pytree: survives jit with the metadata static; matmul is x @ dequantize() in x's dtype.
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    y = jax.jit(lambda w, x: w.matmul(x))(weight, jnp.asarray(x))
    assert y.shape == (2, 5, N) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x @ np.asarray(deq, np.float64).T, rtol=1e-4, atol=1e-4)
    yb = weight.matmul(jnp.asarray(x, jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16

    leaves, treedef = jax.tree_util.tree_flatten(weight)
    assert len(leaves) == 4
    assert jax.tree_util.tree_unflatten(treedef, leaves).bits == cfg.bits


def test_from_codes_and_sizes(seed):
    rng = np.random.default_rng(seed)
    N, K, gs = 64, 256, 128
    codes = rng.integers(0, 16, size=(N, K), dtype=np.int32)
    scales = rng.random((K // gs, N)).astype(np.float32) + 0.1
    zeros = rng.integers(0, 16, size=(K // gs, N), dtype=np.int32)
    g_idx = np.arange(K, dtype=np.int32) // gs
    w = UniformQuantizedWeight.from_codes(codes, scales, zeros, g_idx, bits=4, group_size=gs, sym=False)
    expected = scales[g_idx] * (codes.T - zeros[g_idx]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(w.dequantize()), expected)
    # qweight 256*64/2 + qzeros 2*64/2 + scales 2*64*4 + g_idx 256*4 bytes
    assert w.nbytes == 8192 + 64 + 512 + 1024
    assert w.avg_bits() == pytest.approx(8 * 9792 / (N * K))
