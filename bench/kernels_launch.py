"""The shared kernel launch on the GPU: the single-kernel ("fused") launch vs the first ("partials") launch for the
GPTQ, SqueezeLLM (LUT) and SpQR kernels, and the GPTQ 3-bit code layouts ("halves" vs "planes").

    python bench/kernels_launch.py --out $OUT/launch.jsonl [--shapes 8192x28672,4096x4096] [--ms 1,16]
        [--formats gptq-w4g128,gptq-w3g128,gptq-w3g128-planes,lut4,lut3,spqr3] [--launches partials,fused]
    python bench/kernels_launch.py --smoke          # odd shapes through every new code path (correctness only)
    python bench/kernels_launch.py --merge launch.jsonl [...]   # rows -> bench/results/kernels.{json,md}

auto = the default (``KernelConfig()``: the heuristic picks the launch); partials = the kernel writes float32 partials [k_splits, N_pad, M_pad] and XLA sums / transposes / casts them (one
fusion); fused = the k_splits CTAs of an output tile form a cluster, reduce through distributed shared memory and
TMA-store y [M, N] (``gptq_matmul.launch_kernel``). Timing as bench/kernels.py --cupti: one jitted single-call
program per (op, shape, M) dispatched over rotating weight copies + activations (> 4x the 50 MB L2), CUPTI kernel
durations summed per call, median over ``--rounds`` passes; bf16 XLA measured in the same run. Every timed
configuration is first checked on fresh activations against x @ W_float with its output buffer NaN-poisoned.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import gptq_matmul as gm  # noqa: E402
from pallas_kernels import lut_matmul as lm  # noqa: E402
from pallas_kernels import spqr_matmul as sm  # noqa: E402
from bench.timing import activations, bf16_matmul, config_fields, copies, cupti, rotation_sets  # noqa: E402

TOL = 1e-2
FORMATS = ("gptq-w4g128", "gptq-w3g128", "gptq-w3g128-planes", "lut4", "lut3", "spqr3")


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------------ formats
class Format:
    """name -> (kernel weight, float32 W [K, N]) maker, kernel call, config class, output dtype, kernel-name tag."""

    def __init__(self, name):
        self.name = name
        self.family = "gptq" if name.startswith("gptq") else "lut" if name.startswith("lut") else "spqr"

    def make(self, seed, K, N, dtype=jnp.bfloat16):
        key = jax.random.PRNGKey(seed)
        if self.family == "gptq":
            bits = 4 if "w4" in self.name else 3
            layout = "planes" if "planes" in self.name else "halves"  # explicit: not the default
            G = -(-K // 128)
            k1, k2, k3 = jax.random.split(key, 3)
            codes = jax.random.randint(k1, (K, N), 0, 2**bits, jnp.int32)
            scales = jax.random.uniform(k2, (G, N), jnp.float32, 0.5, 1.5) * 0.01
            sym = self.name.endswith("-sym")  # symmetric: zero = 2**(bits-1), no nbias array in the kernel layout
            zeros = (jnp.full((G, N), 2 ** (bits - 1), jnp.int32) if sym
                     else jax.random.randint(k3, (G, N), 0, 2**bits, jnp.int32))
            g_idx = np.arange(K) // 128
            if self.name.endswith("-act"):  # act-order: groups in a random column order (the kernel gathers x)
                g_idx = np.random.RandomState(seed).permutation(g_idx)
            w_float = scales[g_idx] * (codes - zeros[g_idx]).astype(jnp.float32)
            return gm.pack(codes, scales, zeros, g_idx, bits=bits, sym=sym, dtype=dtype, layout=layout), w_float
        if self.family == "lut":  # "lut4", "lut3"; "-sp": with 0.5% kept (sparse) weights
            from bench.kernels_lut import make_weight
            _, kw, w_float = make_weight(seed, K, N, int(self.name[3]), 0.005 if self.name.endswith("-sp") else 0.0,
                                         dtype)
            return kw, w_float
        from bench.kernels_spqr import make_spqr
        from jaxquant.kernel_layout import spqr_to_kernel_weight
        w = make_spqr(seed, K, N)
        return spqr_to_kernel_weight(w, dtype), w.dequantize(jnp.float32)

    def config(self, **kw):
        return (sm.KernelConfig if self.family == "spqr" else gm.KernelConfig)(**kw)

    def call(self, x, w, cfg, out_init=None, variant="full"):
        fn = {"gptq": gm.gptq_matmul, "lut": lm.lut_matmul, "spqr": sm.spqr_matmul}[self.family]
        return fn(x, w, config=cfg, out_init=out_init, _variant=variant)

    def out_dtype(self, w):
        if self.family == "lut":
            return lm.kernel_out_dtype(w)
        return w.dtype if self.family == "gptq" else jnp.dtype(jnp.float32)

    @property
    def tag(self):
        return {"gptq": "gptq_w", "lut": "lut_w", "spqr": "spqr_w"}[self.family]


def check(fmt, kw, w_float, M, cfg, key, variant="full"):
    """(Frobenius rel err, max-abs rel err, any NaN, poisoned == plain output) of the kernel path vs x @ W_float."""
    x = jax.random.normal(key, (M, kw.in_features), jnp.float32).astype(kw.dtype)
    rc = cfg.resolved(kw, M)
    poison = gm.nan_output_buffer(rc, kw.n_pad, kw.out_features, M, fmt.out_dtype(kw))
    y = jax.jit(lambda x, w, p: fmt.call(x, w, cfg, p, variant))(x, kw, poison).astype(jnp.float32)
    y2 = jax.jit(lambda x, w: fmt.call(x, w, cfg, variant=variant))(x, kw).astype(jnp.float32)
    ref = jnp.matmul(x.astype(jnp.float32), w_float, precision=jax.lax.Precision.HIGHEST)
    fro = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    mx = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
    same = float(jnp.max(jnp.abs(y - y2))) <= 1e-5 * float(jnp.max(jnp.abs(ref)))  # sparse parts: order of adds
    return fro, mx, bool(jnp.any(jnp.isnan(y))), same, rc


# ------------------------------------------------------------------------------------------------------- runs
def smoke_one(tag, fmt, kw, w_float, M, cfg, key, describe, require=lambda rc: True) -> bool:
    """One NaN-poisoned correctness check of a smoke case, logged; ``describe(rc)`` names the resolved config."""
    try:
        fro, mx, nan, same, rc = check(fmt, kw, w_float, M, cfg, key)
    except Exception:
        log(f"{tag} {fmt.name} {kw.in_features}x{kw.out_features} M={M} {cfg} FAILED {traceback.format_exc()[-3000:]}")
        return False
    good = fro < TOL and not nan and same and require(rc)
    log(f"{tag} {fmt.name} {jnp.dtype(kw.dtype).name} {kw.in_features}x{kw.out_features} M={M} {describe(rc)}: "
        f"err {fro:.2e} (max {mx:.2e}) nan={nan} same={same} {'OK' if good else 'FAIL'}")
    return good


def smoke(seed):
    """Odd shapes through the new paths on the GPU (fused launch with k_splits 1..8, M 1..64, N not a multiple of
    64, both 3-bit layouts, float16, LUT with a sparse part, SpQR): every output NaN-poisoned. Returns all ok."""
    ok = True
    cases = [  # format, K, N, M list, k_splits list, dtype
        ("gptq-w4g128", 1024, 200, (1, 5, 64), (1, 2, 8), jnp.bfloat16),
        ("gptq-w3g128", 2048, 136, (1, 9, 16), (1, 4, 8), jnp.bfloat16),
        ("gptq-w3g128", 1024, 64, (3, 64), (2,), jnp.float16),
        ("gptq-w3g128-planes", 1024, 128, (1, 33), (2,), jnp.bfloat16),
        ("lut4", 1024, 192, (1, 17), (1, 4), jnp.bfloat16),
        ("lut3", 2048, 72, (2, 64), (8,), jnp.bfloat16),
        ("spqr3", 1024, 128, (1, 7), (1, 4), jnp.bfloat16),
    ]
    for i, (name, K, N, ms, splits, dtype) in enumerate(cases):
        fmt = Format(name)
        try:
            kw, w_float = fmt.make(seed + i, K, N, dtype)
        except Exception:
            log(f"smoke {name} {K}x{N}: make FAILED {traceback.format_exc()[-1200:]}")
            ok = False
            continue
        for M in ms:
            for ks in splits:
                for fused in (True, False) if ks == splits[0] and M == ms[0] else (True,):
                    tile_k = 256 if fmt.family == "spqr" else 128  # enough pipeline steps for 8 splits
                    cfg = fmt.config(k_splits=ks, fused=fused, tile_k=tile_k)
                    ok &= smoke_one("smoke", fmt, kw, w_float, M, cfg, jax.random.PRNGKey(seed + 100 * i + M),
                                    lambda rc: f"k_splits={rc.k_splits} fused={rc.fused}")
    return ok


def smoke_ws(seed, families=("gptq", "lut")):
    """The warp-specialized variant (GPTQ and LUT weights) on odd shapes (N_pad a multiple of 128; forced grids so
    that units are split between two or three CTAs, even and uneven; sym / asym, 3 / 4 bits, float16, M 1..64, LUT
    with a sparse part), every output NaN-poisoned. ``families``: the weight formats to run."""
    ok = True
    cases = [  # format, K, N, M list, configs, dtype
        ("gptq-w4g128", 1024, 840, (1, 5), ({"tile_k": 128, "ctas": 4}, {"tile_k": 256, "ctas": 4}, {}), jnp.bfloat16),
        ("gptq-w4g128", 2048, 200, (1, 16, 64), ({}, {"tile_k": 256, "stages": 2}), jnp.bfloat16),
        ("gptq-w3g128", 2048, 384, (1, 9), ({}, {"tile_k": 128, "ctas": 2}), jnp.bfloat16),
        ("gptq-w4g128", 1024, 256, (3,), ({}, {"tile_k": 128, "ctas": 2}), jnp.float16),
        # uneven stream-K grids: CTAs of q and q + 1 steps, units spread over up to 3 CTAs (3 partial slots)
        ("gptq-w4g128", 1024, 256, (1, 7), ({"tile_k": 128, "ctas": 7}, {"tile_k": 64, "ctas": 5}), jnp.bfloat16),
        ("gptq-w3g128", 2048, 640, (2,), ({"tile_k": 256, "ctas": 13},), jnp.bfloat16),
        # whole units per CTA, y stored by the warpgroups (fused). (wgs=4 hung on the H100 and is rejected.)
        ("gptq-w4g128", 1024, 840, (1, 5, 64), ({"fused": True}, {"fused": True, "ctas": 1, "tile_k": 128}),
         jnp.bfloat16),
        ("gptq-w3g128", 1024, 512, (1, 33), ({"fused": True, "tile_k": 128},), jnp.bfloat16),
        ("gptq-w4g128", 1024, 512, (2,), ({"fused": True},), jnp.float16),
        # LUT: each warpgroup looks up its own 64 rows' tables (the unit's tables change across unit boundaries)
        ("lut4", 1024, 840, (1, 5), ({"tile_k": 128, "ctas": 4}, {"tile_k": 256, "ctas": 7}, {}), jnp.bfloat16),
        ("lut3", 2048, 384, (1, 16, 64), ({}, {"tile_k": 128, "ctas": 5}), jnp.bfloat16),
        ("lut4", 1024, 512, (1, 33), ({"fused": True}, {"fused": True, "ctas": 1, "tile_k": 128}), jnp.bfloat16),
        ("lut3", 1024, 256, (3,), ({"fused": True, "tile_k": 128}, {"tile_k": 64, "ctas": 5}), jnp.float16),
        ("lut4-sp", 1024, 200, (1, 9), ({"tile_k": 128, "ctas": 3}, {"fused": True}), jnp.bfloat16),
        # 3-bit at M < 8 (defaults since 2026-11-24): sparse lut3; GPTQ 3-bit with the scales after the wgmma (the ws
        # default of 3-bit codes) in float16, uneven grids and fused
        ("lut3-sp", 1024, 200, (1, 5), ({"tile_k": 128, "ctas": 3}, {}), jnp.bfloat16),
        ("gptq-w3g128", 1024, 840, (1, 5, 64), ({"tile_k": 128, "ctas": 7}, {"fused": True}), jnp.float16),
    ]
    for i, (name, K, N, ms, cfgs, dtype) in enumerate(cases):
        fmt = Format(name)
        if fmt.family not in families:
            continue
        kw, w_float = fmt.make(seed + i, K, N, dtype)
        for M in ms:
            for extra in cfgs:
                cfg = fmt.config(variant="ws", **extra)
                ok &= smoke_one("smoke-ws", fmt, kw, w_float, M, cfg, jax.random.PRNGKey(seed + 100 * i + M),
                                lambda rc: f"{rc.tile_k}/{rc.stages} ctas {rc.ctas} slots {rc.k_splits}"
                                f"{' unpadded x' if rc.direct_x else ''}")
    return ok


def smoke_direct(seed):
    """The unpadded-activation path (``KernelConfig(direct_x=True)``, M = 1..7) on odd shapes through both GPTQ
    kernels: K_pad > K (TMA zero-fills the blocks past K), K not a multiple of 64 (column pad only), act-order,
    3 / 4 bits, float16, tile_k 64..512, n_sub 2, k_splits (partials and cluster), the ws kernel with units split
    between CTAs and fused; every output NaN-poisoned. The first config of a case runs every M, the others M[0]."""
    ok = True
    cases = [  # format, K, N, M list, configs, dtype
        ("gptq-w4g128", 1024, 200, (1, 2, 3, 4, 5, 6, 7),
         ({}, {"tile_k": 512, "k_splits": 1}, {"n_sub": 2, "tile_k": 256}, {"k_splits": 2, "fused": True, "tile_k": 128}),
         jnp.bfloat16),
        ("gptq-w3g128", 576, 136, (3, 1, 7), ({}, {"tile_k": 256, "k_splits": 1}, {"tile_k": 64, "k_splits": 4}),
         jnp.bfloat16),
        ("gptq-w4g128", 1000, 128, (2, 7), ({},), jnp.bfloat16),
        ("gptq-w4g128-act", 1024, 192, (1, 6), ({}, {"tile_k": 512, "k_splits": 1}), jnp.bfloat16),
        ("gptq-w3g128", 1024, 64, (5,), ({},), jnp.float16),
        ("gptq-w4g128", 1024, 840, (1, 5), ({"variant": "ws", "tile_k": 128, "ctas": 4}, {"variant": "ws", "fused": True},
                                           {"variant": "ws", "fused": True, "ctas": 1, "tile_k": 128}), jnp.bfloat16),
        ("gptq-w3g128", 2048, 384, (3, 7), ({"variant": "ws"}, {"variant": "ws", "tile_k": 128, "ctas": 2}), jnp.bfloat16),
        ("gptq-w4g128", 576, 256, (4,), ({"variant": "ws", "tile_k": 64, "ctas": 2}, {"variant": "ws", "fused": True}),
         jnp.float16),
    ]
    for i, (name, K, N, ms, cfgs, dtype) in enumerate(cases):
        fmt = Format(name)
        kw, w_float = fmt.make(seed + i, K, N, dtype)
        for ci, extra in enumerate(cfgs):
            for M in (ms if ci == 0 else ms[:1]):
                cfg = fmt.config(direct_x=True, **extra)
                ok &= smoke_one("smoke-direct", fmt, kw, w_float, M, cfg, jax.random.PRNGKey(seed + 100 * i + M),
                                lambda rc: f"{rc.variant or 'wg1'} {rc.tile_k}/{rc.stages}/{rc.k_splits} n_sub "
                                           f"{rc.n_sub} fused {rc.fused}", require=lambda rc: rc.direct_x)
    return ok


def table(seed, shapes, ms, formats, launches, rounds, emit, deadline, configs=None):
    for si, (K, N) in enumerate(shapes):
        if time.time() > deadline:
            log(f"time budget spent: skipping {K}x{N} and later shapes")
            break
        key = jax.random.PRNGKey(seed + si)
        kb, kx = jax.random.split(key)
        w_bf16 = (jax.random.normal(kb, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        bf_ws = copies(w_bf16, rotation_sets(w_bf16.nbytes, 32))
        bf16_us = {}
        for M in ms:
            xs = activations(jax.random.fold_in(kx, M), M, K, len(bf_ws))
            bf16_us[M], _, names = cupti(bf16_matmul, list(zip(xs, bf_ws)), rounds)
            log(f"{K}x{N} bf16 XLA M={M}: {bf16_us[M]:.2f} us {names}")
        del bf_ws, w_bf16
        for fi, name in enumerate(formats):
            if time.time() > deadline:
                log(f"time budget spent: skipping {name} {K}x{N}")
                break
            fmt = Format(name)
            t0 = time.perf_counter()
            try:
                kw, w_float = fmt.make(seed + 1000 * si + fi, K, N)
            except Exception:
                log(f"{K}x{N} {name}: make FAILED {traceback.format_exc()[-1500:]}")
                continue
            ws = copies(kw, rotation_sets(kw.nbytes, 32))
            log(f"{K}x{N} {name}: made + packed in {time.perf_counter() - t0:.1f} s, {kw.nbytes / 1e6:.1f} MB, "
                f"{len(ws)} copies")
            for M in ms:
                xs = activations(jax.random.fold_in(kx, 7919 * fi + M), M, K, len(ws))
                for launch in launches:
                    for extra in (configs or [{}]):
                        # "_variant=nodeq" (diagnostics): the kernel without its dequantization arithmetic (wrong y)
                        variant = extra.get("_variant", "full")
                        fields = {k: v for k, v in extra.items() if k != "_variant"}
                        cfg = fmt.config(**{"fused": None if launch == "auto" else launch == "fused", **fields})
                        try:
                            fro, mx, nan, same, rc = check(fmt, kw, w_float, M, cfg, jax.random.fold_in(kx, M + 1),
                                                           variant)
                            us, kern_us, names = cupti(lambda x, w: fmt.call(x, w, cfg, variant=variant),
                                                       list(zip(xs, ws)), rounds, fmt.tag)
                        except Exception:
                            log(f"{K}x{N} {name} M={M} {launch} {extra} FAILED: {traceback.format_exc()[-2000:]}")
                            continue
                        moved = kw.nbytes + M * K * 2 + M * N * 2
                        row = dict(format=name, launch=launch, K=K, N=N, M=M, us=round(us, 2),
                                   **({"kernel_variant": variant} if variant != "full" else {}),
                                   kernel_only_us=round(kern_us, 2), bf16_xla_us=round(bf16_us[M], 2),
                                   speedup_vs_bf16=round(bf16_us[M] / us, 3),
                                   kernel_only_speedup_vs_bf16=round(bf16_us[M] / kern_us, 3),
                                   gbps=round(moved / us / 1e3, 1), kernel_only_gbps=round(moved / kern_us / 1e3, 1),
                                   bytes_moved=moved, fro_rel_err=float(f"{fro:.3g}"), max_rel_err=float(f"{mx:.3g}"),
                                   correct=bool(fro < TOL and not nan and same), kernel="pallas-mosaic-gpu",
                                   timing="cupti-rotating", gpu_kernels=names,
                                   config=config_fields(rc))
                        emit(row)
                        log(f"{K}x{N} {name} M={M} {launch}: path {us:.2f} us (kernel {kern_us:.2f}) bf16 "
                            f"{bf16_us[M]:.2f}: x{row['speedup_vs_bf16']} (kernel x"
                            f"{row['kernel_only_speedup_vs_bf16']}) err {fro:.1e} "
                            f"{'OK' if row['correct'] else 'FAIL'} {row['config']} {names}")
            del ws, kw, w_float


# ------------------------------------------------------------------------------------------------------- merge
MD_SECTIONS = {  # --merge-section: (begin marker, end marker, heading)
    "launch": ("<!-- launch rows begin -->", "<!-- launch rows end -->",
               "## Single-kernel launch and GPTQ 3-bit layouts (device time, CUPTI)"),
    "direct": ("<!-- direct-x rows begin -->", "<!-- direct-x rows end -->",
               "## Unpadded activations at M < 8 (direct_x) vs the XLA pad (device time, CUPTI)"),
    "targets": ("<!-- targets rows begin -->", "<!-- targets rows end -->",
                "## Issue targets at the current defaults, 8192x28672 (device time, CUPTI)"),
    "spqr-outliers": ("<!-- spqr-outliers rows begin -->", "<!-- spqr-outliers rows end -->",
                      "## SpQR outlier product: Pallas kernels (default) vs the XLA gathers (device time, CUPTI)"),
    "ws-stream": ("<!-- ws-stream rows begin -->", "<!-- ws-stream rows end -->",
                  "## Stream-K ws launch (uneven grids) at the LLaMA-7B decode shapes (device time, CUPTI)"),
    "post-scale": ("<!-- post-scale rows begin -->", "<!-- post-scale rows end -->",
                   "## GPTQ scales after the wgmma (post_scale) vs on the weights (device time, CUPTI)"),
    "ws-diagnostics": ("<!-- ws-diagnostics rows begin -->", "<!-- ws-diagnostics rows end -->",
                       "## ws kernel diagnostics: no-dequant variant, wgmma overlap attempt (device time, CUPTI)"),
    "lut-ws": ("<!-- lut-ws rows begin -->", "<!-- lut-ws rows end -->",
               "## SqueezeLLM (LUT) weights in the warp-specialized kernel (device time, CUPTI)"),
    "ws-3bit": ("<!-- ws-3bit rows begin -->", "<!-- ws-3bit rows end -->",
                "## 3-bit weights (GPTQ, LUT) and small LUT shapes in the warp-specialized kernel (device time, "
                "CUPTI)"),
    "ws-step": ("<!-- ws-step rows begin -->", "<!-- ws-step rows end -->",
                "## ws step probes: dequantization / wgmma interleave, pipeline stages, one warpgroup with the scales "
                "after the wgmma at the decode shapes (device time, CUPTI)"),
    "ws-grid": ("<!-- ws-grid rows begin -->", "<!-- ws-grid rows end -->",
                "## Even stream-K grids: fewer CTAs where the (unit, step) pairs split evenly (device time, CUPTI)"),
    "plain-decode": ("<!-- plain-decode rows begin -->", "<!-- plain-decode rows end -->",
                     "## Plain-x decode rule: down_proj (11008x4096) at M < 8 on the one-warpgroup kernel (device "
                     "time, CUPTI)"),
    "lop3": ("<!-- lop3 rows begin -->", "<!-- lop3 rows end -->",
             "## Code-field extraction as one PTX lop3, and the probes after it (device time, CUPTI)"),
    "ws-fixup": ("<!-- ws-fixup rows begin -->", "<!-- ws-fixup rows end -->",
                 "## Slot-sum probes: stream-K fix-up in clusters, transposed partial slots, symmetric 3-bit (device "
                 "time, CUPTI; not kept)"),
}


def _ws_kind(c):
    """The kernel a row's config ran: one warpgroup, ws stream-K or the fused ws launch (with its grid)."""
    if not c.get("variant"):
        return "one warpgroup"
    if c["variant"] == "stream":  # rows of the one-warpgroup stream-K attempt (2026-11-24, removed: slower)
        return f"one-warpgroup stream-K ({c.get('ctas')})"
    return f"{'ws-f' if c.get('fused') else 'ws stream-K'} ({c.get('ctas')})"


# sections whose rows are A/B probes labelled by the code they ran (row field "probe"; HEAD = the committed code)
_PROBE_COLUMNS = (("kernel (CTAs)", "code"), lambda r: (_ws_kind(r["config"]), r.get("probe", "HEAD")))
SECTION_COLUMNS = {  # section -> (extra column heads, row -> their cells)
    "direct": (("variant", "x"), lambda r: (
        f"{r['config'].get('variant') or 'wg1'}"
        f"{'-f' if r['config'].get('variant') and r['config'].get('fused') else ''}",
        f"unpadded, staged {r['config'].get('x_stage', 'after')} dequant" if r["config"].get("direct_x")
        else "XLA pad")),
    "spqr-outliers": (("outliers",), lambda r: (f"{r['config'].get('outliers')}",)),
    "ws-stream": (("kernel (CTAs)",), lambda r: (_ws_kind(r["config"]),)),
    "post-scale": (("kernel (CTAs)", "scales"), lambda r: (
        _ws_kind(r["config"]), "after the wgmma" if r["config"].get("post_scale") else "on the weights")),
    "lut-ws": (("kernel (CTAs)", "variant"), lambda r: (
        _ws_kind(r["config"]), "lookup + wgmma per 64-column chunk (abandoned)"
        if r.get("kernel_variant") == "chunked" else "unpadded x" if r["config"].get("direct_x") else "padded x")),
    "ws-3bit": (("kernel (CTAs)", "x", "scales"), lambda r: (
        _ws_kind(r["config"]), "unpadded" if r["config"].get("direct_x") else "XLA pad",
        "-" if r["format"].startswith("lut") else "after the wgmma" if r["config"].get("post_scale")
        else "on the weights")),
    "ws-step": (("kernel (CTAs)", "scales", "variant"), lambda r: (
        _ws_kind(r["config"]), "after the wgmma" if r["config"].get("post_scale") else "on the weights",
        "dequantize group g + 1 during group g's wgmma (removed: slower)" if r.get("kernel_variant") == "ilv"
        else "warp mma.sync from the unpadded x (removed: not faster)" if r.get("kernel_variant") == "mma"
        and r["config"].get("variant") else "default")),
    "plain-decode": (("kernel (CTAs)", "scales"), lambda r: (
        _ws_kind(r["config"]), "after the wgmma" if r["config"].get("post_scale") else "on the weights")),
    "ws-grid": (("kernel (CTAs)", "slots"), lambda r: (_ws_kind(r["config"]), r["config"].get("k_splits"))),
    "ws-fixup": _PROBE_COLUMNS,
    "lop3": _PROBE_COLUMNS,
    "ws-diagnostics": (("kernel (CTAs)", "variant"), lambda r: (
        _ws_kind(r["config"]), "no dequant arithmetic (wrong y)" if r.get("kernel_variant") == "nodeq"
        else "wgmma overlap (abandoned)" if r["config"].get("overlap") else "default")),
}


def merge(paths, results_dir, note="", section="launch"):
    """Append the rows of the JSONL files to kernels.json (rows already there are skipped) and (re)write one
    section of kernels.md (``MD_SECTIONS``) from all of them."""
    sys.path.insert(0, os.path.dirname(results_dir))
    from jaxquant import results

    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    json_path = os.path.join(results_dir, "kernels.json")
    ident = lambda r: json.dumps([r.get(k) for k in ("run_id", "format", "launch", "K", "N", "M", "config", "us")])
    have = {ident(r) for r in json.load(open(json_path))} if os.path.exists(json_path) else set()
    results.append_rows(json_path, [r for r in rows if ident(r) not in have])  # the md section lists all given rows
    md_path = os.path.join(results_dir, "kernels.md")
    begin, end, heading = MD_SECTIONS[section]
    extra_heads, extra_cells = SECTION_COLUMNS.get(section, ((), lambda r: ()))
    r0 = rows[0]
    lines = [begin, "", heading, "",
             f"{r0.get('device', '?')}, jax {r0.get('jax', '?')}, {r0.get('date', '?')}; "
             "commands (device tool, one per run_id): " +
             "; ".join(f"{rid}: `{cmd}`" for rid, cmd in sorted({(str(r.get('run_id', '?')), r.get('command', '?'))
                                                                for r in rows})) + ".", "", note, "",
             "partials = the first launch (kernel writes float32 partials, XLA sums / transposes / casts); fused = "
             "one kernel (split-K reduction through a thread-block cluster's distributed shared memory, y stored by "
             "TMA). path = everything the call runs (activation pad, the kernel, XLA sparse product for SpQR); "
             "kernel = the Pallas kernel alone. bf16 XLA in the same run. Every row checked against x @ W_float "
             "with a NaN-poisoned output buffer.", "",
             "| run | format | launch | K x N | M | path us | kernel us | bf16 XLA us | x bf16 (path) | x bf16 (kernel) "
             "| GB/s (path) | rel err | tile_k/stages/k_splits | " + "".join(f"{h} | " for h in extra_heads) + "ok |",
             "| --- " * (14 + len(extra_heads)) + "|"]
    for r in rows:
        c = r["config"]
        extra = "".join(f"{v} | " for v in extra_cells(r))
        lines.append(f"| {str(r.get('run_id', '?'))[11:16]} | {r['format']} | {r['launch']} | {r['K']}x{r['N']} | "
                     f"{r['M']} | {r['us']} | "
                     f"{r['kernel_only_us']} | {r['bf16_xla_us']} | {r['speedup_vs_bf16']} | "
                     f"{r['kernel_only_speedup_vs_bf16']} | {r['gbps']} | {r['fro_rel_err']} | "
                     f"{c['tile_k']}/{c['stages']}/{c['k_splits']} | {extra}{'yes' if r['correct'] else 'NO'} |")
    lines += ["", end]
    block = "\n".join(lines)
    results.replace_section(md_path, block, begin, end)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x28672,4096x4096")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--launches", default="partials,fused")
    ap.add_argument("--configs", default="", help="extra config fields per timed row, e.g. 'k_splits=2;k_splits=4'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--smoke-ws", action="store_true", help="odd shapes through the warp-specialized variant")
    ap.add_argument("--smoke-families", default="gptq,lut", help="--smoke-ws: weight formats (gptq, lut)")
    ap.add_argument("--smoke-direct", action="store_true", help="odd shapes through the unpadded-x (direct_x) path")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new shape / format after this many s")
    ap.add_argument("--out", default="launch.jsonl")
    ap.add_argument("--merge", nargs="*")
    ap.add_argument("--merge-note", default="")
    ap.add_argument("--merge-section", default="launch", choices=sorted(MD_SECTIONS))
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), args.merge_note,
              args.merge_section)
        return
    t_start = time.time()
    log(f"jax {jax.__version__}, devices {jax.devices()}")
    seed = int.from_bytes(os.urandom(4), "little") % 2**30
    log(f"seed {seed}")
    ok = True
    if args.smoke_ws:
        ok = smoke_ws(seed, tuple(args.smoke_families.split(",")))
        log(f"smoke-ws: {'all OK' if ok else 'FAILURES'} ({time.time() - t_start:.0f} s)")
    if args.smoke_direct:
        ok = smoke_direct(seed) and ok
        log(f"smoke-direct: {'all OK' if ok else 'FAILURES'} ({time.time() - t_start:.0f} s)")
    if args.smoke:
        ok = smoke(seed) and ok
        log(f"smoke: {'all OK' if ok else 'FAILURES'} ({time.time() - t_start:.0f} s)")
    if args.no_table:
        sys.exit(0 if ok else 1)
    from jaxquant import results
    command = "python bench/kernels_launch.py " + " ".join(sys.argv[1:])
    run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def emit(r):
        with open(args.out, "a") as f:
            f.write(json.dumps(results.row("kernels", command=command, run_id=run_id, **r)) + "\n")

    # "default" = the plain config (KernelConfig() with the launch's fused setting), e.g. "default;variant=ws"
    configs = [dict(kv.split("=") for kv in c.split(",")) if c != "default" else {}
               for c in args.configs.split(";") if c]
    configs = [{k: (int(v) if v.lstrip("-").isdigit() else {"True": True, "False": False}.get(v, v))
                for k, v in c.items()} for c in configs] or None
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    table(seed, shapes, [int(m) for m in args.ms.split(",")], args.formats.split(","), args.launches.split(","),
          args.rounds, emit, t_start + args.budget_s, configs)
    log(f"done in {time.time() - t_start:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
