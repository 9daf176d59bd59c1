"""Block-configuration sweep of the GPTQ kernel on the LLaMA-7B decode shapes (issue 7, decode speed).

    python bench/kernels_sweep.py --out $OUT/sweep.jsonl [--shapes 4096x22016,4096x12288,11008x4096,4096x4096]
        [--bits 4,3] [--ms 1,16] [--big 8192x28672] [--budget-s 480]

For each (shape, bits): the weight is packed once (random codes / scales / zeros, g128 asymmetric, as
bench/kernels_launch.py), then at M = 1 every block configuration the kernel takes that gives a sensible grid
(tile_k 64..512, k_splits 1..16 with >= 2 steps per split, one split = the fused single-kernel launch; the
warp-specialized variant, fused and stream-K, where N_pad has >= 64 128-row units) plus the heuristic's own choice
("default"); at M = 16 the default and the four fastest M = 1 configurations; then stages 2 / 4 for the fastest
M = 1 configurations. ``--big`` shapes (8192x28672) get a short fixed list. Every configuration is first checked on
fresh activations against x @ W_float with its output buffer NaN-poisoned, then timed as bench/kernels.py --cupti
(bench/timing.py: CUPTI device time of one jitted call, rotating weight copies + activations > 4x L2, median of
``--rounds`` passes): ``us`` = the whole call (activation pad + kernel + partial sum), ``kernel_us`` = the kernel.
bf16 XLA in the same run. Rows are appended to ``--out`` as they are measured (a cut run keeps them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels import gptq_matmul as gm  # noqa: E402
from bench.kernels_launch import Format  # noqa: E402
from bench.timing import activations, bf16_matmul, copies, cupti, rotation_sets  # noqa: E402

TOL = 1e-2


def log(*a):
    print(*a, flush=True)


def cfg_key(c: gm.KernelConfig) -> str:
    if c.variant == "ws":
        return f"ws{'f' if c.fused else 'p'} {c.tile_k}/{c.stages} ctas {c.ctas}"
    return f"{c.tile_k}/{c.stages}/{c.k_splits}{' fused' if c.fused else ''}"


def candidates(kw, m: int):
    """Explicit configs worth timing at M = m (resolved; duplicates and invalid ones dropped)."""
    tiles_n = kw.n_pad // gm.CHUNK
    out = []
    for t in (512, 256, 128, 64):
        if kw.k_pad % t or (kw.group % t and t % kw.group):
            continue
        if t == 64 and tiles_n > 64:
            continue
        steps = kw.k_pad // t
        for s in (1, 2, 4, 8, 16):
            if steps % s or steps // s < 2:
                continue
            ctas = tiles_n * s
            if ctas < 96 or ctas > 1400 or (t == 64 and s < 8):
                continue
            out.append(gm.KernelConfig(tile_k=t, k_splits=s, stages=3, fused=s == 1))
    units = kw.n_pad // (gm.WS_COMPUTE_WGS * gm.CHUNK)
    if kw.n_pad % (gm.WS_COMPUTE_WGS * gm.CHUNK) == 0 and units >= 64:
        for t, fused in ((512, True), (512, False), (256, False), (256, True)):
            if kw.k_pad % t == 0:
                out.append(gm.KernelConfig(variant="ws", tile_k=t, fused=fused))
    res, seen = [], set()
    for c in out:
        try:
            rc = c.resolved(kw, m)
        except ValueError as e:
            log(f"  skip {c}: {e}")
            continue
        if cfg_key(rc) not in seen:
            seen.add(cfg_key(rc))
            res.append(rc)
    return res


def measure(fmt, kw, w_float, m, cfg, xs, ws, key, rounds):
    """(rel err, nan, path us, kernel us, kernel names, seconds) for one config."""
    t0 = time.perf_counter()
    x = jax.random.normal(key, (m, kw.in_features), jnp.float32).astype(kw.dtype)
    rc = cfg.resolved(kw, m)
    poison = gm.nan_output_buffer(rc, kw.n_pad, kw.out_features, m, kw.dtype)
    y = jax.jit(lambda x, w, p: gm.gptq_matmul(x, w, config=cfg, out_init=p))(x, kw, poison).astype(jnp.float32)
    ref = jnp.matmul(x.astype(jnp.float32), w_float, precision=jax.lax.Precision.HIGHEST)
    fro = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    nan = bool(jnp.any(jnp.isnan(y)))
    us, kern, names = cupti(lambda x, w: gm.gptq_matmul(x, w, config=cfg), list(zip(xs, ws)), rounds, "gptq_w")
    return fro, nan, us, kern, names, time.perf_counter() - t0


def compare_defaults(args, emit, seed, deadline):
    """Per (shape, bits, M): the decode rule ("rule", ``gptq_matmul.decode_blocks``) and the general search
    ("search"), same run."""
    parse = lambda s: [tuple(int(v) for v in x.split("x")) for x in s.split(",") if x]
    shapes = parse(args.shapes) + parse(args.big)
    variants = {"rule": True, "search": False}
    saved = gm.DECODE_RULE
    for si, (K, N) in enumerate(shapes):
        key = jax.random.PRNGKey(seed + si)
        w = (jax.random.normal(key, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        bws = copies(w, rotation_sets(w.nbytes, 32))
        bf = {}
        for M in (int(v) for v in args.ms.split(",")):
            xs = activations(jax.random.fold_in(key, M), M, K, len(bws))
            bf[M] = cupti(bf16_matmul, list(zip(xs, bws)), args.rounds)[0]
            log(f"{K}x{N} bf16 XLA M={M}: {bf[M]:.2f} us")
        del bws, w
        for bits in (int(v) for v in args.bits.split(",")):
            if time.time() > deadline:
                log(f"budget spent: skipping {K}x{N} w{bits}")
                continue
            fmt = Format(f"gptq-w{bits}g128")
            kw, w_float = fmt.make(seed + 100 + 10 * si + bits, K, N)
            ws = copies(kw, rotation_sets(kw.nbytes, 32))
            for M in bf:
                xs = activations(jax.random.fold_in(key, 1000 + M), M, K, len(ws))
                for name, rule in variants.items():
                    gm.DECODE_RULE = rule
                    try:
                        cfg = gm.KernelConfig()
                        rc = cfg.resolved(kw, M)
                        fro, nan, us, kern, names, secs = measure(fmt, kw, w_float, M, cfg, xs, ws,
                                                                 jax.random.fold_in(key, 77 + M), args.rounds)
                    except Exception:
                        log(f"{K}x{N} w{bits} M={M} {name} FAILED: {traceback.format_exc()[-2000:]}")
                        continue
                    finally:
                        gm.DECODE_RULE = saved
                    ok = fro < TOL and not nan
                    emit(dict(format=fmt.name, bits=bits, group_size=128, K=K, N=N, K_pad=kw.k_pad, M=M,
                              heuristic=name, decode_rule=rule,
                              config=dataclasses.asdict(rc), config_key=cfg_key(rc), us=round(us, 2),
                              kernel_us=round(kern, 2), bf16_xla_us=round(bf[M], 2),
                              speedup_vs_bf16=round(bf[M] / us, 3),
                              gbps=round((kw.nbytes + M * K * 2 + M * N * 2) / us / 1e3, 1),
                              fro_rel_err=float(f"{fro:.3g}"), nan=nan, correct=ok, gpu_kernels=names,
                              timing="cupti-rotating"))
                    log(f"{K}x{N} w{bits} M={M} {name:8s} {cfg_key(rc):24s} path {us:7.2f} kernel {kern:7.2f} "
                        f"x{bf[M] / us:.3f} err {fro:.1e} {'OK' if ok else 'FAIL'} {names}")
            del ws, kw, w_float


def merge(paths, results_dir, note=""):
    """Rows of the given JSONL files -> bench/results/kernels_sweep.json (rows already there are kept, duplicates
    skipped) and the section "Decode shapes: block-size sweep" of kernels.md (kept outside its markers)."""
    sys.path.insert(0, os.path.dirname(results_dir))
    from jaxquant import results

    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    json_path = os.path.join(results_dir, "kernels_sweep.json")
    ident = lambda r: json.dumps([r.get(k) for k in ("run_id", "K", "N", "bits", "M", "config_key", "heuristic", "us")])
    have = {ident(r) for r in json.load(open(json_path))} if os.path.exists(json_path) else set()
    results.append_rows(json_path, [r for r in rows if ident(r) not in have])
    rows = json.load(open(json_path))
    sweep = [r for r in rows if "heuristic" not in r]
    comp = [r for r in rows if "heuristic" in r]
    runs = sorted({(r["run_id"], r["device"], r["jax"], r["command"]) for r in rows})
    lines = ["<!-- decode sweep begin -->", "", "## Decode shapes: block-size sweep, decode rule (GPTQ g128)",
             "", "Runs (device tool, CUPTI device time of one jitted call over rotating weight copies + activations, "
             "median of 3 passes; every row checked against x @ W_float with a NaN-poisoned output; bf16 XLA in the "
             "same run; rows in `kernels_sweep.json`):", ""]
    lines += [f"- {rid}: {dev}, jax {jx}: `{cmd}`" for rid, dev, jx, cmd in runs]
    lines += ["", note, ""] if note else [""]
    if sweep:
        lines += ["### Sweep: fastest configuration vs the heuristic of the time (path = pad + kernel + partial sum)", "",
                  "| K x N | bits | M | configs | fastest (tile_k/stages/k_splits) | us | x bf16 | previous default | us | "
                  "x bf16 | bf16 XLA us |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        groups = {}
        for r in sweep:
            groups.setdefault((r["run_id"], r["K"], r["N"], r["bits"], r["M"]), []).append(r)
        for (rid, K, N, bits, M), g in groups.items():
            good = [r for r in g if r["correct"]]
            if not good:
                continue
            b = min(good, key=lambda r: r["us"])
            d = next((r for r in g if r.get("default")), None)
            lines.append(f"| {K}x{N} | {bits} | {M} | {len(g)} | {b['config_key']} | {b['us']} | "
                         f"{b['speedup_vs_bf16']} | {d['config_key'] if d else '-'} | {d['us'] if d else '-'} | "
                         f"{d['speedup_vs_bf16'] if d else '-'} | {b['bf16_xla_us']} |")
        lines.append("")
        bad = [r for r in sweep if not r["correct"]]
        lines.append(f"All {len(sweep)} sweep rows correct (rel err {min(r['fro_rel_err'] for r in sweep)}.."
                     f"{max(r['fro_rel_err'] for r in sweep)}, no NaN)." if not bad else
                     f"{len(bad)} of {len(sweep)} sweep rows FAILED the check.")
        lines.append("")
    if comp:
        lines += ["### Defaults now vs before (same run): new = decode rule + unpadded M = 1 x, new-pad = decode rule "
                  "with the XLA pad, old = the previous heuristic", "",
                  "| K x N | bits | M | heuristic | config | path us | kernel us | x bf16 (path) | GB/s (path) | "
                  "bf16 XLA us | rel err | ok |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in comp:
            lines.append(f"| {r['K']}x{r['N']} | {r['bits']} | {r['M']} | {r['heuristic']} | {r['config_key']} | "
                         f"{r['us']} | {r['kernel_us']} | {r['speedup_vs_bf16']} | {r['gbps']} | {r['bf16_xla_us']} | "
                         f"{r['fro_rel_err']} | {'yes' if r['correct'] else 'NO'} |")
        lines.append("")
    lines.append("<!-- decode sweep end -->")
    block = "\n".join(lines)
    results.replace_section(os.path.join(results_dir, "kernels.md"), block, "<!-- decode sweep begin -->",
                            "<!-- decode sweep end -->")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x22016,4096x12288,11008x4096,4096x4096")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--big", default="8192x28672")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--out", default="sweep.jsonl")
    ap.add_argument("--rule-compare", action="store_true",
                    help="the decode rule vs the general search per shape, bits and M (same run)")
    ap.add_argument("--merge", nargs="*", help="no run: merge these JSONL files into bench/results")
    ap.add_argument("--merge-note", default="")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), args.merge_note)
        return
    t_start = time.time()
    deadline = t_start + args.budget_s
    log(f"jax {jax.__version__}, devices {jax.devices()}")
    seed = int.from_bytes(os.urandom(4), "little") % 2**30
    from jaxquant import results
    command = "python bench/kernels_sweep.py " + " ".join(sys.argv[1:])
    run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def emit(r):
        with open(args.out, "a") as f:
            f.write(json.dumps(results.row("kernels_sweep", command=command, run_id=run_id, **r)) + "\n")

    if args.rule_compare:
        compare_defaults(args, emit, seed, deadline)
        log(f"done in {time.time() - t_start:.0f} s")
        return
    parse = lambda s: [tuple(int(v) for v in x.split("x")) for x in s.split(",") if x]
    shapes, big = parse(args.shapes), parse(args.big)
    ms = [int(v) for v in args.ms.split(",")]
    bf16 = {}

    def bf16_time(K, N, M, key):
        if (K, N, M) not in bf16:
            w = (jax.random.normal(key, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
            bws = copies(w, rotation_sets(w.nbytes, 32))
            xs = activations(jax.random.fold_in(key, M), M, K, len(bws))
            bf16[(K, N, M)] = cupti(bf16_matmul, list(zip(xs, bws)), args.rounds)[0]
            log(f"{K}x{N} bf16 XLA M={M}: {bf16[(K, N, M)]:.2f} us")
        return bf16[(K, N, M)]

    jobs = [(s, b, False) for b in [int(v) for v in args.bits.split(",")] for s in shapes]
    jobs += [(s, b, True) for s in big for b in [int(v) for v in args.bits.split(",")]]
    summary = []
    for ji, ((K, N), bits, is_big) in enumerate(jobs):
        if time.time() > deadline:
            log(f"budget spent: skipping {K}x{N} w{bits}")
            continue
        key = jax.random.PRNGKey(seed + ji)
        fmt = Format(f"gptq-w{bits}g128")
        kw, w_float = fmt.make(seed + 1000 + ji, K, N)
        ws = copies(kw, rotation_sets(kw.nbytes, 32))
        log(f"== {K}x{N} w{bits}: K_pad {kw.k_pad}, {kw.nbytes / 1e6:.1f} MB, {len(ws)} copies")
        m1 = {}  # key -> (us, cfg) at M = 1
        for M in ms:
            if time.time() > deadline:
                break
            bf = bf16_time(K, N, M, jax.random.fold_in(key, 1))
            xs = activations(jax.random.fold_in(key, 100 + M), M, K, len(ws))
            default = gm.KernelConfig().resolved(kw, M)
            if is_big:
                cands = [default] + [c for c in (
                    gm.KernelConfig(tile_k=512, k_splits=1, fused=True, stages=3),
                    gm.KernelConfig(tile_k=256, k_splits=1, fused=True, stages=3),
                    gm.KernelConfig(tile_k=256, k_splits=2, stages=3),
                    gm.KernelConfig(variant="ws", tile_k=512, fused=True)) if cfg_key(c.resolved(kw, M)) != cfg_key(default)]
            elif M == ms[0]:
                cands = [default] + [c for c in candidates(kw, M) if cfg_key(c) != cfg_key(default)]
            else:
                top = sorted(m1.values(), key=lambda v: v[0])[:args.top]
                cands = [default] + [c for _, c in top if cfg_key(c.resolved(kw, M)) != cfg_key(default)]
            log(f"-- {K}x{N} w{bits} M={M}: {len(cands)} configs, default {cfg_key(default)}")
            rows = []
            for ci, cfg in enumerate(cands):
                if time.time() > deadline:
                    log("budget spent")
                    break
                try:
                    rc = cfg.resolved(kw, M)
                    fro, nan, us, kern, names, secs = measure(fmt, kw, w_float, M, cfg, xs, ws,
                                                             jax.random.fold_in(key, 7 + 31 * ci + M), args.rounds)
                except Exception:
                    log(f"{K}x{N} w{bits} M={M} {cfg} FAILED: {traceback.format_exc()[-1500:]}")
                    continue
                ok = fro < TOL and not nan
                row = dict(format=fmt.name, bits=bits, group_size=128, K=K, N=N, K_pad=kw.k_pad, M=M,
                           config=dataclasses.asdict(rc), config_key=cfg_key(rc), default=ci == 0, us=round(us, 2),
                           kernel_us=round(kern, 2), bf16_xla_us=round(bf, 2), speedup_vs_bf16=round(bf / us, 3),
                           gbps=round((kw.nbytes + M * K * 2 + M * N * 2) / us / 1e3, 1), fro_rel_err=float(f"{fro:.3g}"),
                           nan=nan, correct=ok, gpu_kernels=names, seconds=round(secs, 1), timing="cupti-rotating")
                emit(row)
                rows.append(row)
                if M == ms[0] and ok:
                    m1[cfg_key(rc)] = (us, cfg)
                log(f"{K}x{N} w{bits} M={M} {cfg_key(rc):28s} path {us:7.2f} kernel {kern:7.2f} x{bf / us:.3f} "
                    f"err {fro:.1e} {'OK' if ok else 'FAIL'} ({secs:.1f} s) {names}")
            good = [r for r in rows if r["correct"]]
            if good:
                best = min(good, key=lambda r: r["us"])
                d = next((r for r in rows if r["default"]), None)
                summary.append(f"{K}x{N} w{bits} M={M}: best {best['config_key']} {best['us']} us "
                               f"(x{best['speedup_vs_bf16']}); default {d['config_key'] if d else '?'} "
                               f"{d['us'] if d else '?'} us; bf16 {bf:.2f}")
        if not is_big and m1 and time.time() < deadline:  # pipeline depth for the two fastest M = 1 configs
            xs = activations(jax.random.fold_in(key, 101), 1, K, len(ws))
            bf = bf16_time(K, N, 1, jax.random.fold_in(key, 1))
            for us0, cfg in sorted(m1.values(), key=lambda v: v[0])[:1]:
                for st in (2, 4):
                    if time.time() > deadline:
                        break
                    c2 = dataclasses.replace(cfg, stages=st)
                    try:
                        rc = c2.resolved(kw, 1)
                        fro, nan, us, kern, names, secs = measure(fmt, kw, w_float, 1, c2, xs, ws,
                                                                 jax.random.fold_in(key, 999 + st), args.rounds)
                    except Exception:
                        log(f"{K}x{N} w{bits} stages {st} {cfg} FAILED: {traceback.format_exc()[-800:]}")
                        continue
                    ok = fro < TOL and not nan
                    emit(dict(format=fmt.name, bits=bits, group_size=128, K=K, N=N, K_pad=kw.k_pad, M=1,
                              config=dataclasses.asdict(rc), config_key=cfg_key(rc), default=False, us=round(us, 2),
                              kernel_us=round(kern, 2), bf16_xla_us=round(bf, 2), speedup_vs_bf16=round(bf / us, 3),
                              gbps=round((kw.nbytes + K * 2 + N * 2) / us / 1e3, 1), fro_rel_err=float(f"{fro:.3g}"),
                              nan=nan, correct=ok, gpu_kernels=names, seconds=round(secs, 1), timing="cupti-rotating"))
                    log(f"{K}x{N} w{bits} M=1 {cfg_key(rc):28s} path {us:7.2f} kernel {kern:7.2f} x{bf / us:.3f} "
                        f"err {fro:.1e} {'OK' if ok else 'FAIL'} (stages {st}, was {us0:.2f})")
        del ws, kw, w_float
    log(f"done in {time.time() - t_start:.0f} s")
    log("\n".join(summary))


if __name__ == "__main__":
    main()
