"""Plain float64 numpy weighted Lloyd's k-means, one row at a time, written from the rules in jaxquant/kmeans.py's
docstring (not from its code): weighted-quantile or maximin init, strict-convergence / tolerance stop, farthest-point
relocation of empty clusters, 1-D centroids kept sorted; the assignment is a plain argmin over all centroids (the
library's 1-D path uses sorted ranges and binary searches instead). Used by tests/test_kmeans.py and tests/test_squeezellm.py."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def quantile_init(v, w, k):
    """v [n] scalars: centroid j = first sorted value whose cumulative weight reaches (j + 0.5)/k of the total."""
    order = np.argsort(v, kind="stable")
    cw = np.cumsum(w[order])
    out = []
    for j in range(k):
        target = (j + 0.5) / k * cw[-1]
        i = int(np.argmax(cw >= target)) if np.any(cw >= target) else len(v) - 1
        out.append(v[order][i])
    return np.array(out)[:, None]


def maximin_init(x, w, k):
    """x [n, d]: weighted mean, then the positive-weight point farthest from its nearest chosen centroid."""
    c = [np.sum(w[:, None] * x, axis=0) / np.sum(w)]
    while len(c) < k:
        mind = np.min([np.sum((x - cj) ** 2, axis=1) for cj in c], axis=0)
        mind = np.where(w > 0, mind, -1.0)
        c.append(x[int(np.argmax(mind))].copy())
    return np.array(c)


def kmeans_row(x, w, k, max_iter=50, tol=1e-4, init="auto", init_c=None):
    """One row: x [n] or [n, d] float64, w [n] >= 0. Returns centroids, labels, iterations, inertia, relocations."""
    x = np.asarray(x, np.float64)
    scalar = x.ndim == 1
    x = x[:, None] if scalar else x
    w = np.asarray(w, np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    if init_c is not None:
        c = np.asarray(init_c, np.float64).reshape(k, -1).copy()
    else:
        if init == "auto":
            init = "quantile" if x.shape[1] == 1 else "maximin"
        c = quantile_init(x[:, 0], w, k) if init == "quantile" else maximin_init(x, w, k)
    tol_abs = tol * np.mean(np.var(x, axis=0))
    if scalar:  # 1-D rows: centroids kept in ascending order
        c = np.sort(c, axis=0)

    def assign(c):
        d = np.stack([np.sum((x - cj) ** 2, axis=1) for cj in c], axis=1)  # [n, k]
        labels = np.argmin(d, axis=1)
        return labels, d[np.arange(len(x)), labels]

    prev = None
    iterations = relocations = 0
    for _ in range(max_iter):
        labels, _ = assign(c)
        if prev is not None and np.array_equal(labels, prev):
            break
        new = c.copy()
        empty = []
        for j in range(k):
            m = labels == j
            total = w[m].sum()
            if total > 0:
                new[j] = (w[m][:, None] * x[m]).sum(axis=0) / total
            else:
                empty.append(j)
        if empty:
            dist = np.where(w > 0, np.sum((x - c[labels]) ** 2, axis=1), -1.0)
            far = np.argsort(-dist, kind="stable")
            for m, j in enumerate(empty):
                new[j] = x[far[min(m, len(far) - 1)]]
            relocations += len(empty)
        if scalar:
            new = np.sort(new, axis=0)
        shift = np.sum((new - c) ** 2)
        c, prev = new, labels
        iterations += 1
        if shift <= tol_abs:
            break
    labels, dist = assign(c)
    return SimpleNamespace(centroids=c[:, 0] if scalar else c, labels=labels, iterations=iterations,
                           inertia=float(np.sum(w * dist)), relocations=relocations)
