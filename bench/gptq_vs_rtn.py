"""Why GPTQ w4 g128 loses to RTN w4 g128 on SmolLM2-135M (issue 3): three experiments, rows to
``bench/results/gptq_vs_rtn.json`` (+ ``.md`` by hand-written notes in ``bench/NOTES_gptq_vs_rtn.md``).

    python bench/gptq_vs_rtn.py swap    # RTN everywhere, GPTQ's weights only in one kind of linear / one layer range
    python bench/gptq_vs_rtn.py tokens  # which tokens carry the Hessian of the q/k/v input, layer by layer
    python bench/gptq_vs_rtn.py vproj   # v_proj: GPTQ with the Hessian of all tokens / token-centred / no first token
    python bench/gptq_vs_rtn.py sink    # attention mass on each window's first token, v_proj error there

``swap`` reads the quality table's checkpoints (``runs/quality/rtn-w4-g128``, ``runs/quality/gptq-w4-g128``, made by
``bench/quality.py``). Perplexities here are on the first ``--windows`` 2048-token windows of held-out C4 (a short
slice, for comparisons inside this file only). Rows already in the JSON file are skipped (resumable).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

import models  # noqa: E402
from jaxquant import checkpoint, data, results  # noqa: E402
from jaxquant.config import QuantConfig  # noqa: E402
from jaxquant.eval import window_losses  # noqa: E402
from jaxquant.gptq import gptq  # noqa: E402
from jaxquant.hessian import hessian_init, hessian_update  # noqa: E402
from jaxquant.rtn import rtn  # noqa: E402

OUT = "bench/results/gptq_vs_rtn.json"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CFG = QuantConfig(bits=4, group_size=128)


def is_quantized(_, x):
    return hasattr(x, "dequantize")


def dense_checkpoint(name: str) -> dict:
    """Flat {path: float32 array} of a quality-table checkpoint, quantized kernels dequantized."""
    params = checkpoint.load(os.path.join("runs", "quality", name)).params
    return {k: np.asarray(v.dequantize(jnp.float32)) if hasattr(v, "dequantize") else np.asarray(v)
            for k, v in flatten_dict(params, is_leaf=is_quantized).items()}


def heldout_windows(tokenizer, n: int) -> np.ndarray:
    return data.tokenize(tokenizer, data.eval_text("c4-heldout"))[: n * 2048].reshape(n, 2048)


def ppl(module, flat: dict, windows) -> float:
    params = unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    return math.exp(np.mean([float(window_losses(module, params, jnp.asarray(w[None]))[0]) for w in windows]))


def emit(experiment: str, config: str, **fields):
    r = results.row("gptq_vs_rtn", experiment=experiment, config=config, model="smollm2-135m", **fields)
    results.append_rows(OUT, [r], key=("experiment", "config"))
    print(json.dumps({k: r[k] for k in ("experiment", "config", *fields)}), flush=True)


def done() -> set:
    if not os.path.exists(OUT):
        return set()
    with open(OUT) as f:
        return {(r["experiment"], r["config"]) for r in json.load(f)}


# ---------------------------------------------------------------------------------------------------------- swap
def swap(base, windows):
    R, G = dense_checkpoint("rtn-w4-g128"), dense_checkpoint("gptq-w4-g128")
    F = {k: np.asarray(v) for k, v in flatten_dict(base.params).items()}
    layer = lambda k: int(k[0].split("_")[1])  # noqa: E731
    configs = {"rtn all": lambda k: False, "gptq all": lambda k: True}
    for t in LINEARS:
        configs[f"gptq only {t}"] = (lambda t: lambda k: k[-2] == t)(t)
    for a, b in [(0, 10), (10, 20), (20, 30)]:
        configs[f"gptq only layers {a}-{b - 1}"] = (lambda a, b: lambda k: a <= layer(k) < b)(a, b)
    configs["gptq all but v_proj"] = lambda k: k[-2] != "v_proj"
    configs["fp32"] = None
    have = done()
    for name, pred in configs.items():
        if ("swap", name) in have:
            continue
        tree = F if pred is None else {k: (G[k] if k[-1] == "kernel" and pred(k) else R[k]) for k in R}
        emit("swap", name, ppl=ppl(base.module, tree, windows), windows=len(windows))


# -------------------------------------------------------------------------------------------------- layer inputs
def layer_inputs(base, windows):
    """Per decoder layer, the float model's q/k/v input (input_layernorm output) [W, T, D] for ``windows``."""
    m, T = base.module, windows.shape[1]
    pos = jnp.broadcast_to(jnp.arange(T), windows.shape)
    layer = base.family.DecoderLayer(base.config, base.dtype)
    norm_in = jax.jit(lambda lp, h: layer.apply({"params": lp}, h, method=lambda s, h: s.input_layernorm(h)))
    forward = jax.jit(lambda lp, h: layer.apply({"params": lp}, h, pos)[0])
    h = m.apply({"params": base.params}, jnp.asarray(windows), pos, method=m.embed)
    for i in range(base.config.num_layers):
        lp = base.params[f"layers_{i}"]
        yield i, np.asarray(norm_in(lp, h))
        h = forward(lp, h)


def tokens(base, calib):
    if ("tokens", "layer 0") in done():
        return
    for i, x in layer_inputs(base, calib):
        e = (x.astype(np.float64) ** 2).sum(-1)  # a token's share of tr(H) is its squared norm
        order = np.argsort(e.ravel())[::-1]
        d = (x.astype(np.float64) ** 2).sum((0, 1))
        emit("tokens", f"layer {i}", windows=len(calib), first_token_share=float(e[:, 0].sum() / e.sum()),
             top4_tokens_share=float(e.ravel()[order[:4]].sum() / e.sum()),
             top1pct_tokens_share=float(e.ravel()[order[: e.size // 100]].sum() / e.sum()),
             top_token_positions=[int(p) for p in order[:4] % x.shape[1]],
             median_token_energy_vs_first=float(np.median(e[:, 1:]) / e[:, 0].mean()),
             diag_h_max_over_median=float(d.max() / np.median(d)))


# --------------------------------------------------------------------------------------------------------- vproj
def vproj(base, calib, windows):
    """v_proj of every layer, quantized from the float model's inputs: RTN; GPTQ with the pipeline's Hessian (all
    calibration tokens); GPTQ with the Hessian of the token-centred inputs (the mean over tokens removed:
    what a constant input component contributes is left out of the objective); GPTQ without each window's first
    token (attention-sink check). Per layer: how much of tr(H) the token-mean carries, and each variant's output
    error on held-out tokens split into the token-mean part and the token-varying part; then the perplexity of the
    RTN model with each variant's v_proj."""
    have = done()
    R = dense_checkpoint("rtn-w4-g128")
    names = ("gptq H all tokens", "gptq H centred", "gptq H without first tokens")
    damped = "gptq H all tokens, percdamp 1.0"  # stronger damping keeps the weights nearer their RTN neighbourhood
    variants = {n: {} for n in names + (damped, "rtn")}
    held = dict(layer_inputs(base, windows))
    for i, x in layer_inputs(base, calib):
        kernel = np.asarray(base.params[f"layers_{i}"]["self_attn"]["v_proj"]["kernel"])  # [in, out]
        W = jnp.asarray(kernel.T)  # [out, in], the algorithms' layout; dequantize() gives the kernel layout back
        x64 = x.reshape(-1, x.shape[-1]).astype(np.float64)
        mu = x64.mean(0)
        inputs = {names[0]: x.reshape(-1, x.shape[-1]), names[1]: (x64 - mu).astype(np.float32),
                  names[2]: x[:, 1:].reshape(-1, x.shape[-1])}
        Q = {"rtn": np.asarray(rtn(W, CFG).dequantize(jnp.float32))}
        variants["rtn"][i] = Q["rtn"]
        for name, xs in inputs.items():
            state = hessian_update(hessian_init(W.shape[1]), jnp.asarray(xs))
            Q[name] = variants[name][i] = np.asarray(gptq(W, state.H, CFG)[0].dequantize(jnp.float32))
            if name == names[0]:
                cfg = dataclasses.replace(CFG, percdamp=1.0)
                Q[damped] = variants[damped][i] = np.asarray(gptq(W, state.H, cfg)[0].dequantize(jnp.float32))
        xh = held[i].reshape(-1, x.shape[-1]).astype(np.float64)
        mh = xh.mean(0)
        errs = {}
        for name, q in Q.items():
            d = (q - kernel).astype(np.float64)
            errs[name] = {"token_mean_part": float(((mh @ d) ** 2).sum()),
                          "token_varying_part": float((((xh - mh) @ d) ** 2).sum(-1).mean()),
                          "weight_sq_error": float((d ** 2).sum())}
        emit("vproj-layer", f"layer {i}", calib_windows=len(calib), heldout_windows=len(windows),  # (re)written
             token_mean_share_of_trH=float(len(x64) * (mu ** 2).sum() / (x64 ** 2).sum()),
             v_proj_output_sq_error_per_token=errs)
    key = ("self_attn", "v_proj", "kernel")
    F = {k: np.asarray(v) for k, v in flatten_dict(base.params).items()}
    # Each v_proj variant inside the RTN model (its inputs perturbed by the other layers' quantization) and inside
    # the float model (its inputs exactly the distribution its Hessian was computed from).
    for rest, tree0 in (("rtn", R), ("fp32", F)):
        for name, qs in {"rtn all": None, **variants}.items():
            if rest == "fp32" and qs is None:
                continue
            config = name if qs is None else f"{rest}, v_proj: {name}"
            if ("vproj-ppl", config) in have or (rest == "rtn" and name == "rtn"):
                continue
            tree = dict(tree0)
            for i, q in (qs or {}).items():
                tree[(f"layers_{i}",) + key] = q
            emit("vproj-ppl", config, ppl=ppl(base.module, tree, windows), windows=len(windows),
                 calib_windows=len(calib))


# ---------------------------------------------------------------------------------------------------------- sink
def layer_inputs_and_sink_mass(base, windows):
    """Per decoder layer of the float model: the q/k/v input [W, T, D] and the attention mass on the first key
    (mean over heads, windows and queries 1..T-1, from the model's own softmax probabilities)."""
    import flax.linen as nn

    T = windows.shape[1]
    pos = jnp.broadcast_to(jnp.arange(T), windows.shape)
    layer = base.family.DecoderLayer(base.config, base.dtype)

    def forward(lp, h):
        mass = []

        def capture(next_fun, args, kwargs, context):
            if context.method_name == "attention_activation" and args[0] == "probs":
                mass.append(args[1][..., 1:, 0].mean())  # probs [B, KV, G, T, S]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(capture):
            out = layer.apply({"params": lp}, h, pos)[0]
        return out, mass[0]

    forward = jax.jit(forward)
    norm_in = jax.jit(lambda lp, h: layer.apply({"params": lp}, h, method=lambda s, h: s.input_layernorm(h)))
    h = base.module.apply({"params": base.params}, jnp.asarray(windows), pos, method=base.module.embed)
    for i in range(base.config.num_layers):
        lp = base.params[f"layers_{i}"]
        x = np.asarray(norm_in(lp, h))
        h, mass = forward(lp, h)
        yield i, x, float(mass)


def sink(base, calib, windows):
    """The attention sink: per layer, the attention mass on each window's first token, and the v_proj output error
    (RTN; GPTQ with the pipeline's Hessian; float inputs) at that token vs the mean over the other tokens."""
    for (i, xc), (_, xh, mass) in zip(layer_inputs(base, calib), layer_inputs_and_sink_mass(base, windows)):
        kernel = np.asarray(base.params[f"layers_{i}"]["self_attn"]["v_proj"]["kernel"])  # [in, out]
        W = jnp.asarray(kernel.T)
        H = hessian_update(hessian_init(W.shape[1]), jnp.asarray(xc.reshape(-1, xc.shape[-1]))).H
        errs = {}
        for name, q in (("rtn", rtn(W, CFG)), ("gptq", gptq(W, H, CFG)[0])):
            e = ((xh.astype(np.float64) @ (np.asarray(q.dequantize(jnp.float32)) - kernel)) ** 2).sum(-1)
            errs[name] = {"first_token": float(e[:, 0].mean()), "other_tokens": float(e[:, 1:].mean())}
        v0 = float((((xh[:, 0] @ kernel) ** 2).sum(-1)).mean())
        vr = float((((xh[:, 1:] @ kernel) ** 2).sum(-1)).mean())
        emit("sink", f"layer {i}", attention_mass_on_first_token=mass, v_sq_norm_first=v0, v_sq_norm_other=vr,
             v_proj_output_sq_error=errs, calib_windows=len(calib), heldout_windows=len(windows))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=["swap", "tokens", "vproj", "sink"])
    ap.add_argument("--windows", type=int, default=4, help="held-out C4 windows for perplexities and errors")
    ap.add_argument("--calib-windows", type=int, default=8, help="calibration windows (the first of the 128)")
    args = ap.parse_args()
    base = models.from_pretrained("smollm2-135m")
    windows = heldout_windows(base.tokenizer, args.windows)
    calib = data.calibration_windows(base.tokenizer, n=128, seqlen=2048, seed=0)[: args.calib_windows]
    if args.experiment == "swap":
        swap(base, windows)
    elif args.experiment == "tokens":
        tokens(base, calib)
    elif args.experiment == "vproj":
        vproj(base, calib, windows)
    else:
        sink(base, calib, windows)


if __name__ == "__main__":
    main()
