"""Quantization speed at LLaMA-7B shapes: Hessian accumulation and the GPTQ solve, with random data.

What is timed (all with warm-up, ``block_until_ready`` and the median of ``--reps`` repeats on fresh inputs):

  hessian      one full calibration pass: ``nsamples x seqlen`` tokens streamed through
               ``jaxquant.hessian.hessian_update`` in batches of ``--batch`` sequences ([B, seqlen, K] per call),
               starting from ``hessian_init(K)``. The activations (correlated: low-rank mix + noise, uneven column
               scales) are generated on the device before the clock starts, fresh for every repeat.
  gptq_solve   ``jaxquant.gptq.gptq(W [out, in], H, QuantConfig(...))`` end to end (input checks, damping /
               Cholesky, the column loop, packing), fresh random W and H for every repeat. H comes from
               ``--solve-h-seqs`` fresh sequences of correlated activations (positive definite).
  model_total_7b   32 x (3 Hessians at K=4096 [q/k/v shared, o, up/gate shared] + 1 at K=11008 [down]
               + 4 solves 4096x4096 [q, k, v, o] + 2 solves 11008x4096 [up, gate] + 1 solve 4096x11008 [down]),
               shapes as [out, in]. Forward passes of the pipeline are not included.

``compile_seconds`` is the first (cold) run minus the median warm run. ``peak_mem_gb`` is the process-wide peak of the
device allocator at the time the row was written (it never goes down; stages run smallest first).

--breakdown adds, per solve, the warm time of each part of ``gptq()``; --variants times the library's column loop
(``_quantize_blocks``) traced with other unroll factors (codes checked identical) and the old three-step inverse
Cholesky against the library's; --hessian-variants times x^T x with other dot algorithms (bf16x3, tf32, bf16 inputs)
and reports their error against the float32 HIGHEST product (not used by the library: information for a decision).

GPU:  python bench/quant_speed.py                      (writes $OUT/quant_speed.json, else bench/results/)
CPU smoke test:  python bench/quant_speed.py --hessian-k 256 --shapes 128x256 --nsamples 8 --seqlen 64 --batch 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import importlib  # noqa: E402
from jaxquant import results  # noqa: E402
from jaxquant.config import QuantConfig  # noqa: E402
from jaxquant.grid import dequantize_codes, find_params, quantize_codes  # noqa: E402
from jaxquant.hessian import hessian_init, hessian_update  # noqa: E402

G = importlib.import_module("jaxquant.gptq")  # the module (the package re-exports the function gptq)

LAYERS_7B = 32
TARGET_S = 180.0


# ------------------------------------------------------------------------------------------------ random inputs
@partial(jax.jit, static_argnames=("rows", "rank", "dtype"))
def _acts(key, mix, colscale, *, rows, rank, dtype):
    """[rows, K] correlated activations: (z @ mix + 0.3 noise) * colscale."""
    k1, k2 = jax.random.split(key)
    z = jax.random.normal(k1, (rows, rank), jnp.float32)
    x = jnp.matmul(z, mix) + 0.3 * jax.random.normal(k2, (rows, mix.shape[1]), jnp.float32)
    return (x * colscale).astype(dtype)


class ActSource:
    """Fresh correlated activations for one 'layer' (fixed mixing matrix and column scales)."""

    def __init__(self, key, K, dtype):
        self.K, self.dtype = K, dtype
        self.rank = max(1, K // 8)
        k1, k2, self.key = jax.random.split(key, 3)
        self.mix = jax.random.normal(k1, (self.rank, K), jnp.float32) / np.sqrt(self.rank)
        self.colscale = 0.5 + jax.random.uniform(k2, (K,), jnp.float32)

    def batch(self, B, T):
        self.key, k = jax.random.split(self.key)
        x = _acts(k, self.mix, self.colscale, rows=B * T, rank=self.rank, dtype=self.dtype)
        return x.reshape(B, T, self.K)


def _ready(tree):
    return jax.block_until_ready(tree)


def _peak_gb():
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend has it
        stats = None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 2**30, 3)


# ------------------------------------------------------------------------------------------------------ hessian
def bench_hessian(K, args, key):
    src = ActSource(key, K, args.act_dtype)
    nb = args.nsamples // args.batch
    times = []
    for rep in range(args.reps + 1):  # rep 0 is the cold (compiling) run
        xs = _ready([src.batch(args.batch, args.seqlen) for _ in range(nb)])
        t0 = time.perf_counter()
        state = hessian_init(K)
        for x in xs:
            state = hessian_update(state, x)
        _ready(state.H)
        times.append(time.perf_counter() - t0)
        del xs
    H = np.asarray(state.H[:4, :4])
    assert np.all(np.isfinite(H)) and int(state.n) == args.nsamples, "bad Hessian"
    med = statistics.median(times[1:])
    tokens = args.nsamples * args.seqlen
    flops = 2.0 * tokens * K * K
    return dict(what="hessian", shape=[K, K], K=K, tokens=tokens, batch=args.batch, act_dtype=args.act_dtype,
                seconds=med, compile_seconds=max(0.0, times[0] - med), all_seconds=times,
                tflops=flops / med / 1e12)


# ------------------------------------------------------------------------------------------------- gptq solve
def _problem(N, K, args, key):
    kw, ka = jax.random.split(key)
    W = jax.random.normal(kw, (N, K), jnp.float32) * (0.5 + jax.random.uniform(jax.random.fold_in(kw, 1), (K,)))
    src = ActSource(ka, K, "float32")
    state = hessian_init(K)
    for _ in range(max(1, args.solve_h_seqs // args.batch)):
        state = hessian_update(state, src.batch(min(args.batch, args.solve_h_seqs), args.seqlen))
    return _ready((W, state.H))


def _time_parts(W, H, cfg):
    """Warm time of each stage of gptq() (same calls as jaxquant.gptq.gptq, synchronised after each)."""
    t = {}

    def clock(name, fn):
        t0 = time.perf_counter()
        out = _ready(fn())
        t[name] = time.perf_counter() - t0
        return out

    clock("input_checks", lambda: (bool(jnp.isfinite(W).all()), bool(jnp.isfinite(H).all())))
    Wp, Hp, perm, col_group, tables = clock("prepare", lambda: G._prepare(
        W, H, bits=cfg.bits, sym=cfg.sym, group_size=cfg.group_size, act_order=cfg.act_order,
        static_groups=cfg.static_groups))
    U = clock("inverse_cholesky", lambda: G._inverse_cholesky_upper(Hp, cfg.percdamp))
    clock("pd_check", lambda: bool(jnp.isfinite(U).all()))
    codes, deq, loss, tabs = clock("column_loop", lambda: G._quantize_blocks(
        Wp, U, col_group, tables, bits=cfg.bits, sym=cfg.sym, group_size=cfg.group_size,
        block_size=G._block_size(cfg, W.shape[1])))
    clock("loss_to_host", lambda: float(loss))
    return t


def bench_solve(N, K, cfg, args, key, breakdown):
    times, parts = [], []
    for rep in range(args.reps + 1):
        W, H = _problem(N, K, args, jax.random.fold_in(key, rep))
        t0 = time.perf_counter()
        weight, err = G.gptq(W, H, cfg)
        _ready(weight)
        times.append(time.perf_counter() - t0)
        assert np.isfinite(err)
        if breakdown and rep > 0:
            parts.append(_time_parts(W, H, cfg))
        del W, H, weight
    med = statistics.median(times[1:])
    row = dict(what="gptq_solve", shape=[N, K], tokens=args.solve_h_seqs * args.seqlen, bits=cfg.bits,
               group_size=cfg.group_size, act_order=cfg.act_order, sym=cfg.sym, block_size=cfg.block_size,
               seconds=med, compile_seconds=max(0.0, times[0] - med), all_seconds=times,
               us_per_column=med / K * 1e6)
    if parts:
        row["breakdown_s"] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    return row


# ------------------------------------------------------------------------------------- column-loop variants
_UNROLLED = {}


def _loop_with_unroll(unroll):
    """The library's _quantize_blocks traced with another column-loop unroll factor.

    A new Python function per factor, so that jit's caches (keyed on the function) never hand back a trace made with
    another factor; G._UNROLL is read while tracing."""
    if unroll not in _UNROLLED:
        def body(*a, **kw):
            return G._quantize_blocks.__wrapped__(*a, **kw)

        _UNROLLED[unroll] = jax.jit(body, static_argnames=("bits", "sym", "group_size", "block_size"))
    fn = _UNROLLED[unroll]

    def call(*a, **kw):
        old, G._UNROLL = G._UNROLL, unroll
        try:
            return fn(*a, **kw)
        finally:
            G._UNROLL = old

    return call


@jax.jit
def _inverse_cholesky_upper_3step(H, percdamp):
    """The reference's route (jaxquant before the change): cholesky -> cho_solve(I) -> cholesky."""
    eye = jnp.eye(H.shape[0], dtype=H.dtype)
    H = H + percdamp * jnp.mean(jnp.diag(H)) * eye
    L = jnp.linalg.cholesky(H)
    Hinv = jax.scipy.linalg.cho_solve((L, True), eye)
    return jnp.linalg.cholesky(Hinv).T


def _timed(fn, reps):
    t0 = time.perf_counter()
    res = _ready(fn())
    cold = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = _ready(fn())
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    return res, {"seconds": med, "compile_seconds": max(0.0, cold - med)}


def bench_variants(N, K, cfg, args, key):
    """Column-loop unroll factors and the Cholesky routes on the same prepared inputs; codes must match."""
    W, H = _problem(N, K, args, key)
    Wp, Hp, perm, col_group, tables = G._prepare(W, H, bits=cfg.bits, sym=cfg.sym, group_size=cfg.group_size,
                                                 act_order=cfg.act_order, static_groups=cfg.static_groups)
    U = G._inverse_cholesky_upper(Hp, cfg.percdamp)
    bs = G._block_size(cfg, K)
    kw = dict(bits=cfg.bits, sym=cfg.sym, group_size=cfg.group_size, block_size=bs)
    out = {}
    ref, out["library"] = _timed(lambda: G._quantize_blocks(Wp, U, col_group, tables, **kw), args.reps)
    for u in args.unrolls:
        res, info = _timed(lambda: _loop_with_unroll(u)(Wp, U, col_group, tables, **kw), args.reps)
        info.update(codes_agree=float(jnp.mean((res[0] == ref[0]).astype(jnp.float32))),
                    loss_rel=abs(float(res[2]) - float(ref[2])) / float(ref[2]))
        out[f"loop_unroll{u}"] = info
    _, out["chol_library"] = _timed(lambda: G._inverse_cholesky_upper(Hp, cfg.percdamp), args.reps)
    U3, out["chol_3step"] = _timed(lambda: _inverse_cholesky_upper_3step(Hp, cfg.percdamp), args.reps)
    out["chol_3step"]["rel_diff_vs_library"] = float(jnp.linalg.norm(U3 - U) / jnp.linalg.norm(U))
    return dict(what="gptq_variants", shape=[N, K], bits=cfg.bits, group_size=cfg.group_size,
                act_order=cfg.act_order, unroll_library=G._UNROLL, variants=out)


# ------------------------------------------------------------------------------------ hessian precision options
def _xtx(kind):
    """x [B, T, K] -> x^T x [K, K] float32 by one of several dot algorithms."""
    def f(x):
        x = x.reshape(-1, x.shape[-1])
        if kind == "bf16_inputs_f32_acc":  # exact products of bf16 values, float32 accumulation (tensor cores)
            x = x.astype(jnp.bfloat16)
            return jnp.matmul(x.T, x, preferred_element_type=jnp.float32)
        if kind == "f64":  # reference; needs --hessian-f64 (jax_enable_x64)
            x = x.astype(jnp.float64)
            return jnp.matmul(x.T, x, precision=lax.Precision.HIGHEST)
        x = x.astype(jnp.float32)
        if kind == "f32_highest":
            return jnp.matmul(x.T, x, precision=lax.Precision.HIGHEST)
        preset = {"bf16x3": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
                  "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32}[kind]
        return lax.dot_general(x.T, x, (((1,), (0,)), ((), ())), precision=preset,
                               preferred_element_type=jnp.float32)
    return jax.jit(lambda acc, x: acc + f(x).astype(acc.dtype))


def bench_hessian_variants(K, args, key):
    """Time of one full pass of x^T x with other dot algorithms, and the error of each against the first kind run
    (float64 with --hessian-f64, else float32 HIGHEST, whose own summation error over n tokens is not known then).

    The activations are rounded to bf16 first so that bf16_inputs_f32_acc sees the same values (a bf16 model)."""
    src = ActSource(key, K, "bfloat16")
    xs = _ready([src.batch(args.batch, args.seqlen) for _ in range(args.nsamples // args.batch)])
    out, ref = {}, None
    kinds = ("f64",) if args.hessian_f64 else ()
    for kind in kinds + ("f32_highest", "bf16x3", "tf32", "bf16_inputs_f32_acc"):
        step = _xtx(kind)

        def run():
            acc = jnp.zeros((K, K), jnp.float64 if kind == "f64" else jnp.float32)
            for x in xs:
                acc = step(acc, x)
            return acc

        try:
            res, info = _timed(run, args.reps)
        except Exception as e:  # noqa: BLE001 - an algorithm the backend lacks
            out[kind] = {"error": repr(e)[:300]}
            continue
        if ref is None:
            ref = res
        info["reference"] = kinds[0] if kinds else "f32_highest"
        info["rel_err_vs_reference"] = float(jnp.linalg.norm(res - ref) / jnp.linalg.norm(ref))
        info["max_rel_err_diag"] = float(jnp.max(jnp.abs(jnp.diag(res) - jnp.diag(ref)) / jnp.diag(ref)))
        info["tflops"] = 2.0 * args.nsamples * args.seqlen * K * K / info["seconds"] / 1e12
        out[kind] = info
    return dict(what="hessian_variants", shape=[K, K], K=K, tokens=args.nsamples * args.seqlen, batch=args.batch,
                reference=kinds[0] if kinds else "f32_highest", variants=out)


# ---------------------------------------------------------------------------------------------------- driver
def _parse_cfg(s):
    bits, gs, act = s.split(":")
    return QuantConfig(bits=int(bits), group_size=int(gs), act_order=act in ("1", "true", "True"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hessian-k", default="4096,11008", help="comma list of Hessian sizes K ('' = none)")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="solve shapes OUTxIN ('' = none)")
    ap.add_argument("--configs", default="4:128:0,4:128:1,3:128:0", help="bits:group_size:act_order, comma list")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="sequences per hessian_update call")
    ap.add_argument("--act-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--solve-h-seqs", type=int, default=8, help="sequences behind each solve's fresh H")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true", help="also time each stage of gptq()")
    ap.add_argument("--variants", default="", help="OUTxIN list for the column-loop variant comparison")
    ap.add_argument("--unrolls", default="1,16,32", help="column-loop unroll factors compared in --variants")
    ap.add_argument("--hessian-variants", default="", help="K list: time/error of other dot algorithms for x^T x")
    ap.add_argument("--hessian-f64", action="store_true",
                    help="enable jax_enable_x64 and add a float64 reference to --hessian-variants")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON list file (default $OUT/quant_speed.json, else bench/results)")
    args = ap.parse_args()
    args.unrolls = [int(u) for u in args.unrolls.split(",") if u]
    if args.hessian_f64:
        jax.config.update("jax_enable_x64", True)
    if args.nsamples % args.batch:
        ap.error("--nsamples must be a multiple of --batch")
    out = args.out or os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"),
                                   "quant_speed.json")
    key = jax.random.PRNGKey(args.seed)
    cfgs = [_parse_cfg(c) for c in args.configs.split(",") if c]
    hks = [int(k) for k in args.hessian_k.split(",") if k]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    print(f"device={jax.devices()[0].device_kind} jax={jax.__version__} out={out}", flush=True)

    rows = []

    def emit(r):
        r = results.row("quant_speed", **r)
        r.setdefault("bits", None)
        r.setdefault("group_size", None)
        r.setdefault("act_order", None)
        r["peak_mem_gb"] = _peak_gb()
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("command", "benchmark")}), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:  # rewritten after every row: partial results survive a time-out
            json.dump(rows, f, indent=1)

    hess = {}
    for i, K in enumerate(sorted(hks)):
        r = bench_hessian(K, args, jax.random.fold_in(key, 1000 + i))
        hess[K] = r["seconds"]
        emit(r)
    solve = {}
    for ci, cfg in enumerate(cfgs):
        for si, (N, K) in enumerate(sorted(shapes, key=lambda s: s[0] * s[1])):
            r = bench_solve(N, K, cfg, args, jax.random.fold_in(key, 2000 + 100 * ci + si), args.breakdown)
            solve[(cfg, N, K)] = r["seconds"]
            emit(r)
    for s in [s for s in args.variants.split(",") if s]:
        N, K = (int(v) for v in s.split("x"))
        emit(bench_variants(N, K, cfgs[0], args, jax.random.fold_in(key, 3000)))
    for K in [int(k) for k in args.hessian_variants.split(",") if k]:
        emit(bench_hessian_variants(K, args, jax.random.fold_in(key, 4000 + K)))

    need_h = {4096, 11008}
    need_s = [(4096, 4096), (11008, 4096), (4096, 11008)]
    full_calib = args.nsamples == 128 and args.seqlen == 2048
    if need_h <= set(hess):
        h_layer = 3 * hess[4096] + hess[11008]
        for cfg in cfgs:
            if all((cfg, N, K) in solve for N, K in need_s):
                s_layer = 4 * solve[(cfg, 4096, 4096)] + 2 * solve[(cfg, 11008, 4096)] + solve[(cfg, 4096, 11008)]
                total = LAYERS_7B * (h_layer + s_layer)
                emit(dict(what="model_total_7b", shape="llama-7b: 32 layers x (3 H@4096 + 1 H@11008 + 4 solves "
                                                      "4096x4096 + 2 solves 11008x4096 + 1 solve 4096x11008)",
                          bits=cfg.bits, group_size=cfg.group_size, act_order=cfg.act_order,
                          tokens=args.nsamples * args.seqlen, full_calibration=full_calib, batch=args.batch,
                          act_dtype=args.act_dtype, seconds=total, hessian_seconds=LAYERS_7B * h_layer,
                          solve_seconds=LAYERS_7B * s_layer, compile_seconds=None,
                          target_seconds=TARGET_S, meets_target=total < TARGET_S))

    print("\n| what | shape | bits/gs/act | seconds (median) | compile s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if r["what"] in ("gptq_variants", "hessian_variants"):
            for name, v in r["variants"].items():
                if "seconds" not in v:
                    print(f"| variant {name} | {r['shape']} | failed: {v.get('error')} | - | - |")
                    continue
                cfg = "-" if r["bits"] is None else f"{r['bits']}/{r['group_size']}/{int(r['act_order'])}"
                extra = {k: (f"{x:.3g}" if isinstance(x, float) else x) for k, x in v.items()
                         if k not in ("seconds", "compile_seconds", "reference")}
                print(f"| variant {name} | {r['shape']} | {cfg} | {v['seconds']:.4f} | {v['compile_seconds']:.2f} | "
                      f"{extra} |")
            continue
        cfg = "-" if r["bits"] is None else f"{r['bits']}/{r['group_size']}/{int(r['act_order'])}"
        comp = "-" if r.get("compile_seconds") is None else f"{r['compile_seconds']:.2f}"
        print(f"| {r['what']} | {r['shape'] if isinstance(r['shape'], list) else 'llama-7b'} | {cfg} | "
              f"{r['seconds']:.4f} | {comp} |")


if __name__ == "__main__":
    main()
