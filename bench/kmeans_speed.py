"""SqueezeLLM k-means speed at LLaMA-7B shapes, with random weights and random positive Fisher values.

What is timed (warm-up excluded and reported as compile seconds, ``block_until_ready``, median of ``--reps`` repeats,
fresh inputs for every repeat, generated on the device before the clock starts):

  kmeans       ``jaxquant.kmeans.kmeans(W, F, k=2**bits)``: the Fisher-weighted 1-D k-means of every output row of
               W [out, in] (quantile init, at most 50 iterations, tol 1e-4: SqueezeLLM's settings), input checks
               included.
  squeezellm   (--full) ``jaxquant.squeezellm.squeezellm(W, F, cfg)`` end to end for one layer: sparse selection,
               k-means, float16 tables and codes, the CSR built on the host, packing, the Fisher-weighted error;
               dense (sparsity 0) and at the paper's 0.45 % (0.05 % sensitive + 0.40 % outliers; here the
               per-matrix magnitude threshold, outlier_scope="layer": the whole-model path computes one
               model-wide threshold rule once instead, not timed here).
  model_total_7b   32 x (4 x [4096, 4096] (q, k, v, o) + 2 x [11008, 4096] (up, gate) + 1 x [4096, 11008] (down)),
               shapes [out, in]; the Fisher pass and the model-wide threshold search are not included.

Inputs: W = 0.02 * Student-t(5) with a per-row scale in [0.5, 1.5]; F = (row scale * column scale * |N(0, 1)|)^2 with
log-normal column scales (a few input channels dominate, as squared gradients do).

Check (--check-rows): the first rows of the last 4-bit [4096, 11008] problem against the float64 numpy oracle of
tests/kmeans_oracle.py (same init and rules): relative difference of the objective and the share of equal labels
(float32 on the device vs float64: a handful of near-tie points may flip).

GPU:  python bench/kmeans_speed.py --full              (writes $OUT/kmeans_speed.json, else bench/results/)
CPU smoke test:  python bench/kmeans_speed.py --shapes 64x256 --reps 1 --check-rows 4
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
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import importlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxquant import results  # noqa: E402
from jaxquant.kmeans import kmeans  # noqa: E402

SQ = importlib.import_module("jaxquant.squeezellm")  # the module (the package re-exports the function squeezellm)
LAYERS_7B = 32
SHAPES_7B = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}  # [out, in]: linears per decoder layer
TARGET_S = 60.0


@partial(jax.jit, static_argnames=("shape",))
def _problem(key, shape):
    out, inp = shape
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    row = 0.5 + jax.random.uniform(k1, (out, 1))
    W = 0.02 * row * jax.random.t(k2, 5.0, shape)
    col = jnp.exp(jax.random.normal(k3, (1, inp)))
    F = jnp.square(row * col * jnp.abs(jax.random.normal(k4, shape)) * jax.random.uniform(k5, (out, 1), minval=0.1))
    return W.astype(jnp.float32), F.astype(jnp.float32)


def _peak_gb():
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend has it
        stats = None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 2**30, 3)


def _time(fn, shape, reps, key):
    """[cold, warm...] seconds of fn(W, F) on fresh problems, and the last problem and result."""
    times = []
    for rep in range(reps + 1):
        W, F = jax.block_until_ready(_problem(jax.random.fold_in(key, rep), shape))
        t0 = time.perf_counter()
        res = jax.block_until_ready(fn(W, F))
        times.append(time.perf_counter() - t0)
    return times, (W, F, res)


def bench_kmeans(shape, bits, args, key):
    times, (W, F, res) = _time(lambda W, F: kmeans(W, F, k=2**bits), shape, args.reps, key)
    med = statistics.median(times[1:])
    it = np.asarray(res.iterations)
    assert np.all(np.isfinite(np.asarray(res.centroids))), "non-finite centroids"
    row = dict(what="kmeans", shape=list(shape), bits=bits, k=2**bits, seconds=med,
               compile_seconds=max(0.0, times[0] - med), all_seconds=times, iterations_mean=float(it.mean()),
               iterations_max=int(it.max()), rows_at_max_iter=int(np.sum(it >= 50)),
               points_per_s=shape[0] * shape[1] / med)
    return row, (W, F, res)


def bench_squeezellm(shape, bits, sparsity, args, key):
    cfg = SQ.SqueezeLLMConfig.from_sparsity(bits, sparsity, outlier_scope="layer")
    times, (_, _, (qw, err)) = _time(lambda W, F: SQ.squeezellm(W, F, cfg), shape, args.full_reps, key)
    med = statistics.median(times[1:])
    return dict(what="squeezellm", shape=list(shape), bits=bits, sparsity_pct=sparsity, seconds=med,
                compile_seconds=max(0.0, times[0] - med), all_seconds=times, nnz=qw.nnz, avg_bits=qw.avg_bits(),
                fisher_error=err)


def check_against_oracle(W, F, res, rows, bits):
    from kmeans_oracle import kmeans_row

    W, F = np.asarray(W[:rows], np.float64), np.asarray(F[:rows], np.float64)
    rel, agree = [], []
    for i in range(rows):
        o = kmeans_row(W[i], F[i], 2**bits)
        rel.append(abs(float(res.inertia[i]) - o.inertia) / o.inertia)
        agree.append(float(np.mean(np.asarray(res.labels[i]) == o.labels)))
    return dict(what="oracle_check", shape=list(np.shape(res.labels)), bits=bits, rows=rows,
                max_rel_objective_diff=max(rel), min_label_agreement=min(agree), mean_label_agreement=float(
                    np.mean(agree)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="OUTxIN list")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also time squeezellm() end to end (dense and 0.45 %%)")
    ap.add_argument("--full-reps", type=int, default=2, help="warm repeats of the end-to-end squeezellm() timing")
    ap.add_argument("--check-rows", type=int, default=16)
    ap.add_argument("--out", default=None, help="JSON list file (default $OUT/kmeans_speed.json, else bench/results)")
    args = ap.parse_args()
    out = args.out or os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"),
                                   "kmeans_speed.json")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    bits_list = [int(b) for b in args.bits.split(",")]
    key = jax.random.PRNGKey(int.from_bytes(os.urandom(4), "little"))
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    rows = []

    def emit(r):
        r = results.row("kmeans_speed", **r, peak_mem_gb=_peak_gb())
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("command", "benchmark", "all_seconds")}),
              flush=True)
        with open(out, "w") as f:  # rewritten after every row: partial results survive a time-out
            json.dump(rows, f, indent=1)

    per = {}
    for bits in bits_list:
        for shape in shapes:
            r, (W, F, res) = bench_kmeans(shape, bits, args, jax.random.fold_in(key, hash((bits, shape)) % 2**31))
            per[("kmeans", bits, shape)] = r["seconds"]
            emit(r)
            if args.check_rows and bits == bits_list[-1] and shape == shapes[-1]:
                emit(check_against_oracle(W, F, res, args.check_rows, bits))
            del W, F, res
            if args.full:
                for sparsity in (0.0, 0.45):
                    r = bench_squeezellm(shape, bits, sparsity, args, jax.random.fold_in(key, 7 + bits))
                    per[("squeezellm", sparsity, bits, shape)] = r["seconds"]
                    emit(r)
    if all(s in SHAPES_7B for s in shapes) and set(shapes) == set(SHAPES_7B):
        for bits in bits_list:
            kinds = [("kmeans", "kmeans", ())] + ([("squeezellm dense", "squeezellm", (0.0,)),
                                                   ("squeezellm 0.45%", "squeezellm", (0.45,))] if args.full else [])
            for label, name, extra in kinds:
                parts = {f"{o}x{i}": per[(name, *extra, bits, (o, i))] for (o, i) in SHAPES_7B}
                total = LAYERS_7B * sum(n * per[(name, *extra, bits, s)] for s, n in SHAPES_7B.items())
                emit(dict(what="model_total_7b", timed=label, bits=bits, seconds=total, target_s=TARGET_S,
                          per_shape_seconds=parts, layers=LAYERS_7B, linears_per_layer=dict(
                              {f"{o}x{i}": n for (o, i), n in SHAPES_7B.items()})))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
