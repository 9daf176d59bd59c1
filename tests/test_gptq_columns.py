"""The GPTQ in-block column kernel (pallas_kernels/gptq_columns.py) in interpret mode: against its jnp reference, a
float64 numpy oracle of the column loop, and the XLA loop of ``jaxquant.gptq._quantize_blocks``."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import jax.numpy as jnp

from pallas_kernels import gptq_columns as C

G = importlib.import_module("jaxquant.gptq")  # the module (the package re-exports the function gptq)


def _spd_inverse_factor(rng, K):
    """U upper with U^T U = H^-1 for a random SPD H (float64 numpy)."""
    X = rng.standard_normal((K, 3 * K))
    H = X @ X.T / (3 * K) + 0.05 * np.eye(K)
    return np.linalg.cholesky(np.linalg.inv(H)).T


def _block_inputs(rng, N, bs, per_column, bits=4):
    """W1, U1, scale, zero (float32) with a grid that clips some weights (scale a bit small) and integer zeros."""
    maxq = 2**bits - 1
    W1 = rng.standard_normal((N, bs)).astype(np.float32)
    U1 = _spd_inverse_factor(rng, bs).astype(np.float32)
    S = bs if per_column else 1
    scale = (np.abs(W1).max(1)[None, :] / maxq * rng.uniform(1.0, 1.8, (S, N))).astype(np.float32)
    zero = rng.integers(maxq // 2 - 2, maxq // 2 + 3, (S, N)).astype(np.float32)
    return W1, U1, scale, zero, maxq


def _oracle(W1, U1, scale, zero, maxq, codes_seen):
    """Float64 column loop. Near a rounding tie (float32 may round either way) it follows the code in ``codes_seen``
    after checking that code is one of the two candidates, so both computations stay on the same path.
    Returns codes, dequantized, scaled errors, the number of ties followed."""
    W = np.asarray(W1, np.float64).copy()
    U = np.asarray(U1, np.float64)
    N, bs = W.shape
    Q = np.zeros((N, bs), np.int64)
    D = np.zeros((N, bs))
    E = np.zeros((N, bs))
    ties = 0
    for i in range(bs):
        s = np.asarray(scale[i if scale.shape[0] > 1 else 0], np.float64)
        z = np.asarray(zero[i if zero.shape[0] > 1 else 0], np.float64)
        x = W[:, i] / s
        q = np.clip(np.round(x) + z, 0, maxq)
        near = np.abs(np.abs(x - np.floor(x)) - 0.5) < 1e-4
        if near.any():
            cand = np.clip(np.stack([np.floor(x), np.ceil(x)]) + z, 0, maxq)[:, near]
            seen = codes_seen[near, i]
            assert np.all((seen == cand[0]) | (seen == cand[1])), "code at a rounding tie is neither neighbour"
            q[near] = seen
            ties += int(near.sum())
        dq = s * (q - z)
        err = (W[:, i] - dq) / U[i, i]
        W -= err[:, None] * U[i][None, :]
        Q[:, i], D[:, i], E[:, i] = q, dq, err
    return Q, D, E, ties


@pytest.mark.parametrize("layout,per_column", [("rows", False), ("cols", True), ("cols", False)])
def test_kernel_matches_reference_and_float64_oracle(rng, layout, per_column):
    N, bs = 37, 32  # odd N: a padded last row tile
    W1, U1, scale, zero, maxq = _block_inputs(rng, N, bs, per_column)
    Q, D, E = (np.asarray(a) for a in C.gptq_columns(W1, U1, scale, zero, maxq=maxq, layout=layout, block_rows=16,
                                                     interpret=True))
    Qr, Dr, Er = (np.asarray(a) for a in C.gptq_columns_reference(W1, U1, scale, zero, maxq))
    # The kernel body in interpret mode performs the reference's float32 operations: identical results.
    np.testing.assert_array_equal(Q, Qr)
    np.testing.assert_array_equal(D, Dr)
    np.testing.assert_array_equal(E, Er)
    assert Q.dtype == np.int32 and Q.min() == 0 and Q.max() == maxq  # the grid clips at both ends here

    Qo, Do, Eo, _ = _oracle(W1, U1, scale, zero, maxq, Q)
    np.testing.assert_array_equal(Q, Qo)
    np.testing.assert_allclose(D, Do, rtol=1e-5, atol=1e-5 * np.abs(Do).max())
    np.testing.assert_allclose(E, Eo, rtol=1e-4, atol=1e-4 * np.abs(Eo).max())


def test_kernel_rows_are_independent(rng):
    """A row's results do not depend on the other rows, the row tiling or the layout (1-GPU vs row-split 2-GPU
    solves pick their tiles by N)."""
    N, bs = 45, 16
    W1, U1, scale, zero, maxq = _block_inputs(rng, N, bs, per_column=True)
    full = C.gptq_columns(W1, U1, scale, zero, maxq=maxq, layout="cols", block_rows=16, interpret=True)
    for layout in ("rows", "cols"):
        half = C.gptq_columns(W1[20:], U1, scale[:, 20:], zero[:, 20:], maxq=maxq, layout=layout, block_rows=8,
                              interpret=True)
        for a, b in zip(full, half):
            np.testing.assert_array_equal(np.asarray(a)[20:], np.asarray(b))


def test_kernel_rejects_bad_shapes(rng):
    W1, U1, scale, zero, maxq = _block_inputs(rng, 8, 24, per_column=False)
    with pytest.raises(ValueError, match="power of two"):
        C.gptq_columns(W1, U1, scale, zero, maxq=maxq, interpret=True)
    W1, U1, scale, zero, maxq = _block_inputs(rng, 8, 16, per_column=False)
    with pytest.raises(ValueError, match="scale/zero shapes"):
        C.gptq_columns(W1, U1, scale[:, :4], zero, maxq=maxq, interpret=True)
    with pytest.raises(ValueError, match="layout"):
        C.gptq_columns(W1, U1, scale, zero, maxq=maxq, layout="diagonal", interpret=True)


# (group_size, static_groups, act_order, block_size): the configs the kernel covers, and one it leaves to XLA.
_CASES = [
    (16, False, False, 16, True),  # dynamic groups, group_size == block_size (g128 bs128 at scale)
    (-1, False, True, 16, True),  # per channel, act-order
    (16, True, True, 16, True),  # static groups + act-order: per-column table lookups
    (32, False, False, 16, True),  # dynamic groups spanning two blocks
    (8, False, False, 16, False),  # groups inside a block: XLA loop
]


@pytest.mark.parametrize("gs,static_groups,act_order,bs,kernel_used", _CASES)
def test_quantize_blocks_kernel_path_equals_xla_loop(rng, monkeypatch, gs, static_groups, act_order, bs, kernel_used):
    N, K, bits = 19, 48, 3
    W = rng.standard_normal((N, K)).astype(np.float32)
    X = rng.standard_normal((K, 2 * K)).astype(np.float32)
    H = jnp.asarray(X @ X.T)
    Wp, Hp, perm, col_group, tables = G._prepare(jnp.asarray(W), H, bits=bits, sym=False, group_size=gs,
                                                 act_order=act_order, static_groups=static_groups)
    U = G._inverse_cholesky_upper(Hp, 0.01)
    kw = dict(bits=bits, sym=False, group_size=gs, block_size=bs, row_loss=True)

    calls = []
    kernel = C.gptq_columns
    monkeypatch.setattr(C, "gptq_columns", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    # Unjitted so every call traces (and the counter sees the kernel calls); the kernel itself stays jitted.
    got = G._quantize_blocks.__wrapped__(Wp, U, col_group, tables, column_kernel="interpret", **kw)
    assert len(calls) == int(kernel_used)  # the block loop body is traced once
    assert all(k["interpret"] for k in calls)
    want = G._quantize_blocks(Wp, U, col_group, tables, column_kernel="off", **kw)

    codes, deq, loss, (scales, zeros) = got
    codes, deq, scales, zeros = (np.asarray(a) for a in (codes, deq, scales, zeros))
    # The two paths do the same float32 operations, but XLA may fuse the loop's multiply-subtract differently (last
    # bits of later columns differ; seen on CPU): a near-tie may then round the other way and change that row from
    # there on. Codes agree almost everywhere, and where they agree the dequantized weights agree closely.
    same = codes == np.asarray(want[0])
    assert same.mean() >= 0.98, f"only {same.mean():.3f} of the codes agree"
    np.testing.assert_allclose(deq[same], np.asarray(want[1])[same], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, np.asarray(want[2]), rtol=0.05)
    np.testing.assert_allclose(scales, np.asarray(want[3][0]), rtol=1e-4)
    assert (zeros == np.asarray(want[3][1])).mean() >= 0.95
    assert len(np.unique(codes)) == 2**bits  # every level used: a real quantization, not a trivial one


def test_column_kernel_mode_and_config(monkeypatch):
    monkeypatch.setenv("JAXQUANT_GPTQ_COLUMN_KERNEL", "0")
    assert G._column_kernel_mode("auto") == "off"
    assert G._column_kernel_mode("interpret") == "interpret"
    assert G._column_kernel_config() == {}
    with pytest.raises(ValueError, match="column_kernel"):
        G._column_kernel_mode("yes")
    monkeypatch.setenv("JAXQUANT_GPTQ_COLUMN_KERNEL", "rows:16:4")
    assert G._column_kernel_config() == dict(layout="rows", block_rows=16, num_warps=4)
    monkeypatch.setenv("JAXQUANT_GPTQ_COLUMN_KERNEL", "rows:16")
    with pytest.raises(ValueError, match="layout:block_rows:num_warps"):
        G._column_kernel_config()
