"""A plain float64 numpy SpQR, written from the reference (Vahe1994/SpQR spqr_engine.py / quant_groups.py)
independently of jaxquant.spqr.

Like the GPTQ oracle in oracles.py, it uses the textbook OBS form: one column at a time, the explicit inverse Hessian
of the remaining columns updated after each column (Hinv -= Hinv[:, j] Hinv[j, :] / Hinv[j, j]) and all remaining
weights moved at once, instead of the Cholesky factor and lazy blocks. The Cholesky diagonal the reference uses is
U_jj = sqrt(Hinv_jj at the time column j is reached); those values are found up front by running the elimination once
without weights (the leave-one-out pass and tau need them for columns not yet reached).

Near-ties (see oracles.py): float32 and float64 can decide differently where a value sits on a boundary: a rounding
tie, an outlier test err^2 vs tau, a leave-one-out test, a float16 rounding of a second-level statistic. Given the
implementation's decisions (``follow``), the oracle takes the implementation's side where, and only where, its own
value is within a small tolerance of the boundary and the implementation decided the other way; it counts those
events in ``forced``. Every other decision is its own.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def _grid(x, bits):
    """quant_groups.Quantizer.find_params(perchannel, weight, sym=False, round_zero=False) on the rows of x."""
    maxq = 2**bits - 1
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    same = lo == hi
    lo, hi = np.where(same, -1.0, lo), np.where(same, 1.0, hi)
    scale = (hi - lo) / maxq
    return scale, -lo / scale


class _Follower:
    def __init__(self, tie_tol, decision_tol, f16_tol=2e-4):
        # f16_tol: float32 noise in a value that went through many error updates, relative (a float16 half-ulp is
        # ~2.4e-4 to 4.9e-4 relative, so this band is wide, but the oracle only follows where the roundings differ).
        self.tie_tol, self.decision_tol, self.f16_tol, self.forced = tie_tol, decision_tol, f16_tol, 0

    def round(self, x, maxq, follow=None):
        """round(x) half to even, then clamp to [0, maxq]; near a .5 tie, follow's (already clamped) code."""
        q = np.clip(np.round(x), 0, maxq)
        if follow is None:
            return q
        near = np.abs(np.abs(x - np.floor(x)) - 0.5) < self.tie_tol * (maxq + 1)
        take = near & (follow != q) & (np.abs(follow - q) == 1)
        self.forced += int(take.sum())
        return np.where(take, follow, q)

    def greater(self, value, threshold, scale, follow=None):
        """value > threshold; within decision_tol * scale of it, follow's decision."""
        out = value > threshold
        if follow is None:
            return out
        near = np.abs(value - threshold) < self.decision_tol * scale
        take = near & (follow != out)
        self.forced += int(take.sum())
        return np.where(take, follow, out)

    def to_f16(self, x, follow=None):
        """float16 rounding; where x sits within float32 noise of a float16 rounding boundary, follow's value."""
        h = x.astype(np.float16).astype(np.float64)
        if follow is None:
            return h
        follow = np.asarray(follow, np.float64)
        half_ulp = 0.5 * np.spacing(np.abs(h).astype(np.float16)).astype(np.float64)
        near = np.abs(np.abs(x - h) - half_ulp) < self.f16_tol * np.abs(x)
        take = near & (follow != h) & ~np.isnan(follow)  # NaN: nothing to follow
        self.forced += int(take.sum())
        return np.where(take, follow, h)


def _quantize(x, scale, zero, bits, follower, follow=None):
    """quantize_dequantize: codes round(x / max(scale, 1e-9) + zero) clamped, value scale * (code - zero)."""
    q = follower.round(x / np.maximum(scale, 1e-9) + zero, 2**bits - 1, follow)
    return q, scale * (q - zero)


def _loo_reduction(Wg, dg, bits):
    """Drop in sum_j((w_j - q_j) / U_jj)^2 of each row when weight i is left out of the fit and of the sum."""
    N, gs = Wg.shape
    base_s, base_z = _grid(Wg, bits)
    _, rec = _quantize(Wg, base_s[:, None], base_z[:, None], bits, _Follower(0, 0))
    base = np.sum(((rec - Wg) / dg) ** 2, axis=1)
    red = np.zeros((N, gs))
    for i in range(gs):
        keep = np.arange(gs) != i
        x = Wg[:, keep]
        s, z = _grid(x, bits)
        _, rec = _quantize(x, s[:, None], z[:, None], bits, _Follower(0, 0))
        red[:, i] = base - np.sum(((rec - x) / dg[keep]) ** 2, axis=1)
    return red, base


def spqr(W, H, bits, group_size, qq_scale_bits, qq_zero_bits, qq_groupsize, outlier_relative_threshold,
         simplified_outliers=False, act_order=True, round_zero=False, percdamp=1.0, follow=None, tie_tol=1e-5,
         decision_tol=1e-4):
    """SpQR by explicit OBS updates.

    follow: optional dict of the implementation's decisions, consulted only near boundaries: ``codes``, ``outliers``,
    ``loo``, ``deq`` (its reconstruction, for the float16 values of outliers) [N, K] (original column order), ``scale_codes``, ``zero_codes`` [G, N], ``scale_qq``, ``zero_qq``
    [G, N/qq_groupsize, 2]. Returns codes, deq, outliers, loo (original order), scale_codes, zero_codes, scale_qq,
    zero_qq, scale, zero [G, N] (dequantized statistics), loss, threshold, forced.
    """
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    N, K = W.shape
    gs, qqg = group_size, qq_groupsize
    f = follow or {}
    fol = _Follower(tie_tol, decision_tol)

    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(K)
    W, H = W[:, order], H[np.ix_(order, order)]
    take = lambda name: None if name not in f else np.asarray(f[name])[:, order]  # noqa: E731
    f_codes, f_out, f_loo, f_deq = take("codes"), take("outliers"), take("loo"), take("deq")
    dead = np.diag(H) == 0
    H[np.diag_indices(K)] += percdamp * np.mean(np.abs(np.diag(H)))
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = np.linalg.inv(H)

    d2 = np.zeros(K)  # Hinv_jj when column j is reached
    E = Hinv.copy()
    for j in range(K):
        d2[j] = E[j, j]
        E -= np.outer(E[:, j], E[j, :]) / E[j, j]
    d = np.sqrt(d2)
    use_outliers = np.isfinite(outlier_relative_threshold)
    tau = outlier_relative_threshold * np.mean(np.var(W, axis=0, ddof=1) / d2) if use_outliers else np.inf

    codes, deq = np.zeros((N, K)), np.zeros((N, K))
    outliers, loo = np.zeros((N, K), bool), np.zeros((N, K), bool)
    G = K // gs
    stats = {k: [] for k in ("scale_codes", "zero_codes", "scale_qq", "zero_qq", "scale", "zero")}
    loss = 0.0
    for j in range(K):
        if j % gs == 0:
            g = j // gs
            Wg = W[:, j:j + gs].copy()
            if use_outliers and not simplified_outliers:
                red, base = _loo_reduction(Wg, d[j:j + gs], bits)
                cand = fol.greater(red, tau, np.maximum(tau, base[:, None]), None if f_loo is None else
                                   f_loo[:, j:j + gs])
                loo[:, j:j + gs] = cand
                n_keep = np.maximum((~cand).sum(axis=1, keepdims=True), 1)
                mean = np.where(cand, 0.0, Wg).sum(axis=1, keepdims=True) / n_keep
                Wg = np.where(cand, mean, Wg)
            scale, zero = _grid(Wg, bits)
            if round_zero:
                zero = np.round(zero)
            # Second level: groups of qqg consecutive output rows; their (scale, zero) are float16.
            for name, x, b in (("scale", scale, qq_scale_bits), ("zero", zero, qq_zero_bits)):
                xg = x.reshape(N // qqg, qqg)
                s2, z2 = _grid(xg, b)
                fq = None if f"{name}_qq" not in f else np.asarray(f[f"{name}_qq"], np.float64)[g]
                s2 = fol.to_f16(s2, None if fq is None else fq[:, 0])
                z2 = fol.to_f16(z2, None if fq is None else fq[:, 1])
                fc = None if f"{name}_codes" not in f else np.asarray(f[f"{name}_codes"])[g].reshape(N // qqg, qqg)
                c, xd = _quantize(xg, s2[:, None], z2[:, None], b, fol, fc)
                stats[f"{name}_codes"].append(c.reshape(N))
                stats[f"{name}_qq"].append(np.stack([s2, z2], axis=-1))
                stats[name].append(xd.reshape(N))
            scale, zero = stats["scale"][-1], stats["zero"][-1]

        w = W[:, j]
        fc = None if f_codes is None else f_codes[:, j]
        if fc is not None and f_out is not None:
            fc = np.where(f_out[:, j], -9, fc)  # an outlier's stored code is the code of 0: nothing to follow
        q, dq = _quantize(w, scale, zero, bits, fol, fc)
        if use_outliers:
            err = (w - dq) / d[j]
            out = fol.greater(err ** 2, tau, tau, None if f_out is None else f_out[:, j])
            q0, _ = _quantize(np.zeros(N), scale, zero, bits, _Follower(0, 0))
            q = np.where(out, q0, q)
            dq = np.where(out, fol.to_f16(w, None if f_deq is None else np.where(out, f_deq[:, j], np.nan)), dq)
            outliers[:, j] = out
        codes[:, j], deq[:, j] = q, dq
        h = Hinv[j, j]
        loss += np.sum((w - dq) ** 2) / h / 2
        W[:, j + 1:] -= np.outer((w - dq) / h, Hinv[j, j + 1:])
        Hinv -= np.outer(Hinv[:, j], Hinv[j, :]) / h

    inv = np.argsort(order)
    out = {k: np.array(v) for k, v in stats.items()}
    assert out["scale"].shape == (G, N)
    return SimpleNamespace(codes=codes[:, inv].astype(np.int64), deq=deq[:, inv], outliers=outliers[:, inv],
                           loo=loo[:, inv], loss=loss, threshold=tau, forced=fol.forced, perm=order, **out)
