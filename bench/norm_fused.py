"""GPU check + timing of the RMSNorm fused into the ws kernel's activation staging (``gptq_matmul`` with
``rms_norm``) against the norm in XLA before the kernel (the path before the fusion).

    python bench/norm_fused.py [--shapes 4096x12288,4096x22016] [--ms 1,2,4] [--out bench/results/norm_fused.json]
    python bench/norm_fused.py --table bench/results/norm_fused.json   # (re)write the markdown table only

Check (every case, before timing): the fused call writes into a NaN-poisoned output buffer and must match
rms_norm_rows(x) @ W_float (float32 oracle of the dequantized weight) at relative error < 1e-2, and the unfused path
to ~bf16 rounding. Odd cases (K not a multiple of 64, M = 7, forced uneven grids) run in the check only. Timing:
CUPTI, rotating weight copies (> 4x L2), the sum of a call's kernels (the norm's XLA kernels included)."""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.decode import random_weight  # noqa: E402
from bench.timing import (copies, cupti, parse_probe_args, rotation_sets, run_checked_probe,  # noqa: E402
                          run_sections)
from jaxquant.kernel_layout import prepare_for_kernels  # noqa: E402
from pallas_kernels import gptq_matmul as gm  # noqa: E402
from pallas_kernels import lut_matmul as lm  # noqa: E402

EPS = 1e-5
DEFAULT_MAX_M = gm.FUSED_NORM_MAX_M
CHECK_CASES = [  # (K, N, format, M, config)
    (4096, 12288, "gptq-w4g128", 1, None), (4096, 22016, "gptq-w4g128", 3, None),
    (4096, 12288, "gptq-w4g128", 7, None),
    (1000, 640, "gptq-w4g128", 1, gm.KernelConfig(variant="ws", tile_k=256)),
    (1000, 640, "gptq-w4g128", 5, gm.KernelConfig(variant="ws", tile_k=128, ctas=7)),
    (2048, 1536, "gptq-w3g128", 2, gm.KernelConfig(variant="ws", tile_k=256, ctas=29)),
    (2048, 1536, "gptq-w4g128", 1, gm.KernelConfig(variant="ws", tile_k=256, fused=True)),
    (4096, 12288, "squeezellm-w4", 1, None), (4096, 11008, "squeezellm-w3", 2, None),
    (1088, 640, "squeezellm-w3", 1, gm.KernelConfig(variant="ws", tile_k=256, ctas=11)),
]


def case_inputs(key, K, N, fmt, M):
    k1, k2, k3 = jax.random.split(key, 3)
    w = prepare_for_kernels({"w": random_weight(k1, fmt, K, N)})["w"]
    x = (3.0 * jax.random.normal(k2, (M, K), jnp.float32)).astype(jnp.bfloat16)
    scale = (1.0 + 0.5 * jax.random.normal(k3, (K,), jnp.float32)).astype(jnp.bfloat16)
    return w, x, scale


def check(key) -> list:
    """Every case (the fused kernel at every M < 8: ``main`` raises FUSED_NORM_MAX_M)."""
    rows = []
    for i, (K, N, fmt, M, config) in enumerate(CHECK_CASES):
        w, x, scale = case_inputs(jax.random.fold_in(key, i), K, N, fmt, M)
        lut = isinstance(w, lm.LUTKernelWeight)
        kernel = lm.lut_matmul if lut else gm.gptq_matmul
        cfg = (config or gm.KernelConfig()).resolved(w, M, staged=True)
        fused = gm.fused_norm_ok(cfg, w, M)
        xn = gm.rms_norm_rows(x, scale, EPS)
        want = np.asarray(xn, np.float32) @ np.asarray(w.dequantize(jnp.float32), np.float32)
        poison = gm.nan_output_buffer(cfg, w.n_pad, N, M, lm.kernel_out_dtype(w) if lut else w.dtype)
        got = np.asarray(kernel(x, w, config=config, rms_norm=(scale, EPS), out_init=poison), np.float32)
        unfused = np.asarray(kernel(xn, w, config=config), np.float32)
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        vs_unfused = float(np.linalg.norm(got - unfused) / np.linalg.norm(unfused))
        ok = bool(np.isfinite(got).all() and err < 1e-2 and vs_unfused < 1e-2)
        print(f"check {K}x{N} {fmt} M={M} {cfg} fused={fused}: rel err {err:.2e} vs f32, {vs_unfused:.2e} vs "
              f"unfused -> {'ok' if ok else 'FAIL'}", flush=True)
        rows.append(dict(kind="check", K=K, N=N, format=fmt, M=M, fused_norm=fused, rel_err=err,
                         rel_err_vs_unfused=vs_unfused, ok=ok, config=repr(cfg)))
    return rows


def timing(key, shapes, ms, formats, rounds) -> list:
    """Path us of the XLA norm + kernel vs the fused kernel at every M (``default_fuses``: the library's own rule)."""
    rows = []
    for fmt, shape, M in ((f, s, m) for f in formats for s in shapes for m in ms):
        K, N = map(int, shape.split("x"))
        w, x, scale = case_inputs(key, K, N, fmt, M)
        sets = [(x * (1 + i / 8), wi, scale) for i, wi in enumerate(copies(w, rotation_sets(w.nbytes, 12)))]
        res = {}
        for name, fn in (("xla_norm", lambda x, w, s: w.matmul(gm.rms_norm_rows(x, s, EPS))),
                         ("fused_norm", lambda x, w, s: w.matmul(x, rms_norm=(s, EPS)))):
            total, kern, per = cupti(fn, sets, rounds=rounds, match="mosaic")
            res[name] = dict(us=round(total, 2), kernel_us=round(kern, 2), kernels=per)
            print(f"{fmt} {shape} M={M} {name:10s} {total:7.2f} us (Pallas kernel {kern:6.2f})  {per}", flush=True)
        rows.append(dict(kind="timing", format=fmt, K=K, N=N, M=M, **res, default_fuses=M <= DEFAULT_MAX_M,
                         fused_over_xla_norm=round(res["fused_norm"]["us"] / res["xla_norm"]["us"], 3)))
    return rows


def write_table(rows: list, path: str) -> None:
    """The markdown next to the JSON: per run (date, command), the checks, then the path us per format / shape / M."""
    lines = ["# Fused RMSNorm in the ws kernel vs the norm in XLA", ""]
    for header, run in run_sections(rows):
        lines += header
        checks = [r for r in run if r["kind"] == "check"]
        if checks:
            lines += ["| check | format | M | fused | rel err vs f32 | vs unfused | ok |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['K']}x{r['N']} | {r['format']} | {r['M']} | {r['fused_norm']} | {r['rel_err']:.2e} | "
                      f"{r['rel_err_vs_unfused']:.2e} | {r['ok']} |" for r in checks] + [""]
        timings = [r for r in run if r["kind"] == "timing"]
        if timings:
            lines += ["Path us (every kernel of the call, CUPTI, median of the rotation), XLA norm + kernel vs the "
                      "fused kernel; `default`: the fused kernel is the default at that M:", "",
                      "| format | K x N | M | XLA norm + kernel | fused | ratio | Pallas kernel alone (XLA norm / "
                      "fused) | default |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['format']} | {r['K']}x{r['N']} | {r['M']} | {r['xla_norm']['us']} | "
                      f"{r['fused_norm']['us']} | {r['fused_over_xla_norm']} | {r['xla_norm']['kernel_us']} / "
                      f"{r['fused_norm']['kernel_us']} | {r['default_fuses']} |" for r in timings] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="4096x12288,4096x22016")
    ap.add_argument("--ms", default="1,2,4")
    ap.add_argument("--formats", default="gptq-w4g128,squeezellm-w4,squeezellm-w3")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-timing", action="store_true")
    args = parse_probe_args(ap, write_table)
    if args is None:
        return
    key = jax.random.PRNGKey(int.from_bytes(os.urandom(3), "little"))
    gm.FUSED_NORM_MAX_M = 7  # this process measures the fused kernel wherever it can run (M < 8)
    run_checked_probe(args, "norm_fused", write_table, lambda: check(key),
                      lambda: timing(key, args.shapes.split(","), [int(m) for m in args.ms.split(",")],
                                     args.formats.split(","), args.rounds), eps=EPS)


if __name__ == "__main__":
    main()
