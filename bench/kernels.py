"""GPTQ dequant-matmul kernel benchmark (GPU): Pallas Mosaic GPU kernel vs bf16 XLA matmul vs XLA dequantize+matmul.

    python bench/kernels.py                       # full table -> bench/results/kernels.{json,md}
    python bench/kernels.py --quick --sweep       # exploration: correctness matrix + block-size sweep, no files
    python bench/kernels.py --smoke               # also a jitted LLaMA-shaped forward / generate with the kernels
    python bench/kernels.py --cupti --out-dir DIR # device-time rows (CUPTI, rotating inputs; see bench/timing.py)
                                                  # for int4/int3 x shapes x M plus prefill M -> DIR/kernels_cupti.jsonl
    python bench/kernels.py --merge-cupti DIR/kernels_cupti.jsonl   # -> bench/results/kernels.json + kernels.md

Timing (the default table): every measured op is jitted as a chain of ``--calls`` back-to-back calls on distinct activations and
rotating weight copies (together >= 2x the 50 MB L2, so the cache does not flatter), warmed up, then timed by
block_until_ready over ``--reps`` chains; the median chain time / calls is reported (includes the small XLA ops
around the kernel: activation pad / permutation and the float32 partial reduction). Correctness: every kernel
configuration that is timed is first checked against x @ W_float (W dequantized from the stored GPTQ arrays, float32,
HIGHEST precision) with its output buffer NaN-poisoned; rows fail at relative error >= 1e-2 or any NaN.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import gptq_matmul as gm  # noqa: E402
from bench.timing import activations, bf16_matmul, config_cell, config_fields, copies, cupti  # noqa: E402
from bench.timing import TABLE_ROW_KEY  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]
MS = [1, 4, 16, 64]
FORMATS = {  # name: (bits, group_size, sym, act_order)
    "w4g128": (4, 128, False, False),
    "w4g128-sym": (4, 128, True, False),
    "w3g128": (3, 128, False, False),
    "w4g128-act": (4, 128, False, True),
}
TOL = 1e-2


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------------ weights
def make_weight(key, K, N, bits, group, sym, act):
    """Random GPTQ weight: (UniformQuantizedWeight or None, GPTQKernelWeight, dense float32 W [K, N])."""
    G = K // group
    k1, k2, k3, k4 = jax.random.split(key, 4)
    codes = jax.random.randint(k1, (K, N), 0, 2**bits, jnp.int32)
    scales = jax.random.uniform(k2, (G, N), jnp.float32, 0.5, 1.5) * 0.01
    zeros = (jnp.full((G, N), 2 ** (bits - 1), jnp.int32) if sym
             else jax.random.randint(k3, (G, N), 0, 2**bits, jnp.int32))
    g_idx = np.arange(K) // group
    if act:
        g_idx = np.asarray(jax.random.permutation(k4, jnp.asarray(g_idx)))
    w_float = scales[g_idx] * (codes - zeros[g_idx]).astype(jnp.float32)
    try:
        from jaxquant.formats import UniformQuantizedWeight
        from jaxquant.kernel_layout import to_kernel_weight
        uqw = UniformQuantizedWeight.from_codes(codes.T, scales, zeros, jnp.asarray(g_idx, jnp.int32), bits=bits,
                                                group_size=group, sym=sym)
        kw = to_kernel_weight(uqw, jnp.bfloat16)
    except Exception:  # jaxquant mid-edit by someone else: pack directly, skip the XLA-dequant baseline
        traceback.print_exc()
        uqw = None
        kw = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=sym, dtype=jnp.bfloat16)
    return uqw, kw, w_float


def chain_length(nbytes, calls):
    """Calls per timed chain: every call gets its own weight copy (XLA merges dots, and CSEs dequantizations, that
    share a weight inside one program), within ~16 GB of copies."""
    return int(max(4, min(calls, 16e9 // nbytes)))


# ------------------------------------------------------------------------------------------------------- timing
def time_chain(fn, ws, xs, reps):
    """Median microseconds per call of fn(x_i, w_i) over a jitted chain of len(xs) calls, each on its own x and its
    own weight copy (len(ws) == len(xs)), so neither XLA's operand sharing nor the L2 cache flatters it."""
    calls = len(xs)
    assert len(ws) == calls, (len(ws), calls)
    chain = jax.jit(lambda ws, xs: [fn(xs[i], ws[i]) for i in range(calls)])
    jax.block_until_ready(chain(ws, xs))
    jax.block_until_ready(chain(ws, xs))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(chain(ws, xs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / calls * 1e6


def check_kernel(kw, w_float, M, cfg, key):
    """Relative error (Frobenius, and max-abs) of the NaN-poisoned kernel output against x @ W_float."""
    x = jax.random.normal(key, (M, kw.in_features), jnp.float32).astype(jnp.bfloat16)
    rc = cfg.resolved(kw, M)
    poison = gm.nan_output_buffer(rc, kw.n_pad, kw.out_features, M, kw.dtype)
    y = jax.jit(lambda x, w, p: gm.gptq_matmul(x, w, config=cfg, out_init=p))(x, kw, poison)
    y2 = jax.jit(lambda x, w: gm.gptq_matmul(x, w, config=cfg))(x, kw)
    ref = jnp.matmul(x.astype(jnp.float32), w_float, precision=jax.lax.Precision.HIGHEST)
    y = y.astype(jnp.float32)
    fro = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    mx = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
    same = bool(jnp.array_equal(y, y2.astype(jnp.float32)))
    nan = bool(jnp.any(jnp.isnan(y)))
    return fro, mx, nan, same


# ------------------------------------------------------------------------------------------------------ ceilings
def copy_bandwidth():
    """GB/s of a device-to-device copy (bytes read + written) of a 2 GB buffer."""
    a = jnp.ones((1024, 1024, 1024), jnp.bfloat16)
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t0)
    return 2 * a.nbytes / statistics.median(ts) / 1e9


def read_bandwidth():
    """GB/s of a read-only pass (sum of a 2 GB bf16 buffer), the ceiling that matters for a GEMV."""
    a = jnp.ones((1024, 1024, 1024), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t0)
    return a.nbytes / statistics.median(ts) / 1e9


def diagnostics(key, reps, calls, configs, ms=(1, 16, 64), K=8192, N=28672):
    """int4 g128 K x N: per-kernel GPU times (CUPTI) of bf16 XLA and of the kernel wrapper, the fixed per-call cost
    (a 1-CTA weight), then kernel variants x configs timed as chains."""
    key, kb, kw_key, kt = jax.random.split(key, 4)
    w_bf16 = (jax.random.normal(kb, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
    uqw, kw, w_float = make_weight(kw_key, K, N, 4, 128, False, False)
    x1 = jax.random.normal(kt, (1, K), jnp.float32).astype(jnp.bfloat16)
    try:
        log(f"diag cupti bf16 XLA M=1: {cupti(bf16_matmul, [(x1, w_bf16)], 5)[2]}")
        log(f"diag cupti kernel wrapper M=1: {cupti(lambda x, w: gm.gptq_matmul(x, w), [(x1, kw)], 5)[2]}")
        _, tiny, _ = make_weight(kt, 256, 64, 4, 128, False, False)
        xt = x1[:, :256]
        log(f"diag cupti tiny (256x64) wrapper: {cupti(lambda x, w: gm.gptq_matmul(x, w), [(xt, tiny)], 5)[2]}")
        n = 32
        tinies = copies(tiny, n)
        xts = activations(kt, 1, 256, n)
        log(f"diag chain tiny wrapper: {time_chain(lambda x, w: gm.gptq_matmul(x, w), tinies, xts, reps):.1f} us/call")
        rc = gm.KernelConfig().resolved(tiny, 1)
        xks = [tiny.prepare_activations(x, 8) for x in xts]
        log(f"diag chain tiny bare kernel: "
            f"{time_chain(lambda x, w: gm.gptq_matmul_partials(x, w, rc), tinies, xks, reps):.1f} us/call")
        log(f"diag chain tiny XLA add: {time_chain(lambda x, w: x + 1, tinies, xts, reps):.1f} us/call")
    except Exception:
        log("diag cupti / tiny failed:\n" + traceback.format_exc()[-2000:])
    n = chain_length(w_bf16.nbytes, calls)
    bf_ws = copies(w_bf16, n)
    bf = {}
    for M in ms:
        key, kx = jax.random.split(key)
        bf[M] = time_chain(bf16_matmul, bf_ws, activations(kx, M, K, n), reps)
        log(f"diag {K}x{N} M={M}: bf16 XLA {bf[M]:.1f} us ({(w_bf16.nbytes + M * (K + N) * 2) / bf[M] / 1e3:.0f} GB/s)")
    del bf_ws
    n = chain_length(kw.nbytes, calls)
    ws = copies(kw, n)
    best = {}
    for M in ms:
        key, kx, kc = jax.random.split(key, 3)
        xs = activations(kx, M, K, n)
        for variant, cfg in configs:
            try:
                rc = cfg.resolved(kw, M)
                err = check_kernel(kw, w_float, M, cfg, kc)[0] if variant != "nodeq" else float("nan")
                us = time_chain(lambda x, w: gm.gptq_matmul(x, w, config=cfg, _variant=variant), ws, xs, reps)
                log(f"diag {K}x{N} M={M} {variant:<5} tile_k={rc.tile_k} stages={rc.stages} k_splits={rc.k_splits} "
                    f"n_sub={rc.n_sub}: {us:7.1f} us = {kw.nbytes / us / 1e3:.0f} GB/s, x{bf[M] / us:.2f} vs bf16, "
                    f"err={err:.1e}")
                if variant == "full" and err < TOL and (M not in best or us < best[M][0]):
                    best[M] = (us, cfg)
            except Exception as e:
                log(f"diag {variant} {cfg}: FAILED {type(e).__name__}: {str(e)[-600:]}")
    del ws, kw, uqw, w_float, w_bf16
    return {M: cfg for M, (_, cfg) in best.items()}


# -------------------------------------------------------------------------------------------------- experiments
def correctness_matrix(key):
    """Small odd shapes through every code path: bits, sym/asym, act-order, per-channel, float16, splits, M."""
    cases = [  # K, N, bits, group, sym, act, M, dtype, cfg
        (1024, 256, 4, 128, False, False, 1, jnp.bfloat16, gm.KernelConfig(tile_k=256, stages=2, k_splits=2)),
        (1024, 256, 4, 128, True, False, 5, jnp.bfloat16, gm.KernelConfig(tile_k=128, stages=3, k_splits=1)),
        (1024, 320, 3, 128, False, False, 16, jnp.bfloat16, gm.KernelConfig(tile_k=256, stages=4, k_splits=4)),
        (768, 192, 3, 64, False, True, 3, jnp.bfloat16, gm.KernelConfig(tile_k=256, stages=2, k_splits=1)),
        (1024, 128, 2, 128, False, False, 64, jnp.bfloat16, gm.KernelConfig(tile_k=64, stages=4, k_splits=2)),
        (576, 72, 4, 128, False, False, 9, jnp.bfloat16, None),
        (1024, 256, 4, -1, False, False, 2, jnp.bfloat16, None),
        (1024, 256, 4, 128, False, True, 33, jnp.float16, None),
        (1024, 256, 3, 128, True, False, 1, jnp.float16, gm.KernelConfig(tile_k=128, stages=2, k_splits=1)),
    ]
    ok = True
    for i, (K, N, bits, group, sym, act, M, dt, cfg) in enumerate(cases):
        key, k1, k2 = jax.random.split(key, 3)
        try:
            G = 1 if group == -1 else -(-K // group)
            kk = jax.random.split(k1, 4)
            codes = jax.random.randint(kk[0], (K, N), 0, 2**bits, jnp.int32)
            scales = jax.random.uniform(kk[1], (G, N), jnp.float32, 0.5, 1.5) * 0.01
            zeros = (jnp.full((G, N), 2 ** (bits - 1), jnp.int32) if sym
                     else jax.random.randint(kk[2], (G, N), 0, 2**bits, jnp.int32))
            g_idx = np.zeros(K, np.int64) if group == -1 else np.arange(K) // group
            if act:
                g_idx = np.asarray(jax.random.permutation(kk[3], jnp.asarray(g_idx)))
            kw = gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=sym, dtype=dt)
            w_float = scales[g_idx] * (codes - zeros[g_idx]).astype(jnp.float32)
            x = jax.random.normal(k2, (M, K), jnp.float32).astype(dt)
            cfg = cfg or gm.KernelConfig()
            rc = cfg.resolved(kw, M)
            poison = gm.nan_output_buffer(rc, kw.n_pad, kw.out_features, M, kw.dtype)
            y = gm.gptq_matmul(x, kw, config=cfg, out_init=poison).astype(jnp.float32)
            ref = jnp.matmul(x.astype(jnp.float32), w_float, precision=jax.lax.Precision.HIGHEST)
            ref_kernel_layout = gm.reference_matmul(x, kw).astype(jnp.float32)
            fro = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            fro_kl = float(jnp.linalg.norm(y - ref_kernel_layout) / jnp.linalg.norm(ref))
            nan = bool(jnp.any(jnp.isnan(y)))
            good = fro < TOL and not nan
            ok &= good
            log(f"check {i}: K={K} N={N} bits={bits} g={group} sym={sym} act={act} M={M} {jnp.dtype(dt).name} {rc}: "
                f"rel_err={fro:.2e} vs_kernel_layout_ref={fro_kl:.2e} nan={nan} {'OK' if good else 'FAIL'}")
        except Exception:
            ok = False
            tb = traceback.format_exc()
            log(f"check {i} raised:\n" + (tb if i == 0 else tb[-1500:]))
    return ok


def sweep(key, shapes, ms, bits_list, configs, reps, calls):
    for (K, N) in shapes:
        for bits in bits_list:
            key, kw_key = jax.random.split(key)
            uqw, kw, w_float = make_weight(kw_key, K, N, bits, 128, False, False)
            n = chain_length(kw.nbytes, calls)
            ws = copies(kw, n)
            for M in ms:
                key, kx, kc = jax.random.split(key, 3)
                xs = activations(kx, M, K, n)
                for cfg in configs:
                    try:
                        rc = cfg.resolved(kw, M)
                        fro, mx, nan, same = check_kernel(kw, w_float, M, cfg, kc)
                        us = time_chain(lambda x, w, cfg=cfg: gm.gptq_matmul(x, w, config=cfg), ws, xs, reps)
                        log(f"sweep {K}x{N} w{bits} M={M} tile_k={rc.tile_k} stages={rc.stages} "
                            f"k_splits={rc.k_splits} n_sub={rc.n_sub}: {us:8.1f} us  err={fro:.1e} nan={nan} "
                            f"same={same}")
                    except Exception as e:
                        log(f"sweep {K}x{N} w{bits} M={M} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
            del ws, kw, uqw, w_float


def full_table(key, shapes, ms, formats, reps, calls, bw, on_rows=None, tuned=None):
    """tuned: {M: KernelConfig} block sizes picked on 8192x28672 (k_splits left to the heuristic per shape; a
    tile_k that does not fit a shape falls back to the heuristic)."""
    rows = []
    for (K, N) in shapes:
        key, kb = jax.random.split(key)
        w_bf16 = (jax.random.normal(kb, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        n = chain_length(w_bf16.nbytes, calls)
        bf16_ws = copies(w_bf16, n)
        bf16_us = {}
        for M in ms:
            key, kx = jax.random.split(key)
            bf16_us[M] = time_chain(bf16_matmul, bf16_ws, activations(kx, M, K, n), reps)
            log(f"{K}x{N} bf16 XLA M={M}: {bf16_us[M]:.1f} us")
        del bf16_ws, w_bf16
        for fmt in formats:
            bits, group, sym, act = FORMATS[fmt]
            key, kw_key = jax.random.split(key)
            uqw, kw, w_float = make_weight(kw_key, K, N, bits, group, sym, act)
            n = chain_length(max(kw.nbytes, uqw.nbytes if uqw is not None else 0), calls)
            ws = copies(kw, n)
            uqws = copies(uqw, n) if uqw is not None else None
            for M in ms:
                key, kx, kc = jax.random.split(key, 3)
                xs = activations(kx, M, K, n)
                cfg = gm.KernelConfig()
                if tuned and any(t <= M for t in tuned):
                    cfg = dataclasses.replace(tuned[max(t for t in tuned if t <= M)], k_splits=None)
                    try:
                        cfg.resolved(kw, M)
                    except ValueError:
                        cfg = dataclasses.replace(cfg, tile_k=None)
                rc = cfg.resolved(kw, M)
                fro, mx, nan, same = check_kernel(kw, w_float, M, cfg, kc)
                us = time_chain(lambda x, w: gm.gptq_matmul(x, w, config=cfg), ws, xs, reps)
                deq_us = (time_chain(lambda x, w: w.matmul(x), uqws, xs, reps) if uqws is not None
                          else float("nan"))
                moved = kw.nbytes + M * K * 2 + M * N * 2
                row = dict(format=f"gptq-{fmt}", bits=bits, group_size=group, sym=sym, act_order=act, M=M, K=K,
                           N=N, us=round(us, 2), bf16_xla_us=round(bf16_us[M], 2),
                           xla_dequant_us=round(deq_us, 2), speedup_vs_bf16=round(bf16_us[M] / us, 3),
                           speedup_vs_xla_dequant=round(deq_us / us, 3), gbps=round(moved / us / 1e3, 1),
                           bytes_moved=moved, copy_gbps=round(bw, 1), max_rel_err=float(f"{mx:.3g}"),
                           fro_rel_err=float(f"{fro:.3g}"), correct=bool(fro < TOL and not nan and same),
                           kernel="pallas-mosaic-gpu",
                           config=dict(tile_k=rc.tile_k, stages=rc.stages, k_splits=rc.k_splits, n_sub=rc.n_sub))
                rows.append(row)
                log(f"{K}x{N} {fmt} M={M}: kernel {us:.1f} us ({row['gbps']} GB/s), bf16 {bf16_us[M]:.1f}, "
                    f"xla-dequant {deq_us:.1f}, x{row['speedup_vs_bf16']} vs bf16, err {fro:.1e} "
                    f"{'OK' if row['correct'] else 'FAIL'}")
            del ws, uqws, kw, uqw, w_float
            if on_rows is not None:
                on_rows(rows)
    return rows


def prefill_rows(key, reps, calls, ms=(128, 512)):
    """Large M (prefill): kernel layout via XLA dequantize + matmul (the dispatched path) vs bf16 XLA."""
    rows = []
    K, N = 8192, 28672
    key, kb, kw_key = jax.random.split(key, 3)
    w_bf16 = (jax.random.normal(kb, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
    uqw, kw, w_float = make_weight(kw_key, K, N, 4, 128, False, False)
    del w_float
    n = 4
    bf_ws, kws, uqws = copies(w_bf16, n), copies(kw, n), (copies(uqw, n) if uqw is not None else None)
    for M in ms:
        key, kx = jax.random.split(key)
        xs = activations(kx, M, K, n)
        bf = time_chain(bf16_matmul, bf_ws, xs, reps)
        deq = time_chain(lambda x, w: w.matmul(x), kws, xs, reps)
        deq_uqw = time_chain(lambda x, w: w.matmul(x), uqws, xs, reps) if uqws is not None else float("nan")
        log(f"prefill {K}x{N} M={M}: bf16 {bf:.1f} us, kernel-layout XLA dequant+matmul {deq:.1f} us, "
            f"AutoGPTQ-layout XLA dequant+matmul {deq_uqw:.1f} us")
        rows.append(dict(format="gptq-w4g128", bits=4, group_size=128, sym=False, act_order=False, M=M, K=K, N=N,
                         us=round(deq, 2), bf16_xla_us=round(bf, 2), xla_dequant_us=round(deq_uqw, 2),
                         speedup_vs_bf16=round(bf / deq, 3), kernel="xla-dequant-matmul (kernel layout)",
                         gbps=round((kw.nbytes + M * K * 2 + M * N * 2) / deq / 1e3, 1)))
    return rows


def cupti_table(key, shapes, ms, formats, rounds, calls, on_row=None):
    """Device-time rows (CUPTI, rotating inputs): for each shape, M and format the kernel path (activation pad +
    Pallas kernel + partial-sum reduction, as dispatched), the Pallas kernel alone, the bf16 XLA matmul and the XLA
    dequantize-then-matmul of the stored AutoGPTQ arrays, all in the same run; each kernel configuration checked
    against x @ W_float with a NaN-poisoned output first."""
    rows = []
    for (K, N) in shapes:
        key, kb = jax.random.split(key)
        w_bf16 = (jax.random.normal(kb, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        n = chain_length(w_bf16.nbytes, calls)
        bf_ws = copies(w_bf16, n)
        bf16_us = {}
        for M in ms:
            key, kx = jax.random.split(key)
            xs = activations(kx, M, K, n)
            bf16_us[M], _, names = cupti(bf16_matmul, list(zip(xs, bf_ws)), rounds)
            log(f"cupti {K}x{N} bf16 XLA M={M}: {bf16_us[M]:.1f} us {names}")
        del bf_ws, w_bf16
        for fmt in formats:
            bits, group, sym, act = FORMATS[fmt]
            key, kw_key = jax.random.split(key)
            uqw, kw, w_float = make_weight(kw_key, K, N, bits, group, sym, act)
            n = chain_length(max(kw.nbytes, uqw.nbytes if uqw is not None else 0), calls)
            ws = copies(kw, n)
            uqws = copies(uqw, n) if uqw is not None else None
            for M in ms:
                key, kx, kc = jax.random.split(key, 3)
                xs = activations(kx, M, K, n)
                try:
                    cfg = gm.KernelConfig()
                    rc = cfg.resolved(kw, M)
                    fro, mx, nan, same = check_kernel(kw, w_float, M, cfg, kc)
                    us, kern_us, names = cupti(lambda x, w: gm.gptq_matmul(x, w), list(zip(xs, ws)), rounds,
                                         "gptq")
                    deq_us = (cupti(lambda x, w: w.matmul(x), list(zip(xs, uqws)), rounds)[0]
                              if uqws is not None else float("nan"))
                except Exception:
                    log(f"cupti {K}x{N} {fmt} M={M} FAILED: {traceback.format_exc()[-1500:]}")
                    continue
                moved = kw.nbytes + M * K * 2 + M * N * 2
                row = dict(format=f"gptq-{fmt}", bits=bits, group_size=group, sym=sym, act_order=act, M=M, K=K,
                           N=N, us=round(us, 2), kernel_only_us=round(kern_us, 2),
                           bf16_xla_us=round(bf16_us[M], 2), xla_dequant_us=round(deq_us, 2),
                           speedup_vs_bf16=round(bf16_us[M] / us, 3),
                           kernel_only_speedup_vs_bf16=round(bf16_us[M] / kern_us, 3),
                           speedup_vs_xla_dequant=round(deq_us / us, 3), gbps=round(moved / us / 1e3, 1),
                           kernel_only_gbps=round(moved / kern_us / 1e3, 1), bytes_moved=moved,
                           max_rel_err=float(f"{mx:.3g}"), fro_rel_err=float(f"{fro:.3g}"),
                           correct=bool(fro < TOL and not nan and same), kernel="pallas-mosaic-gpu",
                           timing="cupti-rotating", gpu_kernels=names, config=config_fields(rc))
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                log(f"cupti {K}x{N} {fmt} M={M}: path {us:.1f} us (kernel {kern_us:.1f}), bf16 {bf16_us[M]:.1f}, "
                    f"xla-dequant {deq_us:.1f}: x{row['speedup_vs_bf16']} vs bf16 (kernel alone "
                    f"x{row['kernel_only_speedup_vs_bf16']}), {row['gbps']} GB/s, err {fro:.1e} "
                    f"{'OK' if row['correct'] else 'FAIL'} {rc}")
            del ws, uqws, kw, uqw, w_float
    return rows


def cupti_prefill_rows(key, shapes, ms, rounds, on_row=None):
    """Large M (prefill), int4 g128, device time (CUPTI, 4 rotating weight copies): bf16 XLA matmul vs the dispatched
    path of the kernel layout (GPTQKernelWeight.matmul: XLA dequantize + matmul, since the Pallas kernel takes only
    M <= MAX_KERNEL_M) vs XLA dequantize + matmul of the AutoGPTQ arrays."""
    rows = []
    for (K, N) in shapes:
        key, kb, kw_key = jax.random.split(key, 3)
        w_bf16 = (jax.random.normal(kb, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        uqw, kw, w_float = make_weight(kw_key, K, N, 4, 128, False, False)
        n = 4
        bf_ws, kws = copies(w_bf16, n), copies(kw, n)
        uqws = copies(uqw, n) if uqw is not None else None
        for M in ms:
            key, kx = jax.random.split(key)
            xs = activations(kx, M, K, n)
            try:
                bf = cupti(bf16_matmul, list(zip(xs, bf_ws)), rounds)[0]
                deq, _, names = cupti(lambda x, w: w.matmul(x), list(zip(xs, kws)), rounds)
                deq_uqw = (cupti(lambda x, w: w.matmul(x), list(zip(xs, uqws)), rounds)[0]
                           if uqws is not None else float("nan"))
                y = jax.jit(lambda x, w: w.matmul(x))(xs[0], kw).astype(jnp.float32)
                ref = jnp.matmul(xs[0].astype(jnp.float32), w_float, precision=jax.lax.Precision.HIGHEST)
                fro = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            except Exception:
                log(f"cupti prefill {K}x{N} M={M} FAILED: {traceback.format_exc()[-1500:]}")
                continue
            flops = 2 * M * K * N
            row = dict(format="gptq-w4g128", bits=4, group_size=128, sym=False, act_order=False, M=M, K=K, N=N,
                       us=round(deq, 2), bf16_xla_us=round(bf, 2), xla_dequant_us=round(deq_uqw, 2),
                       speedup_vs_bf16=round(bf / deq, 3), bf16_tflops=round(flops / bf / 1e6, 1),
                       fro_rel_err=float(f"{fro:.3g}"), correct=bool(fro < TOL),
                       kernel="xla-dequant-matmul (kernel layout; Pallas kernel takes M <= "
                              f"{gm.MAX_KERNEL_M})", timing="cupti-rotating", gpu_kernels=names)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            log(f"cupti prefill {K}x{N} M={M}: bf16 {bf:.1f} us ({row['bf16_tflops']} TFLOP/s), kernel-layout XLA "
                f"dequant+matmul {deq:.1f} us, AutoGPTQ-layout {deq_uqw:.1f} us, x{row['speedup_vs_bf16']}, "
                f"err {fro:.1e} {names}")
        del bf_ws, kws, uqws, kw, uqw, w_float, w_bf16
    return rows


def legacy_scatter_matmul(x2d, w):
    """The large-M path before the prefill change (kept here for same-run comparison): codes rebuilt from the kernel
    layout with a scatter (``.at[row, col].set``), float32 dequantization in [K, N], one XLA matmul."""
    nt, kt = w.qweight.shape[:2]
    words = jax.lax.bitcast_convert_type(w.qweight, jnp.uint32)
    pairs = []
    for fields in gm._fields(w.bits):
        v = jnp.zeros((nt, kt, 128), jnp.uint32)
        for plane, word_shift, width, code_shift in fields:
            v = v | (((words[:, :, plane] >> word_shift) & ((2**width - 1) * 0x00010001)) << code_shift)
        pairs.append(jnp.stack([v & 0xFFFF, v >> 16], axis=-1))
    vals = jnp.stack(pairs, axis=3)
    row, col = gm._thread_coords()
    tiles = jnp.zeros((nt, kt, gm.CHUNK, gm.CHUNK), jnp.int32).at[:, :, row, col].set(vals.astype(jnp.int32))
    codes_kn = tiles.transpose(0, 2, 1, 3).reshape(nt * gm.CHUNK, kt * gm.CHUNK).T
    magic = gm._MAGIC[w.dtype_name]
    zpm = -w.nbias.astype(jnp.float32) if w.nbias is not None else jnp.float32(magic + 2 ** (w.bits - 1))
    rows = jnp.arange(w.k_pad) // w.group
    cmz = codes_kn.astype(jnp.float32) + magic - (zpm[rows] if w.nbias is not None else zpm)
    wd = (cmz * w.scales.astype(jnp.float32)[rows]).astype(w.dtype)
    xk = w.prepare_activations(x2d, x2d.shape[0]).astype(x2d.dtype)
    y = jnp.matmul(xk, wd.astype(x2d.dtype), preferred_element_type=jnp.float32)
    return y[:, : w.out_features].astype(x2d.dtype)


def chunked_kernel(x, w):
    return gm.chunked_matmul(x, w, gm._jit_gptq_matmul)


def poisoned_chunked_kernel(x, w):
    """The chunked path with every chunk's kernel output buffer NaN-filled (unwritten tiles show as NaN)."""
    def chunk_fn(xc, w):
        rc = gm.KernelConfig().resolved(w, xc.shape[0])
        poison = gm.nan_output_buffer(rc, w.n_pad, w.out_features, xc.shape[0], w.dtype)
        return gm.gptq_matmul(xc, w, out_init=poison)
    return gm.chunked_matmul(x, w, chunk_fn)


def prefill_format(fmt, key, K, N):
    """(baseline weight or None, kernel weight, W_float, {path: fn}, {path: fn checked with poisoned outputs},
    chunked-max-M of the dispatch) for 'gptq-w4g128' or 'lut4' (dense SqueezeLLM 4-bit)."""
    if fmt == "gptq-w4g128":
        uqw, kw, w_float = make_weight(key, K, N, 4, 128, False, False)
        paths = {"chunked": chunked_kernel, "dequant_once": gm.dequant_matmul, "old_scatter": legacy_scatter_matmul}
        checks = {"chunked": poisoned_chunked_kernel, "dequant_once": gm.dequant_matmul}
        return uqw, kw, w_float, paths, checks, gm.PREFILL_CHUNKED_MAX_M
    if fmt == "lut4":
        import kernels_lut as kl
        from pallas_kernels import lut_matmul as lm
        qw, kw, w_float = kl.make_weight(int(jax.random.randint(key, (), 0, 2**30)), K, N, 4, 0.0)

        def poisoned(x, w):
            def chunk_fn(xc, w):
                rc = lm.KernelConfig().resolved(w, xc.shape[0])
                poison = gm.nan_output_buffer(rc, w.n_pad, w.out_features, xc.shape[0], lm.kernel_out_dtype(w))
                return lm.lut_matmul(xc, w, out_init=poison)
            return gm.chunked_matmul(x, w, chunk_fn)

        paths = {"chunked": lambda x, w: gm.chunked_matmul(x, w, lm._jit_lut_matmul),
                 "dequant_once": lm.reference_matmul}
        return qw, kw, w_float, paths, {"chunked": poisoned, "dequant_once": lm.reference_matmul}, \
            lm.PREFILL_CHUNKED_MAX_M
    raise ValueError(f"unknown prefill format {fmt}")


def cupti_prefill_paths(key, shapes, ms, rounds, on_row=None, fmt="gptq-w4g128"):
    """Large M (prefill), device time (CUPTI, 4 rotating weight copies), all in one run: bf16 XLA matmul; the
    Pallas kernel over 64-row chunks; dequantize-once (gather-free / scatter-free decode of the kernel layout) + one
    XLA matmul; for GPTQ the old kernel-layout path (scatter); the XLA dequantize + matmul of the stored arrays
    (AutoGPTQ / SqueezeLLM layout). The two new paths are checked against x @ W_float (chunked: NaN-poisoned kernel
    outputs); the dispatched ``w.matmul`` too."""
    rows = []
    for (K, N) in shapes:
        key, kb, kw_key = jax.random.split(key, 3)
        w_bf16 = (jax.random.normal(kb, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        uqw, kw, w_float, paths, checks, chunked_max_m = prefill_format(fmt, kw_key, K, N)
        n = 4
        bf_ws, kws = copies(w_bf16, n), copies(kw, n)
        uqws = copies(uqw, n) if uqw is not None else None
        for M in ms:
            key, kx, kc = jax.random.split(key, 3)
            xs = activations(kx, M, K, n)
            t = {}
            timed = [("bf16", bf16_matmul, bf_ws)] + [(p, f, kws) for p, f in paths.items()] + [
                ("autogptq", lambda x, w: w.matmul(x), uqws)]
            for name, fn, ws in timed:
                if ws is None:
                    t[name] = float("nan")
                    continue
                try:
                    t[name], _, names = cupti(fn, list(zip(xs, ws)), rounds)
                    log(f"prefill-paths {fmt} {K}x{N} M={M} {name}: {t[name]:.1f} us {names[:6]}")
                except Exception:
                    t[name] = float("nan")
                    log(f"prefill-paths {K}x{N} M={M} {name} FAILED: {traceback.format_exc()[-1500:]}")
            t.setdefault("old_scatter", float("nan"))
            errs = {}
            x = jax.random.normal(kc, (M, K), jnp.float32).astype(jnp.bfloat16)
            ref = jnp.matmul(x.astype(jnp.float32), w_float, precision=jax.lax.Precision.HIGHEST)
            for name, fn in list(checks.items()) + [("dispatched", lambda x, w: w.matmul(x))]:
                try:
                    y = jax.jit(fn)(x, kw).astype(jnp.float32)
                    errs[name] = (float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)), bool(jnp.any(jnp.isnan(y))))
                except Exception:
                    errs[name] = (float("nan"), True)
                    log(f"prefill-paths check {name} FAILED: {traceback.format_exc()[-1500:]}")
            best = min(("chunked", "dequant_once"), key=lambda p: t[p] if t[p] == t[p] else float("inf"))
            dispatched = "chunked" if M <= chunked_max_m else "dequant_once"
            meta = (dict(bits=4, group_size=128, sym=False, act_order=False) if fmt.startswith("gptq")
                    else dict(bits=4, sparse_frac=0.0))
            row = dict(format=fmt, **meta, M=M, K=K, N=N,
                       us=round(t[best], 2), bf16_xla_us=round(t["bf16"], 2), chunked_kernel_us=round(t["chunked"], 2),
                       dequant_once_us=round(t["dequant_once"], 2), old_scatter_path_us=round(t["old_scatter"], 2),
                       xla_dequant_us=round(t["autogptq"], 2), speedup_vs_bf16=round(t["bf16"] / t[best], 3),
                       speedup_vs_old_path=round(t["old_scatter"] / t[best], 2), fastest_path=best,
                       dispatched_path=dispatched, prefill_chunked_max_m=chunked_max_m,
                       bf16_tflops=round(2 * M * K * N / t["bf16"] / 1e6, 1),
                       fro_rel_err={k: float(f"{e:.3g}") for k, (e, _) in errs.items()},
                       nan={k: nan for k, (_, nan) in errs.items()},
                       correct=all(e < TOL and not nan for e, nan in errs.values()),
                       kernel="prefill paths (chunked kernel / dequantize-once)", timing="cupti-rotating")
            rows.append(row)
            if on_row is not None:
                on_row(row)
            log(f"prefill-paths {fmt} {K}x{N} M={M}: bf16 {t['bf16']:.1f}, chunked {t['chunked']:.1f}, dequant-once "
                f"{t['dequant_once']:.1f}, old {t['old_scatter']:.1f}, autogptq {t['autogptq']:.1f} us; fastest {best} "
                f"(x{row['speedup_vs_bf16']} bf16); dispatch {dispatched}; errs {row['fro_rel_err']} nan {row['nan']}")
        del bf_ws, kws, uqws, kw, uqw, w_float, w_bf16
    return rows


PREFILL_MD_BEGIN, PREFILL_MD_END = "<!-- gptq prefill paths begin -->", "<!-- gptq prefill paths end -->"


def merge_prefill(jsonl, out_dir, note=""):
    """Rows of a --prefill-paths run -> kernels.json (appended, key ``TABLE_ROW_KEY``: other rows stay)
    and their own section of kernels.md (replaced between its markers; the rest of the file is left as it is)."""
    results = _results_module()
    with open(jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    results.append_rows(os.path.join(out_dir, "kernels.json"), rows, key=TABLE_ROW_KEY)
    env = rows[0]
    lines = [PREFILL_MD_BEGIN, "", "## Prefill (M > 64), GPTQ int4 g128 and dense SqueezeLLM 4-bit: path per M, "
             "device time", "",
             f"{env['device']}, jax {env['jax']}, {env['date']}; command: `{env['command']}` (device tool; "
             "`--out-dir` was its $OUT). " + note, "",
             "CUPTI device time per call (4 rotating weight copies + activations, median of 3 passes), all columns "
             "from the same run. chunked = the Pallas kernel over 64-row chunks of x (weight re-read per chunk); "
             "dequant-once = scatter-free decode of the kernel layout to bf16 W^T + one XLA matmul; old = the "
             "previous dispatched path (codes rebuilt by a scatter); AutoGPTQ = XLA dequantize + matmul of the "
             "stored AutoGPTQ arrays (lut4: of the stored SqueezeLLM arrays; no old column: its reference path "
             "was already made scatter-free by the LUT helper). `dispatch` = what the weight's `matmul` ran at "
             f"this M (PREFILL_CHUNKED_MAX_M = {env['prefill_chunked_max_m']} when measured). rel err (Frobenius "
             "vs x @ W_float): chunked with NaN-poisoned kernel outputs / dequant-once / dispatched.", "",
             "| format | K x N | M | bf16 XLA us | chunked us | dequant-once us | old us | AutoGPTQ us | fastest | "
             "x bf16 (fastest) | x old | dispatch | rel err c / d / disp | ok |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        e = r["fro_rel_err"]
        lines.append(f"| {r['format']} | {r['K']}x{r['N']} | {r['M']} | {r['bf16_xla_us']} | "
                     f"{r['chunked_kernel_us']} | {r['dequant_once_us']} | {r['old_scatter_path_us']} | "
                     f"{r['xla_dequant_us']} | "
                     f"{r['fastest_path']} | {r['speedup_vs_bf16']} | {r['speedup_vs_old_path']} | "
                     f"{r['dispatched_path']} | {e.get('chunked')} / {e.get('dequant_once')} / {e.get('dispatched')} "
                     f"| {'yes' if r['correct'] else 'NO'} |")
    lines += ["", PREFILL_MD_END]
    md_path = os.path.join(out_dir, "kernels.md")
    text = open(md_path).read() if os.path.exists(md_path) else ""
    if PREFILL_MD_BEGIN in text and PREFILL_MD_END in text:
        head, rest = text.split(PREFILL_MD_BEGIN, 1)
        text = head + "\n".join(lines) + rest.split(PREFILL_MD_END, 1)[1]
    elif CUPTI_MD_END in text:  # right after the GPTQ device-time section
        head, rest = text.split(CUPTI_MD_END, 1)
        text = head + CUPTI_MD_END + "\n\n" + "\n".join(lines) + rest
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    with open(md_path, "w") as f:
        f.write(text)


def smoke_model(key, hidden=4096, inter=11008, heads=32, vocab=32000):
    """A LLaMA-7B-layer-shaped model (2 layers, bf16, RTN w4 g128) jitted with the kernel layout: decode logits vs
    the XLA reference path, and the generation loop running with the kernels inside."""
    import models.llama as llama
    from models.generate import generate
    from jaxquant.config import QuantConfig
    from jaxquant.formats import UniformQuantizedWeight
    from jaxquant.kernel_layout import prepare_for_kernels
    from jaxquant.rtn import rtn

    cfg = llama.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=2,
                            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads)
    module = llama.LlamaForCausalLM(cfg, dtype=jnp.bfloat16)
    params = module.init(key, jnp.zeros((1, 1), jnp.int32))["params"]

    def quantize(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        if names[-1] == "kernel" and names[0].startswith("layers_"):
            return rtn(leaf.astype(jnp.float32).T, QuantConfig(bits=4, group_size=128))
        return leaf

    qparams = jax.tree_util.tree_map_with_path(quantize, params)
    kparams = prepare_for_kernels(qparams, jnp.bfloat16)
    n_kernel = sum(isinstance(l, gm.GPTQKernelWeight) for l in jax.tree_util.tree_leaves(
        kparams, is_leaf=lambda x: isinstance(x, gm.GPTQKernelWeight)))
    n_uqw = sum(isinstance(l, UniformQuantizedWeight) for l in jax.tree_util.tree_leaves(
        qparams, is_leaf=lambda x: isinstance(x, UniformQuantizedWeight)))
    fwd = jax.jit(lambda p, ids: module.apply({"params": p}, ids)[0])
    for T in (1, 80):  # decode-sized (one kernel call) and prefill-sized (kernel over 64-row chunks)
        ids = jax.random.randint(jax.random.fold_in(key, T), (1, T), 0, cfg.vocab_size)
        ref = fwd(qparams, ids)
        got = fwd(kparams, ids)
        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        log(f"smoke: forward T={T}: logits rel err kernel-layout vs AutoGPTQ-layout params {err:.2e} "
            f"({n_kernel} kernel weights of {n_uqw})")
    prompt = [[1, 2, 3, 4, 5, 6, 7]]
    timings = {}
    for name, p in (("kernel", kparams), ("xla-dequant", qparams)):
        generate(module, p, prompt, max_new_tokens=64)
        t0 = time.perf_counter()
        toks = generate(module, p, prompt, max_new_tokens=64)
        timings[name] = (time.perf_counter() - t0, toks[0][:8])
    for name, (sec, toks) in timings.items():
        log(f"smoke: generate 64 tokens (2-layer model, batch 1) with {name}: {sec * 1e3:.1f} ms, first tokens {toks}")


def _results_module():
    """jaxquant/results.py loaded on its own (the package __init__ imports every method, which others edit)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxquant", "results.py")
    spec = importlib.util.spec_from_file_location("jaxquant_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_outputs(rows, out_dir, bw, fresh=False):
    results = _results_module()
    append_rows, row = results.append_rows, results.row

    os.makedirs(out_dir, exist_ok=True)
    full = [row("kernels", **r) for r in rows]
    path = os.path.join(out_dir, "kernels.json")
    if fresh and os.path.exists(path):
        os.remove(path)
    append_rows(path, full, key=TABLE_ROW_KEY)
    dev = full[0]["device"] if full else "?"
    lines = [f"# GPTQ kernel benchmark ({dev}, jax {full[0]['jax'] if full else '?'})", "",
             f"Device-to-device copy: {bw:.0f} GB/s (read + write). Times are medians per call (us); speedup = bf16 "
             "XLA time / kernel time in the same run; GB/s = (compressed weight + activation + output bytes) / time.",
             "", "| format | K x N | M | kernel us | GB/s | bf16 XLA us | XLA dequant us | x bf16 | x dequant | "
             "rel err | path |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in full:
        lines.append(f"| {r['format']} | {r['K']}x{r['N']} | {r['M']} | {r['us']} | {r.get('gbps', '')} | "
                     f"{r['bf16_xla_us']} | {r['xla_dequant_us']} | {r['speedup_vs_bf16']} | "
                     f"{r.get('speedup_vs_xla_dequant', '')} | {r.get('fro_rel_err', '')} | {r['kernel']} |")
    with open(os.path.join(out_dir, "kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


CUPTI_MD_BEGIN, CUPTI_MD_END = "<!-- gptq cupti rows begin -->", "<!-- gptq cupti rows end -->"


def merge_cupti(jsonl, out_dir, note=""):
    """Rows of a --cupti run (JSON lines) -> kernels.json (appended; ``TABLE_ROW_KEY``, so the chain rows, other
    dates' rows and other benchmarks' rows stay) and the GPTQ device-time section of kernels.md (replaced between its
    markers; the rest of the file is left as it is)."""
    results = _results_module()
    with open(jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    results.append_rows(os.path.join(out_dir, "kernels.json"), rows, key=TABLE_ROW_KEY)
    dec = [r for r in rows if r["M"] <= gm.MAX_KERNEL_M]
    pre = [r for r in rows if r["M"] > gm.MAX_KERNEL_M]
    env = rows[0]
    lines = [CUPTI_MD_BEGIN, "", "## GPTQ int4 / int3 g128: device time (CUPTI, rotating inputs), all shapes", "",
             f"{env['device']}, jax {env['jax']}, {env['date']}; command: `{env['command']}` (device tool; "
             "`--out-dir` was its $OUT). " + note, "",
             "Each op is one jitted single-call program dispatched on a rotating set of weight copies and activations "
             "(together > 2x the 50 MB L2); CUPTI records every GPU kernel and a call's time is the sum over its "
             "kernels (host dispatch and launch gaps excluded), median over 3 passes. `path` = what "
             "`GPTQKernelWeight.matmul` runs (activation pad + Pallas kernel + float32 partial-sum reduction); "
             "`kernel` = the Pallas kernel alone. bf16 XLA and XLA dequant (AutoGPTQ arrays -> float32 dequantize -> "
             "matmul under jit) in the same run. Block sizes: the heuristic (`KernelConfig()`). Every row checked "
             "against x @ W_float with a NaN-poisoned output buffer (rel err = Frobenius). GB/s = (compressed weight + "
             "activation + output bytes) / path time.", "",
             "Plot: `kernels.png` (`python bench/plot_kernels.py`): speedup over bf16 by format and M on 8192x28672 "
             "from kernels.json (device-time rows preferred; wall-clock chain rows hatched). Notes on what limits "
             "each target: `bench/NOTES_kernels.md`.", "",
             "| format | K x N | M | path us | kernel us | bf16 XLA us | XLA dequant us | x bf16 (path) | "
             "x bf16 (kernel alone) | GB/s (path) | rel err | tile_k/stages/k_splits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in dec:
        c = r.get("config") or {}
        lines.append(f"| {r['format']} | {r['K']}x{r['N']} | {r['M']} | {r['us']} | {r['kernel_only_us']} | "
                     f"{r['bf16_xla_us']} | {r['xla_dequant_us']} | {r['speedup_vs_bf16']} | "
                     f"{r['kernel_only_speedup_vs_bf16']} | {r['gbps']} | {r['fro_rel_err']} | "
                     f"{config_cell(c)} |")
    if pre:
        lines += ["", "### Prefill-sized M (int4 g128, device time, 4 rotating weight copies)", "",
                  f"The Pallas kernel takes M <= {gm.MAX_KERNEL_M} only, so at these M `GPTQKernelWeight.matmul` "
                  "runs its XLA dequantize + matmul from the kernel layout (first column); the AutoGPTQ-layout XLA "
                  "path and the bf16 matmul are measured in the same run. Superseded: the dispatch now runs the "
                  "kernel over 64-row chunks (section 'Prefill (M > 64)' below).", "",
                  "| K x N | M | bf16 XLA us (TFLOP/s) | kernel-layout XLA dequant+matmul us | AutoGPTQ-layout XLA "
                  "dequant+matmul us | x bf16 (kernel layout) | rel err |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in pre:
            lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['bf16_xla_us']} ({r['bf16_tflops']}) | {r['us']} | "
                         f"{r['xla_dequant_us']} | {r['speedup_vs_bf16']} | {r['fro_rel_err']} |")
    lines += ["", CUPTI_MD_END]
    md_path = os.path.join(out_dir, "kernels.md")
    text = open(md_path).read() if os.path.exists(md_path) else ""
    if CUPTI_MD_BEGIN in text and CUPTI_MD_END in text:
        head, rest = text.split(CUPTI_MD_BEGIN, 1)
        text = head + "\n".join(lines) + rest.split(CUPTI_MD_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    with open(md_path, "w") as f:
        f.write(text)


def parse_config(text):
    """tile_k,stages,k_splits[,n_sub] with "auto" for the heuristic."""
    tile_k, stages, k_splits, n_sub = ([None if v in ("", "auto") else int(v) for v in text.split(",")] + [None])[:4]
    return gm.KernelConfig(tile_k=tile_k, stages=stages, k_splits=k_splits, n_sub=n_sub)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="no full table")
    ap.add_argument("--sweep", action="store_true", help="block-size sweep (--sweep-configs) on --sweep-shapes")
    ap.add_argument("--sweep-shapes", default="8192x28672,4096x4096")
    ap.add_argument("--sweep-ms", default="1,16")
    ap.add_argument("--sweep-bits", default="4")
    ap.add_argument("--sweep-configs", default="auto,4,auto,auto;256,4,auto,1;128,4,auto,2",
                    help="tile_k,stages,k_splits,n_sub;... (auto = heuristic)")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--prefill", action="store_true", help="large-M rows (XLA path) on 8192x28672")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--diag", action="store_true", help="bandwidth ceilings + kernel variants on 8192x28672")
    ap.add_argument("--tune", action="store_true", help="full table uses the best --diag config per M")
    ap.add_argument("--diag-configs", default="full:auto,4,auto,auto;nodeq:auto,4,auto,auto",
                    help="variant:tile_k,stages,k_splits,n_sub;...")
    ap.add_argument("--no-check-matrix", action="store_true")
    ap.add_argument("--cupti", action="store_true",
                    help="device-time rows (CUPTI, rotating inputs) for --cupti-formats x --shapes x --ms, written "
                         "as JSON lines to --out-dir/kernels_cupti.jsonl; no chain table")
    ap.add_argument("--cupti-formats", default="w4g128,w3g128")
    ap.add_argument("--cupti-prefill-ms", default="128,512,2048")
    ap.add_argument("--cupti-prefill-shapes", default="8192x28672,4096x4096,4096x11008,11008x4096")
    ap.add_argument("--rounds", type=int, default=3, help="CUPTI: passes over the rotating inputs")
    ap.add_argument("--merge-cupti", metavar="JSONL",
                    help="no GPU work: merge the rows of a --cupti run into --out-dir/kernels.json and the GPTQ "
                         "device-time section of kernels.md")
    ap.add_argument("--merge-note", default="")
    ap.add_argument("--prefill-paths", action="store_true",
                    help="only the prefill path comparison (cupti_prefill_paths) on --cupti-prefill-shapes x "
                         "--cupti-prefill-ms -> --out-dir/kernels_prefill.jsonl")
    ap.add_argument("--prefill-lut-shapes", default="", help="--prefill-paths: also dense lut4 on these shapes")
    ap.add_argument("--prefill-lut-ms", default="128,256,512")
    ap.add_argument("--merge-prefill", metavar="JSONL",
                    help="no GPU work: merge a --prefill-paths run into --out-dir/kernels.json + kernels.md")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if args.merge_cupti:
        merge_cupti(args.merge_cupti, args.out_dir, args.merge_note)
        return
    if args.merge_prefill:
        merge_prefill(args.merge_prefill, args.out_dir, args.merge_note)
        return

    log(f"jax {jax.__version__}, devices {jax.devices()}")
    key = jax.random.PRNGKey(int.from_bytes(os.urandom(4), "little"))
    shapes = lambda s: [tuple(int(v) for v in p.split("x")) for p in s.split(",") if p]
    ints = lambda s: [int(v) for v in s.split(",") if v]
    ok = True
    tuned = None
    if not args.no_check_matrix:
        key, k = jax.random.split(key)
        ok = correctness_matrix(k)
        log(f"correctness matrix: {'all OK' if ok else 'FAILURES'}")
    bw = copy_bandwidth()
    log(f"device-to-device copy: {bw:.0f} GB/s (read + write); read-only pass: {read_bandwidth():.0f} GB/s")
    if args.diag:
        key, k = jax.random.split(key)
        tuned = diagnostics(k, args.reps, args.calls,
                            [(c.split(":")[0], parse_config(c.split(":")[1])) for c in args.diag_configs.split(";")])
        log(f"best configs on 8192x28672 by M: {tuned}")
        if not args.tune:
            tuned = None
    if args.sweep:
        key, k = jax.random.split(key)
        sweep(k, shapes(args.sweep_shapes), ints(args.sweep_ms), ints(args.sweep_bits),
              [parse_config(c) for c in args.sweep_configs.split(";")], args.reps, args.calls)
    rows = []
    if args.prefill_paths:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, "kernels_prefill.jsonl")
        results = _results_module()

        def on_prefill_row(r):
            with open(path, "a") as f:
                f.write(json.dumps(results.row("kernels", **r)) + "\n")

        key, k = jax.random.split(key)
        pre = cupti_prefill_paths(k, shapes(args.cupti_prefill_shapes), ints(args.cupti_prefill_ms), args.rounds,
                                  on_prefill_row)
        if args.prefill_lut_shapes:
            key, k = jax.random.split(key)
            pre += cupti_prefill_paths(k, shapes(args.prefill_lut_shapes), ints(args.prefill_lut_ms), args.rounds,
                                       on_prefill_row, fmt="lut4")
        log("\nK x N        M     bf16  chunked  deq-once      old  autogptq  fastest       x_bf16  ok")
        for r in pre:
            log(f"{r['K']}x{r['N']:<6} {r['M']:>5} {r['bf16_xla_us']:>8} {r['chunked_kernel_us']:>8} "
                f"{r['dequant_once_us']:>9} {r['old_scatter_path_us']:>8} {r['xla_dequant_us']:>9} "
                f"{r['fastest_path']:<13} {r['speedup_vs_bf16']:>6} {r['correct']}")
        sys.exit(0 if ok and all(r["correct"] for r in pre) else 1)
    if args.cupti:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, "kernels_cupti.jsonl")
        results = _results_module()

        def on_row(r):
            with open(path, "a") as f:
                f.write(json.dumps(results.row("kernels", **r)) + "\n")

        key, k1, k2 = jax.random.split(key, 3)
        cupti_table(k1, shapes(args.shapes), ints(args.ms), args.cupti_formats.split(","), args.rounds, args.calls,
                    on_row)
        if args.cupti_prefill_ms:
            cupti_prefill_rows(k2, shapes(args.cupti_prefill_shapes), ints(args.cupti_prefill_ms), args.rounds,
                               on_row)
        sys.exit(0 if ok else 1)
    if not args.quick:
        key, k = jax.random.split(key)
        partial_dir = os.environ.get("OUT")  # on the device machine: keep what finished if the call is cut short
        on_rows = (lambda r: write_outputs(r, partial_dir, bw, fresh=True)) if partial_dir else None
        rows = full_table(k, shapes(args.shapes), ints(args.ms), args.formats.split(","), args.reps, args.calls, bw,
                          on_rows, tuned)
    if args.prefill:
        key, k = jax.random.split(key)
        rows += prefill_rows(k, args.reps, args.calls)
    if rows:
        write_outputs(rows, args.out_dir, bw)
    if args.smoke:
        key, k = jax.random.split(key)
        try:
            smoke_model(k)
        except Exception:
            log("smoke check raised:")
            traceback.print_exc()
    if rows:
        log("\nformat      K x N        M   kernel_us  bf16_us  deq_us  x_bf16  GB/s  err")
        for r in rows:
            log(f"{r['format']:<18} {r['K']}x{r['N']:<6} {r['M']:>3} {r['us']:>9} {r['bf16_xla_us']:>8} "
                f"{r['xla_dequant_us']:>7} {r['speedup_vs_bf16']:>6} {r.get('gbps', '')!s:>6} "
                f"{r.get('fro_rel_err', '')}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
