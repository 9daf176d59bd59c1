"""Layer-by-layer quantization of a whole model (the GPTQ reference's sequential loop, in JAX).

For each decoder layer, only that layer's weights and the calibration activations live on the device:

    inputs of layer i  --for each group of sub-layers (true-sequential order)-->
        Hessians of the group's inputs (one jitted pass; the rest of the layer is dead code that XLA drops)
        method(W, H, cfg) -> QuantizedWeight; the working copy of the layer now uses the quantized weight
    outputs of layer i, recomputed with all its quantized weights  = inputs of layer i+1

Input reuse (``reuse_inputs=True``, the default): once a group is quantized, the inputs of the groups before it are
final, so the passes that follow feed those linears their stored inputs (a Flax method interceptor) and XLA drops
everything upstream of them as dead code: attention runs once per layer instead of four times (at the cost
of keeping each group's inputs for the layer: nsamples x seqlen x the summed input widths, float32). The values fed are the ones the reference would recompute, up to float rounding of a
differently fused program.

Methods plug in as a ``solve(W [out, in], H [in, in], cfg) -> (QuantizedWeight, error)`` function plus whether they
need the Hessian (RTN does not, and skips the forward passes altogether). A method whose statistics are not a layer
Hessian (SqueezeLLM: the Fisher of the whole model's loss) gives ``stats(lm, calibration, cfg, params)``, computed
once before the layer loop; solve then receives that linear's entry in place of H.
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.config import QuantConfig
from jaxquant.hessian import hessian_init, hessian_update


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    solve: Callable  # (W [out, in] float32, H [in, in] or None, cfg) -> (quantized weight, error float)
    needs_hessian: bool = True
    row_parallel: bool = False  # solve(..., mesh=) splits the output rows over the mesh's devices
    # (lm, calibration, cfg, params) -> {"layers_{i}/<sub-layer>": statistics}, computed once before the layer loop;
    # solve gets the linear's entry in place of H (e.g. SqueezeLLM's Fisher). Needs calibration, not the Hessian.
    stats: Optional[Callable] = None

    @property
    def needs_calibration(self) -> bool:
        return self.needs_hessian or self.stats is not None


def _gptq(W, H, cfg, mesh=None):
    from jaxquant.gptq import gptq

    return gptq(W, H, cfg, mesh=mesh)


def _rtn(W, H, cfg):
    from jaxquant.rtn import rtn

    qw = rtn(W, cfg)
    return qw, float(jnp.sum(jnp.square(qw.dequantize().T - W)))


METHODS: Dict[str, Method] = {
    "gptq": Method("gptq", _gptq, row_parallel=True),
    "rtn": Method("rtn", _rtn, needs_hessian=False),
}


def register_method(method: Method) -> None:
    METHODS[method.name] = method


# ------------------------------------------------------------------------------------------------ tree helpers
def _get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _with(tree, path: str, value):
    """Copy of a nested dict with ``path`` set to ``value`` (the other branches are shared, not copied)."""
    key, _, rest = path.partition("/")
    new = dict(tree)
    new[key] = value if not rest else _with(tree[key], rest, value)
    return new


def layer_names(lm) -> List[str]:
    return [f"layers_{i}" for i in range(lm.config.num_layers)]


def non_layer_params(params) -> dict:
    return {k: v for k, v in params.items() if not k.startswith("layers_")}


# ------------------------------------------------------------------------------------------------- jitted parts
def _feeding(stored: dict):
    """Interceptor context: the linears named in ``stored`` ("self_attn/o_proj" -> input array) get that input."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and hasattr(context.module, "features"):
            name = "/".join(context.module.path)
            if name in stored:
                return next_fun(stored[name], *args[1:], **kwargs)
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


def _make_collector(layer, names: Tuple[str, ...], update=hessian_update):
    """Jitted ``(layer_params, h, positions, states, stored) -> (states, inputs)``: folds the inputs of ``names``
    into their Hessians and returns those inputs (one array per distinct input, keyed by its first user;
    ``collect.aliases`` maps every name to that first user, filled in when the function is traced)."""
    aliases = {}

    def collect(layer_params, h, positions, states, stored):
        with _feeding(stored):
            _, variables = layer.apply({"params": layer_params}, h, positions, mutable=["intermediates"])
        sown = variables["intermediates"]
        seen = []  # q/k/v (and up/gate) see the very same input tracer: fold it once, share the result
        out, inputs = {}, {}
        for name in names:
            x = _get(sown, name)["inputs"][0]
            first = next((n for t, n in seen if t is x), None)
            if first is None:
                out[name], inputs[name] = update(states[name], x), x
                seen.append((x, name))
            else:
                out[name] = out[first]
            aliases[name] = first or name
        return out, inputs

    jitted = jax.jit(collect)
    return lambda *args: (*jitted(*args), aliases)


def _make_forward(layer):
    def forward(layer_params, h, positions, stored):
        with _feeding(stored):
            return layer.apply({"params": layer_params}, h, positions)[0]

    return jax.jit(forward)


# ------------------------------------------------------------------------------------------------------ pipeline
@dataclasses.dataclass
class QuantizeReport:
    method: str
    config: QuantConfig
    layers: List[dict]  # one row per quantized linear: layer, name, error, seconds
    seconds: float
    nsamples: int
    seqlen: int
    devices: int = 1
    layer_seconds: List[float] = dataclasses.field(default_factory=list)  # wall time of each decoder layer
    peak_device_bytes: Optional[int] = None  # allocator peak over the run (None where the backend keeps none: CPU)

    def total_error(self) -> float:
        return float(sum(r["error"] for r in self.layers))


def quantize_model(lm, calibration: Optional[np.ndarray], config: QuantConfig, method: str = "gptq",
                   batch_size: int = 4, progress: bool = True, params: Optional[dict] = None,
                   reuse_inputs: bool = True, mesh=None, mesh_solves: str = "linears"):
    """Quantize every linear layer inside the decoder layers of ``lm`` (a ``models.LoadedModel``).

    calibration: ``[n, seqlen]`` token ids (ignored by methods without a Hessian). ``params`` replaces
    ``lm.params`` (e.g. a tree already partly quantized). Returns ``(params, report)``: the parameter tree with
    quantized-weight leaves in place of the quantized kernels, and a per-linear report.

    mesh: a one-axis ``jax.sharding.Mesh`` (``jaxquant.distributed.make_mesh()``): every calibration batch is split
    across its devices (``batch_size`` must be a multiple of the device count) and the Hessians are all-reduced;
    the solves are spread too: ``mesh_solves="linears"`` (default) solves the independent linears of a group
    (q/k/v, up/gate) at the same time on different devices; ``"rows"`` splits every solve's output rows across the
    devices (row-parallel methods: GPTQ). The decoder layers' weights stay in host memory; only the layer being
    processed is put on the devices.
    """
    if mesh_solves not in ("linears", "rows"):
        raise ValueError(f"mesh_solves={mesh_solves!r}: use 'linears' or 'rows'")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    m = METHODS[method]
    family, cfg_model = lm.family, lm.config
    layer = family.DecoderLayer(cfg_model, lm.dtype)
    sequential = getattr(config, "true_sequential", True)  # configs without the flag (SqueezeLLM) need no order
    groups = family.SEQUENTIAL_GROUPS if sequential else (sum(family.SEQUENTIAL_GROUPS, ()),)
    host = jax.device_get(lm.params if params is None else params)
    n_dev = 1 if mesh is None else mesh.devices.size
    if mesh is not None:
        from jaxquant.distributed import batch_sharding, replicated

        on_devices = lambda tree: jax.device_put(tree, replicated(mesh))  # noqa: E731
        split_batch = lambda x: jax.device_put(x, batch_sharding(mesh))  # noqa: E731
    else:
        on_devices, split_batch = jax.device_put, lambda x: x
    by_rows = mesh is not None and n_dev > 1 and mesh_solves == "rows" and m.row_parallel
    solve = partial(m.solve, mesh=mesh) if by_rows else m.solve
    # Linears of one group share nothing once their inputs are collected: with several devices, solve them at the
    # same time, one per device (threads: JAX releases the GIL while a device computes).
    spread = [] if (mesh is None or n_dev == 1 or by_rows) else list(mesh.devices.flat)
    rows: List[dict] = []
    t_start = time.perf_counter()

    inps = positions = None
    if m.needs_hessian:
        if calibration is None or np.ndim(calibration) != 2:
            raise ValueError(f"method {method!r} needs calibration token ids of shape [n, seqlen]")
        n, seqlen = calibration.shape
        batch_size = max(1, min(batch_size, n))
        if n % batch_size:
            raise ValueError(f"nsamples={n} is not a multiple of batch_size={batch_size}")
        if batch_size % n_dev:
            raise ValueError(f"batch_size={batch_size} is not a multiple of the mesh's {n_dev} devices")
        positions = split_batch(jnp.broadcast_to(jnp.arange(seqlen), (batch_size, seqlen)))
        embed = jax.jit(lambda p, ids: lm.module.apply({"params": p}, ids, positions, method=lm.module.embed))
        top = on_devices(non_layer_params(host))
        inps = [embed(top, split_batch(jnp.asarray(calibration[i: i + batch_size])))
                for i in range(0, n, batch_size)]
        del top
        if mesh is not None:
            from jaxquant.distributed import partial_hessians

            h_init, h_update, h_finish = partial_hessians(mesh)
        else:
            h_init, h_update, h_finish = hessian_init, hessian_update, lambda state: state.H
        collectors = {g: _make_collector(layer, g, h_update) for g in groups}
        forward = _make_forward(layer)
    else:
        n, seqlen = (0, 0) if calibration is None else np.shape(calibration)
    model_stats = None
    if m.stats is not None:
        if calibration is None or np.ndim(calibration) != 2:
            raise ValueError(f"method {method!r} needs calibration token ids of shape [n, seqlen]")
        model_stats = m.stats(lm, np.asarray(calibration), config, host)

    from tqdm.auto import tqdm

    bar = tqdm(layer_names(lm), desc=f"{method} w{config.bits}", unit="layer", disable=not progress)
    layer_seconds = []
    for lname in bar:
        t_layer = time.perf_counter()
        work = on_devices(host[lname])  # only this layer's weights on the device(s)
        quantized = {}
        layer_err = 0.0
        stored = [{} for _ in inps or ()]  # per batch: final inputs of the groups quantized so far
        for group in groups:
            hessians = {name: None if model_stats is None else model_stats[f"{lname}/{name}"] for name in group}
            t_group = time.perf_counter()
            if m.needs_hessian:
                states = {name: h_init(_get(work, name)["kernel"].shape[0]) for name in group}
                for b, h in enumerate(inps):
                    states, inputs, aliases = collectors[group](work, h, positions, states, stored[b])
                    if reuse_inputs:
                        stored[b].update({name: inputs[aliases[name]] for name in group})
                finished = {}  # q/k/v (up/gate) share one state: reduce it once
                for name, state in states.items():
                    finished.setdefault(id(state), h_finish(state))
                    hessians[name] = finished[id(state)]
                jax.block_until_ready(hessians)
            collect_seconds = time.perf_counter() - t_group
            def solve_one(name, device=None):
                t0 = time.perf_counter()
                W, H = jnp.asarray(_get(work, name)["kernel"], jnp.float32).T, hessians[name]
                if device is not None:
                    W, H = jax.device_put((W, H), device)
                qw, err = solve(W, H, config)
                return qw, float(err), time.perf_counter() - t0

            if len(spread) > 1 and len(group) > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(len(spread)) as pool:
                    futures = [pool.submit(solve_one, name, spread[i % len(spread)]) for i, name in enumerate(group)]
                    solved = [f.result() for f in futures]
            else:
                solved = [solve_one(name) for name in group]
            for name, (qw, err, seconds) in zip(group, solved):
                kernel = _get(work, name)["kernel"]
                # Later groups and the next layer see the quantized weight (dense copy: one compiled program).
                work = _with(work, f"{name}/kernel", on_devices(qw.dequantize(kernel.dtype)))
                quantized[name] = qw
                layer_err += err
                rows.append({"layer": lname, "name": name, "error": err, "seconds": seconds,
                             "collect_seconds": collect_seconds})
                collect_seconds = 0.0  # a group's inputs are collected once, reported with its first linear
        if m.needs_hessian:
            inps = [forward(work, h, positions, stored[b]) for b, h in enumerate(inps)]
            del stored
        stored = host[lname]
        for name, qw in quantized.items():
            stored = _with(stored, f"{name}/kernel", jax.device_get(qw))
        host = dict(host, **{lname: stored})
        layer_seconds.append(time.perf_counter() - t_layer)
        bar.set_postfix(err=f"{layer_err:.4g}")
    bar.close()
    from jaxquant.distributed import peak_device_bytes

    report = QuantizeReport(method=method, config=config, layers=rows, seconds=time.perf_counter() - t_start,
                            nsamples=int(n), seqlen=int(seqlen), devices=n_dev, layer_seconds=layer_seconds,
                            peak_device_bytes=peak_device_bytes(None if mesh is None else mesh.devices.flat))
    return host, report
