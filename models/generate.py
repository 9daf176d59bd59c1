"""Jitted generation with a KV cache: greedy or temperature + top-p sampling.

Prompts are left-padded to a common length (rounded up to ``pad_to`` so nearby prompt lengths share one compiled
program); the prefill and the whole decode loop (``lax.while_loop``) are one ``jax.jit`` program, so generating N
tokens never recompiles per token. The loop checks its stop condition (length, every row at EOS) once per
``steps_per_check`` decode steps, which run as a fixed-count inner loop: XLA's GPU while loop reads its condition
back to the host at every iteration, so a check per step leaves the GPU waiting between steps (measured:
bench/results/decode_step_levers.md).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.common import init_cache


def sample_top_p(logits: jax.Array, key, temperature: float, top_p: float) -> jax.Array:
    """Nucleus sampling over [B, V] logits: keep the smallest set of tokens whose probability reaches top_p."""
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The smallest logit still inside the nucleus (the token that crosses top_p is kept, as HF does).
    cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, jnp.minimum(cutoff_index, logits.shape[-1] - 1), axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


# Decode steps per stop-condition check (bench/results/decode_step_levers.md); JAXQUANT_STEPS_PER_CHECK=1 checks
# every step, as before.
STEPS_PER_CHECK = int(os.environ.get("JAXQUANT_STEPS_PER_CHECK", "8"))


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "greedy", "cache_dtype", "steps_per_check"))
def _generate(module, params, ids, prompt_mask, key, temperature, top_p, eos_id, *, max_new_tokens: int,
              greedy: bool, cache_dtype, steps_per_check: int = STEPS_PER_CHECK):
    batch, prompt_len = ids.shape
    config = module.config
    kv_heads, head_dim = config.kv_cache_shape
    cache = init_cache(config.num_layers, batch, prompt_len + max_new_tokens, kv_heads, head_dim, cache_dtype)
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    apply = functools.partial(module.apply, {"params": params})
    logits, cache = apply(ids, positions, cache=cache, cache_index=0, kv_mask=kv_mask)

    def pick(logits, key):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample_top_p(logits, key, temperature, top_p).astype(jnp.int32)

    key, sub = jax.random.split(key)
    first = pick(logits[:, -1], sub)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    state = (1, first, positions[:, -1] + 1, cache, out, first == eos_id, key)

    def cond(state):
        step, _, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_step(_, state):
        step, token, pos, cache, out, done, key = state
        logits, cache = apply(token[:, None], pos[:, None], cache=cache, cache_index=prompt_len + step - 1,
                              kv_mask=kv_mask)
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, eos_id, pick(logits[:, -1], sub))
        # steps past max_new_tokens (the last group's overrun) write nothing out; their cache write clamps to the
        # last slot, which no later step reads
        out = jnp.where(step < max_new_tokens, jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step)), out)
        return step + 1, nxt, pos + 1, cache, out, done | (nxt == eos_id), key

    group = max(1, min(steps_per_check, max_new_tokens - 1))  # no group longer than the whole decode

    def body(state):
        return jax.lax.fori_loop(0, group, decode_step, state)

    step, *_, out, done, _ = jax.lax.while_loop(cond, body, state)
    return out, jnp.minimum(step, max_new_tokens)


def generate(module, params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None, pad_id: int = 0, pad_to: int = 16,
             cache_dtype=None, steps_per_check: int = STEPS_PER_CHECK) -> list:
    """Generates up to ``max_new_tokens`` per prompt; returns the new token ids of each (cut after EOS). The loop
    stops within ``steps_per_check`` steps of every row reaching EOS (module docstring)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if steps_per_check < 1:
        raise ValueError(f"steps_per_check must be >= 1, got {steps_per_check}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    longest = max(len(p) for p in prompts)
    width = -(-longest // pad_to) * pad_to
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = True
    cache_dtype = cache_dtype or module.dtype
    out, steps = _generate(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(seed),
                           jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                           jnp.int32(-1 if eos_id is None else eos_id), max_new_tokens=max_new_tokens,
                           greedy=temperature == 0.0, cache_dtype=cache_dtype, steps_per_check=steps_per_check)
    out = np.asarray(out)[:, : int(steps)]
    result = []
    for row in out:
        row = row.tolist()
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result
