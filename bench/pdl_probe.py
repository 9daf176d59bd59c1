"""Probe (GPU): does the installed JAX launch a Pallas Mosaic GPU kernel with programmatic dependent launch (PDL)?

    python bench/pdl_probe.py [--out bench/results/pdl_probe.json]
    XLA_FLAGS=--xla_gpu_enable_pdl=true python bench/pdl_probe.py --out ...   # XLA's PDL switch on as well
    python bench/pdl_probe.py --table bench/results/pdl_probe.json   # (re)write the markdown only

Why: a decode step's Pallas calls each pay ~1.4 us of launch and ~1 us before their first weight blocks land
(bench/results/ws_trace.md). With PDL a kernel may start while the kernel before it still runs, prefetch its weights
and wait (``griddepcontrol.wait``) only before reading its input. JAX 0.11's Pallas marks a kernel that calls
``plgpu.griddepcontrol_wait`` as using PDL (the module attribute ``mosaic_gpu.uses_pdl``); whether the runtime then
launches it with programmatic stream serialization is what this measures.

One jitted call, CUPTI per kernel: A, a one-CTA Mosaic kernel that signals ``griddepcontrol.launch_dependents`` first
and then spins (``--spin-iters`` dependent float ops on x's data), then B, a Mosaic kernel of 132 CTAs that passes x
through (``launch_probe.passthrough``), with or without ``griddepcontrol.wait`` at its start. If B is launched with
PDL, its CTAs start while A spins (they fit on the 131 idle SMs) and wait there: B's CUPTI time grows by about A's. If
not, B starts after A ends and both B rows are alike."""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.launch_probe import X_SHAPE, passthrough, probe_inputs  # noqa: E402
from bench.timing import cupti, parse_probe_args, run_meta, save_rows  # noqa: E402
from pallas_kernels import gptq_matmul as gm  # noqa: E402


def spin_kernel(iters: int):
    """A: x -> x by one CTA that lets dependent kernels launch at once, then runs ``iters`` dependent float ops."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def body(x_gmem, out_gmem):
        plgpu.griddepcontrol_launch_dependents()

        def copy(smem, bar):
            plgpu.copy_gmem_to_smem(x_gmem, smem, bar)
            plgpu.barrier_wait(bar)
            v = jax.lax.fori_loop(0, iters, lambda i, v: v * 0.999999 + 1e-6, smem[0:1, :].astype(jnp.float32))
            smem[0:1, :] = v.astype(jnp.bfloat16)  # a spin on x's data: not foldable, and its result is stored
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, out_gmem)
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(copy, plgpu.SMEM(X_SHAPE, jnp.bfloat16), plgpu.Barrier(num_arrivals=1))

    mesh = plgpu.Mesh(grid=(1,), grid_names=("n",))
    return gm.mesh_kernel(body, out_type=jax.ShapeDtypeStruct(X_SHAPE, jnp.bfloat16), mesh=mesh,
                          name=f"pdl_spin_{iters}", aliased=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spin-iters", default="0,4000,20000")
    ap.add_argument("--rounds", type=int, default=20)
    args = parse_probe_args(ap, write_table)
    if args is None:
        return
    xs = probe_inputs()
    lowered = jax.jit(passthrough(132, 1, 1, wait=True)).trace(*xs[0]).lower().as_text()
    meta = dict(run_meta("pdl_probe"), xla_flags=os.environ.get("XLA_FLAGS", ""),
                marked_uses_pdl="mosaic_gpu.uses_pdl" in lowered)  # Pallas's mark on a kernel that waits (JAX 0.11)
    rows = []
    for iters in map(int, args.spin_iters.split(",")):
        for wait in (False, True):
            a, b = spin_kernel(iters), passthrough(132, 1, 1, wait=wait)
            _, _, per = cupti(lambda x, a=a, b=b: b(a(x)), xs, rounds=args.rounds)
            rows.append(dict(meta, spin_iters=iters, wait=wait, spin_us=per[0][1], dependent_us=per[1][1],
                             kernels=per))
            print(rows[-1]["spin_iters"], wait, per, flush=True)
    if args.out:
        save_rows(rows, args.out, write_table)


def write_table(rows: list, path: str) -> None:
    lines = ["# PDL probe (bench/pdl_probe.py): is a Mosaic GPU kernel that waits launched early?", "",
             "A = one-CTA spin kernel that signals launch_dependents first; B = 132-CTA pass-through kernel, with or "
             "without griddepcontrol.wait. CUPTI us per kernel (median). PDL active = B's time grows with A's.", ""]
    for date in sorted({r["date"] for r in rows}):
        rs = [r for r in rows if r["date"] == date]
        for flags in sorted({r["xla_flags"] for r in rs}):
            fs = [r for r in rs if r["xla_flags"] == flags]
            m = fs[0]
            lines += [f"- {date}: {m['device']}, jax {m['jax']}, XLA_FLAGS `{flags}`; B (with the wait) lowered "
                      f"with `mosaic_gpu.uses_pdl`: {m['marked_uses_pdl']}; command: `{m['command']}`", "",
                      "| spin iterations | B waits | A us | B us |", "| --- | --- | --- | --- |"]
            lines += [f"| {r['spin_iters']} | {r['wait']} | {r['spin_us']} | {r['dependent_us']} |" for r in fs]
            lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
