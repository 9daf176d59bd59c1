"""Probe (GPU): what a grid-wide barrier costs a Mosaic GPU (Pallas) kernel call, the building block of any kernel
that spans several linears (a stream-K fix-up inside the kernel, a persistent decode layer).

    python bench/barrier_probe.py [--out bench/results/barrier_probe.json]
    python bench/barrier_probe.py --table bench/results/barrier_probe.json   # (re)write the markdown only

Three kernels of the GPTQ ws kernel's launch shape (132 CTAs of 3 warpgroups, 200 KB of shared memory), each passing
a [1, 4096] bf16 activation through CTA 0 (``launch_probe.passthrough``): without a semaphore; with a global-memory
semaphore that every CTA increments (``pl.get_global(plgpu.SemaphoreType.REGULAR)``: Pallas zero-fills it with an
XLA op before every call); and with a grid barrier on it (every CTA increments it, then waits until it holds the CTA
count).
Two timings: CUPTI device time per kernel (which also shows whether the zero fill runs as a kernel of its own), and
the wall time per call of a jitted chain of ``--chain`` data-dependent calls (the chain's wall time / calls, median of
``--reps``), which also counts work CUPTI's kernel records leave out, such as a memset node (on the H100 runs of
2026-11-24 the chain was bound by launches: 5-6.5 us per call of a 1.41 us kernel).

The semaphore is ``pl.get_global``'s, one for the grid: a ``scratch_types`` semaphore is one per CTA (the first
run's barrier waited on its own CTA's count and hung). Rows are saved after every mode.
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.launch_probe import X_SHAPE, passthrough, passthrough_body, probe_inputs  # noqa: E402
from bench.pdl_probe import spin_kernel  # noqa: E402
from bench.timing import cupti, parse_probe_args, run_meta, save_rows  # noqa: E402

CTAS, WARPGROUPS, SMEM_KB = 132, 3, 200
MODES = ("none", "signal", "barrier")


def semaphore_kernel(mode: str, ctas: int = CTAS, warpgroups: int = WARPGROUPS, smem_kb: int = SMEM_KB):
    """x -> x by CTA 0 (``launch_probe.passthrough``'s body) after ``mode``: "none", "signal" (warpgroup 0 of every CTA
    increments a zero-initialised global semaphore) or "barrier" (then waits until it holds ``ctas``, without
    decrementing: a one-shot grid barrier; the CTAs are all resident, one per SM)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return passthrough(ctas, warpgroups, smem_kb)
    copy = passthrough_body(warpgroups, smem_kb)

    def body(x_gmem, out_gmem):
        # pl.get_global: one semaphore for the whole grid (a scratch_types semaphore is one per CTA: the barrier
        # of the first run of this probe waited on its own CTA's count and hung). Pallas zero-fills it before every call.
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR((1,)))

        @jax.named_scope("grid_barrier")
        def sync():
            plgpu.semaphore_signal(sem.at[0], 1, memory_scope="gpu")
            if mode == "barrier":
                plgpu.semaphore_wait(sem.at[0], ctas, decrement=False, memory_scope="gpu")

        if warpgroups > 1:
            jax.lax.cond(jax.lax.axis_index("wg") == 0, sync, lambda: None)
        else:
            sync()
        copy(x_gmem, out_gmem)

    kw = dict(num_threads=warpgroups, thread_name="wg") if warpgroups > 1 else {}
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(X_SHAPE, jnp.bfloat16), grid=(ctas,), grid_names=("n",),
                        **kw)


def chain_wall_us(kernel, x, calls: int, reps: int, before=None) -> float:
    """Wall microseconds per call of ``calls`` data-dependent kernel calls in one jitted program (median of reps);
    ``before``: a kernel run ahead of each call (a long one keeps the chain device-bound, so wall differences between
    kernels are device time, memset nodes included)."""
    def run(x):
        for _ in range(calls):
            x = kernel(before(x) if before else x)
        return x

    f = jax.jit(run)
    jax.block_until_ready(f(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / calls * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--chain", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--passes", type=int, default=2, help="passes over the modes (alternating)")
    ap.add_argument("--ctas", type=int, default=CTAS)
    ap.add_argument("--warpgroups", type=int, default=WARPGROUPS)
    ap.add_argument("--smem-kb", type=int, default=SMEM_KB)
    ap.add_argument("--check", action="store_true", help="one call per mode and its output check only (no timing)")
    ap.add_argument("--spin-iters", type=int, default=0,
                    help="chain: a one-CTA spin kernel (pdl_probe.spin_kernel) of this many steps before every call")
    args = parse_probe_args(ap, write_table)
    if args is None:
        return
    xs = probe_inputs()
    rows, meta = [], run_meta("barrier_probe")
    spin = spin_kernel(args.spin_iters) if args.spin_iters else None
    for _ in range(args.passes):  # alternating the modes
        for mode in args.modes.split(","):
            k = semaphore_kernel(mode, args.ctas, args.warpgroups, args.smem_kb)
            out = jax.jit(k)(xs[0][0])
            same = bool(jnp.array_equal(out, xs[0][0]))
            if args.check:
                print(dict(mode=mode, ctas=args.ctas, warpgroups=args.warpgroups, smem_kb=args.smem_kb,
                           output_ok=same), flush=True)
                continue
            total, _, per = cupti(k, xs, rounds=args.rounds)
            wall = chain_wall_us(k, xs[0][0], args.chain, args.reps, spin)
            rows.append(dict(mode=mode, ctas=args.ctas, warpgroups=args.warpgroups, smem_kb=args.smem_kb, kernels=per,
                             cupti_us=round(total, 2), chain_calls=args.chain, wall_us_per_call=round(wall, 2),
                             chain_spin_iters=args.spin_iters, output_ok=same))
            print(rows[-1], flush=True)
            if args.out:  # after every row: a mode that hangs keeps the rows before it
                save_rows([dict(meta, **r) for r in rows], args.out, write_table)


def spin_note(r) -> str:
    return f", each after a {r['chain_spin_iters']}-step spin kernel" if r.get("chain_spin_iters") else ""


def write_table(rows: list, path: str) -> None:
    lines = ["# Grid-barrier probe (bench/barrier_probe.py): a global semaphore in a Mosaic GPU kernel call", "",
             "CUPTI = device time of the call's kernels (median over rotating inputs; a memset is not a kernel record); "
             "wall = a jitted chain of data-dependent calls, wall time / calls (median of repetitions), which also "
             "counts a memset node but is bound by launches at these sizes.", ""]
    for date in sorted({r["date"] for r in rows}):
        rs = [r for r in rows if r["date"] == date]
        lines += [f"- {date}: {rs[0]['device']}, jax {rs[0]['jax']}; command: `{rs[0]['command']}`; semaphore: "
                  f"{rs[0].get('semaphore', 'pl.get_global (one per grid)')}", "",
                  "| semaphore | CTAs x warpgroups, smem KB | kernels (name, CUPTI us) | CUPTI us | wall us per call "
                  "(chain) | output ok |", "| --- | --- | --- | --- | --- | --- |"]
        for r in rs:
            if r.get("status"):  # a mode that did not finish (recorded by hand from the run log)
                lines.append(f"| {r['mode']} | {r['ctas']} x {r['warpgroups']}, {r['smem_kb']} | {r['status']} | - | - "
                             f"| - |")
                continue
            ks = "; ".join(f"{n} {t}" for n, t in r["kernels"])
            lines.append(f"| {r['mode']} | {r['ctas']} x {r['warpgroups']}, {r['smem_kb']} | {ks} | {r['cupti_us']} | "
                         f"{r['wall_us_per_call']} ({r['chain_calls']}{spin_note(r)}) | {r['output_ok']} |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
