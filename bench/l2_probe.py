"""Probe (GPU): does prefetching a quantized weight into L2 during the XLA ops before its matmul make the matmul faster?

    python bench/l2_probe.py [--out bench/results/l2_prefetch_probe.json]
    python bench/l2_probe.py --table bench/results/l2_prefetch_probe.json   # (re)write the markdown only

One jitted call: P (a Pallas kernel of 132 CTAs that issues TMA L2 prefetches of the first ``s`` (unit, k-step)
blocks of every CTA of the target's stream-K ws schedule, and passes x through), then ``gap`` small XLA fusions (the
kind of work a decode step runs between two linears), then the GPTQ kernel on the prefetched weight. Without P the
same call runs the gap and the kernel. Rotating weight copies (together > 4x L2) keep the kernel's own reads cold.
CUPTI times every kernel of the call."""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.decode import random_weight  # noqa: E402
from bench.timing import copies, cupti, gap_ops, parse_probe_args, rotation_sets, run_meta, save_rows  # noqa: E402
from jaxquant.kernel_layout import prepare_for_kernels  # noqa: E402
from pallas_kernels import gptq_matmul as gm  # noqa: E402


def prefetch_call(w, tile_k: int, steps: int, ctas: int = 132):
    """x -> x, with the first ``steps`` blocks of each CTA of w's stream-K ws schedule (tile_k) prefetched to L2."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows = gm.WS_COMPUTE_WGS * gm.CHUNK
    units, spu = w.n_pad // rows, w.k_pad // tile_k
    gps = max(1, tile_k // w.group)
    has_bias = w.nbias is not None

    def body(x_gmem, q_gmem, s_gmem, *rest):
        b_gmem = rest[0] if has_bias else None
        out_gmem = rest[-1]
        cta = jax.lax.axis_index("n")
        for t in range(steps):
            unit, k, *_ = gm.ws_step(t, cta, units, spu, ctas)
            for j in range(gm.WS_COMPUTE_WGS):
                plgpu.async_prefetch(q_gmem.at[unit * gm.WS_COMPUTE_WGS + j, pl.ds(k * (tile_k // gm.CHUNK),
                                                                                    tile_k // gm.CHUNK)])
            g = gm._scale_block_index(k, tile_k, w.group)
            for ref in [s_gmem] + ([b_gmem] if has_bias else []):
                plgpu.async_prefetch(ref.at[pl.ds(g * gps, gps), pl.ds(unit * rows, rows)])

        def copy_x(smem, bar):  # CTA 0 passes x through (a real output keeps the call in the program)
            @pl.when(cta == 0)
            def _():
                plgpu.copy_gmem_to_smem(x_gmem, smem, bar)
                plgpu.barrier_wait(bar)
                plgpu.copy_smem_to_gmem(smem, out_gmem)
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(copy_x, plgpu.SMEM(x_shape, jnp.bfloat16), plgpu.Barrier(num_arrivals=1))

    x_shape = (w.in_features // 256, 256)
    mesh = plgpu.Mesh(grid=(ctas,), grid_names=("n",))
    call = gm.mesh_kernel(body, out_type=jax.ShapeDtypeStruct(x_shape, jnp.bfloat16), mesh=mesh,
                          name=f"l2_prefetch_s{steps}", aliased=False)

    def run(x, w):
        y = call(x.reshape(x_shape), w.qweight, w.scales, *([w.nbias] if has_bias else []))
        return y.reshape(x.shape)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="4096x4096,4096x12288,4096x22016,11008x4096")
    ap.add_argument("--gaps", default="2,8")
    ap.add_argument("--steps", default="0,2,4,8,all")
    ap.add_argument("--rounds", type=int, default=5)
    args = parse_probe_args(ap, write_table)
    if args is None:
        return
    rows = []
    key = jax.random.PRNGKey(0)
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        w = prepare_for_kernels({"w": random_weight(key, "gptq-w4g128", K, N)})["w"]
        x = jax.random.normal(key, (1, K), jnp.float32).astype(jnp.bfloat16)
        cfg = gm.KernelConfig().resolved(w, 1)
        tile_k = cfg.tile_k if cfg.variant == "ws" else gm.WS_STREAM_TILE_K
        units, spu = w.n_pad // (gm.WS_COMPUTE_WGS * gm.CHUNK), w.k_pad // tile_k
        q, r = divmod(units * spu, 132)
        sets = [(x * (1 + i / 8), wi) for i, wi in enumerate(copies(w, rotation_sets(w.nbytes, 12)))]
        for gap in map(int, args.gaps.split(",")):
            for s in args.steps.split(","):
                steps = q + (r > 0) if s == "all" else int(s)
                if steps > q + (r > 0):
                    continue
                pf = prefetch_call(w, tile_k, steps) if steps else None

                def fn(x, w, pf=pf, gap=gap):
                    if pf is not None:
                        x = pf(x, w)
                    return w.matmul(gap_ops(x, gap))

                try:
                    total, kern, per = cupti(fn, sets, rounds=args.rounds, match="gptq")
                except Exception as e:  # noqa: BLE001
                    print(f"{shape} gap {gap} steps {s}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                    continue
                pf_us = sum(t for n, t in per if "l2_prefetch" in n)
                frac = min(1.0, steps / max(1, q))
                print(f"{shape} gap {gap} steps {s:>3} ({frac:.0%} of the weight): total {total:7.2f} us, "
                      f"gptq kernel {kern:6.2f} us, prefetch kernel {pf_us:5.2f} us  {per}", flush=True)
                rows.append(dict(shape=shape, K=K, N=N, gap_fusions=gap, prefetch_steps=steps, fraction=frac,
                                 total_us=round(total, 2), gptq_kernel_us=round(kern, 2),
                                 prefetch_kernel_us=round(pf_us, 2), kernels=per, config=gm.KernelConfig()
                                 .resolved(w, 1).__repr__()))
    if args.out and rows:
        meta = run_meta("l2_prefetch_probe")
        save_rows([dict(meta, **r) for r in rows], args.out, write_table)


def write_table(rows: list, path: str) -> None:
    """The markdown next to the JSON: the GPTQ kernel's us per shape, gap and prefetched share."""
    meta = rows[0]
    lines = [f"# L2 prefetch probe ({meta['device']}, jax {meta['jax']}, {meta['date']})", "",
             f"Command: `{meta['command']}`", "",
             "| shape | XLA fusions in the gap | prefetched steps per CTA (share) | GPTQ kernel us | "
             "prefetch kernel us | call us (all kernels) |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['shape']} | {r['gap_fusions']} | {r['prefetch_steps']} ({r['fraction']:.0%}) | "
              f"{r['gptq_kernel_us']} | {r['prefetch_kernel_us']} | {r['total_us']} |" for r in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
