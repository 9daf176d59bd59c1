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


# ------------------------------------------------------------------------------ device-count-independent reduction
# A Hessian summed over D devices rounds differently from one device's running sum, and over a model's depth the
# difference flips codes. To give the same bits on any device count, the calibration set is split into P canonical
# shards (contiguous runs of sequences, P a power of two); each shard's Hessian is accumulated on its own, batch by
# batch, with the reference normalisation (its own sample count), exactly as one device would for that shard; the P
# shard Hessians are combined by one fixed pairwise tree, ((S0 + S1) + (S2 + S3)) + ((S4 + S5) + (S6 + S7)), then
# scaled by 1/P (exact: a power of two), which gives 2/n * sum x^T x for equal shards. A device holding shards
# [d P/D, (d + 1) P/D) builds the subtree of its block locally (ShardTree) and the mesh combines the D subtree roots
# by the top levels of the same tree (jaxquant.distributed.partial_hessians): the same additions in the same order
# whatever D divides P. (Identical bits also need identically compiled kernels: true on CPU; on GPUs only with XLA's
# deterministic ops, since by default it autotunes GEMM kernels by timing: bench/results/quant_pipeline.md.)

DEFAULT_HESSIAN_SHARDS = 8


def hessian_shards(nsamples: int, batch_size: int, n_dev: int = 1, shards=None) -> int:
    """The number P of canonical calibration shards: ``shards`` if given (checked), else the largest power of two up
    to ``DEFAULT_HESSIAN_SHARDS`` (8) that splits ``nsamples`` into whole batches of ``batch_size`` per shard."""
    if shards is None:
        shards = DEFAULT_HESSIAN_SHARDS
        while shards > 1 and nsamples % (shards * batch_size):
            shards //= 2
    elif shards < 1 or shards & (shards - 1):
        raise ValueError(f"hessian_shards={shards} must be a power of two (1, 2, 4, 8, ...)")
    elif nsamples % (shards * batch_size):
        raise ValueError(f"nsamples={nsamples} is not a multiple of hessian_shards={shards} x batch_size="
                         f"{batch_size}: every shard must hold whole batches")
    if shards % n_dev:
        raise ValueError(
            f"hessian_shards={shards} (canonical calibration shards at nsamples={nsamples}, batch_size={batch_size} "
            f"per device) is not a multiple of the mesh's {n_dev} devices: use a power-of-two device count that "
            f"divides it, or nsamples a multiple of {n_dev} x batch_size and hessian_shards={n_dev} or more")
    return shards


def calibration_order(nsamples: int, batch_size: int, n_dev: int, shards: int):
    """Row indices of the calibration set for each step ([steps, n_dev * batch_size]) and the steps per shard.

    Device d takes the contiguous block of sequences [d n/D, (d + 1) n/D) (its shards), ``batch_size`` at a time,
    in order; a step's batch is the devices' slices side by side (split on the leading axis over the mesh). On one
    device this is the calibration set in order."""
    per_device = nsamples // n_dev
    steps = per_device // batch_size
    order = [[d * per_device + s * batch_size + j for d in range(n_dev) for j in range(batch_size)]
             for s in range(steps)]
    return order, (nsamples // shards) // batch_size


_add = jax.jit(jnp.add)


class ShardTree:
    """Pairwise sum of consecutive shard Hessians, built as they finish (a binary counter: at most log2(count) + 1
    partial sums alive). Works on any array, e.g. [D, K, K] split over a mesh (one shard per device): the additions
    are elementwise, so each device sums its own shards."""

    def __init__(self):
        self._stack = []  # (number of shards, their sum)

    def push(self, H) -> None:
        size = 1
        while self._stack and self._stack[-1][0] == size:
            _, left = self._stack.pop()
            H, size = _add(left, H), 2 * size
        self._stack.append((size, H))

    def root(self):
        if len(self._stack) != 1:
            raise ValueError(f"ShardTree holds {[s for s, _ in self._stack]} shards: not a power of two")
        return self._stack[0][1]


def pairwise_sum(parts):
    """((p0 + p1) + (p2 + p3)) + ... over a power-of-two list: the top levels of the shard tree."""
    parts = list(parts)
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
    return parts[0]
