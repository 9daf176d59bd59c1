"""Plain float64 numpy oracles, written independently of the jaxquant implementation.

GPTQ here is the textbook OBS form: one column at a time, no lazy batching, and the explicit
inverse Hessian of the remaining columns updated with
    Hinv -= Hinv[:, q] Hinv[q, :] / Hinv[q, q]
after each column (instead of the Cholesky shortcut).

Rounding ties. A weight whose x/scale lies within float32 noise of a .5 tie may round either way
in a float32 implementation, and in GPTQ that one choice then steers the rest of the row. So that
a comparison tests the algorithm and not the last bit, the GPTQ oracle can be given the
implementation's codes and zero points (`follow`): where, and only where, its own value is within
tie_tol * maxq grid steps of a tie (float32 noise scales with the weights' range, i.e. with maxq
steps) and the implementation took the other neighbour, it takes that neighbour too and counts
the event in `forced`. Every other decision is its own.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def _round(x, follow=None, tie_tol=0.0):
    """round(x) (half to even); near a tie, `follow`'s choice of neighbour if it made the other."""
    r = np.round(x)
    if follow is None:
        return r, np.zeros(np.shape(x), bool)
    other = np.where(r > x, r - 1, r + 1)
    near = np.abs(np.abs(x - np.floor(x)) - 0.5) < tie_tol
    take = near & (follow == other)
    return np.where(take, other, r), take


def grid_params(x, bits, sym, follow_zero=None, tie_tol=0.0):
    """Row-wise (scale, zero, forced) of the min/max grid; x [rows, cols]."""
    maxq = 2**bits - 1
    x = np.asarray(x, np.float64)
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = np.maximum(x.max(axis=1), 0.0)
    if sym:
        hi = np.maximum(-lo, hi)
        lo = np.where(lo < 0, -hi, lo)
    both_zero = (lo == 0) & (hi == 0)
    lo[both_zero], hi[both_zero] = -1.0, 1.0
    scale = (hi - lo) / maxq
    if sym:
        return scale, np.full_like(scale, (maxq + 1) / 2), np.zeros(scale.shape, bool)
    zero, forced = _round(-lo / scale, follow_zero, tie_tol * maxq)
    return scale, zero, forced


def grid_quantize(x, scale, zero, bits, follow=None, tie_tol=0.0):
    """(codes, forced) for x with scale/zero broadcastable. `follow` are codes, not roundings."""
    maxq = 2**bits - 1
    if follow is not None:
        follow = np.asarray(follow, np.float64) - zero  # the rounding it implies (unless clamped)
    r, forced = _round(x / scale, follow, tie_tol * maxq)
    return np.clip(r + zero, 0, maxq), forced


def rtn(W, bits, group_size, sym):
    """Codes [N, K], scales [G, N], zeros [G, N] of round-to-nearest over column groups."""
    N, K = W.shape
    gs = K if group_size == -1 else group_size
    codes = np.zeros((N, K))
    scales, zeros = [], []
    for g0 in range(0, K, gs):
        s, z, _ = grid_params(W[:, g0:g0 + gs], bits, sym)
        codes[:, g0:g0 + gs], _ = grid_quantize(W[:, g0:g0 + gs], s[:, None], z[:, None], bits)
        scales.append(s)
        zeros.append(z)
    return codes.astype(np.int64), np.array(scales), np.array(zeros)


def hessian(batches):
    """H = 2/n sum_b x_b^T x_b, n counting sequences (3-D batch: shape[0]; 2-D batch: 1)."""
    K = batches[0].shape[-1]
    total = np.zeros((K, K))
    n = 0
    for x in batches:
        n += x.shape[0] if x.ndim == 3 else 1
        x = np.asarray(x, np.float64).reshape(-1, K)
        total += x.T @ x
    return 2.0 / n * total


def gptq(W, H, bits, group_size=-1, sym=False, act_order=False, static_groups=False, percdamp=0.01,
         follow=None, tie_tol=1e-5):
    """GPTQ by explicit OBS updates.

    follow: optional (codes [N, K] in original column order, zeros [G, N] as stored) of the
    implementation under test, consulted only at rounding ties (see the module docstring).
    Returns codes, deq [N, K] (original column order), loss, scales, zeros, g_idx, forced.
    """
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    N, K = W.shape
    W_orig = W.copy()
    f_codes, f_zeros = follow if follow is not None else (None, None)
    forced = 0

    def params(x, g):
        nonlocal forced
        fz = None if f_zeros is None else np.asarray(f_zeros, np.float64)[g]
        scale, zero, took = grid_params(x, bits, sym, fz, tie_tol)
        forced += int(took.sum())
        return scale, zero

    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    gs = group_size
    fixed = None
    if gs == -1:
        fixed = [params(W_orig, 0)]  # from W before zeroing dead columns, as the reference
    elif static_groups:
        fixed = [params(W[:, g0:g0 + gs], g0 // gs) for g0 in range(0, K, gs)]

    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(K)
    W = W[:, order]
    H = H[np.ix_(order, order)]
    H += percdamp * np.mean(np.diag(H)) * np.eye(K)
    Hinv = np.linalg.inv(H)

    codes = np.zeros((N, K))
    deq = np.zeros((N, K))
    loss = 0.0
    group_params = []
    for j in range(K):
        if gs == -1:
            scale, zero = fixed[0]
        elif static_groups:
            scale, zero = fixed[order[j] // gs]
        elif j % gs == 0:
            scale, zero = params(W[:, j:j + gs], j // gs)  # current (updated) weights
            group_params.append((scale, zero))
        w = W[:, j]
        fq = None if f_codes is None else np.asarray(f_codes)[:, order[j]]
        q, took = grid_quantize(w, scale, zero, bits, fq, tie_tol)
        forced += int(took.sum())
        dq = scale * (q - zero)
        codes[:, j], deq[:, j] = q, dq
        h = Hinv[j, j]
        loss += np.sum((w - dq) ** 2) / h / 2
        # OBS: move the remaining weights to compensate, then drop column j from the inverse.
        W[:, j + 1:] -= np.outer((w - dq) / h, Hinv[j, j + 1:])
        Hinv -= np.outer(Hinv[:, j], Hinv[j, :]) / h

    inv = np.argsort(order)
    if gs == -1:
        scales, zeros = np.array([fixed[0][0]]), np.array([fixed[0][1]])
        g_idx = np.zeros(K, np.int64)
    else:
        table = fixed if static_groups else group_params
        scales, zeros = np.array([p[0] for p in table]), np.array([p[1] for p in table])
        g_idx = np.arange(K) // gs
        if not static_groups:
            g_idx[order] = np.arange(K) // gs
    return SimpleNamespace(codes=codes[:, inv].astype(np.int64), deq=deq[:, inv], loss=loss,
                           scales=scales, zeros=zeros, g_idx=g_idx, forced=forced)
