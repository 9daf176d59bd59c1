"""Perplexity exactly as the GPTQ reference computes it (``llama.py``/``opt.py`` ``*_eval``).

The text is tokenized once; ``nsamples = numel // seqlen`` non-overlapping windows; for each window the mean shifted
cross-entropy over its ``seqlen - 1`` predictions is multiplied by ``seqlen``; ``ppl = exp(sum / (nsamples * seqlen))``.
Windows run in batches under one jitted function that returns only the per-window mean loss.
"""
from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("module",))
def window_losses(module, params, windows: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of each ``[B, seqlen]`` window (float32), as ``CrossEntropyLoss`` computes it."""
    logits, _ = module.apply({"params": params}, windows)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll, axis=-1)


def perplexity(module, params, ids: np.ndarray, seqlen: int = 2048, batch_size: int = 1, max_windows=None,
               progress: bool = True) -> dict:
    """GPTQ-protocol perplexity of a 1-D token array. ``max_windows`` evaluates only the first windows (a slice)."""
    nsamples = ids.size // seqlen
    if nsamples == 0:
        raise ValueError(f"text has {ids.size} tokens, fewer than seqlen={seqlen}")
    if max_windows is not None:
        nsamples = min(nsamples, max_windows)
    windows = ids[: nsamples * seqlen].reshape(nsamples, seqlen)
    nlls = np.zeros(nsamples, np.float64)
    from tqdm.auto import tqdm

    bar = tqdm(total=nsamples, desc="perplexity", unit="win", disable=not progress)
    t0, compile_s = time.perf_counter(), None
    for start in range(0, nsamples, batch_size):
        batch = windows[start: start + batch_size]
        real = batch.shape[0]
        if real < batch_size:  # keep one compiled shape: pad with copies, drop their losses
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        losses = np.asarray(window_losses(module, params, jnp.asarray(batch)))[:real]
        nlls[start: start + real] = losses.astype(np.float64) * seqlen
        if compile_s is None:
            compile_s = time.perf_counter() - t0
        bar.update(real)
        bar.set_postfix(ppl=f"{math.exp(nlls[: start + real].sum() / ((start + real) * seqlen)):.4f}")
    bar.close()
    total = time.perf_counter() - t0
    steady = (total - compile_s) / max(nsamples - batch_size, 1) if nsamples > batch_size else total / nsamples
    return {
        "ppl": float(math.exp(nlls.sum() / (nsamples * seqlen))),
        "nsamples": int(nsamples),
        "seqlen": int(seqlen),
        "eval_tokens": int(nsamples * seqlen),
        "total_tokens": int(ids.size),
        "seconds": total,
        "seconds_per_window": steady,
        "first_batch_seconds": compile_s,
    }
