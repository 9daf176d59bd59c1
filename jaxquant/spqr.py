"""SpQR (Dettmers et al., 2023) following the reference ``SPQRUtil.quantize`` of Vahe1994/SpQR (spqr_engine.py,
quant_groups.py).

GPTQ-style column-by-column quantization with error feedback through the upper Cholesky factor U of H^-1, with:
  * small groups (default 16) of input columns, each with its own min/max grid per output row; the grid is the
    reference's: plain [min, max] of the row (0 not forced into the range) and a fractional zero point;
  * second-level quantization of those statistics: the scales (and the zeros) of ``qq_groupsize`` consecutive output
    rows are quantized to ``qq_scale_bits`` (``qq_zero_bits``) on their own min/max grid, whose scale and zero are
    kept in 16 bits; the weights are quantized with the dequantized statistics;
  * unstructured outliers: a weight whose OBS error ((w - q) / U_jj)^2 exceeds tau is kept in 16 bits, with
    tau = outlier_relative_threshold * mean_j(var_n(W[:, j]) / U_jj^2) (unbiased variance over output rows, of the
    permuted weights with dead columns zeroed). Before each group's statistics are fitted, a leave-one-out pre-pass
    marks as likely outliers the weights whose exclusion lowers the group row's U-weighted squared error (grid fitted
    without them, no second level) by more than tau; those are replaced by the mean of the row's other weights in
    the group for the fit. ``simplified_outliers`` skips that pre-pass (statistics fitted on all weights).
    Then, column by column, the weights whose error exceeds tau become outliers; the others keep their codes. An
    outlier keeps the current (error-updated) value of its weight, in float16, as the reference stores it; its code
    slot holds the code of 0.
  * act-order permutation (decreasing diag H), damping ``percdamp * mean(diag H)`` added before dead columns get
    H_jj = 1 (SpQR's order; GPTQ damps after), block-wise lazy updates of the columns right of the block.
Group statistics are fitted when the group starts, on the group's weights after the error feedback of every earlier
column (the reference reads them from ``weight``, updated in place within the block; groups lie inside blocks).

Deviations from the reference, and why:
  * Storage-exact arithmetic: the second-level scales and zeros are rounded to float16 before they are used, and an
    outlier's reconstruction (and error feedback) uses its float16 value. The reference computes with float32 values
    and stores float16 ones, so its stored model differs slightly from the one it optimised; here the stored format
    dequantizes to exactly the matrix the algorithm propagated errors against.
  * Outliers replace the dense value in the stored format (see formats_spqr.py), as in the algorithm; the reference's
    kernels add the sparse value to the dense value dequantized from the code of 0, which is not exactly 0.
  * act-order sorts diag H stably (ties, e.g. dead columns, keep their order; torch's sort is not stable).
  * The block size is a speed knob only: it is rounded to the largest multiple of group_size that divides
    in_features and is at most max(block_size, group_size), so every group lies in one block; results do not depend
    on it. group_size must divide in_features (the reference allows a short last group; with the plain [min, max]
    grid zero padding would change statistics, and SmolLM2's 576/1536 inputs need none at the sizes used).
  * A failed Cholesky factorisation is retried with 10x more damping (``damp_retries``), as jaxquant's GPTQ does.
  * Not supported (clear errors): symmetric grids (the reference would quantize the constant zero point at the
    second level into a wrong value), statistics kept in 16 bits (qq bits None), ``round_zero`` with zeros not
    quantized at the second level (qq_zero_bits >= bits: the reference keeps those in 16 bits, this format does not),
    the ``spearman`` permutation order, ``keep_last_columns``.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .config import SUPPORTED_BITS
from .formats_spqr import SpQRWeight
from .gptq import _inverse_cholesky_upper, factor_with_damping_retries
from .grid import dequantize_codes, find_params, quantize_codes_fractional
from .packing import check_packable
from .sparse import csr_from_mask


@dataclasses.dataclass(frozen=True)
class SpQRConfig:
    """Settings of SpQR; the defaults are the reference README's near-lossless recipe at 4 weight bits.

    bits:                        weight code width (2, 3, 4 or 8).
    group_size:                  input columns sharing first-level statistics (beta1; must divide in_features).
    qq_scale_bits, qq_zero_bits: code widths of the second-level quantization of the group scales / zeros.
    qq_groupsize:                output rows sharing a second-level scale and zero (beta2; must divide out_features).
    outlier_relative_threshold:  tau relative to the layer's mean OBS error scale; inf = no outliers.
    simplified_outliers:         skip the leave-one-out pre-pass (statistics fitted on all weights of the group).
    act_order:                   quantize columns in order of decreasing Hessian diagonal (the reference's act_order).
    round_zero:                  round the first-level zero points to integers before their second-level
                                 quantization (needs qq_zero_bits < bits, see the module docstring).
    percdamp:                    damping added to the Hessian diagonal, as a fraction of its mean (README: 1.0).
    block_size:                  lazy-update width (a speed knob; results do not depend on it).
    damp_retries:                retry a failed Cholesky factorisation with percdamp * 10**r, r = 1..damp_retries.
    true_sequential:             pipeline flag: quantize the sub-layers of a block one after another.
    """

    bits: int = 4
    group_size: int = 16
    qq_scale_bits: int = 3
    qq_zero_bits: int = 3
    qq_groupsize: int = 16
    outlier_relative_threshold: float = 0.2
    simplified_outliers: bool = False
    act_order: bool = True
    round_zero: bool = False
    percdamp: float = 1.0
    block_size: int = 128
    damp_retries: int = 5
    true_sequential: bool = True

    def __post_init__(self):
        self._check_fields()

    def _check_fields(self):
        for name in ("bits", "qq_scale_bits", "qq_zero_bits"):
            value = getattr(self, name)
            if value not in SUPPORTED_BITS:
                extra = "" if name == "bits" else " (SpQR stores the group statistics second-level quantized; " \
                                                   "16-bit statistics are not supported)"
                raise ValueError(f"{name}={value} is not supported; use one of {SUPPORTED_BITS}{extra}")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be a positive number of input columns "
                             "(SpQR uses small groups; -1 / per channel is not supported)")
        if not isinstance(self.qq_groupsize, int) or self.qq_groupsize <= 0:
            raise ValueError(f"qq_groupsize={self.qq_groupsize} must be a positive number of output rows")
        t = self.outlier_relative_threshold
        if not (isinstance(t, (int, float)) and t >= 0):  # also catches NaN
            raise ValueError(f"outlier_relative_threshold={t} must be >= 0 (inf = no outliers)")
        if self.round_zero and self.qq_zero_bits >= self.bits:
            raise ValueError(f"round_zero=True with qq_zero_bits={self.qq_zero_bits} >= bits={self.bits}: the "
                             "reference then keeps integer zero points unquantized in 16 bits, which this format "
                             "does not store; use qq_zero_bits < bits or round_zero=False")
        if self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size} must be positive")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp={self.percdamp} must be >= 0")
        if self.damp_retries < 0:
            raise ValueError(f"damp_retries={self.damp_retries} must be >= 0")

    @property
    def outliers(self) -> bool:
        return math.isfinite(self.outlier_relative_threshold)

    def validate(self, out_features: int, in_features: int) -> None:
        """Raise ValueError if these settings cannot quantize a W [out_features, in_features]."""
        self._check_fields()
        N, K = out_features, in_features
        if K % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide in_features={K} (SpQR needs whole "
                             "groups: its [min, max] grid would change under zero padding)")
        if N % self.qq_groupsize:
            raise ValueError(f"qq_groupsize={self.qq_groupsize} does not divide out_features={N}")
        check_packable(K, self.bits, "in_features")
        check_packable(N, self.qq_scale_bits, "out_features (packed scale codes)")
        check_packable(N, self.qq_zero_bits, "out_features (packed zero codes)")

    def effective_block_size(self, in_features: int) -> int:
        """The largest multiple of group_size dividing in_features and at most max(block_size, group_size)."""
        gs = self.group_size
        limit = max(self.block_size, gs)
        return max(b for b in range(gs, min(limit, in_features) + 1, gs) if in_features % b == 0)


# ---------------------------------------------------------------------------------------------------- pieces
@partial(jax.jit, static_argnames=("act_order",))
def _prepare(W, H, *, act_order):
    """Permute (act-order), find dead columns, zero their weights. Returns Wp, Hp, dead, perm."""
    K = H.shape[0]
    perm = jnp.argsort(-jnp.diag(H), stable=True) if act_order else jnp.arange(K)
    Hp = H[perm][:, perm]
    dead = jnp.diag(Hp) == 0
    Wp = jnp.where(dead[None, :], 0.0, W[:, perm])
    return Wp, Hp, dead, perm


@jax.jit
def _damped_inverse_cholesky(Hp, dead, percdamp):
    """The reference's order: damp = percdamp * mean|diag H| (dead columns counted as 0) added to the diagonal, then
    H_jj = 1 for dead columns; U = chol((H + damp I)^-1), upper (NaN if not positive definite)."""
    diag = jnp.diag(Hp)
    d = jnp.where(dead, 1.0, diag + percdamp * jnp.mean(jnp.abs(diag)))
    Hd = Hp - jnp.diag(diag) + jnp.diag(d)
    return _inverse_cholesky_upper(Hd, 0.0)


@jax.jit
def _outlier_scale(Wp, U):
    """mean_j(var_n(W[:, j]) / U_jj^2): the reference's scale of the OBS error, tau's unit."""
    return jnp.mean(jnp.var(Wp, axis=0, ddof=1) / jnp.square(jnp.diag(U)))


def _spqr_grid(x, bits, round_zero=False):
    """The reference SpQR Quantizer's grid on the rows of x (last axis): plain [min, max], fractional zero."""
    return find_params(x, bits, False, zero_in_range=False, round_zero=round_zero)


def _quantize_dequantize(x, scale, zero, bits):
    return dequantize_codes(quantize_codes_fractional(x, scale, zero, 2**bits - 1), scale, zero)


def _leave_one_out_reduction(Wg, dg, bits):
    """get_leave_one_out_error: for each weight of the group rows Wg [N, gs], how much the row's squared error
    sum(((w - q) / U_jj)^2) drops when the grid is fitted, and the row quantized, without that weight. [N, gs]

    Written without gathers ([N, gs, gs] with a masked diagonal, cheaper to compile): in row i of the cube the
    left-out weight i is replaced by its neighbour (which changes neither min nor max) and its term is dropped."""
    gs = Wg.shape[1]
    eye = np.eye(gs, dtype=bool)
    data = jnp.where(eye, jnp.roll(Wg, -1, axis=1)[:, :, None], Wg[:, None, :])  # [N, left out i, j]
    scale, zero = _spqr_grid(data, bits)
    terms = jnp.square((_quantize_dequantize(data, scale[..., None], zero[..., None], bits) - data) / dg)
    loo = jnp.sum(jnp.where(eye, 0.0, terms), axis=-1)
    scale, zero = _spqr_grid(Wg, bits)
    base = jnp.sum(jnp.square((_quantize_dequantize(Wg, scale[:, None], zero[:, None], bits) - Wg) / dg),
                   axis=1, keepdims=True)
    return base - loo


def _second_level(x, bits, qq_groupsize):
    """Quantize a statistic x [N] in groups of qq_groupsize rows; the groups' (scale, zero) are rounded to float16
    first (they are stored so). Returns (dequantized x [N] float32, codes [N] int32, (scale, zero) [N/qqg, 2] f16)."""
    groups = x.reshape(-1, qq_groupsize)
    scale, zero = _spqr_grid(groups, bits)
    qq = jnp.stack([scale, zero], axis=-1).astype(jnp.float16)
    s, z = qq[:, 0:1].astype(jnp.float32), qq[:, 1:2].astype(jnp.float32)
    codes = quantize_codes_fractional(groups, s, z, 2**bits - 1)
    return dequantize_codes(codes, s, z).reshape(-1), codes.reshape(-1), qq


_UNROLL = 2  # columns per unrolled step: little speed gained beyond 2, compile time grows


@partial(jax.jit, static_argnames=("bits", "group_size", "block_size", "qq_scale_bits", "qq_zero_bits",
                                   "qq_groupsize", "round_zero", "outliers", "leave_one_out"))
def _spqr_blocks(W, U, threshold, *, bits, group_size, block_size, qq_scale_bits, qq_zero_bits, qq_groupsize,
                 round_zero, outliers, leave_one_out):
    """The SpQR column loop on permuted W [N, K] with U = chol(H^-1, upper); group_size | block_size | K.

    No data-dependent branch: outlier decisions are selects. Returns codes, dequantized W, outlier mask,
    leave-one-out candidate mask (all [N, K], permuted order), scale codes, zero codes [G, N], their second-level
    (scale, zero) [G, N/qqg, 2] float16, and the loss sum(((w - q) / U_jj)^2) / 2.
    """
    N, K = W.shape
    bs, gs = block_size, group_size
    G = K // gs
    maxq = 2**bits - 1
    d = jnp.diag(U)

    def fit(Wg, start):
        """Group statistics on the current weights of the group, Wg [N, gs], optionally without likely outliers."""
        candidates = jnp.zeros(Wg.shape, bool)
        if outliers and leave_one_out:
            candidates = _leave_one_out_reduction(Wg, lax.dynamic_slice_in_dim(d, start, gs), bits) > threshold
            keep = ~candidates
            mean = jnp.sum(jnp.where(keep, Wg, 0.0), axis=1, keepdims=True) / jnp.maximum(
                jnp.sum(keep, axis=1, keepdims=True), 1).astype(jnp.float32)
            Wg = jnp.where(candidates, mean, Wg)
        scale, zero = _spqr_grid(Wg, bits, round_zero)
        scale, scale_codes, scale_qq = _second_level(scale, qq_scale_bits, qq_groupsize)
        zero, zero_codes, zero_qq = _second_level(zero, qq_zero_bits, qq_groupsize)
        return (scale, zero), (scale_codes, zero_codes, scale_qq, zero_qq), candidates

    def block(b, carry):
        W, Q, D, O, C, stats, loss = carry
        i1 = b * bs
        W1 = lax.dynamic_slice_in_dim(W, i1, bs, axis=1)
        U1 = lax.dynamic_slice(U, (i1, i1), (bs, bs))

        def group(g, gc):
            (W1, Q1, D1, O1, E1, C1), stats = gc
            i0 = g * gs
            (scale, zero), new, candidates = fit(lax.dynamic_slice_in_dim(W1, i0, gs, axis=1), i1 + i0)
            t = (i1 + i0) // gs
            stats = tuple(s.at[t].set(v) for s, v in zip(stats, new))
            C1 = lax.dynamic_update_slice_in_dim(C1, candidates, i0, axis=1)
            code_of_zero = quantize_codes_fractional(jnp.zeros_like(scale), scale, zero, maxq)

            def column(ii, c):
                W1, Q1, D1, O1, E1 = c
                i = i0 + ii
                w = W1[:, i]
                q = quantize_codes_fractional(w, scale, zero, maxq)
                dq = dequantize_codes(q, scale, zero)
                err = (w - dq) / U1[i, i]
                if outliers:
                    out = err * err > threshold
                    q = jnp.where(out, code_of_zero, q)  # the reference re-quantizes w * (1 - is_outlier)
                    dq = jnp.where(out, w.astype(jnp.float16).astype(jnp.float32), dq)
                    err = (w - dq) / U1[i, i]
                    O1 = O1.at[:, i].set(out)
                W1 = W1 - err[:, None] * U1[i][None, :]  # U1[i, :i] == 0: only columns >= i move
                return W1, Q1.at[:, i].set(q), D1.at[:, i].set(dq), O1, E1.at[:, i].set(err)

            c = lax.fori_loop(0, gs, column, (W1, Q1, D1, O1, E1), unroll=math.gcd(gs, _UNROLL))
            return (*c, C1), stats

        zeros = jnp.zeros((N, bs), jnp.float32)
        no = jnp.zeros((N, bs), bool)
        init = ((W1, jnp.zeros((N, bs), jnp.int32), zeros, no, zeros, no), stats)
        (_, Q1, D1, O1, E1, C1), stats = lax.fori_loop(0, bs // gs, group, init)
        loss = loss + jnp.sum(E1 * E1) / 2
        W = W - jnp.matmul(E1, lax.dynamic_slice_in_dim(U, i1, bs, axis=0), precision=lax.Precision.HIGHEST)
        put = lambda A, A1: lax.dynamic_update_slice_in_dim(A, A1, i1, axis=1)  # noqa: E731
        return W, put(Q, Q1), put(D, D1), put(O, O1), put(C, C1), stats, loss

    stats = (jnp.zeros((G, N), jnp.int32), jnp.zeros((G, N), jnp.int32),
             jnp.zeros((G, N // qq_groupsize, 2), jnp.float16), jnp.zeros((G, N // qq_groupsize, 2), jnp.float16))
    init = (W, jnp.zeros((N, K), jnp.int32), jnp.zeros((N, K), jnp.float32), jnp.zeros((N, K), bool),
            jnp.zeros((N, K), bool), stats, jnp.zeros((), jnp.float32))
    _, Q, D, O, C, stats, loss = lax.fori_loop(0, K // bs, block, init)
    return Q, D, O, C, stats, loss


# ------------------------------------------------------------------------------------------------ public API
def spqr(W, H, cfg: SpQRConfig, *, return_details: bool = False):
    """Quantize W [out_features, in_features] (torch layout) with layer Hessian H [K, K] by SpQR.

    Returns (weight, error): the stored ``SpQRWeight`` and sum over weights of ((w - q) / U_jj)^2 / 2 (GPTQ's loss;
    outliers contribute only their float16 rounding). With return_details=True also a namespace with
    ``dequantized`` [N, K] float32 (the matrix the algorithm propagated errors against, = weight.dequantize().T
    exactly), ``outliers`` and ``loo_candidates`` [N, K] bool (original column order), ``threshold`` (tau) and
    ``perm``. The column loop is one jitted program; only building the CSR (nnz is data-dependent) is host-side.
    """
    if not isinstance(cfg, SpQRConfig):
        raise TypeError(f"spqr needs a SpQRConfig, got {type(cfg).__name__}")
    W = jnp.asarray(W, jnp.float32)
    H = jnp.asarray(H, jnp.float32)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [out_features, in_features], got shape {W.shape}")
    N, K = W.shape
    cfg.validate(N, K)
    if H.shape != (K, K):
        raise ValueError(f"H has shape {H.shape}, expected ({K}, {K}) for W of shape {W.shape}")
    if not bool(jnp.isfinite(W).all()):
        raise ValueError("W contains NaN or Inf")
    if not bool(jnp.isfinite(H).all()):
        raise ValueError("Hessian H contains NaN or Inf")

    Wp, Hp, dead, perm = _prepare(W, H, act_order=cfg.act_order)
    U = factor_with_damping_retries(lambda p: _damped_inverse_cholesky(Hp, dead, p), cfg.percdamp,
                                    cfg.damp_retries, method="SpQR")
    threshold = (cfg.outlier_relative_threshold * _outlier_scale(Wp, U) if cfg.outliers
                 else jnp.asarray(jnp.inf, jnp.float32))
    Q, D, O, C, (scale_codes, zero_codes, scale_qq, zero_qq), loss = _spqr_blocks(
        Wp, U, threshold, bits=cfg.bits, group_size=cfg.group_size, block_size=cfg.effective_block_size(K),
        qq_scale_bits=cfg.qq_scale_bits, qq_zero_bits=cfg.qq_zero_bits, qq_groupsize=cfg.qq_groupsize,
        round_zero=cfg.round_zero, outliers=cfg.outliers, leave_one_out=not cfg.simplified_outliers,
    )
    invperm = jnp.argsort(perm)
    codes, deq, mask, candidates = (A[:, invperm] for A in (Q, D, O, C))
    deq_host = np.asarray(deq)
    outliers = csr_from_mask(deq_host, np.asarray(mask))  # float16 values: exactly deq there
    weight = SpQRWeight.from_parts(
        codes, scale_codes, zero_codes, scale_qq, zero_qq, outliers, np.asarray(perm) if cfg.act_order else None,
        bits=cfg.bits, group_size=cfg.group_size, qq_scale_bits=cfg.qq_scale_bits, qq_zero_bits=cfg.qq_zero_bits,
        qq_groupsize=cfg.qq_groupsize,
    )
    if not return_details:
        return weight, float(loss)
    details = SimpleNamespace(dequantized=deq, outliers=mask, loo_candidates=candidates,
                              threshold=float(threshold), perm=perm)
    return weight, float(loss), details


def _solve(W, H, cfg):
    return spqr(W, H, cfg)


def _register():
    from .pipeline import Method, register_method

    register_method(Method("spqr", _solve))


_register()
