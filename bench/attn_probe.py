"""Probe (GPU): one LLaMA-7B decode step's attention (RoPE, cache write, scores, softmax, P @ V) as the model's XLA
path runs it vs jax.nn.dot_product_attention (XLA and cuDNN implementations) and vs the Pallas decode-attention
kernel (``pallas_kernels.decode_attention``, RoPE still in XLA); CUPTI kernel time per call and kernel names.

    python bench/attn_probe.py [--caches 81,512,2048] [--out bench/results/decode_attention_probe.json]

Before timing, the kernel is checked against its jnp reference on random odd cases (GQA, head_dim 64 / 256, key
padding, the new slot at 0 and at S - 1) with a NaN-poisoned output; the caches must come back bitwise equal.
The caches (81 positions by default, as bench/decode.py's default prompt + new tokens) are jit arguments that are not
donated, so every path also shows the copies XLA makes to update them (``memcpy`` / ``copy`` kernels; the column
"us w/o copies" leaves them out); inside the generation loop the update is in place."""
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
from pallas_kernels import decode_attention as da  # noqa: E402

H, D = 32, 128
inv = rope_inverse_frequencies(D, {"rope_type": "default", "rope_theta": 10000.0})


def cache_index(s: int) -> int:
    return 40 if s == 81 else s // 2


def step(impl, qkv, ck, cv, pos, kv_mask):
    b, s = qkv.shape[0], ck.shape[1]
    idx = cache_index(s)
    if impl.startswith("pallas"):  # RoPE in the kernel, q / k / v read from the fused projection's output
        flat = qkv[:, 0]
        parts = 1 if impl == "pallas-1cta" else None  # one CTA per head instead of the cluster_parts default
        out, ck, cv = da.decode_attention(flat, flat, flat, ck, cv, idx, kv_mask, pos[:, 0], jnp.asarray(inv),
                                          num_heads=H, offsets=(0, H * D, 2 * H * D), parts=parts)
        return out.reshape(b, 1, -1), {"k": ck, "v": cv}
    q, k, v = (qkv[..., i * H * D:(i + 1) * H * D].reshape(b, 1, H, D) for i in range(3))
    q, k = apply_rope(q, pos, inv), apply_rope(k, pos, inv)
    k, v, cache = update_cache({"k": ck, "v": cv}, k, v, idx)
    mask = attention_mask(1, s, idx, kv_mask)
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
             f"Command: `{rows[0]['command']}`. One LLaMA-7B decode step's attention (32 heads, head_dim 128); "
             "CUPTI kernel time of one call (median). model = models.common's XLA path; xla / cudnn = "
             "jax.nn.dot_product_attention's implementations; pallas = pallas_kernels.decode_attention (RoPE, "
             "cache write and attention in one kernel, q / k / v read from the fused projection's output; its "
             "second kernel converts the boolean key mask to int32), with its default CTAs per head "
             "(``cluster_parts``: a cluster of up to 8 at batch 1 on long caches); pallas-1cta = one CTA per "
             "head. The copy kernels update the probe's non-donated cache inputs; inside the generation loop the "
             "update is in place, so \"us w/o copies\" is the figure that carries over.", "",
             "| batch | cache | implementation | us | us w/o copies | kernels | rel err vs model |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['batch']} | {r['cache']} | {r['implementation']} | {r['us']} | {r['us_without_copies']} | "
              f"{len(r['kernels'])} | {r['rel_err_vs_model']:.2e} |" for r in rows]
    checks = rows[0].get("checks", [])
    if checks:
        lines += ["", "Kernel check (NaN-poisoned output, vs the jnp reference; caches bitwise):", "",
                  "| B, H, KV, S, D | CTAs per head | dtype | index | key padding | RoPE dims | fused q/k/v | "
                  "rel err | max abs err | caches equal |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {c['shape']} | {c.get('parts', 1)} | {c['dtype']} | {c['index']} | {c['padding']} | "
                  f"{c['rope_dims']} | "
                  f"{c['fused_source']} | {c['rel_err']:.2e} | {c['max_abs_err']:.2e} | {c['caches_equal']} |"
                  for c in checks]
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


CHECK_CASES = (  # (B, H, KV, S, D, index, key padding, RoPE dims, fused q/k/v source (or "slots"), dtype)
    (1, 32, 32, 81, 128, 40, False, 128, True, "bfloat16"), (16, 32, 32, 81, 128, 80, True, 128, True, "bfloat16"),
    (2, 8, 2, 300, 64, 257, True, 32, False, "float16"), (3, 4, 1, 17, 256, 0, False, 0, False, "bfloat16"),
    (1, 32, 8, 1000, 128, 999, True, 128, True, "bfloat16"), (1, 12, 4, 200, 64, 130, False, 64, False, "float16"),
    (5, 6, 3, 129, 32, 128, True, 16, True, "bfloat16"), (1, 32, 32, 2048, 128, 100, True, 128, True, "bfloat16"),
    (1, 32, 32, 2048, 128, 2047, True, 128, True, "bfloat16"),
    # q / k / v summed from float32 partial slots (a quantized projection's PartialSums)
    (1, 32, 32, 81, 128, 40, False, 128, "slots", "bfloat16"), (16, 8, 2, 300, 64, 257, True, 32, "slots", "float16"),
    (1, 32, 32, 2048, 128, 1000, True, 128, "slots", "bfloat16"))


def check_kernel(seed: int) -> list:
    """The kernel vs reference_decode_attention on CHECK_CASES (fresh random inputs, NaN-poisoned output)."""
    rows = []
    for n, (b, h, kv, s, d, idx, padding, rope, fused, dt) in enumerate(CHECK_CASES):
        ks = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), n), 8)
        if fused:  # one [q | k | v] source with a few features before and after
            src = jax.random.normal(ks[0], (b, 3 + (h + 2 * kv) * d + 5), dt)
            q = k = v = src
            offsets = (3, 3 + h * d, 3 + (h + kv) * d)
            if fused == "slots":  # 3 random float32 slots summing to src, padded rows / columns random too
                f = src.shape[1]
                noise = jax.random.normal(ks[7], (2, f + 7, max(8, b)), jnp.float32)
                last = jax.random.normal(jax.random.fold_in(ks[7], 1), noise.shape[1:], jnp.float32)
                last = last.at[:f, :b].set(src.astype(jnp.float32).T - noise[:, :f, :b].sum(0))
                q = k = v = jnp.concatenate([noise, last[None]])
        else:
            q, k, v = (jax.random.normal(kk, (b, hh * d), dt) for kk, hh in zip(ks[:3], (h, kv, kv)))
            offsets = (0, 0, 0)
        ck, cv = (jax.random.normal(kk, (b, s, kv, d), dt) for kk in ks[3:5])
        valid = jax.random.uniform(ks[5], (b, s)) > 0.3 if padding else None
        pos = jax.random.randint(ks[6], (b,), 0, 4096)
        inv_freq = (1.0 / 10000.0 ** (jnp.arange(0, rope, 2, dtype=jnp.float32) / rope)) if rope else None
        kw = dict(num_heads=h, offsets=offsets)
        ref, rk, rv = jax.jit(functools.partial(da.reference_decode_attention, **kw))(q, k, v, ck, cv, idx, valid,
                                                                                      pos, inv_freq)
        out, ok_k, ok_v = da.decode_attention(q, k, v, ck, cv, idx, valid, pos, inv_freq, **kw,
                                              out=jnp.full((b, h * d), jnp.nan, dt))
        out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
        err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) if np.all(np.isfinite(out)) else float("nan")
        same = bool(np.array_equal(np.asarray(ok_k), np.asarray(rk)) and np.array_equal(np.asarray(ok_v),
                                                                                         np.asarray(rv)))
        rows.append(dict(shape=f"{b}, {h}, {kv}, {s}, {d}", parts=da.cluster_parts(b, kv, s), index=idx,
                         padding=padding, rope_dims=rope,
                         fused_source=fused, dtype=dt, rel_err=err,
                         max_abs_err=float(np.max(np.abs(out - ref))), caches_equal=same))
        print(f"check {rows[-1]}", flush=True)
        if not (err < 1e-2 and same):
            raise SystemExit(f"decode_attention kernel check failed: {rows[-1]}")
    return rows


def is_copy(name: str) -> bool:
    return "memcpy" in name or "copy" in name


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", help="JSON file for the rows")
    ap.add_argument("--caches", default="81", help="cache lengths S (comma separated)")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--impls", default="model,xla,cudnn,pallas,pallas-1cta")
    ap.add_argument("--seed", type=int, default=None, help="random inputs (default: fresh)")
    args = ap.parse_args()
    seed = np.random.SeedSequence().entropy % 2**31 if args.seed is None else args.seed
    checks = check_kernel(seed)
    rows = []
    for s in (int(v) for v in args.caches.split(",")):
        for batch in (int(v) for v in args.batches.split(",")):
            key = jax.random.PRNGKey(seed + s)
            sets = []
            for i in range(8):
                ks = jax.random.split(jax.random.fold_in(key, i), 3)
                qkv = jax.random.normal(ks[0], (batch, 1, 3 * H * D), jnp.bfloat16)
                ck = jax.random.normal(ks[1], (batch, s, H, D), jnp.bfloat16)
                cv = jax.random.normal(ks[2], (batch, s, H, D), jnp.bfloat16)
                sets.append((qkv, ck, cv, jnp.full((batch, 1), cache_index(s), jnp.int32), jnp.ones((batch, s), bool)))
            ref = None
            for impl in args.impls.split(","):
                try:
                    f = functools.partial(step, impl)
                    out = np.asarray(jax.jit(f)(*sets[0])[0], np.float32)
                    ref = out if ref is None else ref
                    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                    total, _, per = cupti(f, sets, rounds=5)
                    no_copy = sum(t for n, t in per if not is_copy(n))
                    print(f"batch {batch} cache {s} {impl:6s} {total:7.2f} us ({no_copy:7.2f} w/o copies)  kernels "
                          f"{len(per)}  rel err vs model {err:.2e}  {per}", flush=True)
                    rows.append(dict(batch=batch, cache=s, cache_index=cache_index(s), implementation=impl,
                                     us=round(total, 2), us_without_copies=round(no_copy, 2), kernels=per,
                                     rel_err_vs_model=err))
                except Exception as e:  # noqa: BLE001
                    print(f"batch {batch} cache {s} {impl}: {type(e).__name__}: {str(e)[:300]}", flush=True)

    if args.out and not rows:
        print("no rows measured (the probe needs a GPU with CUPTI): nothing written")
    elif args.out:
        meta = dict(benchmark="decode_attention_probe", command="python " + " ".join(sys.argv),
                    device=jax.devices()[0].device_kind, jax=jax.__version__, jaxlib=jaxlib.__version__,
                    date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                    what="decode attention (RoPE, cache write, softmax(q k^T) v)", heads=H, head_dim=D, seed=seed)
        write_outputs([dict(meta, **r, **({"checks": checks} if n == 0 else {})) for n, r in enumerate(rows)],
                      args.out)


if __name__ == "__main__":
    main()
