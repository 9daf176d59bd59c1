"""Probe (GPU): the fixed cost of one kernel launch in a decode step, Mosaic GPU (Pallas) kernels vs an XLA fusion.

    python bench/launch_probe.py [--out bench/results/launch_probe.json]
    python bench/launch_probe.py --table bench/results/launch_probe.json   # (re)write the markdown only

Each case is one jitted call of kernels that do (almost) no work on a [1, 4096] bf16 activation: CTA 0 passes x
through shared memory, every other CTA exits. CUPTI device time per kernel, median over rotating inputs. The Mosaic
cases vary what the GPTQ ws kernel carries: the grid (132 CTAs), warpgroups per CTA (1 or 3), and the dynamic shared
memory a CTA asks for (up to the ws kernel's ~200 KB). "xla fusion" is one elementwise XLA fusion of the same x
(``bench.timing.gap_ops``); the "xla, kernel, xla" pattern runs one before and one after each Mosaic kernel (a
decode step's pattern), for the kernel's time there."""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import activations, cupti, gap_ops, parse_probe_args, run_meta, save_rows  # noqa: E402
from pallas_kernels import gptq_matmul as gm  # noqa: E402

X_SHAPE = (16, 256)  # the [1, 4096] activation as a TMA-friendly 2D block


def probe_inputs(n: int = 8) -> list:
    """The probes' rotating inputs: n argument tuples, each one X_SHAPE bf16 activation."""
    return [(x,) for x in activations(jax.random.PRNGKey(0), *X_SHAPE, n)]


def passthrough(ctas: int, warpgroups: int, smem_kb: int, wait: bool = False):
    """x -> x by CTA 0 (warpgroup 0) through shared memory; the CTA asks for ``smem_kb`` KB of shared memory.
    ``wait``: every thread first executes ``griddepcontrol.wait`` (``bench/pdl_probe.py``)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kw = dict(num_threads=warpgroups, thread_name="wg") if warpgroups > 1 else {}
    mesh = plgpu.Mesh(grid=(ctas,), grid_names=("n",), **kw)
    return gm.mesh_kernel(passthrough_body(warpgroups, smem_kb, wait),
                          out_type=jax.ShapeDtypeStruct(X_SHAPE, jnp.bfloat16), mesh=mesh,
                          name=f"probe_{ctas}x{warpgroups}_{smem_kb}kb" + ("_wait" if wait else ""), aliased=False)


def passthrough_body(warpgroups: int, smem_kb: int, wait: bool = False):
    """The body of ``passthrough``: (x_gmem, out_gmem) -> None, for a grid named "n" (and warpgroups "wg")."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    pad_elems = max(1, smem_kb * 1024 // 4 - X_SHAPE[0] * X_SHAPE[1] // 2)

    def body(x_gmem, out_gmem):
        if wait:
            plgpu.griddepcontrol_wait()
        cta = jax.lax.axis_index("n")
        first = cta == 0
        if warpgroups > 1:
            first = first & (jax.lax.axis_index("wg") == 0)

        def copy(smem, bar):
            @pl.when(first)
            def _():
                plgpu.copy_gmem_to_smem(x_gmem, smem, bar)
                plgpu.barrier_wait(bar)
                plgpu.copy_smem_to_gmem(smem, out_gmem)
                plgpu.wait_smem_to_gmem(0)

        def scope(pad):
            del pad  # only reserves shared memory, as the ws kernel's pipeline buffers do
            pl.run_scoped(copy, plgpu.SMEM(X_SHAPE, jnp.bfloat16), plgpu.Barrier(num_arrivals=1), **collective)

        collective = {"collective_axes": "wg"} if warpgroups > 1 else {}
        pl.run_scoped(scope, plgpu.SMEM((pad_elems,), jnp.float32), **collective)

    return body


CASES = [  # name, ctas, warpgroups, smem KB
    ("mosaic 1 CTA, 1 wg, 1 KB", 1, 1, 1),
    ("mosaic 132 CTAs, 1 wg, 1 KB", 132, 1, 1),
    ("mosaic 132 CTAs, 3 wg, 1 KB", 132, 3, 1),
    ("mosaic 132 CTAs, 3 wg, 100 KB", 132, 3, 100),
    ("mosaic 132 CTAs, 3 wg, 200 KB", 132, 3, 200),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=20)
    args = parse_probe_args(ap, write_table)
    if args is None:
        return
    xs = probe_inputs()
    rows = []
    total, _, per = cupti(lambda x: gap_ops(x, 1), xs, rounds=args.rounds)
    rows.append(dict(case="xla fusion", pattern="alone", kernels=per, call_us=round(total, 2)))
    print(rows[-1], flush=True)
    for name, ctas, wgs, kb in CASES:
        k = passthrough(ctas, wgs, kb)
        for pattern, fn in (("alone", k), ("xla, kernel, xla", lambda x, k=k: gap_ops(k(gap_ops(x, 1)), 1))):
            try:
                total, _, per = cupti(fn, xs, rounds=args.rounds)
            except Exception as e:  # noqa: BLE001
                print(f"{name} {pattern}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            rows.append(dict(case=name, ctas=ctas, warpgroups=wgs, smem_kb=kb, pattern=pattern, kernels=per,
                             call_us=round(total, 2)))
            print(rows[-1], flush=True)
    if args.out and rows:
        save_rows([dict(run_meta("launch_probe"), **r) for r in rows], args.out, write_table)


def write_table(rows: list, path: str) -> None:
    lines = ["# Launch probe (bench/launch_probe.py): CUPTI us per kernel of near-empty kernels", ""]
    for date in sorted({r["date"] for r in rows}):
        rs = [r for r in rows if r["date"] == date]
        lines += [f"- {date}: {rs[0]['device']}, jax {rs[0]['jax']}; command: `{rs[0]['command']}`", "",
                  "| case | pattern | kernels (name, us) | call us |", "| --- | --- | --- | --- |"]
        for r in rs:
            ks = "; ".join(f"{n} {t}" for n, t in r["kernels"])
            lines.append(f"| {r['case']} | {r['pattern']} | {ks} | {r['call_us']} |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
