"""Decode-step attention (one new token per sequence against a KV cache): Mosaic GPU (Hopper) Pallas kernel + jnp
reference.

    q [B, Fq], k [B, Fk], v [B, Fv] (the new token's projections; query head h is q[:, oq + h D : oq + (h + 1) D],
    kv head g is k[:, ok + g D : ...] and v[:, ov + g D : ...] for the static ``offsets`` (oq, ok, ov), so the three
    may be one fused q/k/v output passed three times; or all three float32 partial slots [P, F, M >= B] of a
    quantized projection (``gptq_matmul.PartialSums``): the source is then their sum over P, transposed and rounded
    to the cache dtype, summed here), cache_k / cache_v [B, S, KV, D], index (int32 scalar: the
    cache slot of the new token), key_valid [B, S] (0 = a padding key), and optionally RoPE: positions [B] and
    inv_freq [R] (rotate-half over the first 2 R dims of q's and k's heads, as ``models.common.apply_rope``)
      ->  out [B, H * D] in the cache dtype (q's), and the two caches with slot ``index`` := the new k / v (in place).

Query head h attends to kv head h // (H // KV) at the slots j <= index with key_valid[b, j] != 0; the new token's
own slot always counts (so a row never has no key). The arithmetic is the models' XLA path (``apply_rope``,
``update_cache``, ``dot_product_attention``): RoPE in float32 rounded to q's dtype, scores q . k in float32 times
``scale``, softmax in float32 (exp(s - max) / sum), the probabilities rounded to q's dtype, P @ V accumulated in
float32 and rounded once.

Why a kernel: in a LLaMA-7B decode step XLA runs this as ~6 kernels of 1.1-3.3 us each (cache updates, scores,
exp, convert, P @ V; bench/NOTES_kernels.md "Decode step anatomy"), ~11 us per layer for ~1 MB of cache. Here it
is one kernel: ``parts`` CTAs (one warpgroup, 128 threads each; a thread-block cluster when parts > 1,
``cluster_parts``) per (sequence, kv head), all in registers and shared memory. CTA ``part`` takes the 128-slot
chunks part, part + parts, ...:

  1. q's G = H / KV heads and the new k and v (RoPE applied on the way) -> shared memory (float32); the new k / v
     row -> the caches.
  2. Scores: thread t takes key j = 128 c + t of its chunks c (16-byte loads along the key's row) up to ``index``;
     masked keys get -inf. Max over the CTA (warp shuffles, then the 4 warps through shared memory), then over the
     cluster (each CTA's max through distributed shared memory, after a cluster barrier).
  3. exp(s - max) in place, the sum over the CTA and the cluster the same way, then p = round(e / sum) in place:
     the probabilities are exactly the one-CTA ones.
  4. P @ V: thread t owns 8 consecutive dims (t % (D / 8)) of every ``lanes`` = 128 / (D / 8)-th key (t // (D / 8))
     of its chunks, 16-byte loads, 4 keys in flight; the lanes' partial sums meet in shared memory, the cluster's
     CTAs' sums in rank order in the first CTA, which stores each output element once.

Keys past ``index`` are never read. Shared memory holds G x round_up(S, 128) float32 scores, so the cache length
is bounded (``fits``); the models fall back to XLA beyond it and where ``models.common.decode_kernel_ok`` says so.
Measured on an H100 (bench/results/decode_attention_kernel.md, 32 heads, head_dim 128, RoPE + cache write +
attention): faster than XLA's and cuDNN's attention at 81-4096 slots at batch 1 and 16, e.g. 4.7 vs 11.0 / 9.1 us
at 81 slots and 29.5 vs 64.2 / 37.1 us at 4096 slots at batch 1 (8 CTAs per head there; one CTA per head: 78 us).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp

THREADS = 128  # one warpgroup per CTA
VEC = 8  # 16-byte vectors of 16-bit values
UNROLL = 4  # keys in flight per thread in P @ V
SMEM_LIMIT = 200 * 1024  # bytes of shared memory the kernel may use (H100: 227 KB per CTA)
_DTYPES = (jnp.bfloat16, jnp.float16)


def smem_bytes(g: int, s: int, d: int) -> int:
    """Shared memory of one CTA: q [G, D], (k_new, v_new) [2, D], scores [G, S_pad], warp partials [2, 4, G], the
    P @ V lanes [lanes, G, D] and the cluster exchange [3, G * D], all float32."""
    s_pad = -(-s // THREADS) * THREADS
    lanes = THREADS // (d // VEC)
    return 4 * (g * d + 2 * d + g * s_pad + 2 * 4 * g + lanes * g * d + 3 * g * d)


# L2 prefetch of each CTA's cache rows at the kernel's start (``prefetches``): on by default, "0" turns it off (the
# same-run comparisons in bench/results/decode_step_levers.md). Read at trace time.
PREFETCH = os.environ.get("JAXQUANT_DECODE_ATTENTION_PREFETCH", "1") != "0"


def prefetches(s: int, parts: int) -> bool:
    """Whether the kernel prefetches its cache rows into L2 first: where every CTA has one 128-slot chunk (measured
    in LLaMA-7B decode steps at 81 slots: the kernel 173 -> 152 us per step; at 2048 slots, 8 CTAs per head, the
    L2-warm probe lost 2 us, and prefetching every chunk cost batch 16 24 %)."""
    return PREFETCH and -(-s // THREADS) <= parts
MAX_PARTS = 8  # CTAs per (sequence, kv head): a thread-block cluster (portable size limit)
TARGET_CTAS = 264  # ~2 CTAs per H100 SM


def cluster_parts(b: int, kv: int, s: int) -> int:
    """CTAs per (sequence, kv head): enough that the call has ~TARGET_CTAS CTAs, at most one per 128-slot chunk of
    the cache and MAX_PARTS. Each CTA takes the chunks part, part + parts, ... up to the index; the cluster combines
    the softmax statistics and the P @ V partial sums through distributed shared memory."""
    chunks = -(-s // THREADS)
    return max(1, min(MAX_PARTS, chunks, -(-TARGET_CTAS // (b * kv))))


def check_shapes(q, k, v, cache_k, cache_v, num_heads: int, offsets) -> tuple[int, int, int, int]:
    """(B, KV, S, D) after checking the operands; ValueError naming the problem otherwise."""
    if cache_k.ndim != 4 or cache_v.shape != cache_k.shape or cache_v.dtype != cache_k.dtype:
        raise ValueError(f"decode_attention: caches {cache_k.shape} {cache_k.dtype} / {cache_v.shape} "
                         f"{cache_v.dtype} must both be [B, S, KV, D] of one dtype")
    b, s, kv, d = cache_k.shape
    if num_heads % kv:
        raise ValueError(f"decode_attention: {num_heads} query heads are not a multiple of {kv} kv heads")
    slotted = q.ndim == 3
    for name, x, off, heads in (("q", q, offsets[0], num_heads), ("k", k, offsets[1], kv), ("v", v, offsets[2], kv)):
        if slotted:
            if x.ndim != 3 or x.shape[2] < b or off < 0 or off + heads * d > x.shape[1] or x.dtype != jnp.float32:
                raise ValueError(f"decode_attention: {name} {x.shape} {x.dtype} must be float32 partial slots [P, F, "
                                 f"M >= B={b}] (as q) holding {heads} heads of {d} features from offset {off}")
        elif x.ndim != 2 or x.shape[0] != b or off < 0 or off + heads * d > x.shape[1]:
            raise ValueError(f"decode_attention: {name} {x.shape} must be [B={b}, F] holding {heads} heads of {d} "
                             f"features from offset {off}")
    return b, kv, s, d


def source_values(x, b: int, dtype):
    """A q / k / v source as [B, F] in ``dtype``: x itself, or partial slots [P, F, M] summed and rounded (the
    matmul kernels' own finish)."""
    if x.ndim != 3:
        return x
    from pallas_kernels.gptq_matmul import PartialSums

    return PartialSums(x, b, x.shape[1], jnp.dtype(dtype).name).value()


def fits(h: int, kv: int, s: int, d: int, dtype, cache_dtype, rope_dims: int = 0) -> Optional[str]:
    """None if the kernel takes these sizes, else why not (head_dim, dtypes, RoPE dims, shared memory)."""
    if d % VEC or THREADS % (d // VEC):
        return f"head_dim {d}: the kernel needs D / 8 to divide 128 (D in 8, 16, ..., 1024)"
    if jnp.dtype(dtype) not in _DTYPES or jnp.dtype(cache_dtype) not in _DTYPES:
        return f"dtypes {jnp.dtype(dtype)} / cache {jnp.dtype(cache_dtype)}: the kernel takes bfloat16 / float16"
    if rope_dims > d:
        return f"RoPE over {rope_dims} dims of {d}-dim heads"
    need = smem_bytes(h // kv, s, d)
    if need > SMEM_LIMIT:
        return f"{need} bytes of shared memory for {h // kv} heads x {s} cache slots (limit {SMEM_LIMIT})"
    return None


def _heads(x, offset: int, heads: int, d: int):
    return x[:, offset:offset + heads * d].reshape(x.shape[0], heads, d)


def _rope(x, positions, inv_freq):
    """Rotate-half RoPE of x [B, heads, D] at positions [B] in float32, rounded to x's dtype (``apply_rope``)."""
    rot = 2 * inv_freq.shape[0]
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]
    x_rot = x[..., :rot].astype(jnp.float32)
    rotated = jnp.concatenate([-x_rot[..., rot // 2:], x_rot[..., :rot // 2]], axis=-1)
    out = (x_rot * jnp.cos(emb) + rotated * jnp.sin(emb)).astype(x.dtype)
    return jnp.concatenate([out, x[..., rot:]], axis=-1)


def reference_decode_attention(q, k, v, cache_k, cache_v, index, key_valid=None, positions=None, inv_freq=None, *,
                               num_heads: int, offsets=(0, 0, 0), scale: Optional[float] = None):
    """Pure jnp, same contract and arithmetic as :func:`decode_attention`."""
    b, kv, s, d = check_shapes(q, k, v, cache_k, cache_v, num_heads, offsets)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = (source_values(x, b, cache_k.dtype) for x in (q, k, v))
    qh, kh, vh = _heads(q, offsets[0], num_heads, d), _heads(k, offsets[1], kv, d), _heads(v, offsets[2], kv, d)
    if inv_freq is not None:
        qh, kh = _rope(qh, positions, inv_freq), _rope(kh, positions, inv_freq)
    idx = jnp.clip(jnp.asarray(index, jnp.int32), 0, s - 1)
    zero = jnp.zeros((), jnp.int32)
    ck = jax.lax.dynamic_update_slice(cache_k, kh.astype(cache_k.dtype)[:, None], (zero, idx, zero, zero))
    cv = jax.lax.dynamic_update_slice(cache_v, vh.astype(cache_v.dtype)[:, None], (zero, idx, zero, zero))
    g = num_heads // kv
    qg = qh.reshape(b, kv, g, d).astype(jnp.float32)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, ck.astype(jnp.float32)) * scale
    j = jnp.arange(s)
    ok = (j <= idx)[None, :]
    if key_valid is not None:
        ok = ok & ((key_valid != 0) | (j == idx)[None, :])
    scores = jnp.where(ok[:, None, None, :], scores, -jnp.inf)
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    p = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(q.dtype).astype(jnp.float32)
    values = jnp.where(ok[:, :, None, None], cv.astype(jnp.float32), 0.0)  # the kernel never reads masked slots
    out = jnp.einsum("bkgs,bskd->bkgd", p, values)
    return out.reshape(b, num_heads * d).astype(q.dtype), ck, cv


def _make_body(h: int, kv: int, s: int, d: int, scale: float, offsets, rope_half: int, parts: int, slots: int,
               prefetch: bool):
    """inline_mgpu function of the whole kernel (module docstring), run by the CTA's one warpgroup. ``rope_half``:
    R of RoPE (0: none). ``parts``: CTAs (one thread-block cluster) per (sequence, kv head). ``slots``: P of
    partial-slot sources (0: [B, F] sources). ``prefetch``: L2 prefetches of the CTA's cache rows first."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    g_heads = h // kv
    nvd = d // VEC  # 16-byte vectors per row
    lanes = THREADS // nvd  # keys in parallel in P @ V
    s_pad = -(-s // THREADS) * THREADS

    @plgpu.inline_mgpu(arg_types=tuple(plgpu.RefType() for _ in range(16)))
    def run(ctx, q_g, k_g, v_g, valid_g, index_g, pos_g, freq_g, ck_g, cv_g, out_g, q_s, new_s, sc_s, red_s, pv_s,
            xch_s):
        del ctx
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, scf, vector
        from jax._src.lib.mlir.dialects import math as mlir_math
        import jax.experimental.mosaic.gpu as mgpu

        index, f32, i32 = ir.IndexType.get(), ir.F32Type.get(), ir.IntegerType.get_signless(32)
        c = lambda v: arith.constant(index, v)  # noqa: E731
        fc = lambda v: arith.constant(f32, v)  # noqa: E731
        vec_f32 = ir.VectorType.get((VEC,), f32)
        elt = ir.MemRefType(ck_g.type).element_type  # = q's, k's, v's (``fits``)
        vec_cache = ir.VectorType.get((VEC,), elt)
        ult = lambda a, bb: arith.cmpi(arith.CmpIPredicate.ult, a, bb)  # noqa: E731
        ule = lambda a, bb: arith.cmpi(arith.CmpIPredicate.ule, a, bb)  # noqa: E731
        eq = lambda a, bb: arith.cmpi(arith.CmpIPredicate.eq, a, bb)  # noqa: E731

        def when(cond, fn):
            op = scf.IfOp(cond)
            with ir.InsertionPoint(op.then_block):
                fn()
                scf.yield_([])

        def strided(n, fn):  # fn(e) for e = tid, tid + 128, ... < n
            for i in range(-(-n // THREADS)):
                e = arith.addi(tid, c(THREADS * i))
                if THREADS * (i + 1) <= n:
                    fn(e)
                else:
                    when(ult(e, c(n)), lambda e=e: fn(e))

        tid = arith.index_cast(index, mgpu.utils.thread_idx())
        bid = arith.divui(arith.index_cast(index, mgpu.utils.block_idx()), c(parts))  # the cluster: (b, kv head)
        part = gpu.cluster_block_id(gpu.Dimension.x) if parts > 1 else c(0)  # this CTA's chunks: part + parts i
        bb, kvh = arith.divui(bid, c(kv)), arith.remui(bid, c(kv))
        lane, warp = arith.remui(tid, c(32)), arith.divui(tid, c(32))
        raw = memref.load(index_g, [c(0)])  # clamped to [0, S - 1], as dynamic_update_slice clamps
        idx = arith.index_cast(index, arith.maxsi(arith.minsi(raw, arith.constant(i32, s - 1)),
                                                  arith.constant(i32, 0)))
        head0 = arith.muli(kvh, c(g_heads))
        if prefetch:  # the K and V rows of this CTA's one chunk (thread t: key 128 part + t) -> L2 now, so their
            # HBM latency overlaps the staging below and the scores (a decode step finds its cache cold in L2)
            i64 = ir.IntegerType.get_signless(64)
            elt_bytes = mgpu.utils.bitwidth(elt) // 8

            def prefetch_row(ref, j):
                row = arith.addi(arith.muli(arith.addi(arith.muli(bb, c(s)), j), c(kv)), kvh)
                base = llvm.ptrtoint(i64, mgpu.utils.memref_ptr(ref))
                addr = arith.addi(base, arith.index_cast(i64, arith.muli(row, c(d * elt_bytes))))
                for line in range(-(-d * elt_bytes // 128)):
                    llvm.inline_asm(ir.Type.parse("!llvm.void"), [arith.addi(addr, arith.constant(i64, 128 * line))],
                                    "prefetch.global.L2 [$0];", "l", has_side_effects=True)

            j = arith.addi(arith.muli(part, c(THREADS)), tid)
            when(ule(j, idx), lambda: (prefetch_row(ck_g, j), prefetch_row(cv_g, j)))

        # 1. q, the new k (both with RoPE) and v -> shared memory (float32); the new k / v row -> the caches
        if rope_half:
            pos = arith.sitofp(f32, memref.load(pos_g, [bb]))

        def load(src, f):  # feature f of row bb in the model dtype (partial slots: summed in order, rounded)
            if not slots:
                return memref.load(src, [bb, f])
            acc = memref.load(src, [c(0), f, bb])
            for p in range(1, slots):
                acc = arith.addf(acc, memref.load(src, [c(p), f, bb]))
            return arith.truncf(elt, acc)

        def load_head(src, feature0, dd):  # feature0 + dd of row bb, RoPE'd if on, in the model dtype
            f = arith.addi(feature0, dd)
            x = load(src, f)
            if not rope_half:
                return x
            first = ult(dd, c(rope_half))
            rot = ult(dd, c(2 * rope_half))
            partner = arith.select(first, arith.addi(f, c(rope_half)), arith.subi(f, c(rope_half)))
            r = arith.extf(f32, load(src, arith.select(rot, partner, f)))
            r = arith.select(first, arith.negf(r), r)
            t = arith.mulf(pos, memref.load(freq_g, [arith.select(rot, arith.remui(dd, c(rope_half)), c(0))]))
            y = arith.addf(arith.mulf(arith.extf(f32, x), mlir_math.cos(t)), arith.mulf(r, mlir_math.sin(t)))
            return arith.select(rot, arith.truncf(elt, y), x)

        def stage_q(e):
            gi, dd = arith.divui(e, c(d)), arith.remui(e, c(d))
            x = load_head(q_g, arith.addi(c(offsets[0]), arith.muli(arith.addi(head0, gi), c(d))), dd)
            memref.store(arith.extf(f32, x), q_s, [gi, dd])

        def stage_new(e):
            for which, (src, dst) in enumerate(((k_g, ck_g), (v_g, cv_g))):
                feature0 = arith.addi(c(offsets[1 + which]), arith.muli(kvh, c(d)))
                val = load_head(src, feature0, e) if which == 0 else load(src, arith.addi(feature0, e))
                memref.store(arith.extf(f32, val), new_s, [c(which), e])
                memref.store(val, dst, [bb, idx, kvh, e])

        strided(g_heads * d, stage_q)
        strided(d, stage_new)
        mgpu.utils.warpgroup_barrier()

        def cluster_sync():  # release / acquire across the cluster's CTAs (all their threads)
            llvm.inline_asm(ir.Type.parse("!llvm.void"), [],
                            "barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;", "",
                            has_side_effects=True)

        # every rank's exchange buffer (this CTA's too, through the cluster mapping), in rank order
        peers = [mgpu.utils.get_cluster_ref(xch_s, gpu.Dimension.x, c(r)) for r in range(parts)] if parts > 1 else []

        def block_reduce(values, op, row):
            """[G] per thread -> [G] over the CTA (red_s[row] as scratch), then over the cluster's CTAs in rank
            order (xch_s[row] through distributed shared memory)."""
            for gi, v in enumerate(values):
                r = mgpu.utils.warp_tree_reduce(v, op, 32)
                when(eq(lane, c(0)), lambda r=r, gi=gi: memref.store(r, red_s, [c(row), warp, c(gi)]))
            mgpu.utils.warpgroup_barrier()
            out = []
            for gi in range(g_heads):
                r = memref.load(red_s, [c(row), c(0), c(gi)])
                for w in range(1, 4):
                    r = op(r, memref.load(red_s, [c(row), c(w), c(gi)]))
                out.append(r)
            if parts == 1:
                return out
            for gi, r in enumerate(out):
                when(eq(tid, c(0)), lambda r=r, gi=gi: memref.store(r, xch_s, [c(row), c(gi)]))
            cluster_sync()
            out = []
            for gi in range(g_heads):
                r = memref.load(peers[0], [c(row), c(gi)])
                for peer in peers[1:]:
                    r = op(r, memref.load(peer, [c(row), c(gi)]))
                out.append(r)
            return out

        # 2. scores for this CTA's chunks among 0 .. index // 128 (thread t: key 128 c + t)
        n_chunks = arith.addi(arith.divui(idx, c(THREADS)), c(1))
        neg_inf = fc(-math.inf)
        loop = scf.ForOp(part, n_chunks, c(parts), [neg_inf] * g_heads)
        with ir.InsertionPoint(loop.body):
            j = arith.addi(arith.muli(loop.induction_variable, c(THREADS)), tid)
            live = scf.IfOp(ule(j, idx), [f32] * g_heads, has_else=True)
            with ir.InsertionPoint(live.then_block):
                is_new = eq(j, idx)
                accs = [vector.broadcast(vec_f32, fc(0.0)) for _ in range(g_heads)]
                for v in range(nvd):
                    kvec = arith.extf(vec_f32, vector.load(vec_cache, ck_g, [bb, j, kvh, c(v * VEC)]))
                    kvec = arith.select(is_new, vector.load(vec_f32, new_s, [c(0), c(v * VEC)]), kvec)
                    for gi in range(g_heads):
                        accs[gi] = arith.addf(accs[gi], arith.mulf(vector.load(vec_f32, q_s, [c(gi), c(v * VEC)]),
                                                                   kvec))
                key_ok = arith.ori(is_new, arith.cmpi(arith.CmpIPredicate.ne, memref.load(valid_g, [bb, j]),
                                                      arith.constant(i32, 0)))
                scores = []
                for acc in accs:
                    tot = vector.extract(acc, [], [0])
                    for e in range(1, VEC):
                        tot = arith.addf(tot, vector.extract(acc, [], [e]))
                    scores.append(arith.select(key_ok, arith.mulf(tot, fc(scale)), neg_inf))
                scf.yield_(scores)
            with ir.InsertionPoint(live.else_block):
                scf.yield_([neg_inf] * g_heads)
            for gi in range(g_heads):
                memref.store(live.results[gi], sc_s, [c(gi), j])
            scf.yield_([arith.maximumf(m, sc) for m, sc in zip(loop.inner_iter_args, live.results)])
        maxes = block_reduce(list(loop.results), arith.maximumf, 0)

        # 3. e = exp(s - max) in place and its block sum, then p = round(e / sum) in place
        def over_chunks(init, fn):
            lp = scf.ForOp(part, n_chunks, c(parts), init)
            with ir.InsertionPoint(lp.body):
                jj = arith.addi(arith.muli(lp.induction_variable, c(THREADS)), tid)
                scf.yield_(fn(jj, list(lp.inner_iter_args)))
            return list(lp.results)

        def exp_step(jj, sums):
            out = []
            for gi in range(g_heads):
                e = mlir_math.exp(arith.subf(memref.load(sc_s, [c(gi), jj]), maxes[gi]))
                memref.store(e, sc_s, [c(gi), jj])
                out.append(arith.addf(sums[gi], e))
            return out

        totals = block_reduce(over_chunks([fc(0.0)] * g_heads, exp_step), arith.addf, 1)

        def normalise(jj, _):
            for gi in range(g_heads):
                p = arith.divf(memref.load(sc_s, [c(gi), jj]), totals[gi])
                memref.store(arith.extf(f32, arith.truncf(elt, p)), sc_s, [c(gi), jj])
            return []

        over_chunks([], normalise)
        mgpu.utils.warpgroup_barrier()

        # 4. P @ V: thread (key lane jl, dims 8 dv .. 8 dv + 7), keys jl, jl + lanes, ... <= index
        dv, jl = arith.remui(tid, c(nvd)), arith.divui(tid, c(nvd))
        d0 = arith.muli(dv, c(VEC))
        vnew = vector.load(vec_f32, new_s, [c(1), d0])
        n_keys = arith.addi(idx, c(1))
        zero_vec = vector.broadcast(vec_f32, fc(0.0))
        chunks = scf.ForOp(part, n_chunks, c(parts), [zero_vec] * g_heads)
        with ir.InsertionPoint(chunks.body):
            first = arith.muli(chunks.induction_variable, c(THREADS))
            end = arith.minui(arith.addi(first, c(THREADS)), n_keys)
            pv = scf.ForOp(first, end, c(lanes * UNROLL), list(chunks.inner_iter_args))
            with ir.InsertionPoint(pv.body):
                accs = list(pv.inner_iter_args)
                for u in range(UNROLL):
                    jj = arith.addi(pv.induction_variable, arith.addi(jl, c(u * lanes)))
                    inb = ult(jj, end)
                    jc = arith.select(inb, jj, first)  # out-of-range lanes read the chunk's first slot with p = 0
                    vvec = arith.extf(vec_f32, vector.load(vec_cache, cv_g, [bb, jc, kvh, d0]))
                    vvec = arith.select(eq(jj, idx), vnew, vvec)
                    for gi in range(g_heads):
                        p = arith.select(inb, memref.load(sc_s, [c(gi), jc]), fc(0.0))
                        accs[gi] = arith.addf(accs[gi], arith.mulf(vector.broadcast(vec_f32, p), vvec))
                scf.yield_(accs)
            scf.yield_(list(pv.results))
        for gi in range(g_heads):
            vector.store(chunks.results[gi], pv_s, [jl, c(gi), d0])
        mgpu.utils.warpgroup_barrier()

        def lane_sum(e):  # this CTA's P @ V for output element e = (gi, dd)
            gi, dd = arith.divui(e, c(d)), arith.remui(e, c(d))
            tot = memref.load(pv_s, [c(0), gi, dd])
            for ln in range(1, lanes):
                tot = arith.addf(tot, memref.load(pv_s, [c(ln), gi, dd]))
            return gi, dd, tot

        def store(gi, dd, tot):
            memref.store(arith.truncf(elt, tot), out_g, [bb, arith.addi(arith.muli(arith.addi(head0, gi), c(d)), dd)])

        if parts == 1:
            strided(g_heads * d, lambda e: store(*lane_sum(e)))
            return
        # the cluster's CTAs add their P @ V in rank order (the first one stores); a last barrier keeps every CTA's
        # shared memory alive until it has been read
        strided(g_heads * d, lambda e: memref.store(lane_sum(e)[2], xch_s, [c(2), e]))
        cluster_sync()

        def gather(e):
            gi, dd = arith.divui(e, c(d)), arith.remui(e, c(d))
            tot = memref.load(peers[0], [c(2), e])
            for peer in peers[1:]:
                tot = arith.addf(tot, memref.load(peer, [c(2), e]))
            store(gi, dd, tot)

        when(eq(part, c(0)), lambda: strided(g_heads * d, gather))
        cluster_sync()

    return run, (plgpu.SMEM((g_heads, d), jnp.float32), plgpu.SMEM((2, d), jnp.float32),
                 plgpu.SMEM((g_heads, s_pad), jnp.float32), plgpu.SMEM((2, 4, g_heads), jnp.float32),
                 plgpu.SMEM((lanes, g_heads, d), jnp.float32), plgpu.SMEM((3, g_heads * d), jnp.float32))


@functools.lru_cache(maxsize=None)
def _build(b: int, h: int, kv: int, s: int, d: int, dtype_name: str, scale: float, offsets, rope_half: int,
           poisoned: bool, parts: int, slots: int, prefetch: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    run, scratch = _make_body(h, kv, s, d, scale, offsets, rope_half, parts, slots, prefetch)

    def body(*refs):  # q, k, v, key_valid, index, positions, inv_freq, cache_k, cache_v, out
        pl.run_scoped(lambda *smem: run(*refs, *smem), *scratch)

    out_type = () if poisoned else jax.ShapeDtypeStruct((b, h * d), jnp.dtype(dtype_name))
    cluster = dict(cluster=(parts,), cluster_names=("part",)) if parts > 1 else {}
    kernel = pl.kernel(body, out_type=out_type, mesh=plgpu.Mesh(grid=(b * kv,), grid_names=("bk",), **cluster),
                       compiler_params=plgpu.CompilerParams(), name=f"decode_attention_h{h}_kv{kv}_d{d}_p{parts}")

    def call(inputs, cache_k, cache_v, out=None):
        # the caches (and a given out) are Refs: the kernel writes them in place, aliased in and out of the call
        refs = [jax.new_ref(a) for a in (cache_k, cache_v) + (() if out is None else (out,))]
        result = kernel(*inputs, *refs)
        frozen = [jax.freeze(r) for r in refs]
        return (frozen[2] if poisoned else result), frozen[0], frozen[1]

    return call


@functools.partial(jax.jit, static_argnames=("num_heads", "offsets", "scale", "parts"))
def decode_attention(q, k, v, cache_k, cache_v, index, key_valid=None, positions=None, inv_freq=None, *,
                     num_heads: int, offsets=(0, 0, 0), scale: Optional[float] = None, out=None,
                     parts: Optional[int] = None):
    """Mosaic GPU kernel (module docstring): -> (out [B, H * D] in the cache dtype, cache_k, cache_v), the caches
    updated in place. ``index`` is clamped to [0, S - 1] as ``lax.dynamic_update_slice`` clamps it. RoPE when
    ``inv_freq`` [R] (float32) is given, at ``positions`` [B]. ``out``: optional [B, H * D] buffer the kernel writes
    into (tests poison it, so unwritten elements show). ``parts``: CTAs per (sequence, kv head), default
    ``cluster_parts``."""
    offsets = tuple(int(o) for o in offsets)
    b, kv, s, d = check_shapes(q, k, v, cache_k, cache_v, num_heads, offsets)
    rope_half = 0 if inv_freq is None else int(inv_freq.shape[0])
    slots = q.shape[0] if q.ndim == 3 else 0
    dtype = cache_k.dtype
    why = fits(num_heads, kv, s, d, dtype, dtype, 2 * rope_half)
    if why is None and not slots and not q.dtype == k.dtype == v.dtype == dtype:
        why = f"q / k / v / cache dtypes {q.dtype} / {k.dtype} / {v.dtype} / {dtype} differ"
    if why is not None:
        raise ValueError(f"decode_attention: {why}")
    if rope_half and (positions is None or positions.shape != (b,)):
        raise ValueError(f"decode_attention: RoPE needs positions [B={b}], got "
                         f"{None if positions is None else positions.shape}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    valid = jnp.ones((b, s), jnp.int32) if key_valid is None else key_valid.astype(jnp.int32)
    if valid.shape != (b, s):
        raise ValueError(f"decode_attention: key_valid {valid.shape} must be (B, S) = {(b, s)}")
    if out is not None and (out.shape != (b, num_heads * d) or out.dtype != dtype):
        raise ValueError(f"decode_attention: out {out.shape} {out.dtype} must be {(b, num_heads * d)} {dtype}")
    pos = jnp.zeros((b,), jnp.int32) if positions is None else positions.astype(jnp.int32)
    freq = jnp.zeros((1,), jnp.float32) if inv_freq is None else jnp.asarray(inv_freq, jnp.float32)
    parts = cluster_parts(b, kv, s) if parts is None else int(parts)
    if not 1 <= parts <= MAX_PARTS:
        raise ValueError(f"decode_attention: parts={parts}, need 1..{MAX_PARTS} CTAs per (sequence, kv head)")
    call = _build(b, num_heads, kv, s, d, jnp.dtype(dtype).name, scale, offsets, rope_half, out is not None,
                  parts, slots, prefetches(s, parts))
    inputs = (q, k, v, valid, jnp.asarray(index, jnp.int32).reshape(1), pos, freq)
    return call(inputs, cache_k, cache_v, out)
