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

Formats: ``--formats`` names from ``FORMATS``, each optionally with ``+fused``: q/k/v and gate/up fused into one
linear each at build time (``jaxquant.fusion.fuse_projections`` on the stored weights, before the kernel conversion),
so a layer makes 4 linear calls instead of 7. Ratios ("x bf16") are to the faster of bf16 and bf16+fused of the same
run and batch. ``--profile``: CUPTI device time of the decode step of every batch by kernel (the whole generation's
kernels minus the prefill-only run's, per step) and the gap to the wall-clock step time (launches, the loop's host
sync).

Correctness guard (batch 1; ``accuracy_guard``). Oracle: the *stored* quantized weights (before fusion and kernel
conversion) dequantized in float32, float32 activations, full-precision float32 matmuls. Two checks:
- per linear (``--linear-tol``, 1e-2 as in bench/kernels.py): every quantized linear of the dispatched model on its
  real input (the prefill's rows, and the last row alone = the decode step's M = 1 dispatch) vs x @ W_oracle. This is
  the precise check: it sees one call's error, not 32 layers' amplification. The bf16 XLA matmul with the same
  converted bf16 weights is measured beside it.
- model level (``--model-factor``): the prefill's last logits and one decode step's logits of the dispatched path vs
  the float32 oracle must be within ``model_factor`` x the error of the dense-bf16 XLA reference (same bf16 weights,
  plain XLA matmuls) vs the same oracle. A random 32-layer model amplifies any per-call rounding to a few per cent of
  the logits (bench/results/decode.md: the bf16 model vs its own float32 copy, no quantization), so a fixed logits
  tolerance either never fails or always does; the bf16 reference's own distance to the oracle is the measured
  noise of this model in bf16.
``--corrupt-check`` runs the same guard on two deliberately damaged kernel weights (one 64-column output tile reading
zeros; one group's scales x 1.5) against the intact references: both must FAIL. The bf16 row's guard is the noise
floor (bf16 model vs its float32 copy).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
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


_T0 = time.time()


def log(*a):
    print(f"[{time.time() - _T0:6.1f}s]", *a, flush=True)


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


def random_spqr(key, K, N, bits, group, qq_bits, qq_group, outliers, perm_key=None):
    """SpQRWeight from random packed codes and statistics, ``outliers`` of the weights as fp16 CSR entries (the same
    count in every output row, one per stratum of columns: sorted and unique), a random act-order permutation drawn
    from ``perm_key`` (linears that read the same input share it, as one Hessian gives them one order)."""
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
        perm=jax.random.permutation(ks[7] if perm_key is None else perm_key, K).astype(idx_dtype),
        bits=bits, group_size=group, qq_scale_bits=qq_bits, qq_zero_bits=qq_bits, qq_groupsize=qq_group,
        in_features=K, out_features=N)


def random_weight(key, fmt: str, K: int, N: int, perm_key=None):
    kind, opt = FORMATS[fmt]
    if kind == "dense":
        return (jax.random.normal(key, (K, N), jnp.float32) * WEIGHT_STD).astype(jnp.bfloat16)
    if kind == "gptq":
        return random_gptq(key, K, N, opt["bits"], opt["group"])
    if kind == "lut":
        return random_lut(key, K, N, opt["bits"])
    if kind == "spqr":
        return random_spqr(key, K, N, opt["bits"], opt["group"], opt["qq_bits"], opt["qq_group"], opt["outliers"],
                           perm_key)
    raise ValueError(f"unknown format {fmt!r}; choose from {sorted(FORMATS)}")


def parse_format(spec: str):
    """"gptq-w4g128" -> ("gptq-w4g128", False); "gptq-w4g128+fused" -> (.., True): q/k/v and gate/up fused."""
    base, plus, suffix = spec.partition("+")
    if base not in FORMATS or (plus and suffix != "fused"):
        raise ValueError(f"unknown format {spec!r}; choose from {sorted(FORMATS)}, each optionally with '+fused'")
    return base, bool(plus)


# Linears that read the same input (one Hessian, so one act-order permutation): the fusion groups.
_INPUT_GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def build_model(spec: str, key, dims: dict = LLAMA_7B, convert: bool = True, keep_stored: bool = False):
    """(module, params, stored, fusion report): a bf16 LLaMA with random weights, every decoder-layer linear in
    format ``spec`` (``parse_format``), built on the default device layer by layer: random stored weights ->
    ``jaxquant.fusion.fuse_projections`` (``+fused``) -> ``prepare_for_kernels`` (``convert``; the kernels' layouts
    where supported). ``stored``: the unfused, unconverted params (``keep_stored``; the guard's float32 oracle) or
    None. Weights are drawn from ``key`` and the unfused linear's name, so a format fused and unfused holds the same
    values."""
    import models.llama as llama
    from jaxquant.fusion import fuse_projections

    fmt, fuse = parse_format(spec)
    cfg = model_config(dims)
    module = llama.LlamaForCausalLM(cfg, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    prepare = None
    if convert and FORMATS[fmt][0] != "dense":
        from jaxquant.kernel_layout import prepare_for_kernels as prepare

    params, stored, report = {}, ({} if keep_stored else None), {"fused": [], "skipped": {}}
    for i, (name, sub) in enumerate(sorted(shapes.items())):
        sub_key = jax.random.fold_in(key, i)

        def leaf(path, s, sub_key=sub_key, layer=name.startswith("layers_")):
            names = [getattr(p, "key", "") for p in path]
            k = jax.random.fold_in(sub_key, zlib.crc32("/".join(names).encode()) % (2**31))
            if names[-1] == "scale":  # norm scales
                return jnp.ones(s.shape, s.dtype)
            if layer and names[-1] == "kernel":
                group = "/".join([names[0], _INPUT_GROUPS.get(names[1], names[1])])
                perm_key = jax.random.fold_in(sub_key, zlib.crc32(group.encode()) % (2**31))
                return random_weight(k, fmt, *s.shape, perm_key=perm_key)
            return (jax.random.normal(k, s.shape, jnp.float32) * WEIGHT_STD).astype(s.dtype)

        built = jax.tree_util.tree_map_with_path(leaf, sub)
        if keep_stored:
            stored[name] = built
        if fuse and name.startswith("layers_"):
            fused, rep = fuse_projections({name: built})
            built = fused[name]
            report["fused"] += rep["fused"]
            report["skipped"].update(rep["skipped"])
        params[name] = prepare(built) if (prepare is not None and name.startswith("layers_")) else built
    return module, params, stored, report


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


def steps_per_check() -> int:
    from models.generate import STEPS_PER_CHECK

    return STEPS_PER_CHECK


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
    """(median total s, median prefill s, first token, steps of the full run, every total s). See the module
    docstring."""
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
    return statistics.median(total), statistics.median(prefill), first, steps, total


@functools.partial(jax.jit, static_argnums=(0, 4))
def guard_forward(module, params, ids, token, highest: bool):
    """Prefill last-position logits [B, V]; one decode step's logits [B, V] (KV cache in the module's dtype) as
    dispatched (the Pallas decode-attention kernel on GPU) and the same step with XLA's attention, both from the one
    prefill's cache; the prefill's linear inputs (the ``intermediates`` Linear sows). ``highest``: float32 matmuls
    at full precision (on the GPU the default lets XLA use TF32), for the float32 oracle."""
    from models.common import init_cache, xla_decode_attention

    with (jax.default_matmul_precision("highest") if highest else contextlib.nullcontext()):
        b, t = ids.shape
        cfg = module.config
        cache = init_cache(cfg.num_layers, b, t + 1, *cfg.kv_cache_shape, module.dtype)
        kv_mask = jnp.ones((b, t + 1), bool)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        (logits, cache), state = module.apply({"params": params}, ids, pos, cache=cache, cache_index=0,
                                              kv_mask=kv_mask, mutable=["intermediates"])

        def step():
            out, _ = module.apply({"params": params}, token[:, None], jnp.full((b, 1), t), cache=cache,
                                  cache_index=t, kv_mask=kv_mask)
            return out[:, -1]

        dispatched = step()
        with xla_decode_attention():  # read while this function is traced
            with_xla_attention = step()
    return logits[:, -1], dispatched, with_xla_attention, state["intermediates"]


@jax.jit
def _dequantize_f32(w):
    return w.dequantize(jnp.float32)


def oracle_params(stored):
    """The stored (unfused, unconverted) params in float32: quantized weights dequantized exactly (float32
    arithmetic of the stored codes / scales / tables), bf16 arrays widened."""
    return jax.tree_util.tree_map(lambda l: _dequantize_f32(l) if _is_weight(l) else l.astype(jnp.float32), stored,
                                  is_leaf=_is_weight)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _first_linear_inputs(inter, num_layers):
    """Each layer's attention input (the input of q_proj or of the fused qkv_proj), [L, T, H] float64."""
    out = []
    for i in range(num_layers):
        attn = inter[f"layers_{i}"]["self_attn"]
        out.append(np.asarray((attn["qkv_proj"] if "qkv_proj" in attn else attn["q_proj"])["inputs"][0][0],
                              np.float64))
    return np.stack(out)


@jax.jit
def _linear_errors(x, w, w_oracle):
    """Relative Frobenius errors vs x @ w_oracle (float32, full precision) of the dispatched product (kernel on the
    GPU) and of XLA's bf16 matmul with the same dequantized bf16 weight (what the dense-bf16 reference runs)."""
    ref = jnp.matmul(x.astype(jnp.float32), w_oracle, precision=jax.lax.Precision.HIGHEST)
    got = w.matmul(x).astype(jnp.float32)
    xla = jnp.matmul(x, w.dequantize(jnp.float32).astype(x.dtype)).astype(jnp.float32)
    err = lambda y: jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)  # noqa: E731
    return err(got), err(xla), jnp.all(jnp.isfinite(got))


_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def per_linear_check(params, stored, inter, rows=(None, 1)):
    """Every quantized linear of ``params`` on its real prefill input (from ``inter``; all prompt rows, then the last
    row alone = the decode-step M = 1 dispatch) vs the float32 oracle of its stored weights (a fused linear: its
    stored parts side by side). Returns {"kernel": [...], "xla_bf16": [...], "finite", "worst"}."""
    errs, xla_errs, finite, names = [], [], True, []
    for layer in sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1])):
        for parent, subs in params[layer].items():
            for name, sub in subs.items():
                w = sub.get("kernel") if isinstance(sub, dict) else None
                if not _is_weight(w):
                    continue
                parts = [stored[layer][parent][n]["kernel"] for n in _FUSED_PARTS.get(name, (name,))]
                oracle = jnp.concatenate([_dequantize_f32(p) for p in parts], axis=1)
                x = inter[layer][parent][name]["inputs"][0]
                x2d = x.reshape(-1, x.shape[-1])
                for r in rows:
                    e, ex, fin = _linear_errors(x2d if r is None else x2d[-r:], w, oracle)
                    errs.append(float(e))
                    xla_errs.append(float(ex))
                    finite &= bool(fin)
                    names.append(f"{layer}/{parent}/{name} M={x2d.shape[0] if r is None else r}")
                del oracle
    worst = int(np.argmax(errs)) if errs else None
    return {"kernel": errs, "xla_bf16": xla_errs, "finite": finite, "worst": None if worst is None else names[worst]}


def _corrupt(params, layer: str, parent: str, name: str, how: str):
    """A copy of ``params`` with one kernel-layout linear's scales damaged, as a kernel bug would (the guard's
    references keep the intact weights): "tile" zeroes the scales of output columns 0..63 (those outputs read 0, as
    an unwritten output tile would), "group" multiplies one group's scales by 1.5."""
    sub = params[layer][parent]
    key = name if name in sub else next(k for k, v in _FUSED_PARTS.items() if name in v and k in sub)
    w = sub[key]["kernel"]
    scales = w.scales.at[:, :64].set(0) if how == "tile" else w.scales.at[w.scales.shape[0] // 2].multiply(1.5)
    bad = dataclasses.replace(w, scales=scales)
    out = dict(params)
    out[layer] = dict(params[layer], **{parent: dict(sub, **{key: dict(sub[key], kernel=bad)})})
    return out


def accuracy_guard(module, params, stored, prompt, key, linear_tol=1e-2, model_factor=2.0, corrupt=False):
    """The correctness guard (module docstring): per-linear check on real activations against the float32 oracle,
    plus the model-level logits of the dispatched path, of the dense-bf16 XLA reference (same bf16 weights) and of
    the float32 oracle (stored weights, float32 activations). Returns (guard dict, [corrupted guard dicts])."""
    cfg = module.config
    ids = jnp.asarray(prompt, jnp.int32)[None]
    token = jax.random.randint(key, (1,), 0, cfg.vocab_size, jnp.int32)
    f32_module = module.clone(dtype=jnp.float32)
    oracle = oracle_params(stored)
    o_pre, _, o_step, o_inter = guard_forward(f32_module, oracle, ids, token, True)  # the oracle: XLA attention
    o_layers = _first_linear_inputs(o_inter, cfg.num_layers)
    del oracle, o_inter
    quantized = bool(weight_classes(params))
    if quantized:
        ref = dense_reference(params)
        x_pre, _, x_step, x_inter = guard_forward(module, ref, ids, token, False)  # XLA matmuls and attention
        x_layers = _first_linear_inputs(x_inter, cfg.num_layers)
        del ref, x_inter
    out_o = (o_pre, o_step)

    def evaluate(p):
        g_pre, g_step, xa_step, g_inter = guard_forward(module, p, ids, token, False)
        g = {}
        for name, got, want in (("prefill", g_pre, o_pre), ("decode_step", g_step, o_step)):
            g[f"{name}_rel_err_vs_f32"] = float(f"{_rel(got, want):.3g}")
            g[f"{name}_argmax_same_as_f32"] = bool((np.asarray(got).argmax(-1) == np.asarray(want).argmax(-1)).all())
        g["layer_input_rel_err_vs_f32"] = [float(f"{v:.3g}") for v in
                                           np.linalg.norm((_first_linear_inputs(g_inter, cfg.num_layers) - o_layers)
                                                          .reshape(cfg.num_layers, -1), axis=1)
                                           / np.linalg.norm(o_layers.reshape(cfg.num_layers, -1), axis=1)]
        finite = bool(np.isfinite(np.asarray(g_pre)).all() and np.isfinite(np.asarray(g_step)).all())
        # the decode step as dispatched (the Pallas attention kernel on GPU) vs the same weights with XLA attention
        g["decode_step_rel_err_vs_f32_xla_attention"] = float(f"{_rel(xa_step, o_step):.3g}")
        g["decode_step_rel_err_vs_xla_attention"] = float(f"{_rel(g_step, xa_step):.3g}")
        g["attention_ok"] = bool(finite and g["decode_step_rel_err_vs_f32"]
                                 <= model_factor * g["decode_step_rel_err_vs_f32_xla_attention"])
        if not quantized:  # the bf16 model vs its float32 self: the noise floor; only the attention path is judged
            g["guard_ok"] = g["attention_ok"]
            return g
        for name, got, want in (("prefill", g_pre, x_pre), ("decode_step", g_step, x_step)):
            g[f"{name}_rel_err_vs_bf16_xla"] = float(f"{_rel(got, want):.3g}")
        for name, got in (("prefill", x_pre), ("decode_step", x_step)):
            g[f"bf16_xla_{name}_rel_err_vs_f32"] = float(f"{_rel(got, out_o[0 if name == 'prefill' else 1]):.3g}")
        g["bf16_xla_layer_input_rel_err_vs_f32"] = [
            float(f"{v:.3g}") for v in np.linalg.norm((x_layers - o_layers).reshape(cfg.num_layers, -1), axis=1)
            / np.linalg.norm(o_layers.reshape(cfg.num_layers, -1), axis=1)]
        lin = per_linear_check(p, stored, g_inter)
        del g_inter
        g.update(linear_max_rel_err=float(f"{max(lin['kernel']):.3g}"),
                 linear_median_rel_err=float(f"{np.median(lin['kernel']):.3g}"),
                 linear_worst=lin["worst"], linear_checks=len(lin["kernel"]),
                 bf16_xla_linear_max_rel_err=float(f"{max(lin['xla_bf16']):.3g}"),
                 bf16_xla_linear_median_rel_err=float(f"{np.median(lin['xla_bf16']):.3g}"))
        linear_ok = lin["finite"] and max(lin["kernel"]) < linear_tol
        model_ok = finite and all(g[f"{n}_rel_err_vs_f32"] <= model_factor * g[f"bf16_xla_{n}_rel_err_vs_f32"]
                                  for n in ("prefill", "decode_step"))
        g.update(linear_ok=bool(linear_ok), model_ok=bool(model_ok),
                 guard_ok=bool(linear_ok and model_ok and g["attention_ok"]),
                 linear_tol=linear_tol, model_factor=model_factor)
        return g

    guard = evaluate(params)
    corrupted = []
    if corrupt and quantized and hasattr(next(iter(_linear_leaves(params))), "scales"):
        mid = f"layers_{cfg.num_layers // 2}"
        for how, parent, name in (("tile", "self_attn", "o_proj"), ("group", "mlp", "up_proj")):
            g = evaluate(_corrupt(params, mid, parent, name, how))
            g["corruption"] = f"{how}: {mid}/{parent}/{name}"
            corrupted.append(g)
    return guard, corrupted


def _linear_leaves(params):
    return [l for l in jax.tree_util.tree_leaves(params, is_leaf=_is_weight) if _is_weight(l)]


# ------------------------------------------------------------------------------------------------------- profile
def _category(name: str) -> str:
    n = name.lower()
    if "decode_attention" in n:
        return "pallas decode attention"
    if "mosaic_gpu" in n:
        return "pallas quantized matmul"
    if any(s in n for s in ("nvjet", "gemm", "gemv", "cublas", "cutlass", "xmma", "dot")):
        return "XLA / cuBLAS matmul"
    if "cusparse" in n:
        return "cuSPARSE"
    if "reduce" in n:
        return "reduction fusions"
    return "other fusions (elementwise, pad, slice, copy, scatter)"


def kernel_breakdown(compiled, args_full, args_prefill, steps: int, iterations: int = 3) -> dict:
    """Device time per decode step from CUPTI: every GPU kernel of the whole generation program minus those of the
    prefill-only run (eos = first token), divided by the decode steps; by category and by kernel name."""
    from jax.experimental.mosaic.gpu import profiler

    def per_name(args):
        _, timings = profiler.measure(compiled, aggregate=False, iterations=iterations)(*args)
        runs = timings if iterations > 1 else [timings]
        agg = {}
        for run in runs:
            for name, ms in run:
                c, t = agg.get(name, (0, 0.0))
                agg[name] = (c + 1, t + ms * 1e3 / len(runs))
        return {k: (c / len(runs), t) for k, (c, t) in agg.items()}

    full, pre = per_name(args_full), per_name(args_prefill)
    names = {}
    for k, (c, t) in full.items():
        c0, t0 = pre.get(k, (0, 0.0))
        if c - c0 > 0:
            names[k] = ((c - c0) / steps, (t - t0) / steps)
    cats = {}
    for k, (c, t) in names.items():
        cats[_category(k)] = cats.get(_category(k), 0.0) + t
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:25]
    return {"kernel_us_per_step": round(sum(t for _, t in names.values()), 1),
            "kernels_per_step": round(sum(c for c, _ in names.values()), 1),
            "categories_us_per_step": {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels_per_step": [[k[:60], round(c, 2), round(t, 1)] for k, (c, t) in top]}


# --------------------------------------------------------------------------------------------------------- worker
def run_format(spec, batches, prompt_len, new_tokens, reps, dims, seed, rows_path, guard=True, command=None,
               run_id=None, profile=False, corrupt=False, linear_tol=1e-2, model_factor=2.0):
    """One format in this process: build, convert, time each batch (+ CUPTI breakdown of batch 1's decode step with
    ``profile``), guard; appends JSON lines to rows_path."""
    from jaxquant import results

    def row(**fields):
        r = results.row("decode", run_id=run_id, **fields)
        if command:
            r["command"] = command
        return r

    def write(r):
        with open(rows_path, "a") as f:
            f.write(json.dumps(row(**r)) + "\n")

    fmt, fused = parse_format(spec)
    # The bf16 model's guard is the noise floor (bf16 vs float32, no quantization); its fused twin adds nothing.
    guard = guard and not (fused and FORMATS[fmt][0] == "dense")
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    module, params, stored, fusion = build_model(spec, key, dims, keep_stored=guard)
    jax.block_until_ready(params)
    build_s = time.perf_counter() - t0
    classes = weight_classes(params)
    info = dict(format=spec, model_shape="llama-7b" if dims == LLAMA_7B else json.dumps(dims),
                weight_classes=classes, path=path_label(classes), fused=fused,
                linear_calls_per_layer=sum(len(sub) for layer in [params["layers_0"]]
                                           for parent in ("self_attn", "mlp") for sub in [layer[parent]]),
                params_gb=params_bytes(params) / 1e9, avg_bits=quantized_avg_bits(params), build_s=round(build_s, 1))
    if fused and fusion["skipped"]:
        info["fusion_skipped"] = dict(list(fusion["skipped"].items())[:4])
    peak = peak_device_bytes()
    info["load_peak_gb"] = None if peak is None else round(peak / 1e9, 3)
    log(f"[{spec}] built in {build_s:.1f} s: {classes}, {info['params_gb']:.2f} GB params, avg bits "
        f"{info['avg_bits']}, {info['linear_calls_per_layer']} linears per layer (fused {len(fusion['fused'])}, "
        f"skipped {len(fusion['skipped'])}), peak so far {info['load_peak_gb']} GB")
    prompt = np.asarray(jax.random.randint(jax.random.fold_in(key, 7), (prompt_len,), 0, module.config.vocab_size))
    rows = []
    for batch in batches:
        try:
            t0 = time.perf_counter()
            compiled = compile_generate(module, params, batch, prompt_len, new_tokens)
            compile_s = time.perf_counter() - t0
            total, prefill, first, steps, totals = time_generate(compiled, params, prompt, batch, new_tokens, reps)
            decode_s = total - prefill
            peak = peak_device_bytes()
            prog = program_peak_bytes(compiled)
            r = dict(info, what="generate",
                     batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, reps=reps,
                     total_s=round(total, 5), prefill_s=round(prefill, 5), decode_s=round(decode_s, 5),
                     total_min_s=round(min(totals), 5), total_max_s=round(max(totals), 5),
                     tokens_per_s=round(batch * (new_tokens - 1) / decode_s, 2),
                     ms_per_step=round(1e3 * decode_s / (new_tokens - 1), 3),
                     prefill_tokens_per_s=round(batch * prompt_len / prefill, 1),
                     peak_mem_gb=None if prog is None else round(prog / 1e9, 3),
                     process_peak_gb=None if peak is None else round(peak / 1e9, 3), compile_s=round(compile_s, 1),
                     steps_per_check=steps_per_check())
            log(f"[{spec}] batch {batch}: {r['tokens_per_s']} tok/s ({r['ms_per_step']} ms/step), prefill "
                f"{prefill * 1e3:.1f} ms, program peak {r['peak_mem_gb']} GB (process {r['process_peak_gb']} GB), "
                f"compile {compile_s:.1f} s")
        except Exception as e:
            compiled = None
            log(f"[{spec}] batch {batch} FAILED:\n{traceback.format_exc()[-3000:]}")
            r = dict(info, what="generate", batch=batch, error=f"{type(e).__name__}: {str(e)[:500]}")
        rows.append(r)
        write(r)
        if profile and compiled is not None:
            try:
                ids = jnp.asarray(np.tile(np.asarray(prompt, np.int32)[None], (batch, 1)))
                fixed = (ids, jnp.ones(ids.shape, bool), jax.random.PRNGKey(0), jnp.float32(1e-6), jnp.float32(1.0))
                b = kernel_breakdown(compiled, (params, *fixed, jnp.int32(-1)), (params, *fixed, jnp.int32(first)),
                                     new_tokens - 1)
                b["gap_us_per_step"] = round(r["ms_per_step"] * 1e3 - b["kernel_us_per_step"], 1)
                log(f"[{spec}] profile (batch {batch}, per decode step): {json.dumps(b)}")
                write(dict(info, what="profile", batch=batch, ms_per_step=r["ms_per_step"], **b))
            except Exception:
                log(f"[{spec}] profile FAILED:\n{traceback.format_exc()[-3000:]}")
        del compiled
    if guard:
        t0 = time.perf_counter()
        try:
            g, bad = accuracy_guard(module, params, stored, prompt, jax.random.fold_in(key, 11), linear_tol,
                                    model_factor, corrupt)
        except Exception as e:
            log(f"[{spec}] guard FAILED:\n{traceback.format_exc()[-3000:]}")
            g, bad = {"guard_ok": False, "guard_error": f"{type(e).__name__}: {str(e)[:300]}"}, []
        g["guard_s"] = round(time.perf_counter() - t0, 1)
        log(f"[{spec}] guard (batch 1): {json.dumps(g)}")
        write(dict(info, what="guard", batch=1, **g))
        for b in bad:
            log(f"[{spec}] guard on a deliberately corrupted weight ({b['corruption']}): {json.dumps(b)}")
            write(dict(info, what="guard-corrupted", batch=1, **b))
    return rows


# ---------------------------------------------------------------------------------------------------------- report
def _ident(r):
    return r["format"], r["batch"], r["what"], r.get("model_shape"), r.get("device")


def _is_bf16(r) -> bool:
    return parse_format(r["format"])[0] == "bf16"


def merge_rows(kept: list, new: list) -> list:
    """``kept`` minus the rows a new row replaces (same format, batch, kind, model shape and device), then ``new``.
    A replaced bf16 generate row stays while a kept quantized generate row of its run and batch remains: that row's
    ratio is to its own run's bf16."""
    keys = {_ident(r) for r in new}
    run_batch = lambda r: (r.get("run_id"), r["batch"], r.get("model_shape"), r.get("device"))  # noqa: E731
    live = {run_batch(r) for r in kept
            if r.get("what") == "generate" and not _is_bf16(r) and _ident(r) not in keys}
    return [r for r in kept if _ident(r) not in keys
            or (r.get("what") == "generate" and _is_bf16(r) and run_batch(r) in live)] + list(new)


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _guard_text(g) -> str:
    if g is None:
        return "-"
    if "linear_max_rel_err" in g:  # per-linear vs float32 oracle / model step vs f32 (bf16 XLA's)
        return (f"{'ok' if g.get('guard_ok') else 'FAIL'} ({g['linear_max_rel_err']} / "
                f"{g.get('decode_step_rel_err_vs_f32')} ({g.get('bf16_xla_decode_step_rel_err_vs_f32')}))")
    if "guard_error" in g:
        return f"error: {g['guard_error'][:60]}"
    if g.get("guard_ok") is None:
        return "-"
    return (f"{'ok' if g.get('guard_ok') else 'FAIL'} (old guard vs dense bf16: {g.get('prefill_rel_err')} / "
            f"{g.get('decode_step_rel_err')})")


def _run_time(run_id) -> float:
    """Seconds since the epoch of a run id ("2026-11-23T04:43:08Z", or a minute-precision id with a note after it)."""
    import calendar
    import re

    m = re.match(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d)(?::(\d\d))?", str(run_id or ""))
    return calendar.timegm(tuple(int(v or 0) for v in m.groups()) + (0, 0, 0)) if m else 0.0


def summarize(rows):
    """Markdown tables (generation, guard, profile); ratios to the faster bf16 row (unfused or fused) of the same
    batch in the same run."""
    gen = [r for r in rows if r.get("what") == "generate"]
    # a run's guard (batch 1) vouches for that run's rows only
    guards = {(r.get("run_id"), r["format"], r.get("model_shape"), r.get("device")): r
              for r in rows if r.get("what") == "guard"}
    bf16 = {}
    for r in gen:
        if parse_format(r["format"])[0] == "bf16" and "tokens_per_s" in r:
            k = (r.get("run_id"), r["batch"], r.get("model_shape"), r.get("device"))
            bf16[k] = max(bf16.get(k, 0.0), r["tokens_per_s"])
    lines = ["| run | format | path | avg bits | batch | decode tok/s | ms/step | x bf16 (faster of unfused / fused) | "
             "prefill ms | peak GB | process peak GB | params GB | guard (linear max rel err / step logits rel err "
             "vs f32 (bf16 XLA's)) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in gen:
        gtxt = _guard_text(guards.get((r.get("run_id"), r["format"], r.get("model_shape"), r.get("device"))))
        if "tokens_per_s" not in r:
            lines.append(f"| {r.get('run_id')} | {r['format']} | {r['path']} | | {r['batch']} | failed: "
                         f"{r.get('error', '')[:80]} | | | | | | | {gtxt} |")
            continue
        same = (r["batch"], r.get("model_shape"), r.get("device"))
        base = bf16.get((r.get("run_id"),) + same)
        others = [(k[0], v) for k, v in bf16.items() if k[1:] == same]
        cross = base is None and bool(others)
        if cross:  # no bf16 row from the same run: the nearest run's in time, same device and model (flagged)
            base = min(others, key=lambda kv: abs(_run_time(kv[0]) - _run_time(r.get("run_id"))))[1]
        ratio = r["tokens_per_s"] / base if base else None
        r["speedup_vs_bf16"] = None if (ratio is None or cross) else round(ratio, 3)
        bits = "16" if r["avg_bits"] is None else f"{r['avg_bits']:.2f}"
        ratio_text = ("" if ratio is None else f"{ratio:.2f}") + (" (other run)" if cross else "")
        lines.append(f"| {r.get('run_id')} | {r['format']} | {r['path']} | {bits} | {r['batch']} | "
                     f"{r['tokens_per_s']} | "
                     f"{r['ms_per_step']} | {ratio_text} | "
                     f"{r['prefill_s'] * 1e3:.1f} | "
                     f"{r['peak_mem_gb']} | {r['process_peak_gb']} | {r['params_gb']:.2f} | {gtxt} |")
    new_guards = [r for r in rows if r.get("what") in ("guard", "guard-corrupted") and "prefill_rel_err_vs_f32" in r]
    if new_guards:
        lines += ["", "Guard (batch 1; relative Frobenius errors; oracle = the stored weights in float32 with float32 "
                  "activations; bf16 XLA = the same bf16 weights through XLA matmuls and XLA attention; attention = "
                  "the dispatched decode step (the Pallas attention kernel on GPU) vs the same weights with XLA "
                  "attention, within the model factor):", "",
                  "| run | format | corruption | linears: max / median rel err (bf16 XLA max / median) | prefill "
                  "logits vs f32 (bf16 XLA) | step logits vs f32 (bf16 XLA) | vs bf16 XLA (prefill / step) | "
                  "last-layer input vs f32 (bf16 XLA) | verdict |", "|" + " --- |" * 9]
        for g in new_guards:
            lay = g.get("layer_input_rel_err_vs_f32") or [None]
            xlay = g.get("bf16_xla_layer_input_rel_err_vs_f32") or [None]
            att = ("" if "attention_ok" not in g else
                   f"attention {'ok' if g['attention_ok'] else 'FAIL'}: step vs f32 with XLA attention "
                   f"{g['decode_step_rel_err_vs_f32_xla_attention']}")
            if "linear_ok" not in g:  # the bf16 model: only the decode attention path is judged
                verdict = f"noise floor (no quantized weights){'; ' + att if att else ''}"
            else:
                verdict = (f"{'ok' if g['guard_ok'] else 'FAIL'} (linear {'ok' if g.get('linear_ok') else 'FAIL'}, "
                           f"model {'ok' if g.get('model_ok') else 'FAIL'}{', ' + att if att else ''})")
            lin = ("-" if "linear_max_rel_err" not in g else
                   f"{g['linear_max_rel_err']} / {g['linear_median_rel_err']} ({g['bf16_xla_linear_max_rel_err']} / "
                   f"{g['bf16_xla_linear_median_rel_err']})")
            lines.append(f"| {g.get('run_id')} | {g['format']} | {g.get('corruption', '-')} | {lin} | "
                         f"{g['prefill_rel_err_vs_f32']} "
                         f"({g.get('bf16_xla_prefill_rel_err_vs_f32', '-')}) | {g['decode_step_rel_err_vs_f32']} "
                         f"({g.get('bf16_xla_decode_step_rel_err_vs_f32', '-')}) | "
                         f"{g.get('prefill_rel_err_vs_bf16_xla', '-')} / "
                         f"{g.get('decode_step_rel_err_vs_bf16_xla', '-')} | {lay[-1]} ({xlay[-1]}) | {verdict} |")
    profiles = [r for r in rows if r.get("what") == "profile"]
    if profiles:
        lines += ["", "Decode step, CUPTI device time per step (us): kernels of the whole generation "
                  "minus the prefill-only run, / steps; gap = ms/step (wall) - kernel time:", "",
                  "| run | format | batch | ms/step | kernel us | kernels | gap us | by category | "
                  "top kernels (name, per step, us) |",
                  "|" + " --- |" * 9]
        for r in profiles:
            cats = "; ".join(f"{k} {v}" for k, v in r["categories_us_per_step"].items())
            top = "; ".join(f"{n} x{c:g} {t}" for n, c, t in r["top_kernels_per_step"][:6])
            lines.append(f"| {r.get('run_id')} | {r['format']} | {r['batch']} | {r['ms_per_step']} | "
                         f"{r['kernel_us_per_step']} | "
                         f"{r.get('kernels_per_step', '')} | {r['gap_us_per_step']}"
                         f" | {cats} | {top} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help="comma-separated; ';' separates groups, each group runs in its own process")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=65, help="generated tokens (the first from the prefill)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--linear-tol", type=float, default=1e-2,
                    help="guard: max relative error of any quantized linear vs its float32 oracle")
    ap.add_argument("--model-factor", type=float, default=2.0,
                    help="guard: the dispatched path's logits error vs the float32 oracle may be at most this many "
                         "times the bf16 XLA reference's")
    ap.add_argument("--guard-formats", default=None,
                    help="comma-separated formats that run the guard (default: all; the guard adds ~3 compiles)")
    ap.add_argument("--profile", action="store_true", help="CUPTI breakdown of the decode step (every batch)")
    ap.add_argument("--corrupt-check", action="store_true",
                    help="also run the guard on deliberately corrupted weights (it must FAIL)")
    ap.add_argument("--tiny", action="store_true", help="2 small layers (CPU smoke)")
    ap.add_argument("--no-guard", action="store_true")
    ap.add_argument("--worker", help="internal: run these formats in this process")
    ap.add_argument("--rows", help="internal: JSON-lines file the worker appends to")
    ap.add_argument("--command", help="internal: the parent's command line, recorded in the rows")
    ap.add_argument("--run-id", help="internal: the parent's start time (UTC), recorded in the rows")
    ap.add_argument("--worker-timeout", default="400",
                    help="seconds per worker group; a comma-separated list gives one per group (the last repeats)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --out-dir/decode.json (a row with the same format, batch, kind, "
                         "model shape and device is replaced)")
    ap.add_argument("--merge", nargs="+", metavar="ROWS_JSONL",
                    help="no run: merge these decode_rows.jsonl files (in order, as --append would) into "
                         "--out-dir/decode.json and rewrite decode.md")
    args = ap.parse_args()
    if args.merge:
        path = os.path.join(args.out_dir, "decode.json")
        rows = json.load(open(path)) if os.path.exists(path) else []
        for rows_file in args.merge:
            rows = merge_rows(rows, read_rows(rows_file))
        write_outputs(rows, args.out_dir)
        return
    dims = TINY if args.tiny else LLAMA_7B
    batches = [int(b) for b in args.batches.split(",") if b]
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "little")
    run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.worker:
        log(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, seed {seed}")
        for fmt in args.worker.split(","):
            run_format(fmt, batches, args.prompt_len, args.new_tokens, args.reps, dims, seed, args.rows,
                       guard=not args.no_guard and (args.guard_formats is None
                                                    or fmt in args.guard_formats.split(",")),
                       command=args.command, run_id=args.run_id or run_id,
                       profile=args.profile, corrupt=args.corrupt_check, linear_tol=args.linear_tol,
                       model_factor=args.model_factor)
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
        return merge_rows(kept, read_rows(rows_path))

    timeouts = [int(t) for t in str(args.worker_timeout).split(",")]
    for gi, group in enumerate([g for g in args.formats.split(";") if g]):
        timeout = timeouts[min(gi, len(timeouts) - 1)]
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", group, "--rows", rows_path, "--batches",
               args.batches, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--reps",
               str(args.reps), "--linear-tol", str(args.linear_tol), "--model-factor", str(args.model_factor),
               "--seed", str(seed), "--command", command, "--run-id", run_id] + \
              (["--tiny"] if args.tiny else []) + (["--no-guard"] if args.no_guard else []) + \
              (["--profile"] if args.profile else []) + (["--corrupt-check"] if args.corrupt_check else []) + \
              ([] if args.guard_formats is None else ["--guard-formats", args.guard_formats])
        log(f"--- {group}")
        try:
            subprocess.run(cmd, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            log(f"[{group}] worker timed out after {timeout} s")
        write_outputs(all_rows(), args.out_dir)
    for line in summarize(all_rows()):
        log(line)


NOTES_MARK = "<!-- notes (kept when the table is rewritten) -->"


ROW_KEY = ("run_id", "format", "batch", "what", "model_shape", "device")  # one row of decode.json


def write_outputs(rows, out_dir):
    """decode.json (all rows) and decode.md (one line per run, the table; text after NOTES_MARK is kept). Rows of the
    previous decode.json that ``rows`` no longer holds (replaced by a later run of the same configuration,
    ``merge_rows``) go to decode_superseded.json, so the figures notes quote from them stay on record."""
    from jaxquant.results import append_rows

    path = os.path.join(out_dir, "decode.json")
    if os.path.exists(path):
        keep = {tuple(r.get(k) for k in ROW_KEY) for r in rows}
        with open(path) as f:
            gone = [r for r in json.load(f) if tuple(r.get(k) for k in ROW_KEY) not in keep]
        if gone:
            append_rows(os.path.join(out_dir, "decode_superseded.json"), gone, key=ROW_KEY)
    lines = summarize(rows)  # also fills speedup_vs_bf16
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    runs = {}
    for r in rows:
        runs.setdefault(r.get("run_id"), r)
    head = ["# Decode: LLaMA-7B-shaped model, random weights, jitted generation with a KV cache", "",
            "Method: `bench/decode.py` docstring. Rows replaced by a later run of the same configuration are kept in "
            "`decode_superseded.json`. Runs (each row's `run_id`):", ""]
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
