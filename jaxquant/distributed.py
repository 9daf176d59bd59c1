"""Quantization and quantized inference on several devices, with JAX's own sharding (Mesh, NamedSharding, shard_map).

One mesh axis is enough for every use here:

* calibration (``pipeline.quantize_model(..., mesh=)``): each device takes a contiguous block of the calibration
  sequences (its canonical shards, ``jaxquant.hessian``), ``batch_size`` per step; every jitted layer pass runs
  data-parallel on the batch-split activations, each device accumulates its shards' Hessians locally, and the shard
  Hessians are combined by one fixed pairwise tree (one all-gather per Hessian): the same shapes per device and the
  same additions in the same order as on one device, so the codes are bit-identical for any device count that
  divides the shard count;
* solves: GPTQ treats the output rows of W independently once ``H^-1`` is known. The pipeline splits each solve's
  rows into one block per device and runs the single-device solve on each block from its own thread (every device
  already holds the replicated H and weights, so nothing moves in); ``gptq(..., mesh=)`` is the same split as one
  ``shard_map`` program;
* inference (``shard_params``): dense kernels and quantized weights (codes, scales, zeros) are split along their
  output dimension (tensor parallel); the jitted forward and generation loop run unchanged and XLA adds the gathers.

Multi-host: call ``jax.distributed.initialize()`` on every host first; ``make_mesh()`` then spans ``jax.devices()``
(all hosts), and the same code runs as one SPMD program.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "devices"


def make_mesh(devices: Optional[Sequence] = None, axis: str = AXIS) -> Mesh:
    """A one-axis mesh over ``devices`` (default: every device of the default backend, all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (axis,))


def axis_name(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"jaxquant uses a one-axis mesh; got axes {mesh.axis_names}")
    return mesh.axis_names[0]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across the devices."""
    return NamedSharding(mesh, P(axis_name(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` without the replication check (the GPTQ loop carries replicated and per-device values)."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def peak_device_bytes(devices: Optional[Sequence] = None) -> Optional[int]:
    """Largest ``peak_bytes_in_use`` over ``devices`` (allocator statistics: GPUs/TPUs), or None where the backend
    keeps none (the CPU)."""
    peaks = []
    for d in devices if devices is not None else jax.local_devices():
        stats = d.memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def warm_up_collectives(mesh: Mesh) -> None:
    """One tiny all-reduce over the mesh's devices. On GPUs the first collective of a device set creates its NCCL
    communicators (about a second or more) and later collectives over the same devices reuse them: the pipeline
    runs this in a background thread at its start, so that the first Hessian all-reduce does not pay it."""
    x = jax.device_put(np.zeros((mesh.devices.size,), np.float32), batch_sharding(mesh))
    jax.block_until_ready(jax.jit(lambda v: v.sum(), out_shardings=replicated(mesh))(x))


# ----------------------------------------------------------------------------------------- data-parallel Hessian
def partial_hessians(mesh: Mesh):
    """(init, update, finish) for Hessians of batch-sharded activations without a collective per batch: each device
    accumulates the Hessian of its own slices (``H`` is [devices, K, K], split on the first axis; the sample count is
    the device's own, as for one canonical shard, ``jaxquant.hessian``), and ``finish(root, shards)`` combines the
    devices' shard-subtree roots ([devices, K, K]) by the top levels of the fixed pairwise tree and scales by
    1/shards: one all-gather per Hessian instead of one collective per calibration batch, and the same bits as the
    same shards summed on one device."""
    import jax.numpy as jnp

    from jaxquant.hessian import HessianState, hessian_update, pairwise_sum

    ax, n_dev = axis_name(mesh), mesh.devices.size
    spec = HessianState(H=P(ax), n=P(ax))

    # Zeros made in place on each device (a zeros array on one device, then split, would first fill one device with
    # all the partial Hessians: 970 MB at K = 11008 on 2 devices, then copy half of it across). n is placed as
    # update() returns it: the first batch then hits the same compiled program as the others. Jitted, so that
    # ``init.lower(K).out_info`` gives the state's shapes and placement without making it (ahead-of-time compiles).
    init = jax.jit(lambda K: HessianState(H=jnp.zeros((n_dev, K, K), jnp.float32), n=jnp.zeros((n_dev,), jnp.int32)),
                   static_argnums=0, out_shardings=HessianState(H=NamedSharding(mesh, P(ax)),
                                                                n=NamedSharding(mesh, P(ax))))

    def local(state, x):
        new = hessian_update(HessianState(H=state.H[0], n=state.n[0]), x)
        return HessianState(H=new.H[None], n=new.n[None])

    update = shard_map(local, mesh, in_specs=(spec, P(ax)), out_specs=spec)

    @partial(jax.jit, static_argnames="shards", out_shardings=replicated(mesh))
    def finish(root, shards: int):
        # The subtree roots in device order, summed pairwise (same order as ShardTree on one device); 1/shards is a
        # power of two, so the scaling is exact.
        return pairwise_sum([root[d] for d in range(n_dev)]) * jnp.float32(1.0 / shards)

    return init, update, finish


# ------------------------------------------------------------------------------------------- tensor parallel
def _is_quantized_leaf(x) -> bool:
    from jaxquant.formats import all_formats

    return type(x).__name__ in all_formats()


def _output_split(leaf, n_dev: int, axis: str):
    """Shardings' PartitionSpecs that split a linear weight along its output dimension (a pytree of them for a
    quantized weight, from its ``tp_output_specs``), or None where that does not divide evenly."""
    if _is_quantized_leaf(leaf):
        specs = getattr(leaf, "tp_output_specs", None)
        return specs(n_dev, axis) if specs is not None else None
    if getattr(leaf, "ndim", 0) == 2 and leaf.shape[1] % n_dev == 0:
        return P(None, axis)
    return None


def shard_params(params: dict, mesh: Mesh) -> dict:
    """Place a (quantized) parameter tree on ``mesh``: every linear ``kernel`` (dense [in, out] or a quantized
    weight) split along its output dimension where it divides evenly, everything else replicated."""
    axis, n_dev = axis_name(mesh), mesh.devices.size

    def place(path, leaf):
        keys = [str(getattr(p, "key", "")) for p in path]
        split = _output_split(leaf, n_dev, axis) if keys and keys[-1] == "kernel" else None
        if split is None:
            return jax.device_put(leaf, replicated(mesh))
        shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), split,
                                           is_leaf=lambda s: isinstance(s, P))
        return jax.device_put(leaf, shardings)

    return jax.tree_util.tree_map_with_path(place, params, is_leaf=_is_quantized_leaf)
