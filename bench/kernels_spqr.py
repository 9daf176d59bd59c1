"""SpQR dequant(+sparse)-matmul benchmark (GPU): Pallas Mosaic GPU kernel path vs bf16 XLA matmul vs XLA
dequantize-then-matmul of the stored SpQR arrays, device time (CUPTI) over rotating inputs.

    python bench/kernels_spqr.py --out-dir $OUT            # correctness matrix, 8192x28672 diagnostics, full table
    python bench/kernels_spqr.py --merge $OUT/spqr_rows.jsonl   # (here) append the rows to bench/results/kernels.*

Format ``spqr3``: 3-bit codes, groups of 16, 3-bit statistics with float16 second level per 16 x 16, act-order
permutation, ~1% outliers as a random CSR (average bits from the stored arrays in each row). Method as in
bench/kernels.py's CUPTI table: each call is its own dispatch on the next of several weight copies and activations
(together well over the 50 MB L2), CUPTI sums the GPU kernels of a call (host dispatch excluded), median over calls.
Correctness: every timed configuration is first run on fresh random activations with its output buffer NaN-poisoned
and compared with x @ W_float (W = SpQRWeight.dequantize(), float32, HIGHEST): rows fail at relative error >= 1e-2
or any NaN.
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
from pallas_kernels import spqr_matmul as sm  # noqa: E402
from bench.timing import activations, bf16_matmul, config_cell, config_fields, copies, cupti  # noqa: E402
from bench.timing import TABLE_ROW_KEY, rotation_sets  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]
MS = [1, 4, 16, 64]
TOL = 1e-2


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------------ weights
def make_spqr(seed, K, N, bits=3, outlier_frac=0.01, act=True, group_size=16, qq_groupsize=16):
    """A random SpQR weight (realistic statistics: positive scales, fractional zeros; random CSR outliers)."""
    from jaxquant.formats_spqr import SpQRWeight
    from jaxquant.sparse import CSR

    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    G, B = K // group_size, N // qq_groupsize
    codes = jax.random.randint(key, (N, K), 0, 2**bits, jnp.int32)
    scale_codes, zero_codes = rng.integers(0, 8, (G, N)), rng.integers(0, 8, (G, N))
    scale_qq = np.stack([rng.uniform(0.5, 1.5, (G, B)) * 2e-3, -rng.uniform(1, 5, (G, B))], -1)
    zero_qq = np.stack([rng.uniform(0.3, 1.0, (G, B)) * 2 ** (bits - 3), rng.uniform(-1, 1, (G, B))], -1)
    flat = np.unique(rng.integers(0, N * K, int(outlier_frac * N * K)))  # row-major, so sorted within rows
    r, c = flat // K, flat % K
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=N))]).astype(np.int32)
    csr = CSR(jnp.asarray(row_ptr), jnp.asarray(c.astype(np.int16 if K <= 2**15 else np.int32)),
              jnp.asarray((rng.standard_normal(r.size) * 0.05).astype(np.float16)), (N, K))
    perm = rng.permutation(K) if act else None
    return SpQRWeight.from_parts(codes, scale_codes, zero_codes, scale_qq.astype(np.float16),
                                 zero_qq.astype(np.float16), csr, perm, bits=bits, group_size=group_size,
                                 qq_scale_bits=3, qq_zero_bits=3, qq_groupsize=qq_groupsize)


def check(kw, w_float, M, cfg, seed, variant="full"):
    """(Frobenius rel err, max rel err, any NaN, equal to the un-poisoned call) of the kernel path on fresh x."""
    x = jax.random.normal(jax.random.PRNGKey(seed), (M, kw.in_features), jnp.float32).astype(kw.dtype)
    rc = cfg.resolved(kw, M)
    poison = gm.nan_output_buffer(rc, kw.n_pad, kw.out_features, M, jnp.float32)
    y = jax.jit(lambda x, w, p: sm.spqr_matmul(x, w, config=cfg, out_init=p, _variant=variant))(x, kw, poison)
    y2 = jax.jit(lambda x, w: sm.spqr_matmul(x, w, config=cfg, _variant=variant))(x, kw)
    ref = jnp.matmul(x.astype(jnp.float32), w_float, precision=jax.lax.Precision.HIGHEST)
    y = y.astype(jnp.float32)
    fro = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    mx = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
    return fro, mx, bool(jnp.any(jnp.isnan(y))), bool(jnp.array_equal(y, y2.astype(jnp.float32)))


# -------------------------------------------------------------------------------------------------- experiments
def correctness_matrix(seed):
    """Small odd shapes through every code path: bits, act-order, statistics repeated, float16, splits, n_sub, M."""
    from jaxquant.kernel_layout import spqr_to_kernel_weight
    cases = [  # K, N, bits, act, group, qqg, M, dtype, cfg
        (1024, 256, 3, True, 16, 16, 1, jnp.bfloat16, sm.KernelConfig(tile_k=256, stages=2, k_splits=2)),
        (1056, 96, 3, True, 16, 16, 5, jnp.bfloat16, None),  # K, N not multiples of 256 / 64
        (2048, 256, 3, False, 32, 32, 16, jnp.bfloat16, sm.KernelConfig(tile_k=512, stages=3, k_splits=1, n_sub=2)),
        (1024, 128, 4, True, 16, 64, 64, jnp.bfloat16, sm.KernelConfig(tile_k=256, stages=2, k_splits=4)),
        (1024, 128, 2, False, 16, 16, 33, jnp.bfloat16, None),
        (1024, 256, 3, True, 16, 16, 9, jnp.float16, None),
    ]
    ok = True
    for i, (K, N, bits, act, gs, qqg, M, dt, cfg) in enumerate(cases):
        try:
            w = make_spqr(seed + i, K, N, bits, 0.01, act, gs, qqg)
            kw = spqr_to_kernel_weight(w, dt)
            cfg = cfg or sm.KernelConfig()
            fro, mx, nan, same = check(kw, w.dequantize(jnp.float32), M, cfg, seed + 100 + i)
            x = jax.random.normal(jax.random.PRNGKey(seed + 200 + i), (M, K), jnp.float32).astype(dt)
            kern = sm.spqr_matmul(x, kw, config=cfg).astype(jnp.float32)
            ref_k = sm.reference_matmul(x, kw).astype(jnp.float32)
            vs_kernel_ref = float(jnp.linalg.norm(kern - ref_k) / jnp.linalg.norm(ref_k))
            good = fro < TOL and not nan and same
            ok &= good
            log(f"check {i}: K={K} N={N} bits={bits} act={act} g={gs} qqg={qqg} M={M} {jnp.dtype(dt).name} "
                f"{cfg.resolved(kw, M)}: rel_err={fro:.2e} max={mx:.2e} vs_kernel_arith_ref={vs_kernel_ref:.1e} "
                f"nan={nan} same={same} {'OK' if good else 'FAIL'}")
        except Exception:
            log(f"check {i} raised:\n" + traceback.format_exc()[-6000:])
            if i == 0:  # the kernel does not build: nothing else can run
                sys.exit(2)
            ok = False
    return ok


def table(seed, shapes, ms, rounds, max_copies, emit, configs=None, variants=(), sparse_formats=("ell",)):
    """For each shape: bf16 XLA, then spqr3 kernel path (+ variants / configs on request) and XLA dequant+matmul."""
    from jaxquant.kernel_layout import spqr_to_kernel_weight
    for si, (K, N) in enumerate(shapes):
        key = jax.random.PRNGKey(seed + si)
        kb, kx = jax.random.split(key)
        w_bf16 = (jax.random.normal(kb, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        bf_ws = copies(w_bf16, rotation_sets(w_bf16.nbytes, max_copies))
        bf16_us, bf16_names = {}, {}
        for M in ms:
            xs = activations(jax.random.fold_in(kx, M), M, K, len(bf_ws))
            bf16_us[M], _, bf16_names[M] = cupti(bf16_matmul, list(zip(xs, bf_ws)), rounds)
            log(f"{K}x{N} bf16 XLA M={M}: {bf16_us[M]:.1f} us {bf16_names[M]}")
        del bf_ws, w_bf16
        t0 = time.perf_counter()
        w = make_spqr(seed + 1000 + si, K, N)
        w_float = w.dequantize(jnp.float32)
        ws = copies(w, rotation_sets(w.nbytes, max_copies))
        deq = {}
        for M in ms:
            xs = activations(jax.random.fold_in(kx, 1000 + M), M, K, len(ws))
            try:
                deq[M] = cupti(lambda x, w: w.matmul(x), list(zip(xs, ws)), rounds)
            except Exception:
                log(f"{K}x{N} M={M} xla dequant FAILED: {traceback.format_exc()[-1500:]}")
                deq[M] = (float("nan"), float("nan"), [])
        del ws
        for sparse_format in sparse_formats:
            kw = spqr_to_kernel_weight(w, sparse_format=sparse_format)
            _table_weight(seed + si, K, N, ms, rounds, max_copies, emit, configs, variants, sparse_format, w, kw,
                          w_float, kx, bf16_us, bf16_names, deq, t0)
        del w, w_float


def _table_weight(seed, K, N, ms, rounds, max_copies, emit, configs, variants, sparse_format, w, kw, w_float, kx,
              bf16_us, bf16_names, deq, t0):
    log(f"{K}x{N} spqr3: made + packed in {time.perf_counter() - t0:.1f} s; stored {w.avg_bits():.3f} bits/weight "
        f"(paper formula {w.paper_avg_bits():.3f}), kernel layout {kw.avg_bits():.3f} (dense part "
        f"{8 * kw.dense_nbytes / (K * N):.3f}), nnz {w.nnz} ({w.nnz / (K * N):.4f}), ELL slots "
        f"{kw.sparse_slots} in {len(kw.sp_buckets)} buckets")
    n = rotation_sets(kw.nbytes, max_copies)
    kws = copies(kw, n)
    suffix = "" if sparse_format == "ell" else "-csr"
    for M in ms:
        xs = activations(jax.random.fold_in(kx, 2000 + M), M, K, n)
        deq_us, _, deq_names = deq[M]
        for variant, cfg in [("full", None)] + [(v, None) for v in variants] + [("full", c) for c in
                                                                                  (configs or [])]:
            cfg = cfg or sm.KernelConfig()
            try:
                rc = cfg.resolved(kw, M)
                fro, mx, nan, same = check(kw, w_float, M, cfg, seed + 7 * M, variant)
                us, kern_us, names = cupti(
                    lambda x, w, cfg=cfg, variant=variant: sm.spqr_matmul(x, w, config=cfg, _variant=variant),
                    list(zip(xs, kws)), rounds, match="spqr")
            except Exception:
                log(f"{K}x{N} M={M} {variant} {cfg} FAILED: {traceback.format_exc()[-2000:]}")
                continue
            dense_moved = kw.dense_nbytes + M * K * 2 + M * N * 2
            moved = kw.nbytes + M * K * 2 + M * N * 2
            correct = bool(fro < TOL and not nan and same)
            row = dict(format=("spqr3" if variant == "full" else f"spqr3-{variant}") + suffix, bits=3,
                       group_size=16, sparse_format=sparse_format,
                       qq_groupsize=16, stat_bits=3, act_order=True, outlier_fraction=round(w.nnz / (K * N), 5),
                       avg_bits_stored=round(w.avg_bits(), 3), avg_bits_paper=round(w.paper_avg_bits(), 3),
                       avg_bits_kernel_layout=round(kw.avg_bits(), 3), M=M, K=K, N=N, us=round(us, 2),
                       kernel_only_us=round(kern_us, 2), bf16_xla_us=round(bf16_us[M], 2),
                       xla_dequant_us=round(deq_us, 2), speedup_vs_bf16=round(bf16_us[M] / us, 3),
                       kernel_only_speedup_vs_bf16=round(bf16_us[M] / kern_us, 3),
                       speedup_vs_xla_dequant=round(deq_us / us, 3), gbps=round(moved / us / 1e3, 1),
                       kernel_only_gbps=round(dense_moved / kern_us / 1e3, 1), bytes_moved=moved,
                       max_rel_err=float(f"{mx:.3g}"), fro_rel_err=float(f"{fro:.3g}"), correct=correct,
                       kernel="pallas-mosaic-gpu + " + ("xla-sparse (ELL)" if sparse_format == "ell" else
                                                         "cusparse (CSR f32)"),
                       timing="cupti-rotating", gpu_kernels=names,
                       bf16_gpu_kernels=bf16_names[M], xla_dequant_gpu_kernels=deq_names[:8],
                       config=config_fields(rc))
            emit(row)
            log(f"{K}x{N} {row['format']} M={M}: path {us:.1f} us (kernel {kern_us:.1f}), bf16 {bf16_us[M]:.1f}, "
                f"xla-dequant {deq_us:.1f}: x{row['speedup_vs_bf16']} vs bf16 (kernel alone "
                f"x{row['kernel_only_speedup_vs_bf16']}), {row['gbps']} GB/s (kernel {row['kernel_only_gbps']}), "
                f"err {fro:.1e} {'OK' if correct else 'FAIL'} {rc} {names}")
    del kws, kw


# -------------------------------------------------------------------------------------------------------- output
def _results_module():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxquant", "results.py")
    spec = importlib.util.spec_from_file_location("jaxquant_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MD_BEGIN, MD_END = "<!-- spqr rows begin -->", "<!-- spqr rows end -->"


def merge(jsonl, out_dir, note=""):
    """Append the rows of a device run to out_dir/kernels.json (replacing only rows with the same
    ``TABLE_ROW_KEY``: same date) and (re)write the SpQR section of kernels.md, leaving the other sections as they are."""
    results = _results_module()
    rows = [json.loads(line) for line in open(jsonl) if line.strip()]
    results.append_rows(os.path.join(out_dir, "kernels.json"), rows, key=TABLE_ROW_KEY)
    r0 = rows[0]
    lines = [MD_BEGIN, "", f"## SpQR (spqr3) dequant + sparse matmul ({r0['device']}, jax {r0['jax']}, {r0['date']})",
             "", f"Command: `{r0['command']}`. {note}", "",
             "Device time per call (CUPTI, rotating weight copies and activations, median): path = activation "
             "gather + Pallas dense kernel + XLA sparse product + partial-sum reduction; kernel = the Pallas kernel "
             "alone. GB/s = bytes the path reads (kernel layout incl. outlier slices, activations, output) / time. "
             "Every row checked against x @ SpQRWeight.dequantize() with a NaN-poisoned output buffer.", "",
             "| format | K x N | M | bits stored / kernel layout | path us | kernel us | bf16 XLA us | "
             "XLA dequant us | x bf16 | x bf16 (kernel) | GB/s | rel err | ok | tile_k/stages/splits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = r.get("config", {})
        lines.append(f"| {r['format']} | {r['K']}x{r['N']} | {r['M']} | {r['avg_bits_stored']} / "
                     f"{r['avg_bits_kernel_layout']} | {r['us']} | "
                     f"{r['kernel_only_us']} | {r['bf16_xla_us']} | {r['xla_dequant_us']} | {r['speedup_vs_bf16']} | "
                     f"{r['kernel_only_speedup_vs_bf16']} | {r['gbps']} | {r['fro_rel_err']} | "
                     f"{'yes' if r['correct'] else 'NO'} | {config_cell(c)} |")
    lines += ["", MD_END]
    md_path = os.path.join(out_dir, "kernels.md")
    text = open(md_path).read() if os.path.exists(md_path) else ""
    if MD_BEGIN in text and MD_END in text:
        text = text[:text.index(MD_BEGIN)] + "\n".join(lines) + text[text.index(MD_END) + len(MD_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    with open(md_path, "w") as f:
        f.write(text)


def parse_config(text):
    tile_k, stages, k_splits, n_sub = ([None if v in ("", "auto") else int(v) for v in text.split(",")] + [None])[:4]
    return sm.KernelConfig(tile_k=tile_k, stages=stages, k_splits=k_splits, n_sub=n_sub)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--diag", action="store_true", help="variants and block sizes on 8192x28672 first")
    ap.add_argument("--diag-ms", default="1,16,64")
    ap.add_argument("--diag-configs", default="256,2,auto;256,4,auto;512,2,auto;512,4,auto")
    ap.add_argument("--diag-variants", default="nostats,nosparse")
    ap.add_argument("--no-check-matrix", action="store_true")
    ap.add_argument("--sparse-formats", default="ell", help="ell,csr: outlier product per format")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--merge", help="jsonl of a device run: append to bench/results/kernels.{json,md}")
    ap.add_argument("--merge-note", default="")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), args.merge_note)
        return

    log(f"jax {jax.__version__}, devices {jax.devices()}")
    seed = int.from_bytes(os.urandom(3), "little")
    log(f"seed {seed}")
    shapes = [tuple(int(v) for v in p.split("x")) for p in args.shapes.split(",") if p]
    ms = [int(v) for v in args.ms.split(",") if v]
    results = _results_module()
    os.makedirs(args.out_dir, exist_ok=True)
    diag_path = os.path.join(args.out_dir, "spqr_diag.jsonl")
    rows_path = os.path.join(args.out_dir, "spqr_rows.jsonl")

    def emitter(path):
        def emit(r):
            with open(path, "a") as f:
                f.write(json.dumps(results.row("kernels", **r)) + "\n")
        return emit

    ok = True
    if not args.no_check_matrix:
        ok = correctness_matrix(seed)
        log(f"correctness matrix: {'all OK' if ok else 'FAILURES'}")
    if args.diag:
        table(seed + 11, [(8192, 28672)], [int(v) for v in args.diag_ms.split(",")], args.rounds, args.copies,
              emitter(diag_path), configs=[parse_config(c) for c in args.diag_configs.split(";") if c],
              variants=[v for v in args.diag_variants.split(",") if v])
    if not args.no_table:
        table(seed + 23, shapes, ms, args.rounds, args.copies, emitter(rows_path),
              sparse_formats=args.sparse_formats.split(","))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
