"""GPTQ (Frantar et al., 2022) following the reference `GPTQ.fasterquant` of IST-DASLab/gptq.

Columns are quantized one at a time; the rounding error of each column is spread over the
not-yet-quantized columns through the upper Cholesky factor U of H^-1 (H^-1 = U^T U). Updates are
applied lazily: within a block of `block_size` columns immediately, to the rest of the matrix
once per block.

Deviations from the reference (none changes results with the default block_size = group_size):
  * Group parameters are computed on the fully error-updated weights. When a group starts
    inside a block the reference reads its weights from `W`, which lacks the updates from the
    current block, so its result depends on the block size. Here a group starting mid-block is
    read from the block's working copy, and when neither of block_size and group_size divides
    the other the block is shrunk to gcd(block_size, group_size) so every group is either inside
    one block or starts at a block start. block_size is thus a pure speed knob.
  * act-order uses a stable sort of diag(H), so ties (e.g. dead columns) keep their order.
  * A failed Cholesky factorisation is retried with more damping (see QuantConfig.damp_retries).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from pallas_kernels import gptq_columns as gptq_columns_kernel

from .config import QuantConfig
from .formats import UniformQuantizedWeight
from .grid import dequantize_codes, find_params, quantize_codes
from .packing import check_packable

_HIGHEST = lax.Precision.HIGHEST


@partial(jax.jit, static_argnames=("bits", "sym", "group_size", "act_order", "static_groups"))
def _prepare(W, H, *, bits, sym, group_size, act_order, static_groups):
    """Dead columns, fixed group parameters and the act-order permutation.

    Returns the permuted W and H, perm, and for fixed parameters (per channel or static groups)
    the tables scales/zeros [G, N] with col_group[j] = table row of permuted column j.
    """
    N, K = W.shape
    dead = jnp.diag(H) == 0
    H = H + jnp.diag(dead.astype(H.dtype))  # H_ii = 1 where it was 0
    W_live = jnp.where(dead[None, :], 0.0, W)
    if group_size == -1:
        # As the reference: per-channel parameters come from W before dead columns are zeroed.
        scale, zero = find_params(W, bits, sym)
        tables, col_group = (scale[None], zero[None]), jnp.zeros(K, jnp.int32)
    elif static_groups:
        G = -(-K // group_size)  # a short last group is zero-padded: zeros never change the grid's range
        W_pad = jnp.pad(W_live, ((0, 0), (0, G * group_size - K)))
        scale, zero = find_params(W_pad.reshape(N, G, group_size), bits, sym)
        tables, col_group = (scale.T, zero.T), jnp.arange(K, dtype=jnp.int32) // group_size
    else:
        tables, col_group = None, jnp.arange(K, dtype=jnp.int32) // group_size
    perm = jnp.argsort(-jnp.diag(H), stable=True) if act_order else jnp.arange(K)
    if act_order and tables is not None:
        col_group = col_group[perm]  # static groups are looked up through the permutation
    return W_live[:, perm], H[perm][:, perm], perm, col_group, tables


@jax.jit
def _inverse_cholesky_upper(H, percdamp):
    """U with U^T U = (H + damp I)^-1, damp = percdamp * mean(diag H); NaN if not PD.

    With J the reversal permutation and J Hd J = L L^T: Hd^-1 = (J L^-T J)(J L^-1 J), and J L^-1 J is upper
    triangular with a positive diagonal, so it is the Cholesky factor U. One factorisation and one triangular solve
    instead of the reference's cholesky -> cholesky_inverse -> cholesky (about a third of the flops).
    """
    eye = jnp.eye(H.shape[0], dtype=H.dtype)
    H = H + percdamp * jnp.mean(jnp.diag(H)) * eye
    L = jnp.linalg.cholesky(H[::-1, ::-1])
    return jax.scipy.linalg.solve_triangular(L, eye, lower=True)[::-1, ::-1]


def factor_with_damping_retries(factor, percdamp: float, damp_retries: int, method: str = "GPTQ"):
    """``factor(p)`` (an inverse Cholesky factor of the Hessian damped by ``p``, NaN where not positive definite) for
    the first p = percdamp * 10**r, r = 0 .. damp_retries, that is finite; warns at each retry, then a ValueError.
    Shared by GPTQ and SpQR, which damp differently (see their ``factor``)."""
    for retry in range(damp_retries + 1):
        p = percdamp * 10**retry
        U = factor(p)
        if bool(_all_finite(U)):
            return U
        if retry < damp_retries:
            warnings.warn(f"{method}: Cholesky failed with percdamp={p:g}, retrying with more damping")
    raise ValueError(f"Hessian not positive definite after {damp_retries} damping retries (percdamp up to {p:g})")


# Columns per unrolled step of the column loop: fewer, larger loop bodies (one launch sequence per step).
_UNROLL = 8


def _column_kernel_mode(column_kernel: str) -> str:
    """Resolve ``column_kernel`` ("auto", "on", "off", "interpret") at trace time to "gpu", "interpret" or "off".
    "auto": the Pallas kernel (pallas_kernels/gptq_columns.py) on a GPU backend unless JAXQUANT_GPTQ_COLUMN_KERNEL=0,
    the XLA loop elsewhere. Read when a shape is first traced: set the variable before the first solve. Measured
    (H100, bench/results/gptq_solve.md): one w4 g128 solve 1.5-2.6x faster than the XLA loop at 7B shapes."""
    if column_kernel == "auto":
        on = os.environ.get("JAXQUANT_GPTQ_COLUMN_KERNEL", "1") != "0" and jax.default_backend() == "gpu"
        return "gpu" if on else "off"
    if column_kernel not in ("on", "off", "interpret"):
        raise ValueError(f"column_kernel must be 'auto', 'on', 'off' or 'interpret', got {column_kernel!r}")
    return "gpu" if column_kernel == "on" else column_kernel


def _column_kernel_config() -> dict:
    """JAXQUANT_GPTQ_COLUMN_KERNEL=layout:block_rows:num_warps (e.g. rows:16:4) pins the kernel's tiling for every
    N; otherwise the kernel's ``default_config(N)``."""
    value = os.environ.get("JAXQUANT_GPTQ_COLUMN_KERNEL", "")
    if ":" not in value:
        return {}
    try:
        layout, block_rows, num_warps = value.split(":")
        return dict(layout=layout, block_rows=int(block_rows), num_warps=int(num_warps))
    except ValueError:
        raise ValueError(f"JAXQUANT_GPTQ_COLUMN_KERNEL={value!r}: expected 0, 1 or layout:block_rows:num_warps "
                         "(e.g. cols:32:1)") from None


@partial(jax.jit, static_argnames=("bits", "sym", "group_size", "block_size", "row_loss", "column_kernel"))
def _quantize_blocks(W, U, col_group, tables, *, bits, sym, group_size, block_size, row_loss=False,
                     column_kernel="auto"):
    """The GPTQ column loop on permuted W [N, K] with U = chol(H^-1, upper).

    tables=None means group parameters are recomputed at each group start (group_size must then
    divide block_size or be a multiple of it). Returns codes, dequantized W, loss, tables; the loss
    is a scalar, or per output row [N] with row_loss=True (rows are independent: a solve over stacked
    weights splits its loss by linear).

    Written for the GPU: no data-dependent branch inside the loops (an XLA conditional reads its
    predicate on the host, a device->host round trip per column) and no reduction per column.
    Dynamic groups inside a block are a loop over groups around a loop over their columns; groups
    spanning several blocks are refreshed at their first block by a select. The loss is summed
    from the block's scaled errors, sum(err^2)/2 = sum((w - q)^2 / d^2)/2, once per block.

    column_kernel (see ``_column_kernel_mode``): with the kernel, the in-block loop of a block whose columns share one
    dynamic group (group_size == block_size) or look their parameters up in tables (per channel, static groups,
    act-order, group_size a multiple of block_size) is one Pallas launch per block; other blocks (dynamic groups
    smaller than the block, block sizes the kernel does not take) keep the XLA loop.
    """
    N, K = W.shape
    bs, gs = block_size, group_size
    maxq = 2**bits - 1
    dynamic = tables is None
    # Pad K so blocks (and dynamic groups) tile it. Padded columns are zero with an identity
    # Hessian block: they quantize to exactly 0 and never touch the real columns.
    span = max(bs, gs) if dynamic else bs
    Kp = -(-K // span) * span
    W = jnp.pad(W, ((0, 0), (0, Kp - K)))
    U = jnp.eye(Kp, dtype=U.dtype).at[:K, :K].set(U)
    if dynamic:
        col_group = jnp.arange(Kp, dtype=jnp.int32) // gs
        tables = (jnp.ones((Kp // gs, N), jnp.float32), jnp.zeros((Kp // gs, N), jnp.float32))
    else:  # padded columns use an extra dummy group (scale 1, zero 0)
        G = tables[0].shape[0]
        col_group = jnp.pad(col_group, (0, Kp - K), constant_values=G)
        tables = (jnp.pad(tables[0], ((0, 1), (0, 0)), constant_values=1.0),
                  jnp.pad(tables[1], ((0, 1), (0, 0))))
    inner = dynamic and gs <= bs  # groups inside a block: parameters fixed per inner loop
    sub = gs if inner else bs  # columns per inner loop
    mode = _column_kernel_mode(column_kernel)
    use_kernel = mode != "off" and gptq_columns_kernel.supported(bs) and (not inner or gs == bs)

    def kernel_columns(W1, U1, scale, zero):
        """The block's column loop as one kernel: scale/zero [1 or bs, N]. Returns (None, Q1, D1, E1)."""
        return (None, *gptq_columns_kernel.gptq_columns(W1, U1, scale, zero, maxq=maxq, interpret=mode == "interpret",
                                                         **_column_kernel_config()))

    def columns(i1, i0, U1, scale_zero, tables, c):
        """Columns i0 .. i0+sub-1 of the block starting at i1 (fixed scale/zero, or table lookups)."""

        def column(ii, c):
            W1, Q1, D1, E1 = c
            i = i0 + ii
            if scale_zero is not None:
                scale, zero = scale_zero
            else:
                g = col_group[i1 + i]
                scale, zero = tables[0][g], tables[1][g]
            w = W1[:, i]
            q = quantize_codes(w, scale, zero, maxq)
            dq = dequantize_codes(q, scale, zero)
            err = (w - dq) / U1[i, i]
            W1 = W1 - err[:, None] * U1[i][None, :]  # U1[i, :i] == 0: only columns >= i move
            return W1, Q1.at[:, i].set(q), D1.at[:, i].set(dq), E1.at[:, i].set(err)

        return lax.fori_loop(0, sub, column, c, unroll=math.gcd(sub, _UNROLL))

    def block(b, carry):
        W, Q, D, loss, tables = carry
        i1 = b * bs
        W1 = lax.dynamic_slice_in_dim(W, i1, bs, axis=1)
        U1 = lax.dynamic_slice(U, (i1, i1), (bs, bs))
        zeros = jnp.zeros((N, bs), jnp.float32)
        c = (W1, jnp.zeros((N, bs), jnp.int32), zeros, zeros)
        if use_kernel and inner:  # one group per block (gs == bs), from the block's fully updated weights
            scale, zero = find_params(W1, bits, sym)
            t = i1 // gs
            tables = (tables[0].at[t].set(scale), tables[1].at[t].set(zero))
            c = kernel_columns(W1, U1, scale[None], zero[None])
        elif inner:
            def group(g, gc):
                c, tables = gc
                i0 = g * gs
                # Current weights of the group: all earlier columns' updates are applied in W1.
                scale, zero = find_params(lax.dynamic_slice_in_dim(c[0], i0, gs, axis=1), bits, sym)
                t = (i1 + i0) // gs
                tables = (tables[0].at[t].set(scale), tables[1].at[t].set(zero))
                return columns(i1, i0, U1, (scale, zero), tables, c), tables

            c, tables = lax.fori_loop(0, bs // gs, group, (c, tables))
        else:
            if dynamic:  # gs a multiple of bs: a group starting at this block is read from W, fully updated
                t = i1 // gs
                scale, zero = find_params(lax.dynamic_slice_in_dim(W, i1, gs, axis=1), bits, sym)
                new = i1 % gs == 0
                tables = (tables[0].at[t].set(jnp.where(new, scale, tables[0][t])),
                          tables[1].at[t].set(jnp.where(new, zero, tables[1][t])))
            if use_kernel:  # per-column parameters [bs, N] looked up once for the block
                g = lax.dynamic_slice_in_dim(col_group, i1, bs)
                c = kernel_columns(W1, U1, tables[0][g], tables[1][g])
            else:
                c = columns(i1, 0, U1, None, tables, c)
        _, Q1, D1, E1 = c
        loss = loss + (jnp.sum(E1 * E1, axis=1) if row_loss else jnp.sum(E1 * E1)) / 2
        # Lazy update of all later columns (U rows are zero left of the block).
        W = W - jnp.matmul(E1, lax.dynamic_slice_in_dim(U, i1, bs, axis=0), precision=_HIGHEST)
        Q = lax.dynamic_update_slice_in_dim(Q, Q1, i1, axis=1)
        D = lax.dynamic_update_slice_in_dim(D, D1, i1, axis=1)
        return W, Q, D, loss, tables

    init = (W, jnp.zeros((N, Kp), jnp.int32), jnp.zeros((N, Kp), jnp.float32),
            jnp.zeros((N,) if row_loss else (), jnp.float32), tables)
    _, Q, D, loss, tables = lax.fori_loop(0, Kp // bs, block, init)
    return Q[:, :K], D[:, :K], loss, tables


@functools.lru_cache(maxsize=None)
def _row_parallel_blocks(mesh, dynamic: bool, **static):
    """``_quantize_blocks`` under shard_map: each device runs the column loop on its slice of output rows (rows are
    independent given U); the loss is summed across devices. Cached per (mesh, settings): one compile each."""
    from jax.sharding import PartitionSpec as P

    from .distributed import axis_name, shard_map

    ax = axis_name(mesh)
    rows, cols = P(ax, None), P(None, ax)

    row_loss = static.get("row_loss", False)

    def body(w, u, col_group, tables):
        q, d, loss, tables = _quantize_blocks(w, u, col_group, tables, **static)
        return q, d, (loss if row_loss else lax.psum(loss, ax)), tables

    tables_spec = None if dynamic else (cols, cols)
    return jax.jit(shard_map(body, mesh, in_specs=(rows, P(), P(), tables_spec),
                             out_specs=(rows, rows, P(ax) if row_loss else P(), (cols, cols))))


def _block_size(cfg: QuantConfig, K: int) -> int:
    bs, gs = min(cfg.block_size, K), cfg.group_size
    if gs != -1 and not cfg.static_groups and bs % gs and gs % bs:
        bs = math.gcd(bs, gs)
    return bs


@jax.jit
def _all_finite(x):
    return jnp.isfinite(x).all()


@partial(jax.jit, static_argnames=("bits", "group_size", "sym", "act_order", "static_groups", "return_dequantized"))
def _finish(codes, deq, perm, scales, zeros, *, bits, group_size, sym, act_order, static_groups,
            return_dequantized):
    """Undo the act-order permutation and pack: one program instead of a dozen eager ops (each of which the GPU
    compiles on first use, per shape and per device)."""
    K = codes.shape[1]
    invperm = jnp.argsort(perm)
    G = 1 if group_size == -1 else -(-K // group_size)
    if group_size == -1:
        g_idx = jnp.zeros(K, jnp.int32)
    elif act_order and not static_groups:
        g_idx = (jnp.arange(K, dtype=jnp.int32) // group_size)[invperm]  # g_idx[perm[i]] = i // gs
    else:
        g_idx = jnp.arange(K, dtype=jnp.int32) // group_size
    weight = UniformQuantizedWeight.from_codes(
        codes[:, invperm], scales[:G], zeros[:G].astype(jnp.int32), g_idx,
        bits=bits, group_size=group_size, sym=sym,
    )
    return weight, (deq[:, invperm] if return_dequantized else None)


@partial(jax.jit, static_argnames=("bits", "sym", "group_size", "act_order", "static_groups", "block_size",
                                   "row_loss", "return_dequantized"))
def _solve(W, H, percdamp, *, bits, sym, group_size, act_order, static_groups, block_size, row_loss,
           return_dequantized):
    """A whole single-device solve as ONE program: input checks, dead columns / act-order, the damped inverse Cholesky
    factor, the column loop and the packing. One compile per shape instead of a chain of seven programs, and one
    host sync per solve (``gptq`` reads the finiteness flags and the loss together at the end; a failed
    factorisation is seen there and the solve rerun with more damping). The same operations as the separate
    programs, in the same order."""
    finite_inputs = jnp.stack([jnp.isfinite(W).all(), jnp.isfinite(H).all()])
    Wp, Hp, perm, col_group, tables = _prepare(W, H, bits=bits, sym=sym, group_size=group_size, act_order=act_order,
                                               static_groups=static_groups)
    U = _inverse_cholesky_upper(Hp, percdamp)
    codes, deq, loss, (scales, zeros) = _quantize_blocks(Wp, U, col_group, tables, bits=bits, sym=sym,
                                                         group_size=group_size, block_size=block_size,
                                                         row_loss=row_loss)
    weight, deq = _finish(codes, deq, perm, scales, zeros, bits=bits, group_size=group_size, sym=sym,
                          act_order=act_order, static_groups=static_groups, return_dequantized=return_dequantized)
    return weight, deq, loss, jnp.concatenate([finite_inputs, jnp.isfinite(U).all()[None]])


def _solve_static(cfg: QuantConfig, K: int, row_errors: bool, return_dequantized: bool) -> dict:
    return dict(bits=cfg.bits, sym=cfg.sym, group_size=cfg.group_size, act_order=cfg.act_order,
                static_groups=cfg.static_groups, block_size=_block_size(cfg, K), row_loss=row_errors,
                return_dequantized=return_dequantized)


def precompile(N: int, K: int, cfg: QuantConfig, device=None, *, return_dequantized: bool = False,
               row_errors: bool = False):
    """Compile ahead of time the program that ``gptq`` runs for W [N, K] (same flags) with W and H on ``device``
    (committed there, as arrays taken from a mesh array's shards are), or None for uncommitted arrays on the default
    device. A later ``gptq`` call with such arrays reuses it (JAX's lowering and compilation caches), so a caller can
    compile its solve shapes in background threads while other work runs. Only an optimisation."""
    sharding = None if device is None else jax.sharding.SingleDeviceSharding(device)
    W = jax.ShapeDtypeStruct((N, K), jnp.float32, sharding=sharding)
    H = jax.ShapeDtypeStruct((K, K), jnp.float32, sharding=sharding)
    return _solve.lower(W, H, float(cfg.percdamp), **_solve_static(cfg, K, row_errors, return_dequantized)).compile()


def gptq(W, H, cfg: QuantConfig, *, return_dequantized: bool = False, mesh=None, row_errors: bool = False):
    """Quantize W [out_features, in_features] (torch layout) with layer Hessian H [K, K].

    mesh: a one-axis ``jax.sharding.Mesh``; the column loop then runs row-parallel across its devices (when they
    divide out_features; otherwise on one device). Same arithmetic per row, so the same codes.

    Returns (weight, error) where error = sum over columns of ||w - q||^2 / (2 [H^-1]_qq), the
    reference's `Losses` total; with return_dequantized=True also the quantized-dequantized
    W [N, K] float32 that the algorithm used (equal to weight.dequantize().T exactly).
    row_errors=True: error is a numpy array [N], each output row's share (they sum to the total). Rows are
    independent given H, so linears that share a Hessian (q/k/v) can be solved as one stacked W and split after.
    """
    W = jnp.asarray(W, jnp.float32)
    H = jnp.asarray(H, jnp.float32)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D [out_features, in_features], got shape {W.shape}")
    N, K = W.shape
    cfg.validate(K)
    if H.shape != (K, K):
        raise ValueError(f"H has shape {H.shape}, expected ({K}, {K}) for W of shape {W.shape}")
    check_packable(K, cfg.bits, "in_features")
    check_packable(N, cfg.bits, "out_features")
    if mesh is None or mesh.devices.size == 1 or N % mesh.devices.size:
        static = _solve_static(cfg, K, row_errors, return_dequantized)
        for retry in range(cfg.damp_retries + 1):
            p = cfg.percdamp * 10**retry
            weight, deq, loss, finite = _solve(W, H, p, **static)
            (w_ok, h_ok, u_ok), loss = jax.device_get((finite, loss))  # the solve's one wait
            if not w_ok:
                raise ValueError("W contains NaN or Inf")
            if not h_ok:
                raise ValueError("Hessian H contains NaN or Inf")
            if u_ok:
                break
            if retry < cfg.damp_retries:
                warnings.warn(f"GPTQ: Cholesky failed with percdamp={p:g}, retrying with more damping")
        else:
            raise ValueError(f"Hessian not positive definite after {cfg.damp_retries} damping retries "
                             f"(percdamp up to {p:g})")
        error = np.asarray(loss, np.float64) if row_errors else float(loss)
        return (weight, error, deq) if return_dequantized else (weight, error)

    # Row-parallel over the mesh: the same steps as separate programs, the column loop under shard_map.
    w_ok, h_ok = jax.device_get((_all_finite(W), _all_finite(H)))  # one wait for both checks
    if not w_ok:
        raise ValueError("W contains NaN or Inf")
    if not h_ok:
        raise ValueError("Hessian H contains NaN or Inf")

    gs = cfg.group_size
    Wp, Hp, perm, col_group, tables = _prepare(
        W, H, bits=cfg.bits, sym=cfg.sym, group_size=gs,
        act_order=cfg.act_order, static_groups=cfg.static_groups,
    )
    U = factor_with_damping_retries(lambda p: _inverse_cholesky_upper(Hp, p), cfg.percdamp, cfg.damp_retries)

    from .distributed import axis_name

    static = dict(bits=cfg.bits, sym=cfg.sym, group_size=gs, block_size=_block_size(cfg, K))
    Wp = jax.device_put(Wp, NamedSharding(mesh, PartitionSpec(axis_name(mesh), None)))
    solve = _row_parallel_blocks(mesh, tables is None, row_loss=row_errors, **static)
    codes, deq, loss, (scales, zeros) = solve(Wp, U, col_group, tables)
    weight, deq = _finish(codes, deq, perm, scales, zeros, bits=cfg.bits, group_size=gs, sym=cfg.sym,
                          act_order=cfg.act_order, static_groups=cfg.static_groups,
                          return_dequantized=return_dequantized)
    error = np.asarray(jax.device_get(loss), np.float64) if row_errors else float(loss)
    return (weight, error, deq) if return_dequantized else (weight, error)
