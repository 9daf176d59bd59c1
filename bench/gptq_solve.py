"""One full GPTQ solve (the jitted ``jaxquant.gptq._solve`` that ``gptq`` and the pipeline run on one device) with the
XLA column loop vs the Pallas column kernel (pallas_kernels/gptq_columns.py), in the same run, at LLaMA-7B layer
shapes: the full solves of one decoder layer (stacked q/k/v, o, stacked gate/up, down) and the half-row solves that
each device of a 2-GPU run does (the first N/2 rows of the same W with the same H, so their codes must equal the
first half of the full solve's codes bit for bit: rows are independent).

w4 g128 asym, block 128, no act-order (the default config). Random W (0.02 N(0, 1)), H = 2 X^T X / T from correlated
activations X [T, K] (low-rank mix + noise, uneven column scales). Per mode: compile (``_solve.lower().compile()``,
timed), one warm-up, then the median of ``--reps`` calls (block_until_ready). Both modes' codes, dequantized weights
and losses are compared.

``--kernel-configs``: also time the kernel alone on one 128-column block for a few (block_rows, num_warps, contract)
settings, each checked against the jnp reference run by XLA on the same device.

    python bench/gptq_solve.py [--reps 5] [--json bench/results/gptq_solve.json] [--md bench/results/gptq_solve.md]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FULL = {4096: [12288, 4096, 22016], 11008: [4096]}  # K -> N of one layer's solves (q/k/v, o, gate/up; down)


def _hessian(key, K, T):
    import jax
    import jax.numpy as jnp

    k1, k2, k3, k4 = jax.random.split(key, 4)
    rank = K // 8
    mix = jax.random.normal(k1, (rank, K), jnp.float32) / rank**0.5
    colscale = 0.5 + jax.random.uniform(k2, (K,), jnp.float32)
    X = (jax.random.normal(k3, (T, rank)) @ mix + 0.3 * jax.random.normal(k4, (T, K))) * colscale
    return jnp.matmul(X.T, X, precision="highest") * (2.0 / T)


def _timed(fn, reps):
    import jax

    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def _compile_solve(W, H, cfg, mode):
    """``_solve`` compiled with the column kernel on ("1") or off ("0"): the mode is read when the program is traced,
    so the trace caches are cleared first. Returns the compiled program and the compile seconds."""
    import jax

    G = importlib.import_module("jaxquant.gptq")
    os.environ["JAXQUANT_GPTQ_COLUMN_KERNEL"] = mode
    jax.clear_caches()
    static = G._solve_static(cfg, W.shape[1], row_errors=False, return_dequantized=True)
    t = time.perf_counter()
    compiled = G._solve.lower(W, H, float(cfg.percdamp), **static).compile()
    return compiled, time.perf_counter() - t


def bench_solves(args, emit):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxquant.config import QuantConfig
    from jaxquant.packing import unpack_qweight
    from pallas_kernels import gptq_columns as C

    cfg = QuantConfig(bits=4, group_size=128, block_size=128)
    key = jax.random.PRNGKey(args.seed)
    for K, Ns in args.shapes.items():
        key, kh = jax.random.split(key)
        H = _hessian(kh, K, args.tokens)
        for N in Ns:
            key, kw = jax.random.split(key)
            W_full = 0.02 * jax.random.normal(kw, (N, K), jnp.float32)
            full_codes = {}
            for rows in (N, N // 2):
                W = W_full[:rows]
                res = {}
                for mode, name in (("0", "xla_loop"), ("1", "pallas_kernel")):
                    try:
                        compiled, compile_s = _compile_solve(W, H, cfg, mode)
                    except Exception as e:  # the kernel path failed to build: report it, keep the XLA rows
                        print(f"{rows}x{K} {name}: compile failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                        return
                    med, times = _timed(lambda: compiled(W, H, float(cfg.percdamp)), args.reps)
                    weight, deq, loss, finite = compiled(W, H, float(cfg.percdamp))
                    codes = np.asarray(unpack_qweight(weight.qweight, cfg.bits)).T
                    res[name] = dict(seconds=med, times=times, compile_s=compile_s, codes=codes,
                                     deq=np.asarray(deq), loss=float(loss), finite=bool(np.asarray(finite).all()))
                    print(f"{rows}x{K} {name}: {med * 1e3:.2f} ms (compile {compile_s:.1f} s) loss {float(loss):.6g}",
                          flush=True)
                a, b = res["xla_loop"], res["pallas_kernel"]
                same = a["codes"] == b["codes"]
                deq_rel = float(np.abs(a["deq"] - b["deq"]).max() / np.abs(a["deq"]).max())
                common = dict(shape=f"{rows}x{K}", N=rows, K=K, solve=("full" if rows == N else "half rows (2-GPU)"),
                              bits=cfg.bits, group_size=cfg.group_size, block_size=cfg.block_size, sym=cfg.sym,
                              act_order=cfg.act_order, reps=args.reps, hessian_tokens=args.tokens,
                              codes_equal_fraction=float(same.mean()), rows_all_codes_equal=float(same.all(1).mean()),
                              deq_max_abs_diff_rel=deq_rel,
                              speedup=a["seconds"] / b["seconds"],
                              kernel_config=":".join(map(str, C.default_config(rows))))
                if rows == N:
                    full_codes = {k: v["codes"] for k, v in res.items()}
                for name, r in res.items():
                    extra = {}
                    if rows != N:  # rows are independent: the half-row solve equals the first half of the full one
                        extra["half_equals_full_rows"] = bool(np.array_equal(r["codes"], full_codes[name][:rows]))
                    emit(dict(what="gptq_solve", path=name, seconds=r["seconds"],
                              times=[round(t, 6) for t in r["times"]], compile_s=round(r["compile_s"], 2),
                              loss=r["loss"], finite=r["finite"], **common, **extra))
                print(f"  codes equal {same.mean():.6f}, rows all equal {same.all(1).mean():.4f}, deq diff {deq_rel:.2e},"
                      f" speedup {a['seconds'] / b['seconds']:.2f}x", flush=True)


def bench_kernel_configs(args, emit):
    """Times the kernel alone on one 128-column block per config and N; returns {N: {config: us}}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import gptq_columns as C

    bs, maxq = 128, 15
    key = jax.random.PRNGKey(args.seed + 1)
    k1, k2 = jax.random.split(key)
    X = jax.random.normal(k2, (4 * bs, bs))
    Hb = X.T @ X / (4 * bs) + 0.05 * jnp.eye(bs)
    U1 = jnp.linalg.cholesky(jnp.linalg.inv(Hb)).T
    ref_fn = jax.jit(C.gptq_columns_reference, static_argnames="maxq")
    timings = {}
    for N in args.kernel_ns:
        W1 = jax.random.normal(k1, (N, bs), jnp.float32)
        xmin, xmax = jnp.minimum(W1.min(1), 0), jnp.maximum(W1.max(1), 0)
        scale = ((xmax - xmin) / maxq)[None]
        zero = jnp.round(-xmin / scale[0])[None]
        Qr, Dr, Er = ref_fn(W1, U1, scale, zero, maxq=maxq)
        for layout, block_rows, num_warps, contract in args.configs:
            cfg = f"{layout}:{block_rows}:{num_warps}:{int(contract)}"
            fn = jax.jit(lambda w, u, s, z: C.gptq_columns(w, u, s, z, maxq=maxq, layout=layout,
                                                          block_rows=block_rows, num_warps=num_warps,
                                                          contract=contract))
            try:
                med, _ = _timed(lambda: fn(W1, U1, scale, zero), 20)
            except Exception as e:  # a config Triton rejects: record and go on
                print(f"kernel N={N} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            Q, D, E = fn(W1, U1, scale, zero)
            same = float((np.asarray(Q) == np.asarray(Qr)).mean())
            d_rel = float(jnp.abs(D - Dr).max() / jnp.abs(Dr).max())
            e_rel = float(jnp.abs(E - Er).max() / jnp.abs(Er).max())
            print(f"kernel N={N} {cfg}: {med * 1e6:.1f} us, codes equal to XLA reference {same:.6f}, "
                  f"D diff {d_rel:.2e}, E diff {e_rel:.2e}", flush=True)
            emit(dict(what="gptq_columns_kernel", N=N, bs=bs, layout=layout, block_rows=block_rows,
                      num_warps=num_warps, contract=contract, us=med * 1e6, codes_equal_reference=same,
                      deq_max_abs_diff_rel=d_rel, err_max_abs_diff_rel=e_rel))
            if same == 1.0 and not contract:  # only exact configs are candidates for the default
                timings.setdefault(N, {})[(layout, block_rows, num_warps)] = med * 1e6
    return timings


def pick_configs(timings):
    """Fastest exact config at N >= LARGE_N ("large") and summed over the smaller N ("small"): set in-process as the
    kernel's defaults for the solves that follow (and printed, to be written into pallas_kernels/gptq_columns.py)."""
    from pallas_kernels import gptq_columns as C

    for name, Ns in (("large", [n for n in timings if n >= C.LARGE_N]), ("small", [n for n in timings if n < C.LARGE_N])):
        common = set.intersection(*(set(timings[n]) for n in Ns)) if Ns else set()
        if common:
            best = min(common, key=lambda c: sum(timings[n][c] for n in Ns))
            C.CONFIGS[name] = best
    print(f"kernel configs for the solves: {C.CONFIGS}", flush=True)
    return dict(C.CONFIGS)


def write_md(rows, path):
    solves = [r for r in rows if r.get("what") == "gptq_solve"]
    lines = ["# GPTQ solve: XLA column loop vs Pallas column kernel", "",
             f"Device: **{solves[0]['device'] if solves else '?'}**, JAX {solves[0]['jax'] if solves else '?'}. "
             "One `jaxquant.gptq._solve` (w4 g128 asym, block 128), median of warm repeats; codes/deq compared "
             "between the two paths in the same run. Half-row shapes: the first N/2 rows of the same W and H "
             "(what each device of a 2-GPU run solves).", "",
             f"Command: `{solves[0]['command'] if solves else ''}` (rows: `gptq_solve.json`)", "",
             "| shape N x K | solve | XLA loop ms | kernel ms | speedup | codes equal | deq max diff (rel) | "
             "half == full rows (XLA / kernel) | kernel config |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_shape = {}
    for r in solves:
        by_shape.setdefault(r["shape"], {})[r["path"]] = r
    for shape, d in by_shape.items():
        if len(d) < 2:
            continue
        a, b = d["xla_loop"], d["pallas_kernel"]
        half = (f"{a['half_equals_full_rows']} / {b['half_equals_full_rows']}" if "half_equals_full_rows" in a
                else "-")
        lines.append(f"| {shape} | {a['solve']} | {a['seconds'] * 1e3:.2f} | {b['seconds'] * 1e3:.2f} | "
                     f"{a['seconds'] / b['seconds']:.2f}x | {a['codes_equal_fraction']:.6f} | "
                     f"{a['deq_max_abs_diff_rel']:.2e} | {half} | {a.get('kernel_config', '-')} |")
    kern = [r for r in rows if r.get("what") == "gptq_columns_kernel"]
    if kern:
        lines += ["", "Kernel alone, one 128-column block (codes vs the jnp reference run by XLA on the device):", "",
                  "| N | layout | block_rows | num_warps | contract | us | codes equal to reference |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['N']} | {r.get('layout', 'rows')} | {r['block_rows']} | {r['num_warps']} | {r['contract']} | "
                  f"{r['us']:.1f} | {r['codes_equal_reference']:.6f} |" for r in kern]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8192, help="activation rows behind each Hessian")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench/results/gptq_solve.json")
    ap.add_argument("--md", default="bench/results/gptq_solve.md")
    ap.add_argument("--kernel-configs", default="rows:16:4:0,rows:32:8:0,rows:8:2:0,cols:8:1:0,cols:16:1:0,cols:32:1:0,"
                    "cols:32:2:0,cols:64:2:0,cols:64:4:0,cols:128:4:0,cols:32:1:1",
                    help="layout:block_rows:num_warps:contract,... timed alone on one block ('' to skip); the fastest "
                         "exact ones become the kernel's defaults for the solves")
    ap.add_argument("--kernel-ns", default="22016,4096,2048")
    ap.add_argument("--skip-solves", action="store_true")
    ap.add_argument("--shapes", default="", help="K:N,N;K:N,... instead of the 7B layer shapes (smoke tests)")
    args = ap.parse_args()
    args.configs = [c.split(":") for c in args.kernel_configs.split(",") if c]
    args.configs = [(lay, int(r), int(w), bool(int(c))) for lay, r, w, c in args.configs]
    args.kernel_ns = [int(n) for n in args.kernel_ns.split(",")]
    args.picked = None
    args.shapes = ({int(k): [int(n) for n in ns.split(",")] for k, ns in (p.split(":") for p in args.shapes.split(";"))}
                   if args.shapes else FULL)

    from jaxquant.results import append_rows, row

    rows = []

    def emit(fields):
        r = row("gptq_solve", **fields)
        rows.append(r)
        append_rows(args.json, [r])
        write_md(rows, args.md)

    if args.configs:
        args.picked = pick_configs(bench_kernel_configs(args, emit))
    if not args.skip_solves:
        bench_solves(args, emit)
    print(json.dumps([{k: r[k] for k in ("what", "shape", "path", "seconds") if k in r} for r in rows]))


if __name__ == "__main__":
    main()
