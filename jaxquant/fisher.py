"""Diagonal Fisher information of every decoder linear weight: squared gradients of the language-model loss, summed
over calibration samples (SqueezeLLM's sensitivity).

    F[w] = sum_s (d loss_s / d w)^2,   loss_s = mean next-token cross-entropy of sample s (its seqlen - 1 predictions)

This is what the SqueezeLLM reference computes (kssteven418/SqueezeLLM-gradients: a hook squares each sample's weight
gradient, ``.grad`` sums them over the calibration samples, one sample per backward pass, ``labels = input_ids``).
Its data are C4 windows of 512 tokens, one random window of a random document of at least 512 tokens per sample (its
README says 100 samples; its run.py leaves ``get_loaders``' default of 128); here any [n, seqlen] token array, e.g.
``jaxquant.data.calibration_windows`` (random offsets in the C4 file's first 900 documents). Its model runs in
bfloat16; here the model's own dtype (float32 by default), with the squares accumulated in float32.

Memory, and what bounds it (P = parameters of the model, L = parameters of the decoder layers, T = seqlen, b = the
micro-batch of samples whose gradients are computed together with ``jax.vmap``, default 1):

    model parameters                     P              (model dtype)
    Fisher accumulator                   L_linear       (float32, updated in place: the step donates it)
    per-sample gradients                 b x L          (model dtype)
    activations                          b x T x hidden x num_layers saved at layer boundaries (each decoder layer is
                                         rematerialised with ``jax.checkpoint``, so only one layer's internals, e.g.
                                         its b x heads x T x T attention scores, are live during the backward pass)
                                         + b x T x vocab float32 logits

so it grows linearly with b and T and is independent of the number of samples (they are streamed). Per-sample
squared gradients cannot be obtained from one batched gradient, hence b copies of the gradient.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np


def linear_names(lm) -> List[str]:
    """"layers_{i}/<sub-layer>" of every decoder linear, in the pipeline's order (true-sequential groups)."""
    names = [name for group in lm.family.SEQUENTIAL_GROUPS for name in group]
    return [f"layers_{i}/{name}" for i in range(lm.config.num_layers) for name in names]


def _get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _sample_loss(module, layer, remat: bool):
    """``loss(layer_params [list per layer], top_params, ids [T]) -> mean next-token NLL`` of one sample, each decoder
    layer under ``jax.checkpoint`` when ``remat``: the model's own embed / DecoderLayer / head, i.e. the forward of
    ``module`` exactly."""

    def layer_forward(p, h, positions):
        return layer.apply({"params": p}, h, positions)[0]

    step = jax.checkpoint(layer_forward) if remat else layer_forward

    def loss(layer_params, top, ids):
        ids = ids[None]
        positions = jnp.arange(ids.shape[1])[None]
        h = module.apply({"params": top}, ids, positions, method=module.embed)
        for p in layer_params:
            h = step(p, h, positions)
        logits = module.apply({"params": top}, h, method=module.head)[0, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1))

    return loss


@partial(jax.jit, static_argnames=("module", "layer", "where", "remat"), donate_argnums=(0,))
def _accumulate(acc, layer_params, top, ids, *, module, layer, where, remat):
    """acc + sum over the samples in ids [b, T] of each decoder kernel's squared gradient (float32). Module-level and
    keyed on the (hashable) modules, so every call for one model shape reuses one compiled program."""
    grad = jax.grad(_sample_loss(module, layer, remat))

    def squares(g):
        return {name: jnp.square(_get(g[i], sub)["kernel"].astype(jnp.float32)) for name, i, sub in where}

    if ids.shape[0] == 1:
        sq = squares(grad(layer_params, top, ids[0]))
    else:  # per-sample gradients: b copies of the gradient
        per_sample = jax.vmap(grad, in_axes=(None, None, 0))(layer_params, top, ids)
        sq = jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), squares(per_sample))
    return {name: acc[name] + sq[name] for name, _, _ in where}


def fisher_diagonal(lm, calibration, *, params: Optional[dict] = None, batch_size: int = 1, remat: bool = True,
                    progress: bool = False) -> Dict[str, jax.Array]:
    """Diagonal Fisher of every decoder linear of ``lm`` over ``calibration`` ([n, seqlen] token ids).

    Returns {"layers_{i}/<sub-layer>": F [in, out] float32} (the Flax kernel layout, like the parameter it scores).
    ``params`` replaces ``lm.params``; ``batch_size`` samples have their gradients computed together (vmap), which
    is faster on a GPU and costs ``batch_size`` copies of the gradient (see the module docstring for memory).
    """
    calibration = np.asarray(calibration)
    if calibration.ndim != 2 or calibration.shape[1] < 2:
        raise ValueError(f"calibration must be token ids of shape [n, seqlen] with seqlen >= 2, got "
                         f"{calibration.shape}")
    n = calibration.shape[0]
    if batch_size < 1 or n % batch_size:
        raise ValueError(f"nsamples={n} is not a multiple of batch_size={batch_size}")
    params = lm.params if params is None else params
    names = linear_names(lm)
    for name in names:
        if hasattr(_get(params, name)["kernel"], "matmul"):
            raise ValueError(f"{name}/kernel is already quantized: the Fisher needs the float model")
    layer_params = jax.device_put([params[f"layers_{i}"] for i in range(lm.config.num_layers)])  # once, not per step
    top = jax.device_put({k: v for k, v in params.items() if not k.startswith("layers_")})
    where = tuple((name, int(name.split("/", 1)[0][len("layers_"):]), name.split("/", 1)[1]) for name in names)
    layer = lm.family.DecoderLayer(lm.config, lm.dtype)

    acc = {name: jnp.zeros(_get(params, name)["kernel"].shape, jnp.float32) for name in names}
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        acc = _accumulate(acc, layer_params, top, jnp.asarray(calibration[start: start + batch_size]),
                          module=lm.module, layer=layer, where=where, remat=remat)
        if progress:
            jax.block_until_ready(acc)
            print(f"fisher: {start + batch_size}/{n} samples, {time.perf_counter() - t0:.1f} s", flush=True)
    return acc
