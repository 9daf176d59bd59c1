"""Probe (GPU): a LLaMA decode MLP in one Pallas (Mosaic GPU) kernel, RMSNorm -> gate/up -> SiLU(gate) * up -> down
on GPTQ weights at one activation row, against the path the models run (the norm-fused gate/up ws kernel, XLA's SiLU *
up, the down ws kernel). It tests whether a persistent kernel spanning several linears shortens a decode step.

    python bench/mlp_fused.py [--shapes 4096x11008x4096] [--formats gptq-w4g128] [--out bench/results/mlp_fused.json]
    python bench/mlp_fused.py --table bench/results/mlp_fused.json   # (re)write the markdown only

The kernel (``fused_mlp``): two phases of the stream-K ws kernel (``gptq_matmul.build_ws_kernel``'s step and flush)
sharing one pipeline (``emit_pipeline_warp_specialized``'s pipeline_state: while the compute warpgroups finish
gate/up, the TMA warpgroup already loads down's first blocks), one CTA per SM:

    phase A  gate/up [K, 2I] on the normalised x (the ws kernel's fused RMSNorm) -> float32 partial slots
    barrier  every compute warpgroup of the grid has stored its slots (a ``pl.get_global`` semaphore)
    SwiGLU   thread e of the grid: act[e] = SiLU(gate) * up from the slots, rounded to bf16 after every operation as
             XLA's bf16 elementwise ops are (``swiglu_rounded``) -> act [1, I] in global memory
    barrier  act is complete
    phase B  each compute warpgroup copies act into its shared memory, then down [I, N] on it -> partial slots

Phase grids are rounded up to a multiple of the stages (the pipeline-of-pipelines rule). Check (every case): the kernel
writes into NaN-poisoned buffers and its y must match the float32 oracle and the unfused path at relative error
< 1e-2. Timing, in one run: CUPTI (the sum of one call's kernels, the semaphore's zero fill included) of the unfused
path, the kernel, and the kernel with parts left out (``--variants``: no barriers / no SwiGLU / no act copy / none
of them = the two phases back to back), and the wall time per call of a jitted chain of data-dependent calls.
Measured slower than the unfused path (bench/NOTES_kernels.md, "One kernel for the decode MLP"), so it stays a
probe: the models do not use it.
"""
import argparse
import functools
import os
import statistics
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.decode import random_weight  # noqa: E402
from bench.timing import (copies, cupti, parse_probe_args, rotation_sets, run_checked_probe,  # noqa: E402
                          run_sections)
from jaxquant.kernel_layout import prepare_for_kernels  # noqa: E402
from pallas_kernels import gptq_matmul as gm  # noqa: E402
from pallas_kernels.gptq_matmul import CHUNK, X_VEC, swiglu_rounded  # noqa: E402  (the kernel's SwiGLU arithmetic)

MLP_TILE_K = 256  # both phases share the pipeline's buffers, so one block shape
MLP_WGS = gm.WS_COMPUTE_WGS
SKIPPABLE = ("barriers", "swiglu", "act_load")


def device_sms() -> int:
    """The default device's SM count (a grid barrier needs every CTA resident), or 132 (H100 SXM) when unknown."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def fused_mlp_ok(w_gate_up, w_down, m: int) -> bool:
    """Whether ``fused_mlp`` takes this MLP: one row, GPTQ kernel weights of one bit width / group / dtype in input
    order (no act-order gather, which the fused norm and the act buffer do not do), gate/up = 2 x down's inputs, the
    shared 256-column step fitting both."""
    ws = (w_gate_up, w_down)
    if m != 1 or not all(isinstance(w, gm.GPTQKernelWeight) for w in ws):
        return False
    if any(w.perm is not None for w in ws) or len({(w.bits, w.group, w.dtype_name, w.layout) for w in ws}) != 1:
        return False
    if w_gate_up.out_features != 2 * w_down.in_features or w_down.in_features % CHUNK:
        return False
    return all(gm.ws_pairs(w, MLP_TILE_K) for w in ws)


@functools.lru_cache(maxsize=None)
def mlp_plan(k_pad_a: int, n_pad_a: int, k_pad_b: int, n_pad_b: int, ctas: int):
    """Both phases' stream-K plans on ``ctas`` CTAs and the stages: ((units, steps per unit, slots, grid) of A, of B,
    stages). The shared pipeline needs each phase's grid to be a multiple of the stages, so a phase's grid is rounded
    up with repeated (unstored) last pairs, as ``ws_step`` does for the CTAs with one pair fewer; stages 3 or 4,
    whichever adds fewer steps (3 on a tie)."""
    rows = MLP_WGS * CHUNK
    phases = []
    for k_pad, n_pad in ((k_pad_a, n_pad_a), (k_pad_b, n_pad_b)):
        units, spu = n_pad // rows, k_pad // MLP_TILE_K
        q, r, slots = gm.ws_plan(units, spu, ctas)  # raises where a phase has fewer (unit, step) pairs than CTAs
        phases.append((units, spu, slots, q + (r > 0)))
    stages = min((3, 4), key=lambda s: sum(-(-p[3] // s) * s for p in phases))
    return tuple((u, s, sl, -(-g // stages) * stages) for u, s, sl, g in phases) + (stages,)


def fused_mlp(x2d: jax.Array, norm_scale: jax.Array, eps: float, w_gate_up, w_down, *,
               ctas: Optional[int] = None, out_init=None, skip: tuple = ()) -> jax.Array:
    """down(SiLU(gate) * up) of rms_norm_rows(x) for x [1, K] in the weights' dtype -> [1, N] (float32 partials summed
    here, so XLA can fuse the sum into the residual add). ``out_init``: NaN-poisoned (slots A, act, slots B) buffers
    the kernel writes in place (tests / benchmarks, ``mlp_output_buffers``). ``skip``: timing variants that leave out
    parts between the phases (any of SKIPPABLE; the result is then wrong)."""
    m = gm.check_kernel_input(x2d, w_gate_up, "fused MLP")
    if set(skip) - set(SKIPPABLE):
        raise ValueError(f"skip takes {SKIPPABLE}, got {skip}")
    if not fused_mlp_ok(w_gate_up, w_down, m):
        raise ValueError("fused_mlp takes one row and GPTQ gate/up + down weights of one format in input order, "
                         "gate/up with 2 x down's input features (fused_mlp_ok)")
    if jnp.shape(norm_scale) != (w_gate_up.in_features,):
        raise ValueError(f"the RMSNorm scale must be [{w_gate_up.in_features}], got {jnp.shape(norm_scale)}")
    sms = device_sms()
    ctas = ctas or min(sms, gm.ws_pairs(w_gate_up, MLP_TILE_K), gm.ws_pairs(w_down, MLP_TILE_K))
    if ctas > sms:
        raise ValueError(f"ctas={ctas} exceeds the {sms} SMs: the grid barrier needs every CTA resident")
    call = _build_mlp_call(w_gate_up.k_pad, w_gate_up.n_pad, w_down.k_pad, w_down.n_pad, w_down.in_features,
                           w_gate_up.in_features, float(eps), w_down.bits, w_down.group, w_down.dtype_name,
                           w_down.nbias is not None, w_down.layout, ctas, out_init is not None, tuple(skip))
    args = [w_gate_up.direct_activations(x2d), w_gate_up.direct_activations(jnp.reshape(norm_scale, (1, -1)))[0]]
    for w in (w_gate_up, w_down):
        args += [w.qweight, w.scales] + ([w.nbias] if w.nbias is not None else [])
    outs = call(*args, *(out_init or ()))
    return gm._finish(outs[-1], m, w_down.out_features, x2d.dtype)


def mlp_output_buffers(w_gate_up, w_down, ctas: int, fill=jnp.nan):
    """The kernel's three outputs filled with ``fill``: (float32 slots of gate/up, act [1, I_pad/64, 64], float32
    slots of down)."""
    (_, _, slots_a, _), (_, _, slots_b, _), _ = mlp_plan(w_gate_up.k_pad, w_gate_up.n_pad, w_down.k_pad, w_down.n_pad,
                                                         ctas)
    return (jnp.full((slots_a, w_gate_up.n_pad, 8), fill, jnp.float32),
            jnp.full((1, w_down.k_pad // CHUNK, CHUNK), fill, w_down.dtype),
            jnp.full((slots_b, w_down.n_pad, 8), fill, jnp.float32))


def reference_fused_mlp(x2d: jax.Array, norm_scale: jax.Array, eps: float, w_gate_up, w_down,
                         ctas: int = 132) -> jax.Array:
    """The kernel's computation in jnp with its exact tiling (``gm.reference_ws_partials`` per phase with the plans
    of ``mlp_plan``; the phase-padding steps repeat unstored pairs and add nothing): the fused norm's rounding, the
    float32 slots, the rounded SwiGLU, then down on the staged act. For CPU tests."""
    stages = mlp_plan(w_gate_up.k_pad, w_gate_up.n_pad, w_down.k_pad, w_down.n_pad, ctas)[-1]

    def partials(w, x):
        cfg = gm.KernelConfig(variant="ws", tile_k=MLP_TILE_K, stages=stages, ctas=ctas, wgs=MLP_WGS, fused=False,
                              post_scale=_post_scale(w.bits))
        xk = gm.staged_x_reference(w.direct_activations(x), w.k_pad, MLP_TILE_K).astype(w.dtype)
        return gm.reference_ws_partials(xk, w, cfg, lambda tile, k, x_blk: gm._block_product(
            w, tile, k, MLP_TILE_K, x_blk, cfg.post_scale))

    gate_up = partials(w_gate_up, gm.rms_norm_rows(x2d, norm_scale, eps)).sum(0)[:, 0]  # the SwiGLU reads slots
    inter = w_down.in_features
    act = swiglu_rounded(gate_up[:inter].astype(x2d.dtype), gate_up[inter:2 * inter].astype(x2d.dtype))
    return gm._finish(partials(w_down, act[None, :]), 1, w_down.out_features, x2d.dtype)


def _post_scale(bits: int) -> bool:
    """The ws kernel's choice (``KernelConfig.resolved``): scales after the wgmma for 3-bit codes only."""
    return bool(gm.POST_SCALE and bits == 3)


# ------------------------------------------------------------------------------------------------------------ kernel
@functools.lru_cache(maxsize=None)
def _build_mlp_call(k_pad_a, n_pad_a, k_pad_b, n_pad_b, inter, k_true, eps, bits, group, dtype_name, has_bias,
                    layout, ctas, aliased, skip=()):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = jnp.dtype(dtype_name)
    wgs, tile_k = MLP_WGS, MLP_TILE_K
    rows = wgs * CHUNK
    plan_a, plan_b, stages = mlp_plan(k_pad_a, n_pad_a, k_pad_b, n_pad_b, ctas)
    gps = max(1, tile_k // group)
    post_scale = _post_scale(bits)
    products = gm._Products(bits, tile_k, group, gps, dtype_name, has_bias, 8, "full", layout, post_scale,
                            wg_local=True)
    zero_x, stage_norm = gm._make_x_stage(1, tile_k, dtype_name, wg_local=True, norm=True)
    _, stage_plain = gm._make_x_stage(1, tile_k, dtype_name, wg_local=True)
    row_rms = gm._make_row_rms(1, k_true=k_true, eps=eps)
    swiglu = _make_swiglu(inter, k_pad_b, plan_a[2], wgs)
    load_act = _make_load_act(k_pad_b)
    n_side = 1 + has_bias

    def body(x_gmem, nscale_gmem, *refs):
        w_a, side_a = refs[0], refs[1:1 + n_side]
        w_b, side_b = refs[1 + n_side], refs[2 + n_side:2 + 2 * n_side]
        slots_a_gmem, act_gmem, slots_b_gmem = refs[2 + 2 * n_side:]
        cta = jax.lax.axis_index("n")
        if "barriers" not in skip:  # Pallas zero-fills it before every call
            sem = pl.get_global(plgpu.SemaphoreType.REGULAR((2,)))
        scratch = {}  # the scoped buffers, set in ``scope`` before the pipelines are traced

        def grid_barrier(i):
            plgpu.semaphore_signal(sem.at[i], 1, memory_scope="gpu")
            plgpu.semaphore_wait(sem.at[i], wgs * ctas, decrement=False, memory_scope="gpu")

        def zeros():
            return plgpu.layout_cast(jnp.full((CHUNK, 8), 0, jnp.float32), plgpu.Layout.WGMMA)

        def make_pipeline(plan, out_gmem, is_b: bool, state, context):
            units, spu, slots, grid = plan

            def unit_k(t):
                unit, k, *_ = gm.ws_step(t, cta, units, spu, ctas)
                return unit, k

            # phase B stages act from shared memory: its x and norm-scale blocks are placeholders of the shared
            # buffers' shapes (block 0; the pipeline needs index maps that use the step)
            in_specs = [
                gm.direct_x_block_spec(1, tile_k, (lambda t: t * 0) if is_b else (lambda t: unit_k(t)[1])),
                plgpu.BlockSpec((wgs, tile_k // CHUNK, bits, 128), lambda t: (*unit_k(t), 0, 0)),
                *[plgpu.BlockSpec((gps, rows), lambda t: (gm._scale_block_index(unit_k(t)[1], tile_k, group),
                                                          unit_k(t)[0])) for _ in range(n_side)],
                plgpu.BlockSpec((tile_k // CHUNK, CHUNK), (lambda t: (t * 0, 0)) if is_b
                                else (lambda t: (unit_k(t)[1], 0))),
            ]

            def step(idx, x_smem, w_smem, *rest):
                *side, n_smem, acc = rest
                wg = jax.lax.axis_index("wg")
                (t,) = idx
                unit, k, flush, slot, pieces = gm.ws_step(t, cta, units, spu, ctas)
                cols = pl.ds(wg * CHUNK, CHUNK)
                a = products.dequant(w_smem.at[wg], *(s.at[:, cols] for s in side))
                x_pad = scratch["x_pad"]
                if is_b:  # this step's block of act
                    stage_plain(scratch["act"].at[wg, :, pl.ds(k * (tile_k // CHUNK), tile_k // CHUNK)], x_pad)
                else:  # the fused norm on the way into the wgmma's tile
                    stage_norm(x_smem, n_smem, x_pad, scratch["norm"])
                acc = (products.accumulate(acc, a, x_pad.at[wg], side[0].at[:, cols]) if post_scale
                       else gm.ws_wgmma(acc, a, x_pad.at[wg]))

                @pl.when(flush)
                def _():
                    gm.ws_store_partial(acc, scratch["acc"], scratch["zero"], out_gmem, wg=wg,
                                        row0=(unit * wgs + wg) * CHUNK, slot=slot, pieces=pieces, slots=slots)

                return acc * jnp.where(flush, 0.0, 1.0).astype(jnp.float32)  # reset after a flush

            return plgpu.emit_pipeline_warp_specialized(
                step, grid=(grid,), memory_registers=gm.WS_MEMORY_REGISTERS, in_specs=in_specs,
                max_concurrent_steps=stages, wg_axis="wg", num_compute_wgs=wgs, compute_context=context,
                pipeline_state=state)

        def context_a(eval_pipeline):
            wg = jax.lax.axis_index("wg")
            with jax.named_scope("prologue"):
                zero_x(scratch["x_pad"])  # rows 1..7 of the wgmma's x tile stay zero in both phases
                row_rms(x_gmem, scratch["norm"])
                scratch["zero"].at[wg][...] = zeros()  # the zero tile for the slots a unit's pieces leave
            eval_pipeline(zeros())
            plgpu.wait_smem_to_gmem(0)  # this warpgroup's gate/up slots are in global memory

        def context_b(eval_pipeline):
            with jax.named_scope("swiglu"):  # ``skip``: timing variants that leave parts out (wrong results)
                if "barriers" not in skip:
                    grid_barrier(0)
                if "swiglu" not in skip:
                    swiglu(slots_a_gmem, act_gmem)
                if "barriers" not in skip:
                    grid_barrier(1)
                if "act_load" not in skip:
                    load_act(act_gmem, scratch["act"])
            eval_pipeline(zeros())
            plgpu.wait_smem_to_gmem(0)

        pipe_a = make_pipeline(plan_a, slots_a_gmem, False, plgpu.PipelinePipeline.START, context_a)
        pipe_b = make_pipeline(plan_b, slots_b_gmem, True, plgpu.PipelinePipeline.STOP, context_b)

        def scope(acc_smem, zero_smem, x_pad, norm_scratch, act_smem, **allocs):
            scratch.update(acc=acc_smem, zero=zero_smem, x_pad=x_pad, norm=norm_scratch, act=act_smem)
            pipe_a(x_gmem, w_a, *side_a, nscale_gmem, allocations=allocs)
            pipe_b(x_gmem, w_b, *side_b, nscale_gmem, allocations=allocs)

        pl.run_scoped(scope, plgpu.SMEM((wgs, CHUNK, 8), jnp.float32), plgpu.SMEM((wgs, CHUNK, 8), jnp.float32),
                      plgpu.SMEM((wgs, 8, tile_k), dtype, transforms=gm.x_smem_transforms(dtype)),
                      plgpu.SMEM((wgs, gm.NORM_SCRATCH), jnp.float32),
                      plgpu.SMEM((wgs, 1, k_pad_b // CHUNK, CHUNK), dtype),
                      **pipe_a.get_allocations(x_gmem, w_a, *side_a, nscale_gmem), collective_axes="wg")

    out_type = (jax.ShapeDtypeStruct((plan_a[2], n_pad_a, 8), jnp.float32),
                jax.ShapeDtypeStruct((1, k_pad_b // CHUNK, CHUNK), dtype),
                jax.ShapeDtypeStruct((plan_b[2], n_pad_b, 8), jnp.float32))
    mesh = plgpu.Mesh(grid=(ctas,), grid_names=("n",), num_threads=wgs + 1, thread_name="wg")
    return gm.mesh_kernel(body, out_type=out_type, mesh=mesh, name=f"gptq_w{bits}_fused_mlp_ws{ctas}",
                          aliased=aliased)


def _make_swiglu(inter: int, k_pad_b: int, slots: int, wgs: int):
    """inline_mgpu ``swiglu(slots_a, act)`` run by every compute warpgroup of the grid: thread e = 128 * (wgs * CTA +
    warpgroup) + lane index of the grid writes act[e] (e < K_pad of down; zero past I) = SiLU(gate) * up with gate
    = the sum of slots [s, e, 0], up = of [s, I + e, 0], both rounded to bf16, then ``swiglu_rounded``; then a
    warpgroup barrier (the grid barrier's signal that follows releases the stores)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
    def swiglu(ctx, slots_ref, act_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, gpu, memref, scf
        from jax._src.lib.mlir.dialects import math as mlir_math
        import jax.experimental.mosaic.gpu as mgpu

        index, f32 = ir.IndexType.get(), ir.F32Type.get()
        dt = ir.MemRefType(act_ref.type).element_type
        idx = lambda v: arith.constant(index, v)  # noqa: E731
        tid = arith.index_cast(index, mgpu.utils.thread_idx())
        e = arith.addi(arith.muli(gpu.block_id(gpu.Dimension.x), idx(wgs * 128)), tid)
        if_op = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, e, idx(k_pad_b)))
        with ir.InsertionPoint(if_op.then_block):
            inside = arith.cmpi(arith.CmpIPredicate.ult, e, idx(inter))
            e_in = arith.select(inside, e, idx(0))
            gate = up = arith.constant(f32, 0.0)
            for s in range(slots):
                gate = arith.addf(gate, memref.load(slots_ref, [idx(s), e_in, idx(0)]))
                up = arith.addf(up, memref.load(slots_ref, [idx(s), arith.addi(e_in, idx(inter)), idx(0)]))
            rnd = lambda v: arith.extf(f32, arith.truncf(dt, v))  # noqa: E731
            g, u = rnd(gate), rnd(up)
            one = arith.constant(f32, 1.0)
            sig = rnd(arith.divf(one, rnd(arith.addf(one, rnd(mlir_math.exp(arith.negf(g)))))))
            out = arith.truncf(dt, arith.mulf(rnd(arith.mulf(g, sig)), u))
            out = arith.select(inside, out, arith.constant(dt, 0.0))
            memref.store(out, act_ref, [idx(0), arith.divui(e, idx(CHUNK)), arith.remui(e, idx(CHUNK))])
            scf.yield_([])
        mgpu.utils.warpgroup_barrier()

    return swiglu


def _make_load_act(k_pad_b: int):
    """inline_mgpu ``load_act(act_gmem, act_smem)``: the warpgroup copies act [1, K/64, 64] into its own
    act_smem[wg] (16-byte vectors), then a warpgroup barrier (the staging of every phase-B step reads it)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n_vec = k_pad_b // X_VEC

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
    def load_act(ctx, act_ref, smem_ref):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, scf, vector
        import jax.experimental.mosaic.gpu as mgpu

        index = ir.IndexType.get()
        idx = lambda v: arith.constant(index, v)  # noqa: E731
        tid_all = arith.index_cast(index, mgpu.utils.thread_idx())
        tid, wg = arith.remui(tid_all, idx(128)), arith.divui(tid_all, idx(128))
        vec_ty = ir.VectorType.get((X_VEC,), ir.MemRefType(act_ref.type).element_type)
        per_row = CHUNK // X_VEC
        for i in range(-(-n_vec // 128)):
            e = arith.addi(tid, idx(128 * i))
            if_op = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, e, idx(n_vec)))
            with ir.InsertionPoint(if_op.then_block):
                c, q = arith.divui(e, idx(per_row)), arith.muli(arith.remui(e, idx(per_row)), idx(X_VEC))
                vector.store(vector.load(vec_ty, act_ref, [idx(0), c, q]), smem_ref, [wg, idx(0), c, q])
                scf.yield_([])
        mgpu.utils.warpgroup_barrier()

    return load_act


def numpy_mlp_oracle(x, norm_scale, eps, w_gate, w_up, w_down) -> np.ndarray:
    """float64 numpy: RMSNorm (HF LLaMA), then down(SiLU(x @ gate) * (x @ up)) with dense float weights [K, I] /
    [I, N]; the tests' independent oracle."""
    x = np.asarray(x, np.float64)
    xn = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(norm_scale, np.float64)
    g, u = xn @ np.asarray(w_gate, np.float64), xn @ np.asarray(w_up, np.float64)
    return (g / (1.0 + np.exp(-g)) * u) @ np.asarray(w_down, np.float64)


# --------------------------------------------------------------------------------------------------------- benchmark
EPS = 1e-5
CHECK_SHAPES = ["4096x11008x4096", "1024x1536x768"]  # K x I x N (the second: a few pairs per CTA, uneven grids)


def case_inputs(key, K, I, N, fmt):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    ws = prepare_for_kernels({"gu": random_weight(k1, fmt, K, 2 * I), "dn": random_weight(k2, fmt, I, N)})
    x = (3.0 * jax.random.normal(k3, (1, K), jnp.float32)).astype(jnp.bfloat16)
    scale = (1.0 + 0.5 * jax.random.normal(k4, (K,), jnp.float32)).astype(jnp.bfloat16)
    return ws["gu"], ws["dn"], x, scale


def unfused(x, scale, w_gu, w_dn):
    """The path the kernel replaces: norm-fused gate/up kernel, XLA SiLU * up, down kernel."""
    inter = w_dn.in_features
    gate_up = w_gu.matmul(x, rms_norm=(scale, EPS))
    return w_dn.matmul(jax.nn.silu(gate_up[:, :inter]) * gate_up[:, inter:])


def kernel(skip=()):
    """The fused kernel as a benchmark function (``skip``: a timing variant)."""
    return lambda x, scale, w_gu, w_dn: fused_mlp(x, scale, EPS, w_gu, w_dn, skip=skip)


def oracle(x, scale, w_gu, w_dn):
    inter = w_dn.in_features
    xn = np.asarray(gm.rms_norm_rows(x, scale, EPS), np.float32)
    gu = xn @ np.asarray(w_gu.dequantize(jnp.float32), np.float32)
    g, u = gu[:, :inter], gu[:, inter:]
    return (g / (1 + np.exp(-g)) * u) @ np.asarray(w_dn.dequantize(jnp.float32), np.float32)


def check(key, formats) -> list:
    rows = []
    for i, (shape, fmt) in enumerate((s, f) for s in CHECK_SHAPES for f in formats):
        K, I, N = map(int, shape.split("x"))
        w_gu, w_dn, x, scale = case_inputs(jax.random.fold_in(key, i), K, I, N, fmt)
        ctas = device_sms() if K >= 4096 else 29
        poison = mlp_output_buffers(w_gu, w_dn, ctas)
        got = np.asarray(fused_mlp(x, scale, EPS, w_gu, w_dn, ctas=ctas, out_init=poison), np.float32)
        want, base = oracle(x, scale, w_gu, w_dn), np.asarray(unfused(x, scale, w_gu, w_dn), np.float32)
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        vs_unfused = float(np.linalg.norm(got - base) / np.linalg.norm(base))
        ok = bool(np.isfinite(got).all() and err < 1e-2 and vs_unfused < 1e-2)
        print(f"check {shape} {fmt} ctas={ctas}: rel err {err:.2e} vs f32, {vs_unfused:.2e} vs unfused -> "
              f"{'ok' if ok else 'FAIL'}", flush=True)
        rows.append(dict(kind="check", shape=shape, format=fmt, ctas=ctas, rel_err=err, rel_err_vs_unfused=vs_unfused,
                         ok=ok))
    return rows


def chain_wall_us(fn, sets, chain: int, reps: int) -> float:
    """Wall us per call of ``chain`` data-dependent calls (each call's x = the previous y), weights rotating."""
    def run(x, scale, *ws):
        for i in range(chain):
            w_gu, w_dn = ws[2 * (i % (len(ws) // 2))], ws[2 * (i % (len(ws) // 2)) + 1]
            x = fn(x, scale, w_gu, w_dn)
        return x

    flat = [w for s in sets for w in s[2:]]
    f = jax.jit(run)
    jax.block_until_ready(f(sets[0][0], sets[0][1], *flat))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(sets[0][0], sets[0][1], *flat))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / chain * 1e6


VARIANTS = {"fused": (), "no_barriers": ("barriers",), "no_swiglu": ("swiglu",), "no_act_load": ("act_load",),
            "phases_only": SKIPPABLE}


def timing(key, shapes, formats, variants, rounds, chain, reps, passes) -> list:
    """Per pass: the unfused path, then every variant of the kernel, CUPTI per call and (unfused / fused only) the
    chain's wall time per call."""
    rows = []
    for fmt, shape in ((f, s) for f in formats for s in shapes):
        K, I, N = map(int, shape.split("x"))
        w_gu, w_dn, x, scale = case_inputs(key, K, I, N, fmt)
        n = rotation_sets(w_gu.nbytes + w_dn.nbytes, 8)
        sets = [(x * (1 + i / 8), scale, a, b) for i, (a, b) in enumerate(copies((w_gu, w_dn), n))]
        for p in range(passes):
            for name in ["unfused"] + variants:
                fn = unfused if name == "unfused" else kernel(VARIANTS[name])
                total, kern, per = cupti(fn, sets, rounds=rounds, match="mosaic")
                wall = chain_wall_us(fn, sets, chain, reps) if name in ("unfused", "fused") else None
                rows.append(dict(kind="timing", format=fmt, shape=shape, pass_=p, path=name, skip=list(VARIANTS.get(
                    name, ())), us=round(total, 2), pallas_us=round(kern, 2), kernels=per, rotation=n,
                    chain_calls=chain, chain_wall_us=wall and round(wall, 2)))
                print(f"{fmt} {shape} pass {p} {name:12s} CUPTI {total:7.2f} us (Pallas {kern:6.2f}), chain wall "
                      f"{wall or float('nan'):7.2f} us/call  {per}", flush=True)
    return rows


def write_table(rows: list, path: str) -> None:
    lines = ["# Decode MLP in one kernel (bench/mlp_fused.py) vs norm-fused gate/up + XLA SiLU * up + down", ""]
    for header, run in run_sections(rows):
        lines += header
        checks = [r for r in run if r["kind"] == "check"]
        if checks:
            lines += ["| check K x I x N | format | CTAs | rel err vs f32 | vs unfused | ok |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['shape']} | {r['format']} | {r['ctas']} | {r['rel_err']:.2e} | "
                      f"{r['rel_err_vs_unfused']:.2e} | {r['ok']} |" for r in checks] + [""]
        timings = [r for r in run if r["kind"] == "timing"]
        if timings:
            lines += ["CUPTI us = every kernel of one call (median over the weight rotation; the fused kernel's "
                      "semaphore zero fill is one of them); chain = wall us per call of a jitted chain of "
                      "data-dependent calls (bound by the host's kernel launches at these sizes: the decode A/B in "
                      "decode_fused_mlp.md is the device-bound comparison). Variants leave parts out of the kernel "
                      "(wrong results, timing only):", "",
                      "| format | K x I x N | pass | path | CUPTI us | Pallas us | chain us/call | kernels (us) |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['format']} | {r['shape']} | {r['pass_']} | {r['path']} | {r['us']} | {r['pallas_us']} | "
                      f"{r['chain_wall_us'] if r['chain_wall_us'] is not None else '-'} | "
                      f"{'; '.join(f'{n} {t}' for n, t in r['kernels'])} |" for r in timings] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="4096x11008x4096")
    ap.add_argument("--formats", default="gptq-w4g128")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chain", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="kernel variants timed after the unfused path")
    ap.add_argument("--no-timing", action="store_true")
    args = parse_probe_args(ap, write_table)
    if args is None:
        return
    key = jax.random.PRNGKey(int.from_bytes(os.urandom(3), "little"))
    formats = args.formats.split(",")
    run_checked_probe(args, "mlp_fused", write_table, lambda: check(key, formats),
                      lambda: timing(key, args.shapes.split(","), formats, args.variants.split(","), args.rounds,
                                     args.chain, args.reps, args.passes), eps=EPS)


if __name__ == "__main__":
    main()
