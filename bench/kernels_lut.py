"""SqueezeLLM (LUT) dequant-matmul kernel benchmark (GPU): Pallas Mosaic GPU kernel vs bf16 XLA matmul vs XLA
dequantize+matmul, device time (CUPTI) on rotating inputs. Companion of bench/kernels.py (GPTQ rows), same method.

    python bench/kernels_lut.py --out-dir DIR     # check matrix, diagnostics + block-size sweep, full table
    python bench/kernels_lut.py --quick           # check matrix + diagnostics only

Timing: every measured op is jitted once per (op, shape, M) and dispatched as single-call programs over a rotating
set of argument sets (each its own activation and its own weight copy, together > 4x the 50 MB L2); CUPTI records
every GPU kernel, a call's time is the sum of its kernels (host dispatch and launch gaps excluded), the median over
``--rounds`` passes is reported. Correctness: every kernel configuration that is timed is first checked against
x @ W_float (W from the stored SqueezeLLM arrays: float16 table values and kept weights, float32, HIGHEST precision)
with its output buffer NaN-poisoned; rows fail at relative error (Frobenius) >= 1e-2 or any NaN.
Rows: JSON lines in --out-dir/kernels_lut.jsonl (written as they are measured), merged into
bench/results/kernels.json with jaxquant.results.append_rows (key ``bench.timing.TABLE_ROW_KEY``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import gptq_matmul as gm  # noqa: E402
from pallas_kernels import lut_matmul as lm  # noqa: E402
from bench.timing import activations, bf16_matmul, config_cell, config_fields, copies, cupti  # noqa: E402
from bench.timing import TABLE_ROW_KEY, latest_rows, rotation_sets  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]
MS = [1, 4, 16, 64]
FORMATS = {"lut4": (4, 0.0), "lut3": (3, 0.0), "lut3-sp0.45": (3, 0.0045), "lut4-sp0.45": (4, 0.0045)}
TOL = 1e-2


def log(*a):
    print(*a, flush=True)


def make_weight(seed, K, N, bits, frac, dtype=jnp.bfloat16):
    """Random SqueezeLLM weight: (LUTQuantizedWeight or None, LUTKernelWeight in ``dtype``, dense float32 W [K, N]
    from the stored float16 values)."""
    key = jax.random.PRNGKey(seed)
    k1, k2 = jax.random.split(key)
    codes = jax.random.randint(k1, (K, N), 0, 2**bits, jnp.int32)
    lut = jnp.sort(jax.random.normal(k2, (N, 2**bits), jnp.float32) * 0.02, axis=1).astype(jnp.float16)
    w_float = jnp.take_along_axis(lut.astype(jnp.float32).T, codes, axis=0)
    sparse = None
    if frac:
        rng = np.random.default_rng(seed)
        flat = np.unique(rng.integers(0, N * K, int(frac * N * K)))  # positions in W[out, in], row-major
        r, c = flat // K, flat % K
        row_ptr = np.zeros(N + 1, np.int32)
        np.cumsum(np.bincount(r, minlength=N), out=row_ptr[1:])
        values = (rng.standard_normal(flat.size) * 0.1).astype(np.float16)
        sparse = (row_ptr, c.astype(np.int16 if K <= 2**15 else np.int32), values)
        w_float = w_float.at[jnp.asarray(c), jnp.asarray(r)].set(jnp.asarray(values, jnp.float32))
    kw = lm.pack(codes, lut, bits=bits, sparse=sparse, dtype=dtype)
    qw = None
    try:
        from jaxquant.formats_lut import LUTQuantizedWeight
        from jaxquant.sparse import CSR
        csr = None if sparse is None else CSR(*(jnp.asarray(a) for a in sparse), shape=(N, K))
        qw = LUTQuantizedWeight.from_codes(codes.T, lut, csr, bits=bits)
    except Exception:  # jaxquant mid-edit by someone else: skip the XLA-dequant baseline
        traceback.print_exc()
    return qw, kw, w_float


def check(kw, w_float, M, cfg, key, variant="full"):
    """(Frobenius rel err, max-abs rel err, any NaN, poisoned == plain output) of the kernel path vs x @ W_float."""
    x = jax.random.normal(key, (M, kw.in_features), jnp.float32).astype(kw.dtype)
    rc = cfg.resolved(kw, M)
    poison = gm.nan_output_buffer(rc, kw.n_pad, kw.out_features, M, lm.kernel_out_dtype(kw))
    y = jax.jit(lambda x, w, p: lm.lut_matmul(x, w, config=cfg, out_init=p, _variant=variant))(x, kw, poison)
    y2 = jax.jit(lambda x, w: lm.lut_matmul(x, w, config=cfg, _variant=variant))(x, kw)
    ref = jnp.matmul(x.astype(jnp.float32), w_float, precision=jax.lax.Precision.HIGHEST)
    y = y.astype(jnp.float32)
    fro = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    mx = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
    # The sparse part's segment sum adds in a nondeterministic order: runs agree to rounding, not bit for bit.
    same = (float(jnp.max(jnp.abs(y - y2.astype(jnp.float32)))) <= 1e-5 * float(jnp.max(jnp.abs(ref))) if kw.nnz
            else bool(jnp.array_equal(y, y2.astype(jnp.float32))))
    return fro, mx, bool(jnp.any(jnp.isnan(y))), same


def correctness_matrix(seed):
    """Odd shapes through every code path: bits, bfloat16 / float16, sparse part, k_splits, tile_k, M."""
    C = lm.KernelConfig
    cases = [  # K, N, bits, dtype, kept fraction, M, cfg
        (1024, 256, 4, jnp.bfloat16, 0.0, 1, C(tile_k=256, stages=2, k_splits=2)),
        (1000, 200, 4, jnp.bfloat16, 0.01, 5, None),
        (1024, 320, 3, jnp.bfloat16, 0.0, 16, C(tile_k=256, stages=4, k_splits=4)),
        (576, 72, 3, jnp.bfloat16, 0.005, 3, None),
        (2048, 128, 4, jnp.float16, 0.0, 64, C(tile_k=64, stages=4, k_splits=2)),
        (1024, 256, 3, jnp.float16, 0.01, 33, C(tile_k=128, stages=3, k_splits=1)),
        (2048, 192, 4, jnp.bfloat16, 0.0, 9, C(tile_k=512, stages=3, k_splits=1)),
        (2048, 192, 3, jnp.bfloat16, 0.0, 1, C(tile_k=512, stages=3, k_splits=2)),
    ]
    ok = True
    for i, (K, N, bits, dt, frac, M, cfg) in enumerate(cases):
        try:
            _, kw, w_float = make_weight(seed + i, K, N, bits, frac, dt)
            cfg = cfg or lm.KernelConfig()
            x = jax.random.normal(jax.random.PRNGKey(seed + 100 + i), (M, K), jnp.float32).astype(dt)
            rc = cfg.resolved(kw, M)
            poison = gm.nan_output_buffer(rc, kw.n_pad, kw.out_features, M, lm.kernel_out_dtype(kw))
            y = lm.lut_matmul(x, kw, config=cfg, out_init=poison).astype(jnp.float32)
            ref = jnp.matmul(x.astype(jnp.float32), w_float, precision=jax.lax.Precision.HIGHEST)
            ref_kl = lm.reference_matmul(x, kw).astype(jnp.float32)
            fro = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
            fro_kl = float(jnp.linalg.norm(y - ref_kl) / jnp.linalg.norm(ref))
            nan = bool(jnp.any(jnp.isnan(y)))
            good = fro < TOL and not nan
            ok &= good
            log(f"check {i}: K={K} N={N} bits={bits} {jnp.dtype(dt).name} sparse={frac} M={M} {rc}: "
                f"rel_err={fro:.2e} vs_kernel_layout_ref={fro_kl:.2e} nan={nan} {'OK' if good else 'FAIL'}")
        except Exception:
            ok = False
            tb = traceback.format_exc()
            log(f"check {i} raised:\n" + (tb[-6000:] if i == 0 else tb[-1500:]))
    return ok


def sweep(seed, rounds, calls, configs, ms=(1, 16, 64), K=8192, N=28672):
    """8192x28672: per bits, per M, every config (checked, then timed); plus the no-lookup variant (memory + wgmma
    only, wrong results) and the bf16 GEMV. Returns {(bits, M): best KernelConfig}."""
    best = {}
    key = jax.random.PRNGKey(seed)
    w_bf16 = (jax.random.normal(key, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
    n = rotation_sets(w_bf16.nbytes, calls)
    bf_ws = copies(w_bf16, n)
    bf = {}
    for M in ms:
        xs = activations(jax.random.fold_in(key, M), M, K, n)
        bf[M], _, names = cupti(bf16_matmul, list(zip(xs, bf_ws)), rounds)
        log(f"sweep {K}x{N} bf16 XLA M={M}: {bf[M]:.1f} us = {w_bf16.nbytes / bf[M] / 1e3:.0f} GB/s {names}")
    del bf_ws, w_bf16
    for bits in (4, 3):
        _, kw, w_float = make_weight(seed + bits, K, N, bits, 0.0)
        n = rotation_sets(kw.nbytes, calls)
        ws = copies(kw, n)
        for M in ms:
            xs = activations(jax.random.fold_in(key, 1000 + M), M, K, n)
            for variant, cfg in configs:
                try:
                    rc = cfg.resolved(kw, M)
                    err = check(kw, w_float, M, cfg, jax.random.fold_in(key, M), variant)[0] \
                        if variant == "full" else float("nan")
                    us, kern, names = cupti(lambda x, w, cfg=cfg, v=variant: lm.lut_matmul(x, w, config=cfg,
                                                                                            _variant=v),
                                            list(zip(xs, ws)), rounds, match="lut_w")
                    log(f"sweep {K}x{N} lut{bits} M={M} {variant:<8} tile_k={rc.tile_k} stages={rc.stages} "
                        f"k_splits={rc.k_splits}: path {us:6.1f} us (kernel {kern:6.1f} us = "
                        f"{kw.nbytes / kern / 1e3:.0f} GB/s), x{bf[M] / us:.2f} vs bf16 (kernel x{bf[M] / kern:.2f}),"
                        f" err={err:.1e} {names}")
                    if variant == "full" and err < TOL and ((bits, M) not in best or us < best[(bits, M)][0]):
                        best[(bits, M)] = (us, rc)
                except Exception:
                    log(f"sweep lut{bits} M={M} {variant} {cfg}: FAILED {traceback.format_exc()[-1500:]}")
        del ws, kw, w_float
    return {k: v[1] for k, v in best.items()}


def dump_sass(out_dir, K=8192, N=28672, configs=((4, 512, 3), (4, 256, 2), (3, 256, 2), (3, 512, 3))):
    """Compile the M = 1 kernels with Mosaic GPU's dump switched on; write ptxas' resource report and the opcode
    counts of the SASS (the instruction mix) to out_dir/sass_summary.txt."""
    import collections
    import glob
    import re
    import tempfile
    dump = tempfile.mkdtemp(prefix="lut_dump_")
    os.environ["MOSAIC_GPU_DUMP_TO"] = dump
    try:
        for bits, tile_k, stages in configs:
            for variant in ("full", "nolookup"):
                _, kw, _ = make_weight(bits, K, N, bits, 0.0)
                cfg = lm.KernelConfig(tile_k=tile_k, stages=stages)
                x = jnp.ones((1, K), jnp.bfloat16)
                jax.block_until_ready(jax.jit(lambda x, w: lm.lut_matmul(x, w, config=cfg, _variant=variant))(x, kw))
                del kw
    finally:
        del os.environ["MOSAIC_GPU_DUMP_TO"]
    lines = []
    for path in sorted(glob.glob(os.path.join(dump, "*"))):
        name = os.path.basename(path)
        if name.endswith(".ptxas"):
            text = open(path).read()
            report = [line.strip() for line in text.splitlines() if "Used" in line or "spill" in line]
            lines.append(f"== {name}: " + " | ".join(report))
        elif name.endswith(".sass"):
            ops = collections.Counter()
            for l in open(path):
                m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", l)
                if m:
                    ops[m.group(1).split(".")[0]] += 1
            lines.append(f"== {name}: {sum(ops.values())} instructions: " +
                         ", ".join(f"{k} {v}" for k, v in ops.most_common(24)))
    with open(os.path.join(out_dir, "sass_summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    for l in lines:
        log(l[:700])


def pick_config(tuned, bits, M, kw):
    """The sweep's best config for the nearest swept M <= M (k_splits, then tile_k back to the heuristic where they do
    not fit this shape)."""
    if not tuned:
        return lm.KernelConfig()
    swept = sorted(m for (b, m) in tuned if b == bits and m <= M)
    if not swept:
        return lm.KernelConfig()
    cfg = tuned[(bits, swept[-1])]
    for fallback in (cfg, dataclasses.replace(cfg, k_splits=None), dataclasses.replace(cfg, k_splits=None,
                                                                                       tile_k=None)):
        try:
            fallback.resolved(kw, M)
            return fallback
        except ValueError:
            continue
    return lm.KernelConfig()


def full_table(seed, shapes, ms, formats, rounds, calls, tuned, on_row):
    rows = []
    for si, (K, N) in enumerate(shapes):
        key = jax.random.PRNGKey(seed + 7919 * si)
        w_bf16 = (jax.random.normal(key, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        n = rotation_sets(w_bf16.nbytes, calls)
        bf_ws = copies(w_bf16, n)
        bf16_us = {}
        for M in ms:
            xs = activations(jax.random.fold_in(key, M), M, K, n)
            bf16_us[M] = cupti(bf16_matmul, list(zip(xs, bf_ws)), rounds)[0]
            log(f"{K}x{N} bf16 XLA M={M}: {bf16_us[M]:.1f} us")
        del bf_ws, w_bf16
        for fi, fmt in enumerate(formats):
            bits, frac = FORMATS[fmt]
            qw, kw, w_float = make_weight(seed + 31 * si + fi, K, N, bits, frac)
            n = rotation_sets(max(kw.nbytes, qw.nbytes if qw is not None else 0), calls)
            ws = copies(kw, n)
            qws = copies(qw, n) if qw is not None else None
            for M in ms:
                xs = activations(jax.random.fold_in(key, 100 * fi + M), M, K, n)
                try:
                    cfg = pick_config(tuned, bits, M, kw)
                    rc = cfg.resolved(kw, M)
                    fro, mx, nan, same = check(kw, w_float, M, cfg, jax.random.fold_in(key, 7 * M + fi))
                    us, kern_us, names = cupti(lambda x, w, cfg=cfg: lm.lut_matmul(x, w, config=cfg),
                                               list(zip(xs, ws)), rounds, match="lut_w")
                    deq_us = (cupti(lambda x, w: w.matmul(x), list(zip(xs, qws)), rounds)[0] if qws is not None
                              else float("nan"))
                except Exception:
                    log(f"{K}x{N} {fmt} M={M} FAILED: {traceback.format_exc()[-1500:]}")
                    continue
                moved = kw.nbytes + M * K * 2 + M * N * 2
                kernel_moved = kw.qweight.nbytes + kw.lutw.nbytes + M * K * 2 + M * N * 2  # no sparse part
                row = dict(format=fmt, bits=bits, group_size=-1, sparse_frac=frac, nnz=kw.nnz, M=M, K=K, N=N,
                           us=round(us, 2), kernel_only_us=round(kern_us, 2), bf16_xla_us=round(bf16_us[M], 2),
                           xla_dequant_us=round(deq_us, 2), speedup_vs_bf16=round(bf16_us[M] / us, 3),
                           kernel_only_speedup_vs_bf16=round(bf16_us[M] / kern_us, 3),
                           speedup_vs_xla_dequant=round(deq_us / us, 3), gbps=round(moved / us / 1e3, 1),
                           kernel_only_gbps=round(kernel_moved / kern_us / 1e3, 1), bytes_moved=moved,
                           max_rel_err=float(f"{mx:.3g}"), fro_rel_err=float(f"{fro:.3g}"),
                           correct=bool(fro < TOL and not nan and same), kernel="pallas-mosaic-gpu-lut",
                           timing="cupti-rotating", gpu_kernels=names,
                           config=config_fields(rc))
                rows.append(row)
                on_row(row)
                log(f"{K}x{N} {fmt} M={M}: path {us:.1f} us (kernel {kern_us:.1f}), bf16 {bf16_us[M]:.1f}, "
                    f"xla-dequant {deq_us:.1f}: x{row['speedup_vs_bf16']} vs bf16 (kernel alone "
                    f"x{row['kernel_only_speedup_vs_bf16']}), {row['gbps']} GB/s, err {fro:.1e} "
                    f"{'OK' if row['correct'] else 'FAIL'} {rc.tile_k}/{rc.stages}/{rc.k_splits}")
            del ws, qws, kw, qw, w_float
    return rows


def _results_module():
    """jaxquant/results.py loaded on its own (the package __init__ imports every method, which others edit)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxquant", "results.py")
    spec = importlib.util.spec_from_file_location("jaxquant_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MD_BEGIN, MD_END = "<!-- lut rows begin -->", "<!-- lut rows end -->"
MD_INTRO = """## SqueezeLLM (LUT, lut4 / lut3) dequant-matmul: device time (CUPTI, rotating inputs)

{runs}

Rows: each (format, shape, M)'s latest date in kernels.json. `-sp0.45`: 0.45% kept float16 weights (SqueezeLLM's
dense-and-sparse 0.45% setting).
`path` = what `LUTKernelWeight.matmul` runs (activation pad + Pallas kernel + partial-sum reduction (+ the XLA sparse
product)); `kernel` = the Pallas kernel alone. bf16 XLA and XLA dequant (`LUTQuantizedWeight.matmul`: unpack +
table gather under jit, then matmul) in the same run. Every row checked against x @ W_float (stored float16 values,
float32 HIGHEST) with a NaN-poisoned output buffer (rel err = Frobenius). GB/s = (kernel-layout weight incl. the
sparse part + activation + output bytes) / path time. Targets on 8192x28672, M = 1: lut4 >= 3x, lut3 >= 3.8x.
Notes: bench/NOTES_kernels.md (SqueezeLLM section).

| format | K x N | M | path us | kernel us | bf16 XLA us | XLA dequant us | x bf16 (path) | x bf16 (kernel) | GB/s (path) | rel err | tile_k/stages/k_splits |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
"""


def write_markdown(results_dir):
    """Regenerate the LUT section of results_dir/kernels.md (between its markers; appended if absent) from the LUT
    rows of results_dir/kernels.json; other sections are left as they are."""
    rows = latest_rows([r for r in json.load(open(os.path.join(results_dir, "kernels.json")))
                        if r.get("kernel") == "pallas-mosaic-gpu-lut"])
    order = {fmt: i for i, fmt in enumerate(FORMATS)}
    rows.sort(key=lambda r: (r["K"] * r["N"], r["K"], order.get(r["format"], 99), r["M"]))
    lines = [f"| {r['format']} | {r['K']}x{r['N']} | {r['M']} | {r['us']} | {r['kernel_only_us']} | "
             f"{r['bf16_xla_us']} | {r['xla_dequant_us']} | {r['speedup_vs_bf16']} | "
             f"{r['kernel_only_speedup_vs_bf16']} | {r['gbps']} | {r['fro_rel_err']} | "
             f"{config_cell(r['config'])} |" for r in rows]
    runs = "\n".join(f"- {date}: {device}, jax {jax_v}; command (device tool, `$OUT` its output folder): `{cmd}`"
                     for date, device, jax_v, cmd in sorted({(r.get("date"), r.get("device"), r.get("jax"),
                                                              r.get("command", "?")) for r in rows}))
    section = MD_BEGIN + "\n\n" + MD_INTRO.format(runs=runs) + "\n".join(lines) + "\n\n" + MD_END
    path = os.path.join(results_dir, "kernels.md")
    text = open(path).read() if os.path.exists(path) else ""
    if MD_BEGIN in text and MD_END in text:
        text = text[:text.index(MD_BEGIN)] + section + text[text.index(MD_END) + len(MD_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def merge(jsonl_paths, results_dir):
    """Append the rows of bench runs (JSON lines) to results_dir/kernels.json (``TABLE_ROW_KEY``: same-date rows
    replaced) and regenerate the LUT section of kernels.md (the latest date's rows)."""
    results = _results_module()
    rows = [json.loads(line) for p in jsonl_paths for line in open(p) if line.strip()]
    results.append_rows(os.path.join(results_dir, "kernels.json"), rows, key=TABLE_ROW_KEY)
    write_markdown(results_dir)


def parse_configs(text):
    out = []
    for item in text.split(";"):
        variant, spec = item.split(":")
        tile_k, stages, k_splits = ([None if v in ("", "auto") else int(v) for v in spec.split(",")] + [None] * 3)[:3]
        out.append((variant, lm.KernelConfig(tile_k=tile_k, stages=stages, k_splits=k_splits)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="check matrix + sweep only")
    ap.add_argument("--no-check-matrix", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--dump-sass", action="store_true", help="ptxas report + SASS opcode counts of the M=1 kernels")
    ap.add_argument("--sweep-ms", default="1,16,64")
    ap.add_argument("--sweep-configs", default="full:auto,auto,auto;full:512,3,auto;full:256,4,auto;"
                                               "full:256,2,auto;full:128,4,auto;nolookup:auto,auto,auto")
    ap.add_argument("--tuned", default="",
                    help="bits:M:tile_k,stages;... block sizes for (bits, M >= that M) where the sweep does not "
                         "cover them (k_splits: heuristic)")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--formats", default="lut4,lut3")
    ap.add_argument("--extra", default="8192x28672:lut3-sp0.45:1,16",
                    help="shape:format:ms rows after the table (sparse part included)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "/tmp/w/kernels_lut"))
    ap.add_argument("--merge", nargs="*", help="JSON-lines files of earlier runs: append to RESULTS/kernels.json, "
                                                "rewrite the LUT section of kernels.md, and exit (no GPU needed)")
    ap.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if args.merge is not None:
        merge(args.merge, args.results_dir)
        return

    log(f"jax {jax.__version__}, devices {jax.devices()}")
    seed = int.from_bytes(os.urandom(4), "little") % 2**30
    log(f"seed {seed}")
    shapes = lambda s: [tuple(int(v) for v in p.split("x")) for p in s.split(",") if p]
    ints = lambda s: [int(v) for v in s.split(",") if v]
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "kernels_lut.jsonl")
    results = _results_module()

    def on_row(r):
        with open(path, "a") as f:
            f.write(json.dumps(results.row("kernels", **r)) + "\n")

    ok = True
    if args.dump_sass:
        try:
            dump_sass(args.out_dir)
        except Exception:
            log(f"dump_sass failed: {traceback.format_exc()[-1500:]}")
    if not args.no_check_matrix:
        ok = correctness_matrix(seed)
        log(f"correctness matrix: {'all OK' if ok else 'FAILURES'}")
    tuned = {}
    for item in filter(None, args.tuned.split(";")):
        bits, M, spec = item.split(":")
        tile_k, stages = (int(v) for v in spec.split(","))
        tuned[(int(bits), int(M))] = lm.KernelConfig(tile_k=tile_k, stages=stages)
    if not args.no_sweep:  # swept (bits, M) override --tuned
        tuned.update(sweep(seed, args.rounds, args.calls, parse_configs(args.sweep_configs), ms=ints(args.sweep_ms)))
    log(f"block sizes used (bits, M) -> config: {tuned}")
    rows = []
    if not args.quick:
        rows = full_table(seed, shapes(args.shapes), ints(args.ms), args.formats.split(","), args.rounds,
                          args.calls, tuned, on_row)
        for item in filter(None, args.extra.split(";")):
            shape, fmt, ms = item.split(":")
            rows += full_table(seed + 1, shapes(shape), ints(ms), [fmt], args.rounds, args.calls, tuned, on_row)
    if rows:
        log("\nformat        K x N        M   path_us kernel_us  bf16_us  deq_us  x_bf16 x_kern   GB/s  err")
        for r in rows:
            log(f"{r['format']:<12} {r['K']}x{r['N']:<6} {r['M']:>3} {r['us']:>9} {r['kernel_only_us']:>9} "
                f"{r['bf16_xla_us']:>8} {r['xla_dequant_us']:>7} {r['speedup_vs_bf16']:>6} "
                f"{r['kernel_only_speedup_vs_bf16']:>6} {r['gbps']:>6} {r['fro_rel_err']} "
                f"{'OK' if r['correct'] else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
