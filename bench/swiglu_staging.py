"""Probe (GPU): SiLU(gate) * up computed inside the down projection's ws kernel (the SwiGLU staging,
``gptq_matmul.SwiGLUSlots``) against the path it replaces, on a LLaMA decode MLP at one activation row:

    unfused  norm-fused gate/up kernel -> XLA sum of its partial slots + SiLU * up -> down kernel
    staged   norm-fused gate/up kernel storing "mn" slots [P, M_pad, N] -> down kernel staging SiLU * up from them

    python bench/swiglu_staging.py [--shapes 4096x11008x4096] [--formats gptq-w4g128,squeezellm-w4]
                                   [--out bench/results/swiglu_staging.json]

Check (every case, before any timing): both kernels write into NaN-poisoned buffers (the gate/up "mn" slots and the
down kernel's slots); y must match the float32 oracle at relative error < 1e-2 and the unfused path (the models'
path without the staging) exactly or to a relative error < 1e-2 (reported). Timing: CUPTI, the sum of one call's
kernels (median over a weight rotation), both paths alternately over ``--passes``, plus the down kernel alone
with and without the staging.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.mlp_fused import EPS, case_inputs, oracle, unfused  # noqa: E402
from bench.timing import copies, cupti, parse_probe_args, rotation_sets, run_checked_probe, run_sections  # noqa
from pallas_kernels import gptq_matmul as gm  # noqa: E402
from pallas_kernels import lut_matmul as lm  # noqa: E402

CHECK_SHAPES = ["4096x11008x4096", "1024x1536x768", "2048x2560x1024"]  # K x I x N


def _kernel_fns(w):
    return (gm.gptq_matmul, gm.gptq_matmul_partials) if isinstance(w, gm.GPTQKernelWeight) else (
        lm.lut_matmul, lm.lut_matmul_partials)


def staged(x, scale, w_gu, w_dn, config=None):
    """The models' decode path with the staging: gate/up "mn" slots -> SwiGLUSlots -> down's matmul."""
    sums = w_gu.matmul(x, rms_norm=(scale, EPS), partial_sums="mn", config=config)
    return w_dn.matmul(gm.SwiGLUSlots(sums, w_dn.in_features, (x.shape[0],)), config=config)


def staged_poisoned(x, scale, w_gu, w_dn, config=None):
    """``staged`` with both kernels writing into NaN-poisoned buffers; returns (y, the gate/up PartialSums, down's
    resolved config)."""
    mm, partials_fn = _kernel_fns(w_gu)
    config = config or gm.KernelConfig()
    cfg_gu = config.resolved(w_gu, 1, staged=True)
    if not gm.slots_mn_ok(cfg_gu):
        raise SystemExit(f"gate/up {w_gu.shape} does not run the ws stream-K kernel: no 'mn' slots to check")
    poison = gm.nan_output_buffer(cfg_gu, w_gu.n_pad, w_gu.out_features, 1, jnp.float32, slots_mn=True)
    sums = mm(x, w_gu, config=config, rms_norm=(scale, EPS), partial_sums="mn", out_init=poison)
    assert isinstance(sums, gm.PartialSums) and sums.layout == "mn", sums
    g = gm.SwiGLUSlots(sums, w_dn.in_features, (1,))
    cfg = config.resolved(w_dn, 1, staged=True)
    if not gm.swiglu_staging_ok(cfg, w_dn, g):
        raise SystemExit(f"down {w_dn.shape} at {cfg} does not take the SwiGLU staging")
    xk, sw = gm.swiglu_kernel_input(g)
    out = partials_fn(xk, w_dn, cfg, m=1, swiglu=sw,
                      out_init=gm.nan_output_buffer(cfg, w_dn.n_pad, w_dn.out_features, 1, jnp.float32))
    return gm.PartialSums(out, 1, w_dn.out_features, w_dn.dtype_name).value(), sums, cfg


def check(key, formats) -> list:
    rows = []
    for i, (shape, fmt) in enumerate((s, f) for s in CHECK_SHAPES for f in formats):
        K, I, N = map(int, shape.split("x"))
        w_gu, w_dn, x, scale = case_inputs(jax.random.fold_in(key, i), K, I, N, fmt)
        # the LLaMA-7B shapes run the defaults; the small ones are forced onto the ws stream-K kernel (uneven grids)
        config = None if K >= 4096 else gm.KernelConfig(variant="ws", tile_k=256)
        y, sums, cfg = staged_poisoned(x, scale, w_gu, w_dn, config)
        got = np.asarray(y, np.float32)
        want, base = oracle(x, scale, w_gu, w_dn), np.asarray(unfused(x, scale, w_gu, w_dn), np.float32)
        slots_finite = bool(np.isfinite(np.asarray(sums.partials)[:, :1, :w_gu.out_features]).all())
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        vs_unfused = float(np.linalg.norm(got - base) / np.linalg.norm(base))
        bitwise = bool(np.array_equal(got, base))
        via_models = np.asarray(staged(x, scale, w_gu, w_dn, config), np.float32)
        ok = bool(np.isfinite(got).all() and slots_finite and err < 1e-2 and vs_unfused < 1e-2
                  and np.array_equal(via_models, got))
        print(f"check {shape} {fmt} slots {sums.partials.shape} down {cfg.tile_k}/{cfg.ctas}: rel err {err:.2e} vs "
              f"f32, {vs_unfused:.2e} vs unfused (bitwise {bitwise}) -> {'ok' if ok else 'FAIL'}", flush=True)
        rows.append(dict(kind="check", shape=shape, format=fmt, gate_up_slots=sums.partials.shape[0],
                         down_tile_k=cfg.tile_k, down_ctas=cfg.ctas, rel_err=err, rel_err_vs_unfused=vs_unfused,
                         bitwise_vs_unfused=bitwise, ok=ok))
    return rows


def down_alone(staging: bool):
    """The down kernel alone, on a ready act (plain) or on the gate/up slots (staging)."""
    if staging:
        return lambda sums, act, w_dn: w_dn.matmul(gm.SwiGLUSlots(sums, w_dn.in_features, (1,)))
    return lambda sums, act, w_dn: w_dn.matmul(act)


def timing(key, shapes, formats, rounds, passes) -> list:
    rows = []
    for fmt, shape in ((f, s) for f in formats for s in shapes):
        K, I, N = map(int, shape.split("x"))
        w_gu, w_dn, x, scale = case_inputs(key, K, I, N, fmt)
        n = rotation_sets(w_gu.nbytes + w_dn.nbytes, 8)
        sets = [(x * (1 + i / 8), scale, a, b) for i, (a, b) in enumerate(copies((w_gu, w_dn), n))]
        sums = w_gu.matmul(x, rms_norm=(scale, EPS), partial_sums="mn")
        act = gm.SwiGLUSlots(sums, I, (1,)).value()
        down_sets = [(sums, act, w) for w in copies(w_dn, rotation_sets(w_dn.nbytes, 8))]
        for p in range(passes):
            for name, fn, arg_sets in (("unfused", unfused, sets), ("staged", staged, sets),
                                       ("down, plain act", down_alone(False), down_sets),
                                       ("down, SwiGLU staging", down_alone(True), down_sets)):
                total, kern, per = cupti(fn, arg_sets, rounds=rounds, match="mosaic")
                rows.append(dict(kind="timing", format=fmt, shape=shape, pass_=p, path=name, us=round(total, 2),
                                 pallas_us=round(kern, 2), kernels=per))
                print(f"{fmt} {shape} pass {p} {name:22s} CUPTI {total:7.2f} us (Pallas {kern:6.2f})  {per}",
                      flush=True)
    return rows


def write_table(rows: list, path: str) -> None:
    lines = ["# SiLU * up in the down kernel's staging (bench/swiglu_staging.py) vs XLA between the kernels", ""]
    for header, run in run_sections(rows):
        lines += header + ([f"Code: {run[0]['code']}", ""] if run[0].get("code") else [])
        checks = [r for r in run if r["kind"] == "check"]
        if checks:
            lines += ["| check K x I x N | format | gate/up slots | down tile_k / CTAs | rel err vs f32 | vs unfused | "
                      "bitwise | ok |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['shape']} | {r['format']} | {r['gate_up_slots']} | {r['down_tile_k']} / {r['down_ctas']} "
                      f"| {r['rel_err']:.2e} | {r['rel_err_vs_unfused']:.2e} | {r['bitwise_vs_unfused']} | {r['ok']} |"
                      for r in checks] + [""]
        timings = [r for r in run if r["kind"] == "timing"]
        if timings:
            lines += ["CUPTI us = every kernel of one call (median over the weight rotation):", "",
                      "| format | K x I x N | pass | path | CUPTI us | Pallas us | kernels (us) |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['format']} | {r['shape']} | {r['pass_']} | {r['path']} | {r['us']} | {r['pallas_us']} | "
                      f"{'; '.join(f'{n} {t}' for n, t in r['kernels'])} |" for r in timings] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="4096x11008x4096")
    ap.add_argument("--formats", default="gptq-w4g128,squeezellm-w4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--no-timing", action="store_true")
    args = parse_probe_args(ap, write_table)
    if args is None:
        return
    key = jax.random.PRNGKey(int.from_bytes(os.urandom(3), "little"))
    formats = args.formats.split(",")
    run_checked_probe(args, "swiglu_staging", write_table, lambda: check(key, formats),
                      lambda: timing(key, args.shapes.split(","), formats, args.rounds, args.passes), eps=EPS)


if __name__ == "__main__":
    main()
