"""Device-time measurement shared by the kernel benchmarks (bench/kernels.py, kernels_lut.py, kernels_spqr.py,
kernels_launch.py): CUPTI kernel durations of single-call jitted programs dispatched over rotating argument sets.

Method (bench/NOTES_kernels.md, "Measurement method"): every call is a dispatch of the jitted program on the next
argument set (its own weight copy and activation; the sets together exceed the L2 cache, so the cache does not
flatter), after a warm-up pass over every set; CUPTI records each GPU kernel's duration and a call's time is the sum
of its kernels (host dispatch and launch gaps excluded); the median over ``rounds`` passes is reported.
"""
from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp

L2_BYTES = 50e6  # H100 L2


def copies(tree, n):
    """``tree`` and n - 1 device copies of it (each call of a rotation reads its own weight)."""
    return [tree] + [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree) for _ in range(n - 1)]


def rotation_sets(nbytes, most):
    """Argument sets per rotation: together >= 4x the L2 cache, at least 4, at most ``most`` (when ``most`` >= 4)."""
    return int(max(4, min(most, math.ceil(4 * L2_BYTES / nbytes))))


def activations(key, M, K, n, dtype=jnp.bfloat16):
    """n fresh random [M, K] activations (never zeros: they can run faster than real data)."""
    return [jax.random.normal(k, (M, K), jnp.float32).astype(dtype) for k in jax.random.split(key, n)]


def bf16_matmul(x, w):
    """The baseline: XLA's bf16 matmul (cuBLAS on the GPU), float32 accumulation."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def gap_ops(x, n: int):
    """n small XLA fusions on x (a barrier between them keeps them apart, as a decode step's norms / attention ops
    are): the XLA work the probes put around a kernel."""
    for _ in range(n):
        x = jax.lax.optimization_barrier(jnp.tanh(x * 1.5 + 0.25).astype(x.dtype))
    return x


def cupti(fn, arg_sets, rounds=3, match=""):
    """(median us of one call, median us of its kernels whose name contains ``match``, [(kernel, median us)] of
    one call). The second value is the whole call when ``match`` is empty and NaN when no kernel matches."""
    from jax._src.lib import mosaic_gpu as mosaic_gpu_lib

    f = jax.jit(fn)
    for args in arg_sets:
        jax.block_until_ready(f(*args))
    ext = mosaic_gpu_lib._mosaic_gpu_ext
    ext._cupti_init()
    try:
        outs = [f(*args) for _ in range(rounds) for args in arg_sets]
        jax.block_until_ready(outs)
    finally:
        timings = ext._cupti_get_timings(True)
    calls = rounds * len(arg_sets)
    if not timings or len(timings) % calls:
        raise RuntimeError(f"{len(timings or [])} kernel records for {calls} calls")
    per = len(timings) // calls
    chunks = [timings[i * per:(i + 1) * per] for i in range(calls)]
    total = statistics.median(sum(t for _, t in c) for c in chunks) * 1e3
    part = statistics.median(sum(t for n, t in c if match in n) for c in chunks) * 1e3 if match else total
    per_kernel = [(n[:40], round(statistics.median(c[i][1] for c in chunks) * 1e3, 2))
                  for i, (n, _) in enumerate(chunks[0])]
    return total, (part or float("nan")), per_kernel


def config_fields(rc) -> dict:
    """A resolved kernel config as a benchmark row records it: block sizes, the launch, and where the config class
    has them and they are set, the kernel variant / grid / warpgroups, unpadded x, post_scale, the outlier path."""
    c = dict(tile_k=rc.tile_k, stages=rc.stages, k_splits=rc.k_splits, n_sub=rc.n_sub, fused=rc.fused)
    for name in ("direct_x", "outliers", "variant", "ctas", "wgs", "post_scale"):
        if getattr(rc, name, None) is not None:
            c[name] = getattr(rc, name)
    return c


def config_cell(c: dict) -> str:
    """A row's config for a markdown cell: tile_k/stages/k_splits, then the kernel where it is not the one-warpgroup
    kernel with float32 partials: "ws (132 CTAs)", "ws-f (112 CTAs)", "fused" (the cluster launch)."""
    cell = f"{c.get('tile_k')}/{c.get('stages')}/{c.get('k_splits')}"
    if c.get("variant"):
        return cell + f" {c['variant']}{'-f' if c.get('fused') else ''} ({c.get('ctas')} CTAs)"
    return cell + (" fused" if c.get("fused") else "")


# The key under which a benchmark table's rows replace earlier ones in bench/results/kernels.json: the same op, shape,
# M, timing and launch on the same date. Rows of other dates and of other benchmarks (the launch / sweep rows carry a
# "launch" or "run_id") stay as the history the other sections of kernels.md are built from.
TABLE_ROW_KEY = ("format", "M", "K", "N", "kernel", "timing", "launch", "run_id", "date")


def latest_rows(rows: list) -> list:
    """Per (format, M, K, N, kernel) the rows of the latest date (a table section built from the whole history)."""
    key = lambda r: tuple(r.get(k) for k in ("format", "M", "K", "N", "kernel"))  # noqa: E731
    last = {}
    for r in rows:
        last[key(r)] = max(last.get(key(r), ""), str(r.get("date", "")))
    return [r for r in rows if str(r.get("date", "")) == last[key(r)]]


def run_sections(rows: list):
    """The probes' markdown sections: per run (date, command), newest first, its header lines and its rows."""
    runs = {}
    for r in rows:
        runs.setdefault((r["date"], r["command"]), []).append(r)
    for (date, command), run in sorted(runs.items(), reverse=True):
        yield [f"## {date}, {run[0]['device']}, jax {run[0]['jax']}", "", f"Command: `{command}`", ""], run


def run_meta(benchmark: str) -> dict:
    """The common keys of a probe's rows (../shared/RESULTS.md), the date to the UTC minute (several runs a day)."""
    import datetime

    import jaxlib

    from jaxquant.results import command_line

    return dict(benchmark=benchmark, command=command_line(), device=jax.devices()[0].device_kind,
                jax=jax.__version__, jaxlib=jaxlib.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"))


def save_rows(rows: list, path: str, write_table) -> None:
    """rows -> ``path`` (JSON list) and ``write_table(rows, md_path)`` -> the markdown next to it."""
    import json
    import os

    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    write_table(rows, os.path.splitext(path)[0] + ".md")


def run_checked_probe(args, benchmark: str, write_table, check, timing, **meta) -> list:
    """A probe's run: ``check()`` rows (NaN-poisoned correctness), written to ``args.out`` at once; any wrong row
    stops the run before ``timing()`` (unless ``args.no_timing``), whose rows are then written with them. ``meta``:
    extra keys of every row beside ``run_meta(benchmark)``."""
    meta = dict(run_meta(benchmark), **meta)
    rows = check()
    if args.out:
        save_rows([dict(meta, **r) for r in rows], args.out, write_table)
    failed = [r for r in rows if r.get("ok") is False]
    if failed:
        raise SystemExit(f"{len(failed)} check(s) failed")
    if not args.no_timing:
        rows += timing()
        if args.out:
            save_rows([dict(meta, **r) for r in rows], args.out, write_table)
    return rows


def parse_probe_args(ap, write_table):
    """The probes' ``--out`` (JSON rows, the markdown written next to it) and ``--table`` options, then parse_args;
    with ``--table`` the markdown of that JSON is rewritten without a run and None is returned."""
    ap.add_argument("--out")
    ap.add_argument("--table", help="no run: write the markdown of this JSON next to it")
    args = ap.parse_args()
    if args.table:
        rewrite_table(args.table, write_table)
        return None
    return args


def rewrite_table(path: str, write_table) -> None:
    """``--table``: the markdown of the JSON rows in ``path``, rewritten without a run."""
    import json
    import os

    with open(path) as f:
        write_table(json.load(f), os.path.splitext(path)[0] + ".md")
