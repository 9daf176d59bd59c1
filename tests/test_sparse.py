"""CSR storage of kept 16-bit weights: exact round trip, product against numpy, checks of corrupt arrays."""

from __future__ import annotations

import numpy as np
import pytest

from jaxquant.sparse import CSR, csr_from_mask, csr_matmul, index_dtype


@pytest.mark.parametrize("rows,cols,density", [(37, 50, 0.05), (8, 40000, 0.001), (16, 24, 0.0)])
def test_csr_round_trip_and_product(rng, rows, cols, density):
    dense = rng.standard_normal((rows, cols)).astype(np.float32)
    mask = rng.random((rows, cols)) < density
    if density:
        mask[rng.integers(rows), :] = False  # an empty row in the middle
    csr = csr_from_mask(dense, mask)
    csr.check()
    assert csr.nnz == mask.sum()
    assert csr.col_idx.dtype == index_dtype(cols) == (np.int16 if cols <= 32768 else np.int32)
    # Exactly the kept values (as float16), zeros elsewhere.
    want = np.where(mask, dense.astype(np.float16).astype(np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(csr.to_dense()), want)
    # x @ S^T for a batch with two leading axes.
    x = rng.standard_normal((2, 3, cols)).astype(np.float32)
    got = np.asarray(csr_matmul(x, csr.row_ptr, csr.col_idx, csr.values, rows))
    ref = x.astype(np.float64) @ want.T.astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))
    assert csr.nbytes == 4 * (rows + 1) + csr.nnz * (np.dtype(index_dtype(cols)).itemsize + 2)


def test_csr_check_names_problem(rng):
    dense = rng.standard_normal((4, 8)).astype(np.float32)
    csr = csr_from_mask(dense, rng.random((4, 8)) < 0.5)
    bad_ptr = CSR(np.asarray(csr.row_ptr)[:-1], csr.col_idx, csr.values, csr.shape)
    with pytest.raises(ValueError, match="row_ptr"):
        bad_ptr.check()
    cols = np.asarray(csr.col_idx).copy()
    if cols.size:
        cols[0] = 9
        with pytest.raises(ValueError, match="out of range"):
            CSR(csr.row_ptr, cols, csr.values, csr.shape).check()
    with pytest.raises(ValueError, match="same 2-D shape"):
        csr_from_mask(dense, np.ones((4, 7), bool))
