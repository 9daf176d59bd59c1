"""RPTQ memory table (computed, as the RPTQ paper's): weights + KV cache of a LLaMA-7B-shaped model per configuration.

    python bench/rptq_memory.py [--batch 64 --seqlen 8192]

Nothing is allocated: the stored size of every array is computed from its shape. The quantized linears use
jaxquant's stored format of RPTQ's weights (GPTQ, asymmetric, per output channel: packed codes, float32 scales,
packed zeros, int32 g_idx); the formula is checked against ``UniformQuantizedWeight.nbytes`` of a real quantized
weight before the table is written. Embedding, LM head and norms stay float16. The KV cache holds k and v at the bits
the configuration quantizes them to (16 = float16), plus the per-cluster scale and zero of their quantizers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxquant import results  # noqa: E402
from jaxquant.rptq import CONFIGURATIONS, DEFAULT_CLUSTERS, activation_bits  # noqa: E402

LLAMA_7B = dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
GB = 1e9


def linear_shapes(m: dict):
    """(in, out) of the seven linears of one LLaMA decoder layer."""
    h, f, kv = m["hidden"], m["intermediate"], m["hidden"] * m["kv_heads"] // m["heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]


def quantized_linear_bytes(k: int, n: int, bits: int) -> int:
    """Stored bytes of a per-channel asymmetric GPTQ weight: qweight int32 [ceil(k*bits/32), n], qzeros int32
    [1, ceil(n*bits/32)], scales float32 [1, n], g_idx int32 [k]."""
    return 4 * (-(-k * bits // 32) * n + -(-n * bits // 32) + n + k)


def check_formula(rng) -> None:
    """The formula against a real stored weight (odd shapes, both bit widths)."""
    import jax.numpy as jnp

    from jaxquant.config import QuantConfig
    from jaxquant.rtn import rtn

    for bits, (k, n) in [(4, (96, 40)), (3, (128, 96))]:
        w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
        q = rtn(w, QuantConfig(bits=bits, group_size=-1))
        q = q[0] if isinstance(q, tuple) else q
        if q.nbytes != quantized_linear_bytes(k, n, bits):
            raise AssertionError(f"formula {quantized_linear_bytes(k, n, bits)} != stored {q.nbytes} bytes "
                                 f"for {bits}-bit {k}x{n}")


def memory(m: dict, wbits: int, kv_bits: int, batch: int, seqlen: int) -> dict:
    lin = sum(k * n for k, n in linear_shapes(m)) * m["layers"]
    if wbits >= 16:
        lin_bytes = 2 * lin
    else:
        lin_bytes = m["layers"] * sum(quantized_linear_bytes(k, n, wbits) for k, n in linear_shapes(m))
    other = 2 * (2 * m["vocab"] * m["hidden"] + (2 * m["layers"] + 1) * m["hidden"])  # embed, head, norms: fp16
    kv_width = m["hidden"] * m["kv_heads"] // m["heads"]
    kv = 2 * m["layers"] * batch * seqlen * kv_width * kv_bits / 8
    if kv_bits < 16:  # per cluster scale + zero (float32) of the k and v quantizers, per layer
        kv += m["layers"] * 2 * 2 * 4 * DEFAULT_CLUSTERS["R2"] * m["kv_heads"]
    return {"linear_params": lin, "weights_gb": (lin_bytes + other) / GB, "kv_cache_gb": kv / GB,
            "total_gb": (lin_bytes + other + kv) / GB}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--out", default="bench/results/rptq_memory.json")
    args = ap.parse_args()
    check_formula(np.random.default_rng())
    configs = {"W16A16": (16, 16, False), **CONFIGURATIONS}
    rows = []
    for name, (wbits, abits, kv_only) in configs.items():
        kv_bits = 16 if abits >= 16 else max(activation_bits(abits, kv_only)[a] for a in ("k", "v"))
        mem = memory(LLAMA_7B, wbits, kv_bits, args.batch, args.seqlen)
        rows.append(results.row("rptq_memory", model="llama-7b-shaped", shape=LLAMA_7B, config=name, wbits=wbits,
                                abits=abits, kv_only=kv_only, kv_bits=kv_bits, batch=args.batch, seqlen=args.seqlen,
                                computed=True, **mem))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    base = rows[0]["total_gb"]
    lines = [f"# RPTQ memory: LLaMA-7B-shaped model, batch {args.batch}, sequence {args.seqlen} (computed)", "",
             f"Command: `{rows[0]['command']}` ({rows[0]['date']}). Computed from array shapes, nothing allocated: "
             "quantized linears in jaxquant's stored per-channel GPTQ format (formula checked against a real stored "
             "weight), embedding / LM head / norms float16, KV cache = k and v of every layer at the bits the "
             "configuration quantizes them to (+ their per-cluster scales and zeros). Activations of the running "
             "step are not counted (they do not grow with the cache).", "",
             "| config | weight bits | k / v bits | weights GB | KV cache GB | total GB | reduction vs W16A16 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['wbits']} | {r['kv_bits']} | {r['weights_gb']:.2f} | "
                     f"{r['kv_cache_gb']:.1f} | {r['total_gb']:.1f} | {base / r['total_gb']:.2f}x |")
    with open(args.out.replace(".json", ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
