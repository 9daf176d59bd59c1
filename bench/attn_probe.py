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
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import cupti  # noqa: E402
from models.common import apply_rope, attention_mask, dot_product_attention, rope_inverse_frequencies, update_cache  # noqa: E402

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
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None if impl == "auto" else impl)
    return out.reshape(b, 1, -1), cache


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
            rows.append(dict(batch=batch, implementation=impl, us=round(total, 2), kernels=per, rel_err_vs_model=err))
        except Exception as e:  # noqa: BLE001
            print(f"batch {batch} {impl}: {type(e).__name__}: {str(e)[:300]}", flush=True)

if args.out:
    meta = dict(benchmark="decode_attention_probe", command="python " + " ".join(sys.argv),
                device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                shape=dict(heads=H, head_dim=D, cache=S, cache_index=IDX))
    with open(args.out, "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
