"""The in-block column loop of GPTQ as one Pallas GPU kernel per block (Triton lowering) + pure-jnp reference.

Computation for one block of ``bs`` columns (the ``columns``/``column`` loop of ``jaxquant.gptq._quantize_blocks``):

    W1 [N, bs] float32   the block's current weights (earlier blocks' lazy updates applied)
    U1 [bs, bs] float32  the block's diagonal block of the upper Cholesky factor of H^-1
    scale, zero [S, N] float32, S = 1 (one set of grid parameters for every column of the block) or S = bs (row s =
                         the parameters of column s: per-column group lookups, e.g. act-order with static groups)
    maxq                 2**bits - 1

    for i in 0 .. bs-1:                                   (sequential: column i sees the updates of columns < i)
        w      = W1[:, i]
        q      = clip(round_half_even(w / scale_i) + zero_i, 0, maxq)      codes, Q1[:, i] (int32)
        dq     = scale_i * (q - zero_i)                                     D1[:, i]
        err    = (w - dq) / U1[i, i]                                        E1[:, i]
        W1    -= err[:, None] * U1[i][None, :]            (U1[i, :i] == 0: only columns >= i move)

    -> Q1 [N, bs] int32, D1 [N, bs] float32, E1 [N, bs] float32.

The same rounding formula as ``jaxquant.grid.quantize_codes`` / ``dequantize_codes`` (written out here: this package
never imports jaxquant). Rows are independent: no reduction across rows, no atomics, so a row's results do not depend
on how many rows are solved together (1-GPU and row-split 2-GPU solves give the same codes).

Kernel: grid (N_pad / block_rows,); each program holds a tile of block_rows rows x bs columns in registers and runs
the sequential loop over the bs columns (one ``scf.for``): column i is taken out of the tile by a masked sum (exact:
one non-zero term), quantized, its q / dq / err stored, and the tile gets the rank-1 update with row i of U1 (read
from global memory, L1/L2 resident). One launch per block instead of bs iterations of several small XLA kernels (the
XLA loop is launch bound, ~8-12 us per column on an H100). Two layouts:
  "cols" (default): the tile is W1^T [bs, block_rows] (XLA transposes W1 in and the results out), so the rows of W
      lie across the lanes and each lane runs the per-row chain for its own rows; outputs are written a contiguous
      row of [bs, N] per column; U1[i, i] is a scalar load.
  "rows": the tile is W1 [block_rows, bs] as stored; columns lie across the lanes, so every lane repeats the
      per-row chain; outputs written a strided column at a time. 1.2-2x slower per block (H100 sweep).
Default tiling by N (:data:`CONFIGS`, :func:`default_config`); measured in bench/results/gptq_solve.md.

Backend: the Triton lowering of Pallas (``jax.experimental.pallas.triton``; deprecated in JAX 0.11 but present). Why
not Mosaic GPU: its programming model is a warpgroup operating on whole arrays in fixed register layouts (WGMMA /
strided fragments, 128-thread vectors); this loop needs a per-column extraction from a register tile, a broadcast of
a per-row vector against a per-column vector (rank-1 update) and scalar/dynamic-row loads, 128 times in a row with a
dependency chain -- Triton expresses each of these directly (masked reductions, broadcasting, pointer loads), while
Mosaic GPU would need the tile in shared memory and a scalar-times-vector inner loop over the remaining columns.
A Mosaic GPU version was not written or measured (judgement from its programming model, under the time given).
On JAX 0.11.2 each lowering emits a DeprecationWarning for the Triton backend; it still compiles and runs there.

Exactness: Triton lowers float32 ``/`` to the approximate ``div.full.f32`` and has no round-half-even primitive, and
LLVM/ptxas may contract ``w - scale * t`` into an FMA. On the GPU the per-column scalar chain therefore uses inline
PTX with explicit rounding (``div.rn.f32``, ``cvt.rni.f32.f32``, ``sub.rn.f32``, ``mul.rn.f32``): the same IEEE
operations as the jnp reference. The rank-1 update is ``contract=False``: ``mul.rn`` then ``sub.rn`` (two roundings,
as XLA's ``W1 - err[:, None] * U1[i]``), or ``contract=True``: one FMA (fewer instructions, different last bits).
In ``interpret=True`` mode (CPU tests) the same steps run as jnp ops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(n_cols: int) -> bool:
    """Whether the kernel takes blocks of ``n_cols`` columns (Triton tiles need power-of-two sizes)."""
    return _is_pow2(n_cols) and 16 <= n_cols <= 256


# ------------------------------------------------------------------------------------------------ reference (jnp)
def gptq_columns_reference(W1, U1, scale, zero, maxq: int):
    """Pure-jnp reference: same inputs and outputs as :func:`gptq_columns` (see the module docstring)."""
    W1, U1, scale, zero = (jnp.asarray(a, jnp.float32) for a in (W1, U1, scale, zero))
    N, bs = W1.shape
    per_column = scale.shape[0] != 1

    def column(i, c):
        W1, Q1, D1, E1 = c
        s = scale[i] if per_column else scale[0]
        z = zero[i] if per_column else zero[0]
        w = W1[:, i]
        q = jnp.clip(jnp.round(w / s) + z, 0, maxq).astype(jnp.int32)
        dq = s * (q.astype(jnp.float32) - z)
        err = (w - dq) / U1[i, i]
        W1 = W1 - err[:, None] * U1[i][None, :]
        return W1, Q1.at[:, i].set(q), D1.at[:, i].set(dq), E1.at[:, i].set(err)

    zeros = jnp.zeros((N, bs), jnp.float32)
    _, Q1, D1, E1 = lax.fori_loop(0, bs, column, (W1, jnp.zeros((N, bs), jnp.int32), zeros, zeros))
    return Q1, D1, E1


# ------------------------------------------------------------------------------------------------------- kernel
def _ptx(asm: str, *args):
    from jax.experimental.pallas import triton as pltriton

    constraints = "=r," + ",".join("r" for _ in args)
    (out,) = pltriton.elementwise_inline_asm(asm, args=list(args), constraints=constraints, pack=1,
                                             result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)])
    return out


class _Ops:
    """The per-column scalar arithmetic: IEEE-exact inline PTX on the GPU, jnp ops in interpret mode."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def div(self, a, b):
        return a / b if self.interpret else _ptx("div.rn.f32 $0, $1, $2;", a, b)

    def round(self, a):
        return jnp.round(a) if self.interpret else _ptx("cvt.rni.f32.f32 $0, $1;", a)

    def sub(self, a, b):
        return a - b if self.interpret else _ptx("sub.rn.f32 $0, $1, $2;", a, b)

    def mul(self, a, b):
        return a * b if self.interpret else _ptx("mul.rn.f32 $0, $1, $2;", a, b)


def _quantize_column(ops, w, s, z, d, maxq):
    """Codes (as float), dequantized values and scaled errors of one column's values w [rows]."""
    q = jnp.minimum(jnp.maximum(ops.round(ops.div(w, s)) + z, 0.0), float(maxq))
    dq = ops.mul(s, q - z)
    err = ops.div(ops.sub(w, dq), jnp.broadcast_to(d, w.shape))
    return q, dq, err


def _kernel_rows(w_ref, u_ref, scale_ref, zero_ref, q_ref, d_ref, e_ref, *, bs, maxq, per_column, contract,
                 interpret):
    """layout "rows": tile W1 [block_rows, bs] as stored; outputs [N, bs], written a column at a time."""
    ops = _Ops(interpret)
    W = w_ref[...]  # [block_rows, bs], kept in registers across the loop
    cols = lax.broadcasted_iota(jnp.int32, W.shape, 1)
    ucols = lax.broadcasted_iota(jnp.int32, (bs,), 0)
    if not per_column:
        s0, z0 = scale_ref[0, :], zero_ref[0, :]

    def column(i, W):
        s, z = (scale_ref[i, :], zero_ref[i, :]) if per_column else (s0, z0)
        w = jnp.sum(jnp.where(cols == i, W, 0.0), axis=1)  # column i: exactly one non-zero term per row
        u = u_ref[i, :]  # [bs]
        d = jnp.sum(jnp.where(ucols == i, u, 0.0))  # U1[i, i]
        q, dq, err = _quantize_column(ops, w, s, z, d, maxq)
        q_ref[:, i] = q.astype(jnp.int32)
        d_ref[:, i] = dq
        e_ref[:, i] = err
        e2, u2 = jnp.broadcast_to(err[:, None], W.shape), jnp.broadcast_to(u[None, :], W.shape)
        return W - e2 * u2 if contract else ops.sub(W, ops.mul(e2, u2))

    lax.fori_loop(0, bs, column, W)


def _kernel_cols(wt_ref, u_ref, scale_ref, zero_ref, qt_ref, dt_ref, et_ref, *, bs, maxq, per_column, contract,
                 interpret):
    """layout "cols": the transposed tile W1^T [bs, block_rows] (rows of W contiguous), so column i of W1 is row i of
    the tile: the per-row quantities are spread over the lanes instead of repeated on each, and the outputs
    [bs, N] are written a contiguous row at a time."""
    ops = _Ops(interpret)
    WT = wt_ref[...]  # [bs, block_rows]
    rows = lax.broadcasted_iota(jnp.int32, WT.shape, 0)
    if not per_column:
        s0, z0 = scale_ref[0, :], zero_ref[0, :]

    def column(i, WT):
        s, z = (scale_ref[i, :], zero_ref[i, :]) if per_column else (s0, z0)
        w = jnp.sum(jnp.where(rows == i, WT, 0.0), axis=0)  # row i of the tile: one non-zero term per column
        u = u_ref[i, :]  # [bs]
        d = u_ref[i, i]
        q, dq, err = _quantize_column(ops, w, s, z, d, maxq)
        qt_ref[i, :] = q.astype(jnp.int32)
        dt_ref[i, :] = dq
        et_ref[i, :] = err
        u2, e2 = jnp.broadcast_to(u[:, None], WT.shape), jnp.broadcast_to(err[None, :], WT.shape)
        return WT - u2 * e2 if contract else ops.sub(WT, ops.mul(u2, e2))

    lax.fori_loop(0, bs, column, WT)


LAYOUTS = ("rows", "cols")
# (layout, block_rows, num_warps) for large and small N: the fastest exact configs of the sweep in bench/gptq_solve.py
# (H100, 2026-11-23, one 128-column block): N = 22016: cols:32:1 309 us (rows:16:4 620 us); N = 4096 and 2048:
# cols:8:1 195 / 208 us (rows:16:4 453 / 259 us). Small N is latency bound (one chain of 128 dependent columns).
CONFIGS = {"large": ("cols", 32, 1), "small": ("cols", 8, 1)}
LARGE_N = 8192


def default_config(N: int) -> tuple[str, int, int]:
    """(layout, block_rows, num_warps) used for N rows when not given: few rows -> smaller tiles, more programs."""
    return CONFIGS["large" if N >= LARGE_N else "small"]


@functools.partial(jax.jit, static_argnames=("maxq", "layout", "block_rows", "num_warps", "contract", "interpret"))
def gptq_columns(W1, U1, scale, zero, *, maxq: int, layout: str | None = None, block_rows: int | None = None,
                 num_warps: int | None = None, contract: bool = False, interpret: bool = False):
    """One GPTQ block: W1 [N, bs], U1 [bs, bs], scale/zero [S, N] (S in {1, bs}) -> (Q1 int32, D1, E1) [N, bs].

    layout/block_rows/num_warps: None takes :func:`default_config`. N is padded to a multiple of ``block_rows`` (a
    power of two) with zero rows (scale 1, zero 0); bs must satisfy :func:`supported`. Layout "cols" runs on W1^T
    (an XLA transpose in, and out for the results). ``interpret=True`` runs the kernel body with jnp ops.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    N, bs = W1.shape
    S = scale.shape[0]
    d_layout, d_rows, d_warps = default_config(N)
    layout = d_layout if layout is None else layout
    block_rows = d_rows if block_rows is None else block_rows
    num_warps = d_warps if num_warps is None else num_warps
    if not supported(bs):
        raise ValueError(f"gptq_columns: block of {bs} columns; the kernel needs a power of two in [16, 256]")
    if U1.shape != (bs, bs):
        raise ValueError(f"gptq_columns: U1 has shape {U1.shape}, expected ({bs}, {bs})")
    if S not in (1, bs) or scale.shape != (S, N) or zero.shape != (S, N):
        raise ValueError(f"gptq_columns: scale/zero shapes {scale.shape}/{zero.shape}, expected (1 or {bs}, {N})")
    if not _is_pow2(block_rows):
        raise ValueError(f"gptq_columns: block_rows={block_rows} must be a power of two")
    if layout not in LAYOUTS:
        raise ValueError(f"gptq_columns: layout must be one of {LAYOUTS}, got {layout!r}")
    Np = -(-N // block_rows) * block_rows
    f32 = jnp.float32
    W1, U1, scale, zero = (jnp.asarray(a, f32) for a in (W1, U1, scale, zero))
    if Np != N:
        W1 = jnp.pad(W1, ((0, Np - N), (0, 0)))
        scale = jnp.pad(scale, ((0, 0), (0, Np - N)), constant_values=1.0)
        zero = jnp.pad(zero, ((0, 0), (0, Np - N)))
    params = pl.BlockSpec((S, block_rows), lambda r: (0, r))
    if layout == "rows":
        tile, kernel, shape = pl.BlockSpec((block_rows, bs), lambda r: (r, 0)), _kernel_rows, (Np, bs)
    else:
        tile, kernel, shape = pl.BlockSpec((bs, block_rows), lambda r: (0, r)), _kernel_cols, (bs, Np)
        W1 = W1.T
    kernel = functools.partial(kernel, bs=bs, maxq=maxq, per_column=S != 1, contract=contract, interpret=interpret)
    Q1, D1, E1 = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, f32),
                   jax.ShapeDtypeStruct(shape, f32)),
        grid=(Np // block_rows,),
        in_specs=[tile, pl.BlockSpec((bs, bs), lambda r: (0, 0)), params, params],
        out_specs=(tile, tile, tile),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"gptq_columns_{layout}",
    )(W1, U1, scale, zero)
    if layout == "cols":
        Q1, D1, E1 = Q1.T, D1.T, E1.T
    return Q1[:N], D1[:N], E1[:N]
