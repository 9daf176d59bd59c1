"""SpQR's outlier product as Pallas GPU kernels: any M through the Triton lowering (adds into the dense product in
place), M = 1 through Mosaic GPU (per-row sums, shared-memory gathers). Pure-jnp references next to each.

Computation (the ELL row-length buckets of :class:`pallas_kernels.spqr_matmul.SpQRKernelWeight`):

    y       [M, N] float32      the dense part x @ W_dense (updated in place: input 0 aliases the output)
    x       [M_x, K_pad] (rows >= M ignored) or, ``kmajor``, [K_pad, M] (the transpose): the prepared activations
                                in kernel column order; M = 1 takes the first form as it is (no copy), larger M the
                                second (a column's M values are then contiguous for the gather)
    buckets ((cols [n_b, L_b] int16/int32, vals [n_b, L_b] float16), ...): bucket row i holds up to L_b outliers of
                                one output row, as (kernel column, value - dense value); padding has value 0
    rows    [T] int32           the output row of each bucket row, buckets in order (T = sum n_b)

    y[m, rows[t]] += sum_l vals[t, l] * x[m, cols[t, l]]        (float32 products and sums)

:func:`outlier_product_add` (Triton lowering, any M): one launch for all buckets; the grid enumerates blocks of
``block_rows`` bucket rows, bucket after bucket (a static branch per bucket on the program id). A program loads its
block's columns / values a [block_rows, chunk] tile at a time (coalesced along each row), gathers the activations of
those columns from global memory ([block_rows, chunk, Mp], Mp = M rounded up to a power of two, masked), multiplies,
sums over the chunk, and adds the [block_rows, Mp] sums into y at its rows. Each element of y has one writer and a
fixed order of additions: deterministic (no atomics). Triton because Mosaic GPU's array model has no per-lane gather;
its pointer loads express one directly.

:func:`outlier_sums_mgpu` (Mosaic GPU, M = 1): the same sums per bucket row, [T + 1] float32, written by one thread
per bucket row from a copy of x in shared memory (raw loads in an ``inline_mgpu`` block); the caller adds
``sums[sp_inv]``, which XLA fuses into the partial-sum / convert epilogue. At M = 1 the Triton kernel's gathers from
global memory are its limit (its time does not move with occupancy), shared-memory gathers are ~2x faster.

Measured (H100, 8192x28672, 1 % outliers; bench/results/spqr_outliers.md and kernels.md): the XLA form
(:func:`pallas_kernels.spqr_matmul.sparse_product`) 17-22 us at M = 1 and ~360 us at M = 16 (XLA transposes the
gathered buckets), the Triton kernel 15.5-16 us at M = 1 and ~68 us at M = 16, the Mosaic GPU sums 7.5-8.3 us at M = 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHUNK_SLOTS = 32  # ELL slots per row and loaded tile (a power of two)
TILE_ELEMENTS = 4096  # block_rows * chunk * Mp per gathered tile (32 float32 values per thread at 4 warps)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def block_plan(buckets_shapes, mp: int, chunk: int = CHUNK_SLOTS, tile_elements: int = TILE_ELEMENTS):
    """Per bucket (n_b, L_b): (block_rows, chunk, programs); block_rows and chunk are powers of two."""
    plan = []
    for n_b, l_b in buckets_shapes:
        c = min(chunk, _pow2_ceil(l_b))
        r = min(_pow2_ceil(n_b), max(1, _pow2_floor(tile_elements // (c * mp))))
        plan.append((r, c, -(-n_b // r)))
    return tuple(plan)


def outlier_product_reference(y, x, buckets, rows, *, kmajor: bool = False):
    """Pure jnp: same inputs and result as :func:`outlier_product_add` (float32 products, sums over each row)."""
    m = y.shape[0]
    xk = (x.T if kmajor else x)[:m].astype(jnp.float32)  # [m, K_pad]
    sums = [jnp.einsum("tl,mtl->tm", vals.astype(jnp.float32), xk[:, cols.astype(jnp.int32)],
                       precision=jax.lax.Precision.HIGHEST) for cols, vals in buckets]
    sums = jnp.concatenate(sums, axis=0)  # [T, m]
    return y.at[:, rows].add(sums.T)


def _kernel(*refs, plan, n_buckets, m, n, mp, kmajor):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    y_in, x_ref, rows_ref = refs[:3]
    bucket_refs = refs[3:3 + 2 * n_buckets]
    y_out = refs[-1]
    del y_in  # aliased with y_out
    pid = pl.program_id(0)
    first_program, first_row = 0, 0
    m_ids = jax.lax.broadcasted_iota(jnp.int32, (mp,), 0)
    m_ok = m_ids < m
    for b, (block_rows, chunk, programs) in enumerate(plan):
        cols_ref, vals_ref = bucket_refs[2 * b], bucket_refs[2 * b + 1]
        n_b, l_b = cols_ref.shape

        @pl.when((pid >= first_program) & (pid < first_program + programs))
        def _(cols_ref=cols_ref, vals_ref=vals_ref, n_b=n_b, l_b=l_b, block_rows=block_rows, chunk=chunk,
              first_program=first_program, first_row=first_row):
            r0 = (pid - first_program) * block_rows
            r_ids = r0 + jax.lax.broadcasted_iota(jnp.int32, (block_rows,), 0)
            r_ok = r_ids < n_b
            acc = jnp.zeros((block_rows, mp), jnp.float32)
            for l0 in range(0, l_b, chunk):  # static: L_b <= a few hundred
                l_ids = l0 + jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
                ok = r_ok[:, None] & (l_ids < l_b)[None, :]
                tile = (r_ids[:, None], l_ids[None, :])  # index arrays: the last chunk may pass L_b (masked)
                cols = pltriton.load(cols_ref.at[tile], mask=ok, other=0).astype(jnp.int32)
                vals = pltriton.load(vals_ref.at[tile], mask=ok, other=0).astype(jnp.float32)
                # [block_rows, chunk, mp]; padding slots read column 0 (their value is 0)
                c3, m3 = cols[:, :, None], m_ids[None, None, :]
                xg = pltriton.load(x_ref.at[(c3, m3) if kmajor else (m3, c3)], mask=m_ok[None, None, :], other=0)
                acc = acc + jnp.sum(vals[:, :, None] * xg.astype(jnp.float32), axis=1)
            # Masked rows point past y (row N): the GPU skips masked lanes; interpret mode drops out-of-bounds
            # writes but would let a masked duplicate of a real row overwrite it.
            out_rows = pltriton.load(rows_ref.at[first_row + r_ids], mask=r_ok, other=n)
            y_ok = m_ok[:, None] & r_ok[None, :]
            idx = (m_ids[:, None], out_rows[None, :])  # y[m, rows] as an [mp, block_rows] tile
            cur = pltriton.load(y_out.at[idx], mask=y_ok, other=0.0)
            pltriton.store(y_out.at[idx], cur + acc.T, mask=y_ok)

        first_program += programs
        first_row += n_b


@functools.partial(jax.jit, static_argnames=("kmajor", "chunk", "tile_elements", "num_warps", "interpret"))
def outlier_product_add(y, x, buckets, rows, *, kmajor: bool = False, chunk: int = CHUNK_SLOTS,
                        tile_elements: int = TILE_ELEMENTS, num_warps: int = 4, interpret: bool = False):
    """y [M, N] float32 + the outlier product (see the module docstring) -> float32 [M, N] (y's buffer, updated).

    x [M_x >= M, K_pad] or (``kmajor``) [K_pad, M]; buckets ((cols, vals), ...); rows [T] int32. ``chunk`` (a power of
    two) slots per loaded tile; ``tile_elements`` bounds block_rows * chunk * Mp; ``interpret=True`` runs on the CPU."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    m, n = y.shape
    x_m, k_pad = x.shape[::-1] if kmajor else x.shape
    if y.dtype != jnp.float32:
        raise ValueError(f"outlier_product_add: y must be float32, got {y.dtype}")
    if x_m < m:
        raise ValueError(f"outlier_product_add: y has {m} rows but x {x.shape} (kmajor={kmajor}) only {x_m}")
    if sum(c.shape[0] for c, _ in buckets) != rows.shape[0]:
        raise ValueError(f"outlier_product_add: rows has {rows.shape[0]} entries, the buckets hold "
                         f"{sum(c.shape[0] for c, _ in buckets)} rows")
    for cols, vals in buckets:
        if cols.shape != vals.shape or cols.ndim != 2:
            raise ValueError(f"outlier_product_add: bucket columns {cols.shape} and values {vals.shape} must be the "
                             "same [n_b, L_b] shape")
    if not _pow2_ceil(chunk) == chunk:
        raise ValueError(f"outlier_product_add: chunk={chunk} must be a power of two")
    if not buckets:
        return y
    mp = _pow2_ceil(m)
    plan = block_plan([c.shape for c, _ in buckets], mp, chunk, tile_elements)
    kernel = functools.partial(_kernel, plan=plan, n_buckets=len(buckets), m=m, n=n, mp=mp, kmajor=kmajor)
    flat = [a for bucket in buckets for a in bucket]
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(y.shape, jnp.float32),
        grid=(sum(p for _, _, p in plan),),
        input_output_aliases={0: 0},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="spqr_outliers",
    )(y, x, rows, *flat)


# --------------------------------------------------------------------------------------- Mosaic GPU variant (M = 1)
THREADS = 128  # one warpgroup per CTA, one bucket row per thread


def sums_plan(bucket_shapes):
    """Per bucket (first CTA, CTAs, first row): CTAs of THREADS bucket rows, bucket after bucket."""
    plan, first_cta, first_row = [], 0, 0
    for n_b, _ in bucket_shapes:
        ctas = -(-n_b // THREADS)
        plan.append((first_cta, ctas, first_row))
        first_cta, first_row = first_cta + ctas, first_row + n_b
    return tuple(plan), first_cta, first_row


def outlier_sums_reference(x, buckets):
    """Pure jnp: the per-bucket-row sums of :func:`outlier_sums_mgpu`, float32 [T + 1] (last entry 0)."""
    xk = x[0].astype(jnp.float32)
    sums = [jnp.sum(vals.astype(jnp.float32) * xk[cols.astype(jnp.int32)], axis=1) for cols, vals in buckets]
    return jnp.concatenate(sums + [jnp.zeros((1,), jnp.float32)])


@jax.jit
def outlier_sums_mgpu(x, buckets):
    """Mosaic GPU kernel, M = 1: x [M_x, K_pad] (row 0 used), buckets ((cols, vals), ...) -> float32 [T + 1]:
    entry t = sum_l vals[t, l] * x[0, cols[t, l]] for bucket row t (buckets in order), entry T = 0, so that
    ``sums[sp_inv]`` is each output row's correction.

    Each CTA (one warpgroup) copies x's row into shared memory (16-byte vectors), then each thread runs one bucket
    row: 16-byte loads of 8 columns and 8 values, 8 shared-memory gathers, float32 multiply-adds in slot order. The
    gathers hit shared memory (a few bank conflicts per warp) instead of L1 lines (one per distinct 128-byte line)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    k_pad = x.shape[1]
    if x.dtype not in (jnp.bfloat16, jnp.float16) or k_pad % 8:
        raise ValueError(f"outlier_sums_mgpu: x must be bfloat16/float16 [M, K_pad], K_pad % 8 == 0; got {x.dtype} "
                         f"{x.shape}")
    for cols, vals in buckets:
        if cols.shape != vals.shape or cols.shape[1] % 8 or vals.dtype != jnp.float16:
            raise ValueError(f"outlier_sums_mgpu: buckets need float16 values and [n_b, L_b] with L_b % 8 == 0, got "
                             f"{cols.shape} {cols.dtype} / {vals.shape} {vals.dtype}")
    plan, ctas, total = sums_plan([c.shape for c, _ in buckets])
    nb = len(buckets)
    x_vecs = k_pad // 8

    @plgpu.inline_mgpu(arg_types=tuple(plgpu.RefType() for _ in range(2 * nb + 3)))
    def run(ctx, x_g, *refs):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, memref, scf, vector
        import jax.experimental.mosaic.gpu as mgpu

        bucket_refs, out_g, x_s = refs[:2 * nb], refs[2 * nb], refs[2 * nb + 1]
        index, f32, i32 = ir.IndexType.get(), ir.F32Type.get(), ir.IntegerType.get_signless(32)
        c = lambda v: arith.constant(index, v)
        tid = arith.index_cast(index, mgpu.utils.thread_idx())
        bid = arith.index_cast(index, mgpu.utils.block_idx())
        x_elt = ir.MemRefType(x_g.type).element_type

        # x row 0 -> shared memory
        for i in range(-(-x_vecs // THREADS)):
            e = arith.addi(tid, c(THREADS * i))
            op = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, e, c(x_vecs)))
            with ir.InsertionPoint(op.then_block):
                k = arith.muli(e, c(8))
                v = vector.load(ir.VectorType.get((8,), x_elt), x_g, [c(0), k])
                vector.store(v, x_s, [k])
                scf.yield_([])
        mgpu.utils.warpgroup_barrier()
        for b, (first_cta, n_ctas, first_row) in enumerate(plan):
            cols_g, vals_g = bucket_refs[2 * b], bucket_refs[2 * b + 1]
            n_b, l_b = ir.MemRefType(cols_g.type).shape
            col_elt = ir.MemRefType(cols_g.type).element_type
            val_elt = ir.MemRefType(vals_g.type).element_type
            t = arith.addi(arith.muli(arith.subi(bid, c(first_cta)), c(THREADS)), tid)
            in_bucket = arith.andi(arith.cmpi(arith.CmpIPredicate.uge, bid, c(first_cta)),
                                   arith.cmpi(arith.CmpIPredicate.ult, bid, c(first_cta + n_ctas)))
            op = scf.IfOp(arith.andi(in_bucket, arith.cmpi(arith.CmpIPredicate.ult, t, c(n_b))))
            with ir.InsertionPoint(op.then_block):
                zero = arith.constant(f32, 0.0)
                loop = scf.ForOp(c(0), c(l_b), c(8), [zero])
                with ir.InsertionPoint(loop.body):
                    l0, acc = loop.induction_variable, loop.inner_iter_args[0]
                    vc = vector.load(ir.VectorType.get((8,), col_elt), cols_g, [t, l0])
                    vv = vector.load(ir.VectorType.get((8,), val_elt), vals_g, [t, l0])
                    for j in range(8):
                        col = vector.extract(vc, [], [j])
                        if ir.IntegerType(col_elt).width < 32:
                            col = arith.extui(i32, col)  # kernel columns < 2**15: the sign bit is 0
                        xv = arith.extf(f32, memref.load(x_s, [arith.index_cast(index, col)]))
                        acc = arith.addf(acc, arith.mulf(arith.extf(f32, vector.extract(vv, [], [j])), xv))
                    scf.yield_([acc])
                memref.store(loop.results[0], out_g, [arith.addi(t, c(first_row))])
                scf.yield_([])
        last = scf.IfOp(arith.andi(arith.cmpi(arith.CmpIPredicate.eq, bid, c(0)),
                               arith.cmpi(arith.CmpIPredicate.eq, tid, c(0))))
        with ir.InsertionPoint(last.then_block):
            memref.store(arith.constant(f32, 0.0), out_g, [c(total)])
            scf.yield_([])

    def body(x_g, *refs):
        pl.run_scoped(lambda x_s: run(x_g, *refs, x_s), plgpu.SMEM((k_pad,), x.dtype))

    mesh = plgpu.Mesh(grid=(ctas,), grid_names=("rows",))
    flat = [a for bucket in buckets for a in bucket]
    return pl.kernel(body, out_type=jax.ShapeDtypeStruct((total + 1,), jnp.float32), mesh=mesh,
                     compiler_params=plgpu.CompilerParams(), name="spqr_outlier_sums")(x, *flat)
