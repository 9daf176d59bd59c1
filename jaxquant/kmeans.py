"""Weighted Lloyd's k-means, jitted and vectorised over rows: one implementation for SqueezeLLM and RPTQ.

    kmeans(points, weights, k=...) -> KMeansResult(centroids, labels, iterations, inertia)

``points`` is either ``[rows, n]`` (each row a set of n scalars: SqueezeLLM clusters each output row of a weight
matrix into k = 2**bits centroids, weighted by the Fisher information) or ``[rows, n, d]`` (each row a set of n
points in d dimensions: RPTQ clusters the (max, min) points of the channels at a reorder point, ``[1, C, 2]``,
or per head ``[heads, C / heads, 2]``).
Every row is an independent problem; the per-row steps are written for one row and ``jax.vmap``-ed.

The algorithm, exactly (the float64 numpy oracle in tests/kmeans_oracle.py implements the same rules):

  weights     w >= 0; a row whose weights sum to 0 is clustered with unit weights (the SqueezeLLM reference does
              the same for a row with no Fisher mass).
  init        "quantile" (1-D only, the default there): with the row sorted ascending (stable sort) and cw the
              cumulative sum of its weights in that order, centroid j is the first sorted value whose cw reaches
              (j + 0.5) / k of the total weight: the weighted (j + 0.5)/k-quantile.
              "maximin" (any d, the default for d > 1): centroid 0 is the weighted mean; centroid j is the
              positive-weight point farthest (squared Euclidean) from its nearest centroid among 0..j-1, the
              lowest index on ties (farthest-point seeding: outlying channels get their own clusters, as RPTQ
              wants).
              An explicit array ``[rows, k]`` / ``[rows, k, d]`` may be given instead.
  1-D order   for 1-D rows the centroids are kept in ascending order: sorted after the init and after every
              update (the set of centroids, and so the clustering, is the same as without sorting; only the
              numbering differs, and the output table comes out sorted).
  iteration   labels = nearest centroid (squared Euclidean distance, the lowest index on ties). If no label
              changed since the previous iteration the row has converged (its centroids are already the means of
              its clusters). Otherwise each centroid becomes the weighted mean of its points; a cluster with no
              weight is relocated (below); the row has converged if the squared centroid shift, summed over the
              clusters, is <= tol * mean_d(var(points[:, d])) (unweighted variance: scikit-learn's tolerance).
  empty       (scikit-learn relocates empty clusters to the points farthest from their centres; so do we,
              deterministically) the m-th empty cluster (in index order) moves to the m-th positive-weight point in
              order of decreasing squared distance to its own centroid, ties broken by the lower point index.
  stop        after ``max_iter`` centroid updates at most; ``iterations`` counts the updates a row made.
  output      centroids; labels = nearest centroid to the final centroids (so codes always decode to their nearest
              centroid); inertia = sum of w * squared distance to the labelled centroid (unit weights where the
              row's weights sum to 0).

Deviations from the SqueezeLLM reference (scikit-learn ``KMeans(n_clusters=2**bits, random_state=0, n_init="auto",
max_iter=50)``, i.e. one weighted k-means++ run with tol 1e-4): the deterministic quantile init replaces
k-means++ (a seeded random draw that cannot be vectorised as cheaply and that no oracle could replay); max_iter=50 and
tol=1e-4 are kept with scikit-learn's meaning. The RPTQ reference (quantize/reorder_utils.py) runs scikit-learn's
``KMeans(n_clusters, n_init=10, random_state=0)``, unweighted, once per head on that head's [C / heads, 2] (max, min)
points: here ``points`` [heads, C / heads, 2] (one row per head, all heads at once); the maximin init replaces the
best of 10 k-means++ runs, for the same reason.

How it runs. 1-D rows (SqueezeLLM): each row is sorted once and its weights and weighted values are prefix-summed
once (in double-float arithmetic, two float32 words per sum, so that a cluster's sum, a difference of two prefix
sums, keeps float32 accuracy however much weight lies before it). With sorted centroids every cluster is a contiguous
range of the sorted row, found by a binary search of the k - 1 midpoints: an iteration costs O(k log n) per row,
so the whole k-means is dominated by one sort per row. Points (RPTQ): O(n k d) per iteration (assignment by
squared distance, masked reductions for the sums). Relocating empty clusters (a top-k over the row) runs only in
iterations where some row has one.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
from jax import lax

INITS = ("auto", "quantile", "maximin")


class KMeansResult(NamedTuple):
    centroids: jax.Array  # [rows, k] for 1-D rows, [rows, k, d] for points
    labels: jax.Array  # [rows, n] int32
    iterations: jax.Array  # [rows] int32: centroid updates made
    inertia: jax.Array  # [rows]: sum of w * squared distance to the labelled centroid


# ------------------------------------------------------------------------------------------------ per-row steps
def _sq_dist(x, c):
    """x [n, d], c [k, d] -> [n, k] squared distances (as differences, not the |x|^2 - 2xc + |c|^2 expansion)."""
    return jnp.sum(jnp.square(x[:, None, :] - c[None, :, :]), axis=-1)


def _assign(x, c):
    """Nearest centroid of every point, the lowest index on ties; and that squared distance."""
    d = _sq_dist(x, c)
    labels = jnp.argmin(d, axis=1).astype(jnp.int32)
    return labels, jnp.take_along_axis(d, labels[:, None], axis=1)[:, 0]


def _weighted_sums(x, w, labels, k):
    """Per-cluster total weight [k] and weighted sum of points [k, d]: masked reductions over the points (written as
    broadcast + sum, not a one-hot matmul, so XLA fuses them and never materialises an [n, k] array)."""
    member = labels[:, None] == jnp.arange(k, dtype=jnp.int32)[None, :]  # [n, k]
    wm = jnp.where(member, w[:, None], 0)
    return jnp.sum(wm, axis=0), jnp.sum(wm[:, :, None] * x[:, None, :], axis=0)


def _means(x, w, labels, c):
    """Weighted means of the clusters; a cluster with no weight keeps ``c`` for now (relocated separately)."""
    total, sums = _weighted_sums(x, w, labels, c.shape[0])
    empty = total <= 0
    means = sums / jnp.where(empty, 1, total)[:, None]
    return jnp.where(empty[:, None], c, means), empty


def _relocate(x, w, labels, c_old, new, empty):
    """Move the m-th empty cluster to the m-th positive-weight point farthest from its own (old) centroid."""
    k = c_old.shape[0]
    dist = jnp.sum(jnp.square(x - c_old[labels]), axis=-1)
    dist = jnp.where(w > 0, dist, -1)
    kk = min(k, x.shape[0])
    _, far = lax.top_k(dist, kk)  # descending; equal values keep the lower index first
    rank = jnp.clip(jnp.cumsum(empty.astype(jnp.int32)) - 1, 0, kk - 1)
    return jnp.where(empty[:, None], x[far[rank]], new)


def _quantile_init_sorted(xs, ws, k):
    """xs [n] sorted, ws [n] in that order: centroid j = the first value whose cumulative weight reaches (j + 0.5)/k
    of the total."""
    cw = jnp.cumsum(ws)
    targets = (jnp.arange(k, dtype=xs.dtype) + 0.5) / k * cw[-1]
    idx = jnp.clip(jnp.searchsorted(cw, targets, side="left"), 0, xs.shape[0] - 1)
    return xs[idx]


def _maximin_init(x, w, k):
    """Centroid 0 = weighted mean; then repeatedly the positive-weight point farthest from its nearest centroid."""
    mean = jnp.sum(w[:, None] * x, axis=0) / jnp.sum(w)
    c = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(mean)
    mind = jnp.sum(jnp.square(x - mean), axis=-1)

    def body(j, state):
        c, mind = state
        i = jnp.argmax(jnp.where(w > 0, mind, -1))
        c = c.at[j].set(x[i])
        return c, jnp.minimum(mind, jnp.sum(jnp.square(x - x[i]), axis=-1))

    c, _ = lax.fori_loop(1, k, body, (c, mind))
    return c


def _row_tolerance(x, tol):
    return tol * jnp.mean(jnp.var(x, axis=0))


# ------------------------------------------------------------------------------------------------------ driver
@jax.jit
def _lloyd(x, w, init_c, tol, max_iter):
    """x [rows, n, d], w [rows, n] (positive total in every row), init_c [rows, k, d]."""
    tol_abs = jax.vmap(_row_tolerance, in_axes=(0, None))(x, tol)
    rows, n = w.shape
    assign = jax.vmap(_assign)
    means = jax.vmap(_means)
    relocate = jax.vmap(_relocate)

    def cond(state):
        it, _, _, done, _ = state
        return (it < max_iter) & ~jnp.all(done)

    def body(state):
        it, c, prev, done, count = state
        labels, _ = assign(x, c)
        same = jnp.all(labels == prev, axis=1)
        new, empty = means(x, w, labels, c)
        new = lax.cond(jnp.any(empty), lambda: relocate(x, w, labels, c, new, empty), lambda: new)
        shift = jnp.sum(jnp.square(new - c), axis=(1, 2))
        update = ~done & ~same
        c = jnp.where(update[:, None, None], new, c)
        done = done | same | (update & (shift <= tol_abs))
        return it + 1, c, labels, done, count + update.astype(jnp.int32)

    state = (jnp.int32(0), init_c, jnp.full((rows, n), -1, jnp.int32), jnp.zeros((rows,), bool),
             jnp.zeros((rows,), jnp.int32))
    _, c, _, _, count = lax.while_loop(cond, body, state)
    labels, dist = assign(x, c)
    return c, labels, count, jnp.sum(w * dist, axis=1)


# ------------------------------------------------------------------------------------- 1-D rows: sorted path
def _two_sum(a, b):
    """s + e == a + b exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _df_add(p, q):
    """Double-float addition: (hi, lo) pairs, about twice the float32 precision."""
    s, e = _two_sum(p[0], q[0])
    return _two_sum(s, e + p[1] + q[1])


def _df_prefix(v):
    """Exclusive-to-inclusive prefix sums [n + 1] (starting at 0) of v [n] as (hi, lo) double-floats."""
    hi, lo = lax.associative_scan(_df_add, (v, jnp.zeros_like(v)))
    zero = jnp.zeros((1,), v.dtype)
    return jnp.concatenate([zero, hi]), jnp.concatenate([zero, lo])


def _df_range(prefix, lo, hi):
    """sum of v[lo:hi] from its double-float prefix sums (float32 result)."""
    return (prefix[0][hi] - prefix[0][lo]) + (prefix[1][hi] - prefix[1][lo])


def _first_of_equal(c):
    """For sorted centroids: index of the first centroid equal to each (nearest-centroid ties go to it)."""
    return jnp.searchsorted(c, c, side="left").astype(jnp.int32)


def _ranges_1d(xs, c):
    """Sorted row xs [n], sorted centroids c [k] -> each cluster's range [lo, hi) in xs (empty for all but the first
    of equal centroids). A point goes to the lower centroid at an exact midpoint, as argmin does."""
    k, n = c.shape[0], xs.shape[0]
    mid = (c[:-1] + c[1:]) / 2
    pos = jnp.searchsorted(xs, mid, side="right").astype(jnp.int32)  # points <= each midpoint
    bounds = jnp.concatenate([jnp.zeros((1,), jnp.int32), pos, jnp.full((1,), n, jnp.int32)])
    first = _first_of_equal(c)
    last = jnp.searchsorted(c, c, side="right").astype(jnp.int32) - 1
    owner = first == jnp.arange(k, dtype=jnp.int32)
    return jnp.where(owner, bounds[:-1], 0), jnp.where(owner, bounds[last + 1], 0)


def _labels_1d(x, c):
    """Nearest sorted centroid of every x (original order), the first of equal centroids / the lower at a midpoint."""
    j = jnp.searchsorted((c[:-1] + c[1:]) / 2, x, side="left")  # number of midpoints below x
    return _first_of_equal(c)[j]


def _means_1d(cw, cwx, lo, hi, c):
    total = _df_range(cw, lo, hi)
    empty = total <= 0
    return jnp.where(empty, c, _df_range(cwx, lo, hi) / jnp.where(empty, 1, total)), empty


def _relocate_1d(x, w, c_old, new, empty):
    labels = _labels_1d(x, c_old)
    return _relocate(x[:, None], w, labels, c_old[:, None], new[:, None], empty)[:, 0]


@jax.jit
def _sorted_rows(x, w):
    """Each row sorted ascending (stable: equal values keep their order), its weights and weighted values in that
    order. A program of its own: the products must reach the compensated sums already rounded (compilers contract a
    product into a following add, which breaks TwoSum's error term)."""
    xs, ws = lax.sort((x, w), dimension=1, num_keys=1, is_stable=True)
    return xs, ws, ws * xs


@jax.jit
def _lloyd_1d(x, w, xs, ws, wxs, init_c, tol, max_iter):
    """x [rows, n], w [rows, n] (positive total in every row), their sorted form (``_sorted_rows``), init_c
    [rows, k] -> the same as _lloyd, centroids sorted ascending."""
    rows, k = init_c.shape
    cw, cwx = jax.vmap(_df_prefix)(ws), jax.vmap(_df_prefix)(wxs)
    tol_abs = tol * jnp.var(x, axis=1)
    ranges = jax.vmap(_ranges_1d)
    means = jax.vmap(_means_1d)
    relocate = jax.vmap(_relocate_1d)

    def cond(state):
        it, _, _, _, done, _ = state
        return (it < max_iter) & ~jnp.all(done)

    def body(state):
        it, c, prev_lo, prev_hi, done, count = state
        lo, hi = ranges(xs, c)
        same = jnp.all(lo == prev_lo, axis=1) & jnp.all(hi == prev_hi, axis=1)
        new, empty = means(cw, cwx, lo, hi, c)
        new = lax.cond(jnp.any(empty), lambda: relocate(x, w, c, new, empty), lambda: new)
        new = jnp.sort(new, axis=1)
        shift = jnp.sum(jnp.square(new - c), axis=1)
        update = ~done & ~same
        c = jnp.where(update[:, None], new, c)
        done = done | same | (update & (shift <= tol_abs))
        return it + 1, c, lo, hi, done, count + update.astype(jnp.int32)

    none = jnp.full((rows, k), -1, jnp.int32)
    state = (jnp.int32(0), jnp.sort(init_c, axis=1), none, none, jnp.zeros((rows,), bool),
             jnp.zeros((rows,), jnp.int32))
    _, c, _, _, _, count = lax.while_loop(cond, body, state)
    labels = jax.vmap(_labels_1d)(x, c).astype(jnp.int32)
    dist = jnp.square(x - jnp.take_along_axis(c, labels, 1))
    return c, labels, count, jnp.sum(w * dist, axis=1)


@jax.jit
def _checked_weights(x, w):
    """(points finite, weights finite and >= 0, weights with unit weights in rows that have none: as the SqueezeLLM
    reference does for a row without Fisher mass)."""
    w_ok = jnp.all(jnp.isfinite(w) & (w >= 0))
    return jnp.all(jnp.isfinite(x)), w_ok, jnp.where(jnp.sum(w, axis=1, keepdims=True) > 0, w, 1)


def _prepare(points, weights, k, init):
    """Validate; return x [rows, n, d], w [rows, n] (rows without weight -> unit weights), the init (name or
    centroid array [rows, k, d]) and whether the input was 1-D rows."""
    points = jnp.asarray(points)
    if points.ndim not in (2, 3):
        raise ValueError(f"points must be [rows, n] (1-D rows) or [rows, n, d] (points), got shape {points.shape}")
    scalar_rows = points.ndim == 2
    x = points[..., None] if scalar_rows else points
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    rows, n, d = x.shape
    if rows < 1 or n < 1 or d < 1:
        raise ValueError(f"points must be non-empty, got shape {points.shape}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer")
    w = jnp.ones((rows, n), x.dtype) if weights is None else jnp.asarray(weights, x.dtype)
    if w.shape != (rows, n):
        raise ValueError(f"weights must have shape {(rows, n)} (one per point), got {w.shape}")
    x_ok, w_ok, w = _checked_weights(x, w)
    if not bool(x_ok):
        raise ValueError("points must be finite")
    if not bool(w_ok):
        raise ValueError("weights must be finite and >= 0")
    if isinstance(init, str):
        if init not in INITS:
            raise ValueError(f"init={init!r}: use one of {INITS} or an array of initial centroids")
        if init == "auto":
            init = "quantile" if d == 1 else "maximin"
        if init == "quantile" and d != 1:
            raise ValueError(f"init='quantile' is for 1-D rows; these points have d={d} (use 'maximin')")
    else:
        init_c = jnp.asarray(init, x.dtype)
        want = (rows, k) if scalar_rows else (rows, k, d)
        if init_c.shape != want:
            raise ValueError(f"initial centroids must have shape {want}, got {init_c.shape}")
        init = init_c.reshape(rows, k, d)
    return x, w, init, scalar_rows


@partial(jax.jit, static_argnames=("k",))
def _init_quantile(xs, ws, *, k):
    """[rows, k] from the sorted rows (``_sorted_rows``)."""
    return jax.vmap(_quantile_init_sorted, in_axes=(0, 0, None))(xs, ws, k)


@partial(jax.jit, static_argnames=("k",))
def _init_maximin(x, w, *, k):
    return jax.vmap(_maximin_init, in_axes=(0, 0, None))(x, w, k)


def _init(x, w, *, k, init, sorted_rows=None):
    """[rows, k, d] initial centroids; 1-D rows take (or compute) their sorted form."""
    if init == "quantile":
        xs, ws, _ = _sorted_rows(x[..., 0], w) if sorted_rows is None else sorted_rows
        return _init_quantile(xs, ws, k=k)[..., None]
    return _init_maximin(x, w, k=k)


def initial_centroids(points, weights=None, *, k: int, init: str = "auto") -> jax.Array:
    """The initial centroids that :func:`kmeans` starts from (``[rows, k]`` or ``[rows, k, d]``)."""
    x, w, init, scalar_rows = _prepare(points, weights, k, init)
    if not isinstance(init, str):
        raise ValueError("initial_centroids takes an init name, not an array")
    c = _init(x, w, k=k, init=init)
    return c[..., 0] if scalar_rows else c


def kmeans(points, weights=None, *, k: int, max_iter: int = 50, tol: float = 1e-4,
           init: Union[str, jax.Array] = "auto") -> KMeansResult:
    """Weighted k-means of every row of ``points`` (``[rows, n]`` scalars or ``[rows, n, d]`` points).

    weights: ``[rows, n]``, >= 0 (None = unit weights). init: "auto" (quantile for 1-D rows, maximin for points),
    "quantile", "maximin" or an array of initial centroids. Computed in the points' float dtype (float32, or float64
    under ``jax.enable_x64``). The module docstring gives the exact rules (init, convergence, empty clusters).
    """
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r} must be a positive integer")
    if not tol >= 0:
        raise ValueError(f"tol={tol} must be >= 0")
    x, w, init, scalar_rows = _prepare(points, weights, k, init)
    tol = jnp.asarray(tol, x.dtype)
    if scalar_rows:
        x1 = x[..., 0]
        srt = _sorted_rows(x1, w)  # one sort per row, shared by the init and the iterations
        init_c = _init(x, w, k=k, init=init, sorted_rows=srt) if isinstance(init, str) else init
        c, labels, iterations, inertia = _lloyd_1d(x1, w, *srt, init_c[..., 0], tol, jnp.int32(max_iter))
        return KMeansResult(c, labels, iterations, inertia)
    init_c = _init(x, w, k=k, init=init) if isinstance(init, str) else init
    c, labels, iterations, inertia = _lloyd(x, w, init_c, tol, jnp.int32(max_iter))
    return KMeansResult(c, labels, iterations, inertia)
