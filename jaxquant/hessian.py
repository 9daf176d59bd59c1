"""Streamed layer Hessian H = 2/n * sum x^T x, accumulated exactly like the reference `add_batch`.

Sample-count convention (the reference's, kept so that H matches it bit for bit in spirit):
`n` counts *sequences*, not tokens. A 3-D input [batch, seq, K] adds batch samples; a 2-D input
[tokens, K] is one sample (the reference unsqueezes it to [1, tokens, K]); a 1-D input [K] is one
sample; for more leading axes [..., seq, K] every axis but the last two is a batch axis.
Only the overall scale of H depends on this, and GPTQ is invariant to that scale.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.tree_util.register_dataclass, data_fields=["H", "n"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class HessianState:
    H: jax.Array  # [K, K] float32
    n: jax.Array  # int32 scalar: samples seen so far


def hessian_init(K: int) -> HessianState:
    return HessianState(H=jnp.zeros((K, K), jnp.float32), n=jnp.zeros((), jnp.int32))


@partial(jax.jit, static_argnames=("shards",))
def hessian_update(state: HessianState, x: jax.Array, shards: int = 1) -> HessianState:
    """Fold activations x [..., K] into the running Hessian.

    shards > 1: x is one of ``shards`` equal slices of a batch along its batch axis (data parallel). The sample count
    then advances by the whole batch, so the partial Hessians of the slices, each updated with its own slice, sum to
    the Hessian of the whole batch (the update is linear in H and in x^T x).
    """
    K = state.H.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"activations have {x.shape[-1]} features, Hessian expects {K}")
    tmp = math.prod(x.shape[:-2]) * shards if x.ndim >= 3 else 1
    x = x.reshape(-1, K).astype(jnp.float32)
    n_new = state.n + tmp
    # H <- H * n/(n+tmp) + 2/(n+tmp) * x^T x, the scaling applied to x as in the reference.
    H = state.H * (state.n.astype(jnp.float32) / n_new.astype(jnp.float32))
    x = jnp.sqrt(2.0 / n_new.astype(jnp.float32)) * x
    H = H + jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    return HessianState(H=H, n=n_new)
