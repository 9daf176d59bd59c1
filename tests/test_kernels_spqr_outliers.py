"""The SpQR outlier kernel (pallas_kernels/spqr_outliers.py) in Pallas interpret mode on the CPU.

Oracle: float64 numpy, y + x @ D where D [K_pad, N] holds each stored outlier's correction (its value minus the
kernel's dense value, rounded to float16) at its kernel column, built here from the SpQR CSR and the float64 kernel
dense values of tests/test_kernels_spqr.py -- not from the packed ELL buckets the kernel reads.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import spqr_matmul as sm
from pallas_kernels import spqr_outliers as so
from tests.test_kernels_spqr import oracle_kernel_dense, random_spqr, to_kernel


def oracle_corrections(w, kw) -> np.ndarray:
    """[K_pad, N] float64: (outlier value - kernel dense value) rounded to float16, at each outlier's kernel column."""
    K, N = w.in_features, w.out_features
    row_ptr, cols = np.asarray(w.row_ptr).astype(np.int64), np.asarray(w.col_idx).astype(np.int64)
    values = np.asarray(w.values, np.float32)
    rows = np.repeat(np.arange(N), np.diff(row_ptr))
    kidx = np.asarray(kw.kidx)
    kernel_col = np.empty(K, np.int64)
    kernel_col[kidx[kidx < K]] = np.nonzero(kidx < K)[0]
    dense = oracle_kernel_dense(w, kw)
    out = np.zeros((kw.k_pad, N))
    p = kernel_col[cols]
    out[p, rows] = (values - dense[p, rows].astype(np.float32)).astype(np.float16)
    return out


@pytest.fixture(scope="module")
def packed():
    """A packed 3-bit SpQR weight with outliers in several row-length buckets (~25 per row; a quarter of the rows
    none)."""
    rng = np.random.default_rng()
    w = random_spqr(rng, 512, 224, 3, 16, 16, True, outlier_frac=0.05)
    # Drop the outliers of a random quarter of the rows (rows without outliers must stay untouched).
    row_ptr = np.asarray(w.row_ptr).astype(np.int64)
    keep_row = rng.random(w.out_features) >= 0.25
    keep = np.repeat(keep_row, np.diff(row_ptr))
    counts = np.diff(row_ptr) * keep_row
    w = dataclasses.replace(w, row_ptr=jnp.asarray(np.concatenate([[0], np.cumsum(counts)]), jnp.int32),
                            col_idx=w.col_idx[keep], values=w.values[keep])
    kw = to_kernel(w, "bfloat16")
    assert len(kw.sp_buckets) >= 3
    return w, kw, oracle_corrections(w, kw)


@pytest.mark.parametrize("m,kmajor,chunk,tile", [(1, False, 32, 4096), (1, False, 8, 64), (3, True, 16, 256),
                                                 (3, False, 16, 256), (16, True, 32, 4096), (5, True, 8, 128)])
def test_kernel_matches_float64_oracle(rng, packed, m, kmajor, chunk, tile):
    w, kw, corrections = packed
    x = jnp.asarray(rng.standard_normal((m, w.in_features)), jnp.bfloat16)
    xk = kw.prepare_activations(x, -(-m // 8) * 8)  # the kernel's padded activations [M_pad, K_pad]
    y = jnp.asarray(rng.standard_normal((m, w.out_features)), jnp.float32)
    got = so.outlier_product_add(y, xk[:m].T if kmajor else xk, kw.sp_buckets, kw.sp_rows, kmajor=kmajor,
                                 chunk=chunk, tile_elements=tile, interpret=True)
    want = np.asarray(y, np.float64) + np.asarray(xk[:m], np.float64) @ corrections
    assert got.shape == y.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    # Rows without outliers are left exactly as they were.
    untouched = np.setdiff1d(np.arange(w.out_features), np.asarray(kw.sp_rows))
    assert untouched.size > 0
    np.testing.assert_array_equal(np.asarray(got)[:, untouched], np.asarray(y)[:, untouched])
    # Same as the pure-jnp reference and the XLA product the GPU path used before.
    ref = so.outlier_product_reference(y, xk[:m].T if kmajor else xk, kw.sp_buckets, kw.sp_rows, kmajor=kmajor)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    xla = np.asarray(y) + np.asarray(sm.sparse_product(xk[:m], kw))[:, :w.out_features]
    np.testing.assert_allclose(np.asarray(got), xla, rtol=1e-5, atol=1e-5)


def test_block_plan_covers_every_row():
    plan = so.block_plan([(37, 8), (1000, 24), (3, 200)], mp=4, chunk=16, tile_elements=512)
    for (n_b, l_b), (rows, chunk, programs) in zip([(37, 8), (1000, 24), (3, 200)], plan):
        assert rows & (rows - 1) == 0 and chunk & (chunk - 1) == 0
        assert chunk <= max(8, l_b) and rows * chunk * 4 <= 512
        assert (programs - 1) * rows < n_b <= programs * rows


def test_errors(rng, packed):
    w, kw, _ = packed
    xk = jnp.asarray(rng.standard_normal((8, kw.k_pad)), jnp.bfloat16)
    y = jnp.asarray(rng.standard_normal((2, w.out_features)), jnp.float32)
    args = (kw.sp_buckets, kw.sp_rows)
    with pytest.raises(ValueError, match="float32"):
        so.outlier_product_add(y.astype(jnp.bfloat16), xk, *args, interpret=True)
    with pytest.raises(ValueError, match="only 1"):
        so.outlier_product_add(y, xk[:1].T, *args, kmajor=True, interpret=True)
    with pytest.raises(ValueError, match="rows has"):
        so.outlier_product_add(y, xk, kw.sp_buckets, kw.sp_rows[1:], interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        so.outlier_product_add(y, xk, *args, chunk=24, interpret=True)
    with pytest.raises(ValueError, match="outliers="):
        sm.KernelConfig(outliers="cusparse").resolved(kw, 1)
    assert sm.KernelConfig().resolved(kw, 1).outliers in sm.OUTLIER_PATHS


def test_mosaic_sums_reference_and_plan(rng, packed):
    """The Mosaic GPU variant (M = 1; its inline_mgpu body cannot run in interpret mode, it is checked against the
    XLA form on the GPU by bench/spqr_outliers.py): its output contract through the jnp reference, and its CTA plan."""
    w, kw, corrections = packed
    x = jnp.asarray(rng.standard_normal((1, w.in_features)), jnp.bfloat16)
    xk = kw.prepare_activations(x, 8)
    sums = so.outlier_sums_reference(xk, kw.sp_buckets)
    assert sums.shape == (kw.sp_rows.shape[0] + 1,) and float(sums[-1]) == 0.0
    got = np.asarray(sums)[np.asarray(kw.sp_inv)[:w.out_features]]  # each output row's correction (0 if none)
    want = np.asarray(xk[0], np.float64) @ corrections
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    plan, ctas, total = so.sums_plan([c.shape for c, _ in kw.sp_buckets])
    assert total == kw.sp_rows.shape[0]
    covered = np.zeros(total, np.int64)
    for (first_cta, n_ctas, first_row), (cols, _) in zip(plan, kw.sp_buckets):
        t = (np.arange(first_cta, first_cta + n_ctas)[:, None] - first_cta) * so.THREADS + np.arange(so.THREADS)
        t = t[t < cols.shape[0]]
        covered[first_row + t] += 1
    assert ctas == plan[-1][0] + plan[-1][1] and np.all(covered == 1)
    with pytest.raises(ValueError, match="L_b % 8"):
        so.outlier_sums_mgpu(xk, ((kw.sp_buckets[0][0][:, :3], kw.sp_buckets[0][1][:, :3]),))
