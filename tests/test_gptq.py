"""GPTQ / RTN / grid / Hessian against the float64 numpy oracles in tests/oracles.py.

Inputs are drawn fresh each run; the seed is printed (shown by pytest on failure) and can be
pinned with JAXQUANT_TEST_SEED=<int>.
"""

from __future__ import annotations

import os
import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from jaxquant.config import QuantConfig
from jaxquant.gptq import gptq
from jaxquant.grid import find_params, quantize_codes
from jaxquant.hessian import hessian_init, hessian_update
from jaxquant.rtn import rtn

N, K, T = 64, 256, 1024
DEAD = (5, 77)


@pytest.fixture
def seed():
    s = int(os.environ.get("JAXQUANT_TEST_SEED", secrets.randbits(32)))
    print(f"seed={s} (rerun with JAXQUANT_TEST_SEED={s})")
    return s


def correlated_activations(rng, tokens, k, dead=()):
    """Low-rank mixed features plus noise, with uneven column scales: a strongly correlated H."""
    rank = k // 4
    X = rng.standard_normal((tokens, rank)) @ rng.standard_normal((rank, k)) / np.sqrt(rank)
    X = (X + 0.3 * rng.standard_normal((tokens, k))) * (0.5 + rng.random(k))
    X[:, list(dead)] = 0.0
    return X


def problem(rng, cfg, n=N, k=K, dead=DEAD):
    W = rng.standard_normal((n, k)) * (0.5 + rng.random(k))
    X = correlated_activations(rng, T, k, dead)
    H = 2.0 / T * X.T @ X
    return W.astype(np.float32), H.astype(np.float32)


def hessian_norm(D, H):
    return float(np.einsum("nk,kl,nl->", D, H.astype(np.float64), D))


GPTQ_CASES = [
    dict(bits=4, group_size=-1),
    dict(bits=4, group_size=128),
    dict(bits=4, group_size=128, block_size=32, act_order=True),
    dict(bits=3, group_size=128, block_size=32, sym=True),
    dict(bits=3, group_size=128, act_order=True, static_groups=True),
    dict(bits=4, group_size=128, block_size=64, sym=True, act_order=True, static_groups=True),
    dict(bits=4, group_size=-1, sym=True, act_order=True, block_size=48),
    dict(bits=3, group_size=32, block_size=128, act_order=True),  # several groups per block
    dict(bits=4, group_size=128, block_size=96, sym=True),  # neither divides: gcd blocks
    dict(bits=2, group_size=64),
    dict(bits=8, group_size=128, act_order=True),
    # Group sizes that do not divide K: a shorter last group, as the reference (SmolLM2: K=576 at g128).
    dict(bits=4, group_size=96),
    dict(bits=3, group_size=100, block_size=128, act_order=True),
    dict(bits=4, group_size=96, act_order=True, static_groups=True),
]


@pytest.mark.parametrize("case", GPTQ_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_gptq_matches_obs_oracle(case, seed):
    cfg = QuantConfig(**case)
    W, H = problem(np.random.default_rng(seed), cfg)
    weight, err, deq = gptq(W, H, cfg, return_dequantized=True)
    got = np.asarray(weight.codes()).T
    ref = oracles.gptq(W, H, cfg.bits, cfg.group_size, cfg.sym, cfg.act_order, cfg.static_groups,
                       cfg.percdamp, follow=(got, np.asarray(weight.zeros())))
    # Ties the oracle had to follow count as disagreements.
    agree = (np.sum(got == ref.codes) - ref.forced) / got.size
    assert agree >= 0.999, f"seed={seed}: codes agree on only {agree:.5f} ({ref.forced} forced ties)"
    assert abs(err - ref.loss) / ref.loss < 1e-4, f"seed={seed}: error {err} vs oracle {ref.loss}"
    np.testing.assert_array_equal(np.asarray(weight.g_idx), ref.g_idx)
    np.testing.assert_allclose(np.asarray(weight.scales), ref.scales, rtol=1e-4)
    assert weight.shape == (K, N)
    # The stored format reproduces exactly the W the algorithm propagated errors against.
    np.testing.assert_array_equal(np.asarray(weight.dequantize()).T, np.asarray(deq))
    np.testing.assert_array_equal(np.asarray(deq)[:, list(DEAD)], 0.0)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, -1)])
def test_gptq_beats_rtn_on_correlated_data(bits, group_size, seed):
    cfg = QuantConfig(bits=bits, group_size=group_size, act_order=True)
    W, H = problem(np.random.default_rng(seed), cfg, dead=())
    _, _, deq = gptq(W, H, cfg, return_dequantized=True)
    rtn_deq = np.asarray(rtn(W, cfg).dequantize()).T
    e_gptq = hessian_norm(W - np.asarray(deq, np.float64), H)
    e_rtn = hessian_norm(W - rtn_deq.astype(np.float64), H)
    assert e_gptq <= e_rtn, f"seed={seed}: GPTQ {e_gptq} > RTN {e_rtn}"


@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, False), (3, 64, True), (2, -1, False), (8, 32, True),
                                                 (4, 96, False)])
def test_rtn_matches_oracle(bits, group_size, sym, seed):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((N, K)) * (0.5 + rng.random(K))).astype(np.float32)
    W[3] = 0.0  # an all-zero row takes the [-1, 1] range
    cfg = QuantConfig(bits=bits, group_size=group_size, sym=sym)
    weight = rtn(W, cfg)
    codes, scales, zeros = oracles.rtn(W, bits, group_size, sym)
    got = np.array(weight.codes()).T
    # The zero row's zero point is round(maxq/2): a tie for odd maxq (7.5 at 4 bits) that float32
    # and float64 break differently. Either way code == zero, so it dequantizes to exactly 0.
    assert np.all(np.asarray(weight.dequantize())[:, 3] == 0.0)
    got[3], zeros[:, 3] = codes[3], np.asarray(weight.zeros())[:, 3]
    # The symmetric grid puts each row's most negative weight exactly on a rounding tie
    # (x/scale = -(maxq+1)/2 + 1/2), and random weights land near one now and then: there float32
    # and float64 may round differently (by one step), elsewhere the codes must be identical.
    gs = K if group_size == -1 else group_size
    ratio = W.astype(np.float64) / scales.T[:, np.arange(K) // gs]
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-6 * np.maximum(1, np.abs(ratio))
    assert np.all(got[~tie] == codes[~tie]), f"seed={seed}"
    assert np.all(np.abs(got[tie] - codes[tie]) <= 1), f"seed={seed}"
    np.testing.assert_allclose(np.asarray(weight.scales), scales, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(weight.zeros()), zeros)


def test_grid_on_row_batches(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, 40)).astype(np.float32)
    x[1, 2] = np.abs(x[1, 2])  # all positive: min clamps to 0
    scale, zero = find_params(x, bits=4, sym=False)
    assert scale.shape == zero.shape == (3, 5)
    s64, z64, _ = oracles.grid_params(x.reshape(15, 40), 4, False)
    np.testing.assert_allclose(np.asarray(scale).ravel(), s64, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(zero).ravel(), z64)
    q = quantize_codes(x, scale[..., None], zero[..., None], 15)
    assert q.dtype == jnp.int32 and int(q.min()) >= 0 and int(q.max()) <= 15


@pytest.mark.parametrize("ndim", [2, 3])
def test_hessian_streaming(ndim, seed):
    rng = np.random.default_rng(seed)
    k = 48
    shape = (37, k) if ndim == 2 else (3, 11, k)
    batches = [(correlated_activations(rng, int(np.prod(shape[:-1])), k) + 0.5).reshape(shape).astype(np.float32)
               for _ in range(5)]
    state = hessian_init(k)
    for x in batches:
        state = hessian_update(state, jnp.asarray(x))
    expected = oracles.hessian(batches)
    assert int(state.n) == (5 if ndim == 2 else 15)
    np.testing.assert_allclose(np.asarray(state.H), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # Works under an outer jit (the state is a pytree).
    state2 = jax.jit(hessian_update)(hessian_init(k), jnp.asarray(batches[0]))
    np.testing.assert_allclose(np.asarray(state2.H), oracles.hessian(batches[:1]), rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())


# ---- bad input ----------------------------------------------------------------------------


def test_group_size_larger_than_in_features_is_rejected():
    with pytest.raises(ValueError, match=r"group_size=512 exceeds in_features=256"):
        QuantConfig(group_size=512).validate(256)
    W = np.ones((64, 256), np.float32)
    with pytest.raises(ValueError, match=r"group_size=384 exceeds in_features=256"):
        gptq(W, np.eye(256, dtype=np.float32), QuantConfig(group_size=384))


def test_unsupported_bits_and_block_size():
    with pytest.raises(ValueError, match=r"bits=5 is not supported"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match=r"block_size=0 must be positive"):
        QuantConfig(block_size=0)


def test_nan_in_hessian_or_weight(seed):
    cfg = QuantConfig(group_size=128)
    W, H = problem(np.random.default_rng(seed), cfg)
    H_bad = H.copy()
    H_bad[3, 7] = np.nan
    with pytest.raises(ValueError, match=r"Hessian H contains NaN"):
        gptq(W, H_bad, cfg)
    W_bad = W.copy()
    W_bad[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"W contains NaN or Inf"):
        gptq(W_bad, H, cfg)


def test_negative_definite_hessian_raises(seed):
    rng = np.random.default_rng(seed)
    X = correlated_activations(rng, T, K)
    H = (-2.0 / T * X.T @ X).astype(np.float32)
    cfg = QuantConfig(group_size=128, percdamp=1e-6, damp_retries=2)
    W = rng.standard_normal((N, K)).astype(np.float32)
    with pytest.warns(UserWarning, match="Cholesky failed"):
        with pytest.raises(ValueError, match=r"not positive definite after 2 damping retries \(percdamp up to 0\.0001\)"):
            gptq(W, H, cfg)


def test_damping_retry_rescues_slightly_indefinite_hessian(seed):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((K, K)))
    eig = np.linspace(-0.02, 1.0, K)  # mean 0.49: percdamp 0.01 is too little, 0.1 enough
    H = (Q * eig) @ Q.T
    W = rng.standard_normal((N, K)).astype(np.float32)
    with pytest.warns(UserWarning, match="percdamp=0.01"):
        weight, err = gptq(W, H.astype(np.float32), QuantConfig(group_size=128))
    assert np.isfinite(err) and weight.shape == (K, N)
