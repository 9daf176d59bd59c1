"""The SpQR outlier product alone on the GPU: the Pallas kernel (pallas_kernels/spqr_outliers.py) over its block
parameters against the XLA form (spqr_matmul.sparse_product + the add), same weights and activations, same run.

    python bench/spqr_outliers.py --out-dir $OUT [--shapes 8192x28672] [--ms 1] [--chunks 32]
        [--tiles 1024,4096] [--warps 2,4,8]

The defaults are the grid of the recorded run (~40 s on an H100); a 3 x 4 x 4 grid at M = 1 and 16 ran past 560 s.

Each call: y [M, N] float32 (the dense product) -> y + outlier product, float32. Timing as bench/kernels_launch.py
(bench/timing.py: CUPTI device time of one jitted call over rotating weight copies and activations, median of
``--rounds`` passes). Every configuration is first checked against the XLA form on fresh inputs (max abs difference
/ max |outlier product| < 1e-5) and for bitwise-equal repeated calls. Weights: bench/kernels_spqr.make_spqr (3-bit,
1 % outliers placed uniformly at random). Rows: $OUT/spqr_outliers.json + .md (copy into bench/results/).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import activations, copies, cupti, rotation_sets  # noqa: E402
from jaxquant import results  # noqa: E402
from pallas_kernels import spqr_matmul as sm  # noqa: E402
from pallas_kernels import spqr_outliers as so  # noqa: E402


def xla_form(y, xk, w):
    return y + sm.sparse_product(xk, w)[:, :w.out_features]


def mgpu_form(y, xk, w):
    return y + so.outlier_sums_mgpu(xk, w.sp_buckets)[w.sp_inv[:w.out_features]][None]


def kernel_form(y, xk, w, kmajor, **kw):
    return so.outlier_product_add(y, xk.T if kmajor else xk, w.sp_buckets, w.sp_rows, kmajor=kmajor, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8192x28672")
    ap.add_argument("--ms", default="1")
    ap.add_argument("--chunks", default="32")
    ap.add_argument("--tiles", default="1024,4096")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(3), "little"))
    ap.add_argument("--out-dir", default=".")
    args = ap.parse_args()
    from bench.kernels_spqr import make_spqr
    from jaxquant.kernel_layout import spqr_to_kernel_weight

    ints = lambda s: [int(v) for v in s.split(",") if v]
    env = results.environment()
    print(f"{env.get('device')}, jax {jax.__version__}, seed {args.seed}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        kw = spqr_to_kernel_weight(make_spqr(args.seed, K, N), jnp.bfloat16)
        outlier = dict(buckets=[list(c.shape) for c, _ in kw.sp_buckets], slots=kw.sparse_slots,
                       outlier_bytes=sum(int(c.nbytes) + int(v.nbytes) for c, v in kw.sp_buckets))
        sets = rotation_sets(outlier["outlier_bytes"], 32)
        ws = copies(kw, sets)
        print(f"{K}x{N}: {outlier}, {sets} copies", flush=True)
        for M in ints(args.ms):
            key = jax.random.PRNGKey(args.seed + M)
            xks = [w.prepare_activations(x, M) for w, x in zip(ws, activations(key, M, K, sets))]
            ys = [jax.random.normal(k, (M, N), jnp.float32) for k in jax.random.split(key, sets)]
            ref = jax.jit(xla_form)(ys[0], xks[0], ws[0])
            scale = float(jnp.max(jnp.abs(ref - ys[0])))
            us, _, names = cupti(xla_form, list(zip(ys, xks, ws)), args.rounds)
            base = dict(K=K, N=N, M=M, **outlier)
            rows.append(results.row("spqr_outliers", path="xla", us=round(us, 2), gpu_kernels=names, **base))
            print(f"M={M} xla: {us:.2f} us {names}", flush=True)
            if M == 1:
                got = jax.jit(mgpu_form)(ys[0], xks[0], ws[0])
                err = float(jnp.max(jnp.abs(got - ref))) / scale
                same = bool(jnp.array_equal(got, jax.jit(mgpu_form)(ys[0], xks[0], ws[0])))
                us, kern, names = cupti(mgpu_form, list(zip(ys, xks, ws)), args.rounds, "outlier_sums")
                rows.append(results.row("spqr_outliers", path="pallas-mosaic-gpu", us=round(us, 2),
                                        kernel_us=round(kern, 2), rel_err=float(f"{err:.3g}"), deterministic=same,
                                        correct=err < 1e-5 and same, gpu_kernels=names, **base))
                print(f"M=1 mosaic-gpu sums: {us:.2f} us (kernel {kern:.2f}) err {err:.1e} {names}", flush=True)
            grid = itertools.product((False, True) if M > 1 else (False,), ints(args.chunks), ints(args.tiles),
                                     ints(args.warps))
            for kmajor, chunk, tile, warps in grid:
                kwargs = dict(chunk=chunk, tile_elements=tile, num_warps=warps)
                fn = lambda y, xk, w, kmajor=kmajor, kwargs=kwargs: kernel_form(y, xk, w, kmajor, **kwargs)
                try:
                    f = jax.jit(fn)
                    got, again = f(ys[0], xks[0], ws[0]), f(ys[0], xks[0], ws[0])
                    err = float(jnp.max(jnp.abs(got - ref))) / scale
                    same = bool(jnp.array_equal(got, again))
                    us, kern, names = cupti(fn, list(zip(ys, xks, ws)), args.rounds, "spqr_outliers")
                except Exception as e:  # a configuration that does not compile is reported, not fatal
                    print(f"M={M} kmajor={kmajor} {kwargs} FAILED {type(e).__name__}: {str(e)[-300:]}", flush=True)
                    continue
                ok = err < 1e-5 and same
                rows.append(results.row("spqr_outliers", path="pallas-triton", us=round(us, 2),
                                        kernel_us=round(kern, 2), kmajor=kmajor, rel_err=float(f"{err:.3g}"),
                                        deterministic=same, correct=ok, gpu_kernels=names, **kwargs, **base))
                print(f"M={M} kmajor={kmajor} {kwargs}: {us:.2f} us (kernel {kern:.2f}) err {err:.1e} "
                      f"{'OK' if ok else 'WRONG'}", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "spqr_outliers.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = [f"## SpQR outlier product: Pallas kernel vs XLA ({env.get('device')}, jax {jax.__version__})", "",
             f"Command: `{results.command_line()}`. Call = y [M, N] float32 + outlier product (CUPTI device time, "
             "rotating copies, median). Per shape and M: the XLA form and the five fastest correct kernel configs.",
             "", "| K x N | M | path | kmajor | chunk | tile | warps (groups) | us | x XLA |", "|---|---|---|---|---|---|---|---|---|"]
    for (K, N, M), group in itertools.groupby(rows, key=lambda r: (r["K"], r["N"], r["M"])):
        group = list(group)
        xla = next(r for r in group if r["path"] == "xla")
        best = sorted((r for r in group if r["path"] == "pallas-triton" and r["correct"]), key=lambda r: r["us"])[:5]
        lines.append(f"| {K}x{N} | {M} | XLA | | | | | {xla['us']} | 1 |")
        lines += [f"| {K}x{N} | {M} | Mosaic GPU sums + XLA gather-add | | | | 1 | {r['us']} | "
                  f"{xla['us'] / r['us']:.2f}{'' if r['correct'] else ' (WRONG)'} |"
                  for r in group if r["path"] == "pallas-mosaic-gpu"]
        lines += [f"| {K}x{N} | {M} | kernel | {r['kmajor']} | {r['chunk']} | {r['tile_elements']} | {r['num_warps']} "
                  f"| {r['us']} | {xla['us'] / r['us']:.2f} |" for r in best]
    with open(os.path.join(args.out_dir, "spqr_outliers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
