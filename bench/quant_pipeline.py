"""Whole-pipeline GPTQ on a LLaMA-7B-shaped model with random weights: wall time per decoder layer and peak device
memory, on 1 device and on a mesh of several (data-parallel calibration + row-parallel solves), in one run.

Unlike bench/quant_speed.py (Hessian and solve kernels alone), this times ``jaxquant.quantize_model`` end to end:
embedding of the calibration tokens, every jitted layer pass (Hessian collection with input reuse, the recomputed
layer outputs), the solves, and moving each layer between host and device. The weights live in host memory (numpy,
as ``from_pretrained(on_host=True)`` loads them) and only the layer in progress is on the device(s).

Only ``--layers`` decoder layers are built (default 2; the layers are identical in shape, so the per-layer time
extrapolates to the model's 32); the first layer carries the compilation and is reported apart. Peak memory is the
allocator's per-device peak (GPU); the runs go from most devices to one so that each multi-device peak is its own.

    python bench/quant_pipeline.py                          # 1 device, then all devices if there are several
    python bench/quant_pipeline.py --devices 1 2 --layers 3
    CPU smoke test: python bench/quant_pipeline.py --hidden 256 --intermediate 512 --heads 4 --vocab 512 \
        --nsamples 8 --seqlen 64 --batch 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402
from jaxquant import results  # noqa: E402
from jaxquant.config import QuantConfig  # noqa: E402
from jaxquant.distributed import make_mesh  # noqa: E402
from jaxquant.pipeline import quantize_model  # noqa: E402


def random_llama(args, seed: int = 0) -> models.LoadedModel:
    hf = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
              num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
              rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False)
    family, config, module = models.build(hf, "float32")
    rng = np.random.default_rng(seed)
    abstract = models.abstract_params(module)

    def fill(x):  # LLaMA-like scales: norms ~1, weights ~N(0, 0.02)
        if len(x.shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32)
        return (0.02 * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32)

    params = jax.tree_util.tree_map(fill, abstract)
    return models.LoadedModel(family=family, config=config, module=module, params=params, tokenizer=None,
                              hf_config=hf, source="random", dtype=np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--model-layers", type=int, default=32, help="layers of the full model, for the extrapolation")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--devices", type=int, nargs="*", default=None, help="device counts to run (default: 1 and all)")
    ap.add_argument("--mesh-solves", nargs="*", default=["linears"], choices=["linears", "rows"],
                    help="how multi-device runs spread the solves (several: one run each)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    out = args.out or (os.path.join(os.environ["OUT"], "quant_pipeline.json") if os.environ.get("OUT")
                       else "bench/results/quant_pipeline.json")
    n_all = jax.device_count()
    counts = sorted(args.devices or {1, n_all}, reverse=True)  # most devices first: see peak_note
    lm = random_llama(args)
    calib = np.random.default_rng(1).integers(0, args.vocab, (args.nsamples, args.seqlen)).astype(np.int32)
    cfg = QuantConfig(bits=args.bits, group_size=args.group_size)
    rows = []
    runs = [(n, mode) for n in counts for mode in (args.mesh_solves if n > 1 else ["-"])]
    for n_dev, mode in runs:
        if n_dev > n_all:
            raise SystemExit(f"--devices {n_dev}: only {n_all} devices here")
        mesh = make_mesh(jax.devices()[:n_dev]) if n_dev > 1 else None
        t0 = time.perf_counter()
        _, report = quantize_model(lm, calib, cfg, method="gptq", batch_size=args.batch, mesh=mesh, progress=True,
                                   mesh_solves=mode if n_dev > 1 else "linears")
        wall = time.perf_counter() - t0
        peaks = [d.memory_stats().get("peak_bytes_in_use") if d.memory_stats() else None
                 for d in jax.devices()[:n_dev]]
        steady = report.layer_seconds[1:] or report.layer_seconds
        per_layer = float(np.median(steady))
        setup = wall - sum(report.layer_seconds)  # embedding of the calibration set, host->device moves
        row = results.row(
            "quant_pipeline", what="gptq_quantize_model", devices=n_dev, mesh_solves=mode,
            model_shape=dict(hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, vocab=args.vocab,
                             layers_built=args.layers, model_layers=args.model_layers),
            calib=dict(nsamples=args.nsamples, seqlen=args.seqlen, batch=args.batch),
            config=dict(bits=args.bits, group_size=args.group_size), seconds=wall,
            layer_seconds=report.layer_seconds, seconds_per_layer=per_layer,
            first_layer_compile_s=report.layer_seconds[0] - per_layer, setup_seconds=setup,
            implied_model_seconds=setup + report.layer_seconds[0] + per_layer * (args.model_layers - 1),
            steady_collect_seconds_per_layer=sum(r["collect_seconds"] for r in report.layers
                                                 if r["layer"] != "layers_0") / max(args.layers - 1, 1),
            steady_solve_seconds_per_layer=sum(r["seconds"] for r in report.layers
                                               if r["layer"] != "layers_0") / max(args.layers - 1, 1),
            peak_mem_gb=[None if p is None else round(p / 2**30, 3) for p in peaks],
            peak_note="allocator peak per device since the process started (runs go from most devices to one, so "
                      "each multi-device figure is its own)")
        rows.append(row)
        print(json.dumps(row), flush=True)
        results.append_rows(out, [row])  # each row as soon as it is measured: a run cut short keeps what it did


if __name__ == "__main__":
    main()
