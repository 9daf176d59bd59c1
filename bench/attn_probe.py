"""Probe (GPU): one LLaMA-7B decode step's attention (RoPE, cache write, scores, softmax, P @ V) as the model runs it
vs jax.nn.dot_product_attention (XLA and cuDNN implementations); CUPTI kernel time per call and kernel names.

    python bench/attn_probe.py [--out bench/results/decode_attention_probe.json]

The cache (81 positions, as bench/decode.py's default prompt + new tokens) is a jit argument that is not donated, so
the model path also shows the copies XLA makes to update it; inside the generation loop the update is in place."""
import argparse
import datetime
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import cupti  # noqa: E402
from models.common import (apply_rope, attention_mask, dot_product_attention,  # noqa: E402
                           rope_inverse_frequencies, update_cache)

H, D, S, IDX = 32, 128, 81, 40
inv = rope_inverse_frequencies(D, {"rope_type": "default", "rope_theta": 10000.0})


def step(impl, qkv, ck, cv, pos, kv_mask):
    b = qkv.shape[0]
    q, k, v = (qkv[..., i * H * D:(i + 1) * H * D].reshape(b, 1, H, D) for i in range(3))
    q, k = apply_rope(q, pos, inv), apply_rope(k, pos, inv)
    k, v, cache = update_cache({"k": ck, "v": cv}, k, v, IDX)
    mask = attention_mask(1, S, IDX, kv_mask)
    if impl == "model":
        out = dot_product_attention(q, k, v, mask)
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    return out.reshape(b, 1, -1), cache


def write_outputs(rows, out):
    """rows (a list, one per batch / implementation) -> ``out`` (JSON) and ``out`` with .md (a short table)."""
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    lines = [f"# Decode attention probe ({rows[0]['device']}, jax {rows[0]['jax']}, {rows[0]['date']})", "",
             f"Command: `{rows[0]['command']}`. One LLaMA-7B decode step's attention, {rows[0]['cache']}-entry cache; "
             "CUPTI kernel time of one call (median). model = models.common as the model runs it (at batch 1 "
             "its 3 memcpy32_post kernels are copies of the non-donated probe inputs, not in the generation loop); "
             "xla / cudnn = jax.nn.dot_product_attention's implementations.", "",
             "| batch | implementation | us | kernels | rel err vs model |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['batch']} | {r['implementation']} | {r['us']} | {len(r['kernels'])} | "
              f"{r['rel_err_vs_model']:.2e} |" for r in rows]
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", help="JSON file for the rows")
    args = ap.parse_args()
    rows = []
    for batch in (1, 16):
        key = jax.random.PRNGKey(0)
        sets = []
        for i in range(8):
            ks = jax.random.split(jax.random.fold_in(key, i), 3)
            qkv = jax.random.normal(ks[0], (batch, 1, 3 * H * D), jnp.bfloat16)
            ck = jax.random.normal(ks[1], (batch, S, H, D), jnp.bfloat16)
            cv = jax.random.normal(ks[2], (batch, S, H, D), jnp.bfloat16)
            sets.append((qkv, ck, cv, jnp.full((batch, 1), IDX, jnp.int32), jnp.ones((batch, S), bool)))
        ref = None
        for impl in ("model", "xla", "cudnn"):
            try:
                f = functools.partial(step, impl)
                out = np.asarray(jax.jit(f)(*sets[0])[0], np.float32)
                ref = out if ref is None else ref
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                total, _, per = cupti(f, sets, rounds=5)
                print(f"batch {batch} {impl:6s} {total:7.2f} us  kernels {len(per)}  rel err vs model {err:.2e}  {per}",
                      flush=True)
                rows.append(dict(batch=batch, implementation=impl, us=round(total, 2), kernels=per,
                                 rel_err_vs_model=err))
            except Exception as e:  # noqa: BLE001
                print(f"batch {batch} {impl}: {type(e).__name__}: {str(e)[:300]}", flush=True)

    if args.out and not rows:
        print("no rows measured (the probe needs a GPU with CUPTI): nothing written")
    elif args.out:
        meta = dict(benchmark="decode_attention_probe", command="python " + " ".join(sys.argv),
                    device=jax.devices()[0].device_kind, jax=jax.__version__, jaxlib=jaxlib.__version__,
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                    what="decode attention (RoPE, cache write, softmax(q k^T) v)", heads=H, head_dim=D, cache=S,
                    cache_index=IDX)
        write_outputs([dict(meta, **r) for r in rows], args.out)


if __name__ == "__main__":
    main()
