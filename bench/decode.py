"""Decode benchmark (GPU): a LLaMA-7B-shaped model with random weights, jitted generation with a KV cache.

    python bench/decode.py                                   # all formats, batch 1 and 16 -> bench/results/decode.*
    python bench/decode.py --formats bf16,gptq-w4g128 --batches 1 --new-tokens 32
    python bench/decode.py --tiny --formats gptq-w4g128     # CPU smoke: 2 small layers, reference path
    python bench/decode.py --append --formats 'bf16,spqr-w3g16'   # add / replace rows, keep the others

``--formats``: comma-separated; ';' separates groups, each group runs in its own worker process (--worker-timeout
each); the parent never touches the device and rewrites decode.json / decode.md after every group.

Model: LLaMA-7B shapes (32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000), bf16 activations. The weights are
random and built directly on the device in each format's stored (packed) layout: no GPTQ / k-means / SpQR runs and no
weights travel. Every decoder-layer linear is quantized; the embedding, norms and lm_head stay bf16 (as the methods'
reference code leaves them). After building, ``jaxquant.kernel_layout.prepare_for_kernels`` converts whatever it
supports into the Pallas kernels' layouts (the dispatch the project uses); each row records which weight classes the
model then holds (``weight_classes``) and so which path ran (``path``).

Generation is the project's jitted loop (``models.generate._generate``: prefill + ``lax.while_loop`` of decode steps,
one program), compiled ahead of time once per (format, batch). Timing, wall clock around the whole program:
- ``total``: prefill + ``new_tokens`` decode steps (the first token comes from the prefill logits);
- ``prefill``: the same compiled program with ``eos_id`` set to the first token it generates, so the loop stops at
  once (prefill + first pick only). Every prompt row is the same random prompt, so all rows stop together; the work per
  step does not depend on the token values.
- decode tokens/s = batch * (new_tokens - 1) / (median total - median prefill).
Peak memory: ``peak_mem_gb`` = XLA's memory analysis of the compiled generation program (arguments, i.e. the
weights, + outputs + temporaries incl. the KV cache - aliased): what the program needs on the device.
``process_peak_gb`` = the worker process's peak device allocation (``memory_stats``) after that batch's runs; it only
rises within a process (formats in one worker run one after another; the load-time layout conversion counts too).

Correctness guard (batch 1): the prefill's last-position logits (the ones that pick the first token; M = prompt
length) and one decode step's logits (M = 1) of the quantized model on its dispatched path, against the same model
with every quantized weight replaced by its dense bf16 dequantization (plain XLA matmuls): relative Frobenius error
below ``--tol`` and the same argmax. It catches gross errors (an unwritten output tile, NaN); it is not a precise
kernel check: 32 layers of bf16 rounding amplify per-call differences to a few percent of the logits (measured on the
CPU, bench/results/decode.md), so the per-call checks of bench/kernels.py (rel err < 1e-2 at every shape) are the
precise ones.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (kind, options). Formats are built from random codes in their stored layouts.
FORMATS = {
    "bf16": ("dense", {}),
    "gptq-w4g128": ("gptq", dict(bits=4, group=128)),
    "gptq-w3g128": ("gptq", dict(bits=3, group=128)),
    "squeezellm-w4": ("lut", dict(bits=4)),
    "squeezellm-w3": ("lut", dict(bits=3)),
    # SpQR near 3.9 bits: 3-bit codes, groups of 16, 3-bit statistics in groups of 16, ~0.86% fp16 outliers
    # (paper accounting: 3 + 6/16 + 64/256 + 32 * 0.0086 = 3.9), act-order permutation.
    "spqr-w3g16": ("spqr", dict(bits=3, group=16, qq_bits=3, qq_group=16, outliers=0.0086)),
}
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                num_kv_heads=32, head_dim=128)
TINY = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=4,
            head_dim=64)
WEIGHT_STD = 0.02


def log(*a):
    print(*a, flush=True)


# -------------------------------------------------------------------------------------------------- model builder
def model_config(dims: dict, max_positions: int = 2048):
    import models.llama as llama

    return llama.LlamaConfig(**dims, max_position_embeddings=max_positions)


def _random_bits(key, shape) -> jax.Array:
    """int32 words with every bit random: valid packed codes for any bit width (3-bit packing uses all 96 bits of
    three words), so packed layouts can be drawn directly."""
    return jax.lax.bitcast_convert_type(jax.random.bits(key, shape, jnp.uint32), jnp.int32)


def random_gptq(key, K, N, bits, group):
    """UniformQuantizedWeight (AutoGPTQ layout) from random packed codes / zeros and float16 scales."""
    from jaxquant.formats import UniformQuantizedWeight

    G = -(-K // group)
    k1, k2, k3 = jax.random.split(key, 3)
    # |code - zero| ~ 2**bits / 2.4 on average: scales that give dequantized weights of std ~ WEIGHT_STD.
    scale = WEIGHT_STD / (0.41 * 2**bits)
    return UniformQuantizedWeight(
        qweight=_random_bits(k1, (K * bits // 32, N)), qzeros=_random_bits(k2, (G, N * bits // 32)),
        scales=(jax.random.uniform(k3, (G, N), jnp.float32, 0.5, 1.5) * scale).astype(jnp.float16),
        g_idx=jnp.arange(K, dtype=jnp.int32) // group, bits=bits, group_size=group, sym=False, in_features=K,
        out_features=N)


def random_lut(key, K, N, bits):
    """LUTQuantizedWeight (SqueezeLLM, dense-only: no sparse part) from random packed codes and sorted tables."""
    from jaxquant.formats_lut import LUTQuantizedWeight

    k1, k2 = jax.random.split(key)
    lut = jnp.sort(jax.random.normal(k2, (N, 2**bits), jnp.float32) * WEIGHT_STD * 1.5, axis=1)
    return LUTQuantizedWeight(qweight=_random_bits(k1, (K * bits // 32, N)), lut=lut.astype(jnp.float16),
                              row_ptr=jnp.zeros(N + 1, jnp.int32), col_idx=jnp.zeros(0, jnp.int16),
                              values=jnp.zeros(0, jnp.float16), bits=bits, in_features=K, out_features=N)


def random_spqr(key, K, N, bits, group, qq_bits, qq_group, outliers):
    """SpQRWeight from random packed codes and statistics, ``outliers`` of the weights as fp16 CSR entries (the same
    count in every output row, one per stratum of columns: sorted and unique), a random act-order permutation."""
    from jaxquant.formats_spqr import SpQRWeight

    G = K // group
    ks = jax.random.split(key, 8)
    per_row = max(1, round(outliers * K))
    stride = K // per_row
    cols = (jnp.arange(per_row, dtype=jnp.int32)[None, :] * stride
            + jax.random.randint(ks[0], (N, per_row), 0, stride, jnp.int32)).reshape(-1)
    idx_dtype = jnp.int16 if K <= 2**15 else jnp.int32
    # Statistics: scale = s_s * (code - z_s) in [1, 8] * s_s > 0; zero = s_z * (code - z_z) = code in [0, 7].
    scale_step = WEIGHT_STD / (0.41 * 2**bits) / 4.5
    stat = lambda value, zero: jnp.stack([jnp.full((G, N // qq_group), value, jnp.float32),
                                          jnp.full((G, N // qq_group), zero, jnp.float32)], axis=-1).astype(jnp.float16)
    return SpQRWeight(
        qweight=_random_bits(ks[1], (K * bits // 32, N)),
        scale_codes=_random_bits(ks[2], (G, N * qq_bits // 32)), zero_codes=_random_bits(ks[3], (G, N * qq_bits // 32)),
        scale_qq=stat(scale_step, -1.0), zero_qq=stat(1.0, 0.0),
        row_ptr=jnp.arange(N + 1, dtype=jnp.int32) * per_row, col_idx=cols.astype(idx_dtype),
        values=(jax.random.normal(ks[6], (N * per_row,), jnp.float32) * WEIGHT_STD * 3).astype(jnp.float16),
        perm=jax.random.permutation(ks[7], K).astype(idx_dtype),
        bits=bits, group_size=group, qq_scale_bits=qq_bits, qq_zero_bits=qq_bits, qq_groupsize=qq_group,
        in_features=K, out_features=N)


def random_weight(key, fmt: str, K: int, N: int):
    kind, opt = FORMATS[fmt]
    if kind == "dense":
        return (jax.random.normal(key, (K, N), jnp.float32) * WEIGHT_STD).astype(jnp.bfloat16)
    if kind == "gptq":
        return random_gptq(key, K, N, opt["bits"], opt["group"])
    if kind == "lut":
        return random_lut(key, K, N, opt["bits"])
    if kind == "spqr":
        return random_spqr(key, K, N, opt["bits"], opt["group"], opt["qq_bits"], opt["qq_group"], opt["outliers"])
    raise ValueError(f"unknown format {fmt!r}; choose from {sorted(FORMATS)}")


def build_model(fmt: str, key, dims: dict = LLAMA_7B, convert: bool = True):
    """(module, params): a bf16 LLaMA with random weights, every decoder-layer linear in format ``fmt``, built on the
    default device. ``convert``: run ``prepare_for_kernels`` on each layer right after building it (the kernels'
    layouts where supported; one layer's conversion temporaries at a time)."""
    import models.llama as llama

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(FORMATS)}")
    cfg = model_config(dims)
    module = llama.LlamaForCausalLM(cfg, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    prepare = None
    if convert and FORMATS[fmt][0] != "dense":
        from jaxquant.kernel_layout import prepare_for_kernels as prepare

    params = {}
    for i, (name, sub) in enumerate(sorted(shapes.items())):
        sub_key = jax.random.fold_in(key, i)

        def leaf(path, s, sub_key=sub_key, layer=name.startswith("layers_")):
            names = [getattr(p, "key", "") for p in path]
            k = jax.random.fold_in(sub_key, zlib.crc32("/".join(names).encode()) % (2**31))
            if names[-1] == "scale":  # norm scales
                return jnp.ones(s.shape, s.dtype)
            if layer and names[-1] == "kernel":
                return random_weight(k, fmt, *s.shape)
            return (jax.random.normal(k, s.shape, jnp.float32) * WEIGHT_STD).astype(s.dtype)

        built = jax.tree_util.tree_map_with_path(leaf, sub)
        params[name] = prepare(built) if (prepare is not None and name.startswith("layers_")) else built
    return module, params


def _is_weight(x) -> bool:
    return hasattr(x, "matmul") and hasattr(x, "in_features")


def weight_classes(params) -> list:
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_weight)
    return sorted({type(l).__name__ for l in leaves if _is_weight(l)})


def params_bytes(params) -> int:
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_weight)
    return int(sum(l.nbytes if _is_weight(l) else l.size * l.dtype.itemsize for l in leaves))


def quantized_avg_bits(params) -> float | None:
    leaves = [l for l in jax.tree_util.tree_leaves(params, is_leaf=_is_weight) if _is_weight(l)]
    if not leaves:
        return None
    return 8 * sum(l.nbytes for l in leaves) / sum(l.in_features * l.out_features for l in leaves)


def dense_reference(params):
    """Every quantized weight -> its dense bf16 dequantization (the model then runs plain XLA matmuls)."""
    return jax.tree_util.tree_map(lambda l: l.dequantize(jnp.float32).astype(jnp.bfloat16) if _is_weight(l) else l,
                                  params, is_leaf=_is_weight)


def path_label(classes: list) -> str:
    kernels = [c for c in classes if "Kernel" in c]
    if not classes:
        return "bf16 XLA matmul"
    if kernels and len(kernels) == len(classes):
        return "pallas kernel (M<=64; XLA dequant+matmul above)"
    return "XLA dequant+matmul (no kernel)" if not kernels else "mixed"


# ----------------------------------------------------------------------------------------------------- generation
def compile_generate(module, params, batch: int, prompt_len: int, new_tokens: int):
    """AOT-compiled models.generate._generate for this batch / prompt / length: (compiled, args builder)."""
    from models.generate import _generate

    ids = jnp.zeros((batch, prompt_len), jnp.int32)
    mask = jnp.ones((batch, prompt_len), bool)
    lowered = _generate.lower(module, params, ids, mask, jax.random.PRNGKey(0), jnp.float32(1e-6), jnp.float32(1.0),
                              jnp.int32(-1), max_new_tokens=new_tokens, greedy=True, cache_dtype=jnp.bfloat16)
    return lowered.compile()


def program_peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:
        return None


def peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def time_generate(compiled, params, prompt, batch: int, new_tokens: int, reps: int):
    """(median total s, median prefill s, first token, steps of the full run). See the module docstring."""
    ids = jnp.asarray(np.tile(np.asarray(prompt, np.int32)[None], (batch, 1)))
    mask = jnp.ones(ids.shape, bool)
    fixed = (jax.random.PRNGKey(0), jnp.float32(1e-6), jnp.float32(1.0))

    def run(eos):
        t0 = time.perf_counter()
        out, steps = compiled(params, ids, mask, *fixed, jnp.int32(eos))
        out, steps = np.asarray(out), int(steps)
        return time.perf_counter() - t0, out, steps

    _, out, steps = run(-1)  # warm-up
    first = int(out[0, 0])
    if not (out[:, 0] == first).all():
        raise RuntimeError(f"identical prompt rows gave different first tokens {out[:, 0]}")
    _, _, stop_steps = run(first)
    if stop_steps != 1:
        raise RuntimeError(f"eos = first token should stop the loop after the prefill, ran {stop_steps} steps")
    total, prefill = [], []
    for _ in range(reps):
        t, _, s = run(-1)
        total.append(t)
        prefill.append(run(first)[0])
        assert s == new_tokens, (s, new_tokens)
    return statistics.median(total), statistics.median(prefill), first, steps


def guard_logits(module, params, ids, token):
    """(prefill last-position logits [B, V], one decode step's logits [B, V]) with a KV cache, jitted."""
    from models.common import init_cache

    @jax.jit
    def f(params, ids, token):
        b, t = ids.shape
        cfg = module.config
        cache = init_cache(cfg.num_layers, b, t + 1, *cfg.kv_cache_shape, jnp.bfloat16)
        kv_mask = jnp.ones((b, t + 1), bool)
        apply = lambda *a, **k: module.apply({"params": params}, *a, **k)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        logits, cache = apply(ids, pos, cache=cache, cache_index=0, kv_mask=kv_mask)
        step, _ = apply(token[:, None], jnp.full((b, 1), t), cache=cache, cache_index=t, kv_mask=kv_mask)
        return logits[:, -1], step[:, -1]

    return f(params, ids, token)


def check_against_reference(module, params, prompt, key, tol):
    """Guard numbers (module docstring): dict with rel errors, argmax agreement, pass flag."""
    ids = jnp.asarray(prompt, jnp.int32)[None]
    token = jax.random.randint(key, (1,), 0, module.config.vocab_size, jnp.int32)
    got = [np.asarray(a, np.float64) for a in guard_logits(module, params, ids, token)]
    ref_params = dense_reference(params)
    ref = [np.asarray(a, np.float64) for a in guard_logits(module, ref_params, ids, token)]
    del ref_params
    out = {}
    ok = True
    for name, g, r in zip(("prefill", "decode_step"), got, ref):
        err = float(np.linalg.norm(g - r) / np.linalg.norm(r))
        same_argmax = bool((g.argmax(-1) == r.argmax(-1)).all())
        finite = bool(np.isfinite(g).all())
        out[f"{name}_rel_err"] = float(f"{err:.3g}")
        out[f"{name}_argmax_same"] = same_argmax
        ok &= finite and err < tol and same_argmax
    out["guard_ok"] = bool(ok)
    return out


# --------------------------------------------------------------------------------------------------------- worker
def run_format(fmt, batches, prompt_len, new_tokens, reps, tol, dims, seed, rows_path, guard=True,
               command=None, run_id=None):
    """One format in this process: build, convert, time each batch, guard; appends JSON lines to rows_path."""
    from jaxquant import results

    def row(**fields):
        r = results.row("decode", run_id=run_id, **fields)
        if command:
            r["command"] = command
        return r

    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    module, params = build_model(fmt, key, dims)
    jax.block_until_ready(params)
    build_s = time.perf_counter() - t0
    classes = weight_classes(params)
    info = dict(format=fmt, model_shape="llama-7b" if dims == LLAMA_7B else json.dumps(dims), weight_classes=classes,
                path=path_label(classes), params_gb=params_bytes(params) / 1e9, avg_bits=quantized_avg_bits(params),
                build_s=round(build_s, 1), load_peak_gb=None)
    peak = peak_device_bytes()
    info["load_peak_gb"] = None if peak is None else round(peak / 1e9, 3)
    log(f"[{fmt}] built in {build_s:.1f} s: {classes}, {info['params_gb']:.2f} GB params, "
        f"avg bits {info['avg_bits']}, peak so far {info['load_peak_gb']} GB")
    prompt = np.asarray(jax.random.randint(jax.random.fold_in(key, 7), (prompt_len,), 0, module.config.vocab_size))
    rows = []
    for batch in batches:
        try:
            t0 = time.perf_counter()
            compiled = compile_generate(module, params, batch, prompt_len, new_tokens)
            compile_s = time.perf_counter() - t0
            total, prefill, first, steps = time_generate(compiled, params, prompt, batch, new_tokens, reps)
            decode_s = total - prefill
            peak = peak_device_bytes()
            prog = program_peak_bytes(compiled)
            r = dict(info, what="generate",
                     batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, reps=reps,
                     total_s=round(total, 5), prefill_s=round(prefill, 5), decode_s=round(decode_s, 5),
                     tokens_per_s=round(batch * (new_tokens - 1) / decode_s, 2),
                     ms_per_step=round(1e3 * decode_s / (new_tokens - 1), 3),
                     prefill_tokens_per_s=round(batch * prompt_len / prefill, 1),
                     peak_mem_gb=None if prog is None else round(prog / 1e9, 3),
                     process_peak_gb=None if peak is None else round(peak / 1e9, 3), compile_s=round(compile_s, 1))
            del compiled
            log(f"[{fmt}] batch {batch}: {r['tokens_per_s']} tok/s ({r['ms_per_step']} ms/step), prefill "
                f"{prefill * 1e3:.1f} ms, program peak {r['peak_mem_gb']} GB (process {r['process_peak_gb']} GB), "
                f"compile {compile_s:.1f} s")
        except Exception as e:
            log(f"[{fmt}] batch {batch} FAILED:\n{traceback.format_exc()[-3000:]}")
            r = dict(info, what="generate", batch=batch, error=f"{type(e).__name__}: {str(e)[:500]}")
        rows.append(r)
        with open(rows_path, "a") as f:
            f.write(json.dumps(row(**r)) + "\n")
    if guard and FORMATS[fmt][0] != "dense":
        try:
            g = check_against_reference(module, params, prompt, jax.random.fold_in(key, 11), tol)
        except Exception as e:
            log(f"[{fmt}] guard FAILED:\n{traceback.format_exc()[-3000:]}")
            g = {"guard_ok": False, "guard_error": f"{type(e).__name__}: {str(e)[:300]}"}
        log(f"[{fmt}] guard vs dense-bf16 reference (batch 1): {g}")
        with open(rows_path, "a") as f:
            f.write(json.dumps(row(**dict(info, what="guard", batch=1, tol=tol, **g))) + "\n")
    return rows


# ---------------------------------------------------------------------------------------------------------- report
def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(rows):
    """Markdown table; ratios to the bf16 row of the same batch in the same run."""
    gen = [r for r in rows if r.get("what") == "generate"]
    guards = {(r["format"], r.get("model_shape"), r.get("device")): r for r in rows if r.get("what") == "guard"}
    bf16 = {(r.get("run_id"), r["batch"], r.get("model_shape"), r.get("device")): r["tokens_per_s"]
            for r in gen if r["format"] == "bf16" and "tokens_per_s" in r}
    lines = ["| format | path | avg bits | batch | decode tok/s | ms/step | x bf16 | prefill ms | peak GB | "
             "process peak GB | params GB | guard (prefill / step rel err) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in gen:
        g = guards.get((r["format"], r.get("model_shape"), r.get("device")))
        gtxt = "-" if g is None else (
            f"{'ok' if g.get('guard_ok') else 'FAIL'} ({g.get('prefill_rel_err')} / {g.get('decode_step_rel_err')})")
        if "tokens_per_s" not in r:
            lines.append(f"| {r['format']} | {r['path']} | | {r['batch']} | failed: {r.get('error', '')[:80]} "
                         f"| | | | | | | {gtxt} |")
            continue
        same = (r["batch"], r.get("model_shape"), r.get("device"))
        base = bf16.get((r.get("run_id"),) + same)
        others = [v for k, v in bf16.items() if k[1:] == same]
        cross = base is None and bool(others)
        if cross:  # no bf16 row from the same run: ratio to another run's on the same device and model (flagged)
            base = others[0]
        ratio = r["tokens_per_s"] / base if base else None
        r["speedup_vs_bf16"] = None if (ratio is None or cross) else round(ratio, 3)
        bits = "16" if r["avg_bits"] is None else f"{r['avg_bits']:.2f}"
        ratio_text = ("" if ratio is None else f"{ratio:.2f}") + (" (other run)" if cross else "")
        lines.append(f"| {r['format']} | {r['path']} | {bits} | {r['batch']} | {r['tokens_per_s']} | "
                     f"{r['ms_per_step']} | {ratio_text} | "
                     f"{r['prefill_s'] * 1e3:.1f} | "
                     f"{r['peak_mem_gb']} | {r['process_peak_gb']} | {r['params_gb']:.2f} | {gtxt} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help="comma-separated; ';' separates groups, each group runs in its own process")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=65, help="generated tokens (the first from the prefill)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tol", type=float, default=3e-2, help="guard: relative Frobenius error of the logits")
    ap.add_argument("--tiny", action="store_true", help="2 small layers (CPU smoke)")
    ap.add_argument("--no-guard", action="store_true")
    ap.add_argument("--worker", help="internal: run these formats in this process")
    ap.add_argument("--rows", help="internal: JSON-lines file the worker appends to")
    ap.add_argument("--command", help="internal: the parent's command line, recorded in the rows")
    ap.add_argument("--run-id", help="internal: the parent's start time (UTC), recorded in the rows")
    ap.add_argument("--worker-timeout", type=int, default=400)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --out-dir/decode.json (a row with the same format, batch, kind, "
                         "model shape and device is replaced)")
    args = ap.parse_args()
    dims = TINY if args.tiny else LLAMA_7B
    batches = [int(b) for b in args.batches.split(",") if b]
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "little")
    run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.worker:
        log(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, seed {seed}")
        for fmt in args.worker.split(","):
            run_format(fmt, batches, args.prompt_len, args.new_tokens, args.reps, args.tol, dims, seed, args.rows,
                       guard=not args.no_guard, command=args.command, run_id=args.run_id or run_id)
        return
    # Parent: never touches the device; one worker process per group of formats (a crash or timeout stops only its
    # group; process_peak_gb is per process).
    from jaxquant.results import command_line

    os.makedirs(args.out_dir, exist_ok=True)
    rows_path = os.path.join(args.out_dir, "decode_rows.jsonl")
    if os.path.exists(rows_path):
        os.remove(rows_path)
    command = command_line()
    kept = []
    if args.append and os.path.exists(os.path.join(args.out_dir, "decode.json")):
        with open(os.path.join(args.out_dir, "decode.json")) as f:
            kept = json.load(f)

    def all_rows():
        new = read_rows(rows_path)
        ident = lambda r: (r["format"], r["batch"], r["what"], r.get("model_shape"), r.get("device"))
        keys = {ident(r) for r in new}
        return [r for r in kept if ident(r) not in keys] + new

    for group in [g for g in args.formats.split(";") if g]:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", group, "--rows", rows_path, "--batches",
               args.batches, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--reps",
               str(args.reps), "--tol", str(args.tol), "--seed", str(seed), "--command", command,
               "--run-id", run_id] + \
              (["--tiny"] if args.tiny else []) + (["--no-guard"] if args.no_guard else [])
        log(f"--- {group}")
        try:
            subprocess.run(cmd, timeout=args.worker_timeout, check=False)
        except subprocess.TimeoutExpired:
            log(f"[{group}] worker timed out after {args.worker_timeout} s")
        write_outputs(all_rows(), args.out_dir)
    for line in summarize(all_rows()):
        log(line)


NOTES_MARK = "<!-- notes (kept when the table is rewritten) -->"


def write_outputs(rows, out_dir):
    """decode.json (all rows) and decode.md (one line per run, the table; text after NOTES_MARK is kept)."""
    lines = summarize(rows)  # also fills speedup_vs_bf16
    with open(os.path.join(out_dir, "decode.json"), "w") as f:
        json.dump(rows, f, indent=1)
    runs = {}
    for r in rows:
        runs.setdefault(r.get("run_id"), r)
    head = ["# Decode: LLaMA-7B-shaped model, random weights, jitted generation with a KV cache", "",
            "Method: `bench/decode.py` docstring. Runs (each row's `run_id`):", ""]
    head += [f"- {rid}: {r.get('device', '?')}, jax {r.get('jax', '?')}, {r.get('date', '?')}; command: "
             f"`{r.get('command', '?')}`" for rid, r in runs.items()] + [""]
    md = os.path.join(out_dir, "decode.md")
    notes = ""
    if os.path.exists(md):
        text = open(md).read()
        if NOTES_MARK in text:
            notes = text[text.index(NOTES_MARK):]
    with open(md, "w") as f:
        f.write("\n".join(head + lines) + "\n" + ("\n" + notes if notes else ""))


if __name__ == "__main__":
    main()
