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
from jaxquant.hessian import ShardTree, calibration_order, hessian_init, hessian_update
from jaxquant.hessian import hessian_shards as canonical_shards


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    solve: Callable  # (W [out, in] float32, H [in, in] or None, cfg) -> (quantized weight, error float)
    needs_hessian: bool = True
    # (W [N, in], H, cfg) -> (weight, errors per output row [N] numpy, dequantized W [N, in] float32 on W's device),
    # for methods whose output rows are independent given H (GPTQ). The pipeline then solves the linears that share
    # a Hessian (q/k/v, up/gate) as one stacked weight -- the same codes, fewer latency-bound column loops -- and on a
    # mesh splits each such solve's rows across the devices.
    solve_rows: Optional[Callable] = None
    # (N, K, cfg, device or None) -> None: compiles ahead of time what solve_rows runs for W [N, K] with W and H on
    # device (None: uncommitted, default device); the pipeline calls it from background threads (precompile=True).
    precompile_rows: Optional[Callable] = None
    # (lm, calibration, cfg, params) -> {"layers_{i}/<sub-layer>": statistics}, computed once before the layer loop;
    # solve gets the linear's entry in place of H (e.g. SqueezeLLM's Fisher). Needs calibration, not the Hessian.
    stats: Optional[Callable] = None

    @property
    def needs_calibration(self) -> bool:
        return self.needs_hessian or self.stats is not None


def _gptq(W, H, cfg):
    from jaxquant.gptq import gptq

    return gptq(W, H, cfg)


def _gptq_rows(W, H, cfg):
    from jaxquant.gptq import gptq

    return gptq(W, H, cfg, return_dequantized=True, row_errors=True)


def _gptq_precompile_rows(N, K, cfg, device):
    from jaxquant.gptq import precompile

    precompile(N, K, cfg, device, return_dequantized=True, row_errors=True)


def _rtn(W, H, cfg):
    from jaxquant.rtn import rtn

    qw = rtn(W, cfg)
    return qw, float(jnp.sum(jnp.square(qw.dequantize().T - W)))


METHODS: Dict[str, Method] = {
    "gptq": Method("gptq", _gptq, solve_rows=_gptq_rows, precompile_rows=_gptq_precompile_rows),
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
    call = lambda *args: (*jitted(*args), aliases)  # noqa: E731
    call.jitted, call.aliases = jitted, aliases
    return call


def _make_forward(layer):
    def forward(layer_params, h, positions, stored):
        with _feeding(stored):
            return layer.apply({"params": layer_params}, h, positions)[0]

    return jax.jit(forward)


# Rows per device of a split solve: a multiple of every packing run along the outputs (32 codes at 3 bits).
_ROW_UNIT = 32


@partial(jax.jit, static_argnames=("lo", "hi"))
def _stacked_rows(kernels, lo, hi):
    """Rows lo:hi of the linears' weights stacked along their outputs, torch layout [hi - lo, in] float32."""
    return jnp.concatenate(kernels, axis=1)[:, lo:hi].T.astype(jnp.float32)


def _unstack_kernels(deq, sizes, dtype):
    """Dequantized stacked rows [N, in] -> one kernel [in, n] per linear."""
    out, start = [], 0
    for n in sizes:
        out.append(deq[start:start + n].T.astype(dtype))
        start += n
    return tuple(out)


_unstack_jit = jax.jit(_unstack_kernels, static_argnames=("sizes", "dtype"))


@partial(jax.jit, static_argnames="shards")
def _scale_root(root, shards: int):
    """The sum of the shard Hessians -> their mean (1/shards: a power of two, exact)."""
    return root * jnp.float32(1.0 / shards)
_unstack_on_mesh = {}


def _local(x, device):
    """The copy of a replicated (mesh) array that lives on ``device``: no transfer."""
    if device is None:
        return x
    for shard in x.addressable_shards:
        if shard.device == device:
            return shard.data
    return jax.device_put(x, device)


def _joint_sets(group, aliases):
    """The names of ``group`` partitioned by shared input (same Hessian), in group order."""
    sets = {}
    for name in group:
        sets.setdefault(aliases.get(name, name), []).append(name)
    return [tuple(v) for v in sets.values()]


def _used_entries(fn, tree: dict, *args) -> dict:
    """The top-level entries of ``tree`` that ``fn(tree, *args)`` reads (one abstract trace); all of them if the trace
    fails. The embedding needs the token table, not the LM head: only that goes to the device(s)."""
    try:
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.result_type(x))  # noqa: E731
        closed = jax.make_jaxpr(fn)(jax.tree_util.tree_map(spec, tree), *args)
        jaxpr = closed.jaxpr
        used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
        keep = {str(path[0].key) for (path, _), var in zip(flat, jaxpr.invars) if id(var) in used}
        return {k: v for k, v in tree.items() if k in keep}
    except Exception:  # only a saving: fall back to every entry
        return tree


def _run_concurrently(fns):
    if len(fns) == 1:
        return [fns[0]()]
    from concurrent.futures import ThreadPoolExecutor

    # Threads: JAX releases the GIL while a device computes (and while XLA compiles).
    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result() for f in [pool.submit(fn) for fn in fns]]


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
    # wall seconds before the first layer ("setup": calibration embedded, params placed) and after the last ("finish")
    phase_seconds: Dict[str, float] = dataclasses.field(default_factory=dict)

    def total_error(self) -> float:
        return float(sum(r["error"] for r in self.layers))


def quantize_model(lm, calibration: Optional[np.ndarray], config: QuantConfig, method: str = "gptq",
                   batch_size: int = 4, progress: bool = True, params: Optional[dict] = None,
                   reuse_inputs: bool = True, mesh=None, mesh_solves: str = "rows",
                   layer_callback: Optional[Callable[[str, float], None]] = None, precompile: bool = True,
                   hessian_shards: Optional[int] = None):
    """Quantize every linear layer inside the decoder layers of ``lm`` (a ``models.LoadedModel``).

    calibration: ``[n, seqlen]`` token ids (ignored by methods without a Hessian). ``params`` replaces
    ``lm.params`` (e.g. a tree already partly quantized). Returns ``(params, report)``: the parameter tree with
    quantized-weight leaves in place of the quantized kernels, and a per-linear report.

    batch_size: calibration sequences per forward pass on each device (the same on any device count, so that every
    device computes exactly what one device would).

    hessian_shards: the calibration set is split into this many canonical shards (contiguous runs of sequences, a
    power of two; default: 8 where ``nsamples`` is a multiple of 8 x ``batch_size``, else the largest power of two
    that splits it into whole batches); each shard's Hessian is accumulated on its own and the shards are combined
    by one fixed pairwise tree (``jaxquant.hessian``). The result depends on the shard count, not on the device
    count: any mesh whose device count divides it gives bit-identical Hessians and codes (same batch_size; measured
    on CPU devices; on GPUs also with ``XLA_FLAGS=--xla_gpu_deterministic_ops=true``, which ``jaxquant quantize``
    sets by default -- without it XLA autotunes GEMM kernels by timing and two compilations can round differently:
    bench/results/quant_pipeline.md). Memory:
    up to log2(shards / devices) + 2 Hessian-sized float32 arrays per device for the group being collected (one
    shard's running sum, the finished subtrees) and the devices' subtree roots gathered once per Hessian.
    ``hessian_shards=1`` on one device is the plain running sum of the reference.

    mesh: a one-axis ``jax.sharding.Mesh`` (``jaxquant.distributed.make_mesh()``): each device takes a contiguous
    block of the calibration set (whole shards), ``batch_size`` sequences per step, and the Hessians are combined
    across the devices once per Hessian;
    the solves are spread too: ``mesh_solves="rows"`` (default) splits the output rows of each solve across the
    devices, each device running the single-device solve on its block of rows in its own thread (methods with
    ``solve_rows``: GPTQ; others fall back to "linears"); ``"linears"`` solves the independent solves of a group
    at the same time, each whole on one device. The decoder layers' weights stay in host memory; only the layer
    being processed (and the next one, loading in the background) is put on the devices.

    Methods with ``solve_rows`` (GPTQ) solve the linears that share one Hessian (q/k/v, up/gate) as one stacked
    weight: the same codes as separate solves (rows are independent given H) with a third of the column loops.
    layer_callback(layer name, seconds) is called after each decoder layer (progress reporting).

    precompile: while the first layer starts, compile its later programs in background threads (the Hessian
    collection of each group and the layer's forward ahead of time, and for joint-solve methods every solve shape on
    every device by a throw-away solve with an identity Hessian). The programs are the same for every layer, so
    this overlaps most of the run's compilation instead of paying it one program after another; results unchanged.
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
        split_batch = lambda x: jax.device_put(x, batch_sharding(mesh))  # noqa: E731 (host rows -> their devices)
    else:
        on_devices, split_batch = jax.device_put, jnp.asarray
    devices = [None] if mesh is None else list(mesh.devices.flat)
    joint = m.solve_rows is not None and m.stats is None and m.needs_hessian
    rows: List[dict] = []
    t_start = time.perf_counter()

    inps = positions = upcoming = None
    from concurrent.futures import ThreadPoolExecutor

    # Decoder layers go host -> device(s) in a background thread, the next one while this one computes.
    loader, names_all = ThreadPoolExecutor(1), layer_names(lm)
    side = ThreadPoolExecutor(1)  # one-off background jobs
    packer = ThreadPoolExecutor(1)  # solved weights device -> host and (un)stacked there, off the critical path
    if m.needs_hessian:
        if calibration is None or np.ndim(calibration) != 2:
            raise ValueError(f"method {method!r} needs calibration token ids of shape [n, seqlen]")
        n, seqlen = calibration.shape
        batch_size = max(1, min(batch_size, n))
        if n % batch_size:
            raise ValueError(f"nsamples={n} is not a multiple of batch_size={batch_size}")
        n_shards = canonical_shards(n, batch_size, n_dev, hessian_shards)
        order, steps_per_shard = calibration_order(n, batch_size, n_dev, n_shards)
        # Set-up in two halves: first only shapes and placements (the embedding compiled from them, and the first
        # layer's programs started compiling in the background, see start_precompile), then the device work (the
        # first transfers and executions cost seconds on a cold process, a second device more).
        step_shape = (n_dev * batch_size, seqlen)
        batch_spec = lambda dtype: jax.ShapeDtypeStruct(step_shape, dtype, sharding=None if mesh is None  # noqa: E731
                                                        else batch_sharding(mesh))
        ids_spec = batch_spec(jax.dtypes.canonicalize_dtype(np.asarray(calibration).dtype))
        positions_spec = batch_spec(jnp.int32)
        embed_fn = lambda p, ids, pos: lm.module.apply({"params": p}, ids, pos, method=lm.module.embed)  # noqa: E731
        embed = jax.jit(embed_fn)
        top_host = _used_entries(embed_fn, non_layer_params(host), ids_spec, positions_spec)
        # The embedding's output as the layers will see it (shape, dtype, placement), from its compiled program.
        placed = (lambda x: jax.ShapeDtypeStruct(np.shape(x), np.result_type(x), sharding=replicated(mesh))) \
            if mesh is not None else (lambda x: jax.ShapeDtypeStruct(np.shape(x), np.result_type(x)))
        top_spec = jax.tree_util.tree_map(placed, top_host)
        embed_compiled = embed.lower(top_spec, ids_spec, positions_spec).compile()
        h_out = jax.eval_shape(embed_fn, top_spec, ids_spec, positions_spec)
        h_spec = jax.ShapeDtypeStruct(h_out.shape, h_out.dtype,
                                      sharding=None if mesh is None else embed_compiled.output_shardings)
        if mesh is not None:
            from jaxquant.distributed import partial_hessians

            h_init, h_update, h_finish = partial_hessians(mesh)
        else:
            h_init, h_update, h_finish = hessian_init, hessian_update, _scale_root
        collectors = {g: _make_collector(layer, g, h_update) for g in groups}
        forward = _make_forward(layer)
    else:
        n, seqlen = (0, 0) if calibration is None else np.shape(calibration)
    model_stats = None
    if m.stats is not None:
        if calibration is None or np.ndim(calibration) != 2:
            raise ValueError(f"method {method!r} needs calibration token ids of shape [n, seqlen]")
        model_stats = m.stats(lm, np.asarray(calibration), config, host)

    def solve_separately(work, hessians, group):
        """One solve per linear; with several devices the linears of a group run at the same time, one per device."""

        def one(name, device):
            t0 = time.perf_counter()
            W = jnp.asarray(_local(_get(work, name)["kernel"], device), jnp.float32).T
            H = hessians[name]
            if device is not None and H is not None:
                H = _local(H, device) if isinstance(H, jax.Array) else jax.device_put(H, device)
            qw, err = m.solve(W, H, config)
            kernel = on_devices(qw.dequantize(_get(work, name)["kernel"].dtype))
            return (name,), partial(jax.device_get, [qw]), [float(err)], time.perf_counter() - t0, [kernel]

        if len(devices) == 1:
            return [one(name, None) for name in group]
        return _run_concurrently([partial(one, name, devices[i % len(devices)]) for i, name in enumerate(group)])

    def solve_plan(work, sets):
        """[(names, [(device, lo, hi), ...])]: the row blocks of each joint solve and the device of each block."""
        planned = []
        for i, names in enumerate(sets):
            N = sum(int(_get(work, nm)["kernel"].shape[1]) for nm in names)
            if len(devices) == 1 or mesh_solves == "linears":
                planned.append((names, [(devices[i % len(devices)], 0, N)]))
            elif N % (n_dev * _ROW_UNIT) == 0:
                per = N // n_dev
                planned.append((names, [(d, j * per, (j + 1) * per) for j, d in enumerate(devices)]))
            else:  # rows not divisible into whole packing runs per device: one device
                planned.append((names, [(devices[0], 0, N)]))
        return planned

    def solve_joint(work, hessians, sets):
        """One solve per set of linears sharing a Hessian, over their stacked rows; on a mesh either each solve's
        rows split into equal blocks across the devices ("rows") or whole solves side by side ("linears")."""
        shapes = {names: [_get(work, nm)["kernel"].shape for nm in names] for names in sets}

        def block(names, device, lo, hi):
            t0 = time.perf_counter()
            W = _stacked_rows(tuple(_local(_get(work, nm)["kernel"], device) for nm in names), lo=lo, hi=hi)
            qw, row_err, deq = m.solve_rows(W, _local(hessians[names[0]], device), config)
            return qw, row_err, deq, time.perf_counter() - t0

        def to_host(names, sizes, parts):
            """The solved weights of ``names`` on the host, from the row blocks' weights on their devices."""
            parts = jax.device_get(parts)
            qw = parts[0] if len(parts) == 1 else type(parts[0]).concat_outputs(parts)
            return qw.split_outputs(sizes) if len(names) > 1 else [qw]

        def assemble(names, blocks):
            """(names, job that returns their host weights, errors, seconds, dequantized kernels on the device(s)).
            The next group's work needs only the kernels: the job runs later, in the packer thread."""
            sizes = tuple(int(shape[1]) for shape in shapes[names])
            row_err = np.concatenate([b[1] for b in blocks])
            errs = [float(e.sum()) for e in np.split(row_err, np.cumsum(sizes)[:-1])]
            dtype = _get(work, names[0])["kernel"].dtype
            if mesh is None:
                kernels = _unstack_jit(blocks[0][2], sizes=sizes, dtype=dtype)
            else:
                from jax.sharding import NamedSharding, PartitionSpec as P

                from jaxquant.distributed import axis_name, replicated

                N, K = sum(sizes), shapes[names][0][0]
                if len(blocks) == n_dev:  # row blocks in mesh order: one row-sharded array, no copy
                    deq = jax.make_array_from_single_device_arrays(
                        (N, K), NamedSharding(mesh, P(axis_name(mesh), None)), [b[2] for b in blocks])
                else:
                    deq = jax.device_put(blocks[0][2], replicated(mesh))
                if mesh not in _unstack_on_mesh:  # the gather to every device is the all-gather of this program
                    _unstack_on_mesh[mesh] = jax.jit(_unstack_kernels, static_argnames=("sizes", "dtype"),
                                                     out_shardings=replicated(mesh))
                kernels = _unstack_on_mesh[mesh](deq, sizes=sizes, dtype=dtype)
            job = partial(to_host, names, sizes, [b[0] for b in blocks])
            return names, job, errs, max(b[3] for b in blocks), kernels

        planned = solve_plan(work, sets)
        if len(devices) == 1 or mesh_solves == "linears":  # whole solves, side by side on the devices
            results = _run_concurrently([partial(block, names, *blocks[0]) for names, blocks in planned])
            return [assemble(names, [r]) for (names, _), r in zip(planned, results)]
        # one solve after the other, each one's row blocks at the same time on their devices
        return [assemble(names, _run_concurrently([partial(block, names, *b) for b in blocks]))
                for names, blocks in planned]

    def start_precompile(work_future, h_spec, positions_spec):
        """Background compilation of the first layer's programs (see ``precompile``), from their shapes and placements
        (the layer's weights as they arrive on the device(s), the embedding's output ``h_spec``), started before any
        device work of the set-up; returns the pool to join."""
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(12)
        work0 = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.result_type(x),
                                           sharding=None if mesh is None else replicated(mesh)), host[names_all[0]])
        h0 = h_spec

        def spec(shape):  # a collected input as the collection returns it: batch-split on a mesh
            return jax.ShapeDtypeStruct(shape, h0.dtype, sharding=h0.sharding)

        def quiet(fn):
            def run():
                try:
                    fn()
                except Exception as e:  # only an optimisation: the real call compiles whatever this missed
                    import warnings

                    warnings.warn(f"precompile: {type(e).__name__}: {e}")
            return run

        # With JAX's persistent compilation cache on, a single-device program compiled for one device is loaded from
        # the cache for the others (GPU cache keys leave the device out): compile each solve for the devices in turn.
        chain_devices = bool(jax.config.jax_compilation_cache_dir) and n_dev > 1

        def precompile_solves(group):
            """The group's solve programs (every row block, every device), compiled ahead of time; needs the
            collector traced (its aliases give the joint sets)."""
            if not (joint and m.precompile_rows is not None):
                return
            for names, blocks in solve_plan(work0, _joint_sets(group, collectors[group].aliases)):
                K = int(_get(work0, names[0])["kernel"].shape[0])
                jobs = [partial(m.precompile_rows, hi - lo, K, config, device) for device, lo, hi in blocks]
                if chain_devices:
                    pool.submit(quiet(lambda jobs=jobs: [job() for job in jobs]))
                else:
                    for job in jobs:
                        pool.submit(quiet(job))

        def state_spec(K):  # a fresh Hessian sum's shapes and placement, without making it on the device(s)
            return h_init.lower(K).out_info if hasattr(h_init, "lower") else jax.eval_shape(lambda: h_init(K))

        def lower_all():
            stored, before = {}, []  # before: the stored inputs each group's collection is fed
            for group in groups:
                before.append(dict(stored))
                stored.update({name: spec(h0.shape[:-1] + (_get(work0, name)["kernel"].shape[0],))
                               for name in group})
            # From the last group back: the collection that computes attention (o_proj's input) is the largest
            # program (1.3-1.4 s on a GPU with attention as one masked pass). Lowered here, in the pool, not by the
            # caller before the set-up's device work: that started the compiles sooner but beside the process's
            # first device work, and both got slower (bench/results/quant_pipeline.md, a2cedae rows).
            for group, fed in reversed(list(zip(groups, before))):
                sts = {name: state_spec(_get(work0, name)["kernel"].shape[0]) for name in group}
                pool.submit(quiet(collectors[group].jitted.lower(work0, h0, positions_spec, sts, fed).compile))
            pool.submit(quiet(forward.lower(work0, h0, positions_spec, stored).compile))
            for group in groups:  # the collectors are traced: their aliases give the joint sets
                precompile_solves(group)
            if joint:
                work_real = work_future.result()  # warm-up solves on the layer's real weights (identity Hessians)
                for group in groups:
                    sets = _joint_sets(group, collectors[group].aliases)
                    eye = {}
                    for name in group:
                        K = _get(work0, name)["kernel"].shape[0]
                        eye.setdefault(K, on_devices(jnp.eye(K, dtype=jnp.float32)))
                    hess = {name: eye[_get(work0, name)["kernel"].shape[0]] for name in group}
                    for names in sets:
                        pool.submit(quiet(partial(solve_joint, work_real, hess, [names])))

        pool.submit(quiet(lower_all))
        return pool

    from tqdm.auto import tqdm

    bar = tqdm(layer_names(lm), desc=f"{method} w{config.bits}", unit="layer", disable=not progress)
    layer_seconds = []
    warmup = None
    # The set-up's device work from here on (a cold process's first transfers and executions take seconds, longer
    # with a second device): the programs above compile meanwhile.
    if names_all and m.stats is None:  # the first layer's weights travel while the calibration set is embedded
        upcoming = loader.submit(on_devices, host[names_all[0]])
    if precompile and m.needs_hessian and reuse_inputs and names_all:
        if upcoming is None:
            upcoming = loader.submit(on_devices, host[names_all[0]])
        warmup = start_precompile(upcoming, h_spec, positions_spec)
    if mesh is not None and n_dev > 1 and m.needs_calibration:
        from jaxquant.distributed import warm_up_collectives

        side.submit(warm_up_collectives, mesh)
    if m.needs_hessian:
        positions = split_batch(np.broadcast_to(np.arange(seqlen, dtype=np.int32), step_shape))
        top = on_devices(top_host)
        inps = [embed(top, split_batch(np.asarray(calibration[rows], ids_spec.dtype)), positions) for rows in order]
        del top, top_host
    if upcoming is None and names_all:
        upcoming = loader.submit(on_devices, host[names_all[0]])
    # Host copies of the solved weights (device -> host, stacked row blocks joined and split per linear) run in the
    # packer thread, started when the main thread next waits on the device: run beside its dispatches they held the
    # GIL and left the GPUs idle for up to 15 ms after a solve (a profile of a steady layer on 2 GPUs).
    waiting, done = [], []  # waiting: (layer's weights, names, job); done: (layer name, its weights), not yet on host

    def start_packing():
        for target, names, job in waiting:
            target[names] = packer.submit(job)
        waiting.clear()

    def to_host_tree(host, lname, quantized):
        stored = host[lname]
        for names, qws in quantized.items():
            for name, qw in zip(names, qws.result()):
                stored = _with(stored, f"{name}/kernel", qw)
        return dict(host, **{lname: stored})

    phases = {"setup": time.perf_counter() - t_start}
    for index, lname in enumerate(bar):
        t_layer = time.perf_counter()
        work = upcoming.result()  # only this layer's weights (and the next one's, arriving) on the device(s)
        if index + 1 < len(names_all):
            upcoming = loader.submit(on_devices, host[names_all[index + 1]])
        quantized = {}
        layer_err = 0.0
        stored = [{} for _ in inps or ()]  # per batch: final inputs of the groups quantized so far
        for group in groups:
            hessians = {name: None if model_stats is None else model_stats[f"{lname}/{name}"] for name in group}
            t_group = time.perf_counter()
            if m.needs_hessian:
                def fresh():  # zero sums, one per input width (only a shared input's first user reads its own)
                    zeros, out = {}, {}
                    for name in group:
                        K = _get(work, name)["kernel"].shape[0]
                        if K not in zeros:
                            zeros[K] = h_init(K)
                        out[name] = zeros[K]
                    return out

                states, trees = fresh(), {}  # trees: first user of an input -> its shard Hessians' tree

                def end_shard(states):  # q/k/v (up/gate) share one input, one state, one tree
                    for name in group:
                        if aliases[name] == name:
                            trees.setdefault(name, ShardTree()).push(states[name].H)

                for b, h in enumerate(inps):
                    if b and b % steps_per_shard == 0:  # a shard ends: its Hessian into the tree, a fresh sum
                        end_shard(states)
                        states = fresh()
                    states, inputs, aliases = collectors[group](work, h, positions, states, stored[b])
                    if reuse_inputs:
                        stored[b].update({name: inputs[aliases[name]] for name in group})
                end_shard(states)
                finished = {first: h_finish(tree.root(), shards=n_shards) for first, tree in trees.items()}
                for name in group:
                    hessians[name] = finished[aliases[name]]
                start_packing()
                jax.block_until_ready(hessians)
            collect_seconds = time.perf_counter() - t_group
            sets = _joint_sets(group, aliases) if joint else [(name,) for name in group]
            solved = solve_joint(work, hessians, sets) if joint else solve_separately(work, hessians, group)
            for names, job, errs, seconds, kernels in solved:
                waiting.append((quantized, names, job))
                for i, (name, err, kernel) in enumerate(zip(names, errs, kernels)):
                    # Later groups and the next layer see the quantized weight (dense copy: one compiled program).
                    work = _with(work, f"{name}/kernel", kernel)
                    layer_err += err
                    rows.append({"layer": lname, "name": name, "error": err, "collect_seconds": collect_seconds,
                                 "seconds": seconds if i == 0 else 0.0, "solved_with": list(names)})
                    collect_seconds = 0.0  # a group's inputs are collected once, reported with its first linear
        if m.needs_hessian:
            inps = [forward(work, h, positions, stored[b]) for b, h in enumerate(inps)]
            del stored
        else:
            start_packing()
        done.append((lname, quantized))
        if len(done) > 1 or not m.needs_hessian:  # the layer before: its copies were started with this layer
            host = to_host_tree(host, *done.pop(0))
        layer_seconds.append(time.perf_counter() - t_layer)
        if layer_callback is not None:
            layer_callback(lname, layer_seconds[-1])
        bar.set_postfix(err=f"{layer_err:.4g}")
    bar.close()
    t_finish = time.perf_counter()
    start_packing()
    for finished_layer in done:
        host = to_host_tree(host, *finished_layer)
    loader.shutdown(wait=True)
    side.shutdown(wait=True)
    packer.shutdown(wait=True)
    if warmup is not None:
        warmup.shutdown(wait=True)
    from jaxquant.distributed import peak_device_bytes

    phases["finish"] = time.perf_counter() - t_finish
    report = QuantizeReport(method=method, config=config, layers=rows, seconds=time.perf_counter() - t_start,
                            nsamples=int(n), seqlen=int(seqlen), devices=n_dev, layer_seconds=layer_seconds,
                            peak_device_bytes=peak_device_bytes(None if mesh is None else mesh.devices.flat),
                            phase_seconds=phases)
    return host, report
