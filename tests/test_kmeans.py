"""jaxquant.kmeans against the float64 numpy oracle (tests/kmeans_oracle.py): same init, same iterations, same
labels and centroids, for 1-D rows (SqueezeLLM) and 2-D points (RPTQ); the float32 path; degenerate rows; errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.kmeans import initial_centroids, kmeans
from kmeans_oracle import kmeans_row, maximin_init, quantile_init


def _weights(rng, shape):
    """Heavy-tailed positive weights (Fisher-like: a few weights dominate a row) with some exact zeros."""
    w = rng.exponential(1.0, shape) ** 3
    w[rng.random(shape) < 0.05] = 0.0
    return w


def _assert_same(res, i, oracle, what):
    np.testing.assert_allclose(np.asarray(res.centroids[i]), oracle.centroids, rtol=1e-9, atol=1e-12, err_msg=what)
    np.testing.assert_array_equal(np.asarray(res.labels[i]), oracle.labels, err_msg=what)
    assert int(res.iterations[i]) == oracle.iterations, what
    assert float(res.inertia[i]) == pytest.approx(oracle.inertia, rel=1e-9), what


@pytest.mark.parametrize("k", [8, 16])
def test_1d_rows_match_oracle(rng, k):
    rows, n = 12, 256
    x = rng.standard_t(4, (rows, n)) * rng.uniform(0.01, 1.0, (rows, 1))  # heavy tails, row-dependent scale
    w = _weights(rng, (rows, n))
    w[3] = 0.0  # a row without weight: clustered with unit weights
    relocations = 0
    with jax.enable_x64(True):
        res = kmeans(jnp.asarray(x), jnp.asarray(w), k=k)
        init = initial_centroids(jnp.asarray(x), jnp.asarray(w), k=k)
        assert res.centroids.dtype == jnp.float64 and res.centroids.shape == (rows, k)
        for i in range(rows):
            wi = w[i] if w[i].sum() > 0 else np.ones(n)
            np.testing.assert_array_equal(np.asarray(init[i]), quantile_init(x[i], wi, k)[:, 0])
            oracle = kmeans_row(x[i], w[i], k)
            _assert_same(res, i, oracle, f"row {i}")
            relocations += oracle.relocations
    assert relocations > 0  # the heavy weights make duplicate quantiles: the empty-cluster path ran


@pytest.mark.parametrize("k", [4, 8])
def test_2d_points_match_oracle(rng, k):
    """RPTQ's use: (max, min) points of channels, a few outlying channels; maximin init."""
    sets, n = 3, 160
    mx = np.abs(rng.standard_normal((sets, n))) + 0.5
    mx[:, :4] *= 20  # outlier channels
    pts = np.stack([mx, -mx * rng.uniform(0.5, 1.5, (sets, n))], axis=-1)
    with jax.enable_x64(True):
        res = kmeans(jnp.asarray(pts), None, k=k)
        init = initial_centroids(jnp.asarray(pts), k=k)
        assert res.centroids.shape == (sets, k, 2)
        for i in range(sets):
            # centroid 0 is a mean (summation order: ulp differences); the rest are data points
            np.testing.assert_allclose(np.asarray(init[i]), maximin_init(pts[i], np.ones(n), k), rtol=1e-12)
            _assert_same(res, i, kmeans_row(pts[i], np.ones(n), k), f"set {i}")


def test_tolerance_and_given_init_match_oracle(rng):
    rows, n, k = 4, 128, 8
    x = rng.standard_normal((rows, n))
    w = rng.uniform(0.1, 1.0, (rows, n))
    init = np.sort(rng.standard_normal((rows, k)), axis=1)
    with jax.enable_x64(True):
        loose = kmeans(jnp.asarray(x), jnp.asarray(w), k=k, tol=1e-2, init=jnp.asarray(init))
        capped = kmeans(jnp.asarray(x), jnp.asarray(w), k=k, tol=0.0, max_iter=2)
        for i in range(rows):
            _assert_same(loose, i, kmeans_row(x[i], w[i], k, tol=1e-2, init_c=init[i]), f"tol row {i}")
            _assert_same(capped, i, kmeans_row(x[i], w[i], k, tol=0.0, max_iter=2), f"max_iter row {i}")
    assert np.all(np.asarray(capped.iterations) <= 2)


def test_float32_is_a_weighted_lloyd_fixed_point(rng):
    """The default float32 path: labels are nearest centroids, centroids are the weighted means of their clusters
    (float32 rounding), and the objective is the oracle's to float32 accuracy."""
    rows, n, k = 8, 512, 16
    x = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    w = rng.uniform(0.0, 1.0, (rows, n)).astype(np.float32)
    res = kmeans(x, w, k=k, tol=0.0)
    assert res.centroids.dtype == jnp.float32
    c, labels = np.asarray(res.centroids, np.float64), np.asarray(res.labels)
    for i in range(rows):
        d = (x[i, :, None].astype(np.float64) - c[i][None, :]) ** 2
        np.testing.assert_array_less(d[np.arange(n), labels[i]] - d.min(axis=1), 1e-9)
        if int(res.iterations[i]) < 50:  # converged: a fixed point
            for j in np.unique(labels[i]):
                m = labels[i] == j
                mean = np.sum(w[i][m] * x[i][m]) / np.sum(w[i][m])
                assert abs(mean - c[i, j]) <= 1e-5 * np.max(np.abs(x[i])), (i, j)
        oracle = kmeans_row(x[i], w[i], k, tol=0.0)
        assert float(res.inertia[i]) == pytest.approx(oracle.inertia, rel=2e-3)


def test_deterministic_and_degenerate_rows(rng):
    x = rng.standard_normal((3, 64)).astype(np.float32)
    x[1] = 0.5  # one distinct value: every centroid ends up there, no NaN
    x[2, :40] = -1.0  # two distinct values, k = 4
    x[2, 40:] = 2.0
    a = kmeans(x, None, k=4)
    b = kmeans(x, None, k=4)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert np.all(np.isfinite(np.asarray(a.centroids)))
    np.testing.assert_array_equal(np.asarray(a.centroids[1]), 0.5)
    assert set(np.asarray(a.centroids[2]).tolist()) == {-1.0, 2.0}
    assert float(a.inertia[1]) == 0.0 and float(a.inertia[2]) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(points=np.ones(5)), r"points must be \[rows, n\]"),
    (dict(points=np.ones((2, 5)), weights=np.ones((2, 4))), "weights must have shape"),
    (dict(points=np.ones((2, 5)), weights=-np.ones((2, 5))), "finite and >= 0"),
    (dict(points=np.full((2, 5), np.nan)), "points must be finite"),
    (dict(points=np.ones((2, 5)), k=0), "k=0 must be a positive integer"),
    (dict(points=np.ones((2, 5)), max_iter=0), "max_iter=0"),
    (dict(points=np.ones((2, 5, 2)), init="quantile"), "init='quantile' is for 1-D rows"),
    (dict(points=np.ones((2, 5)), init="kmeans++"), "init='kmeans\\+\\+'"),
    (dict(points=np.ones((2, 5)), init=np.ones((2, 3))), "initial centroids must have shape"),
])
def test_bad_input(kwargs, message):
    kwargs = {"k": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        kmeans(kwargs.pop("points"), kwargs.pop("weights", None), **kwargs)
