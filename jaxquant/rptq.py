"""RPTQ (reorder-based post-training quantization of activations): statistics, channel clusters, folded permutations
and per-cluster activation quantizers. Pure functions over arrays; the model knowledge is one table per family.

The five reorder points of the paper and of its reference (hahnyuan/RPTQ4LLM, quantize/opt_reorder_quantize.py):

  R1  attention-norm output  -> q/k/v input      stats: the norm output (= q_proj input), 1 group
  R2  q and k outputs         -> Q K^T            stats: q and k outputs together, per head: 4-D points
                                                  (qmax, kmax, qmin, kmin) of each channel of a head
  R3  v output                -> P V, o_proj      stats: the o_proj input (attention output), per head
  R4  MLP-norm output         -> first MLP matrix stats: the norm output (= fc1 / up_proj input), 1 group
  R5  first MLP output        -> second MLP matrix stats: the fc2 / down_proj input, 1 group

Reference defaults (main.py): clusters R1..R5 = 32/4/4/32/32; statistics for the reorder are the running per-channel
max / min over every calibration token (``layer_omax_hook`` / ``layer_i0max_hook``: ``torch.max(old, new)``); the
activation quantizers calibrate with ``metric="ema_minmax"`` (old * 0.99 + new * 0.01 per batch, the first batch
taken as is), both offered here by ``ema``. Clusters: k-means (scikit-learn in the reference, the shared
``jaxquant.kmeans`` here) on each head's points; the permutation is ``argsort(labels)`` per head (stable here, so the
channels of a cluster keep their order), offset by the head's first channel.

Folding (no gather at run time except inside the norm):
  norm (R1, R4)   the norm reads its input in the permuted order (``x[..., perm]``: mean and variance do not depend
                  on the order, so this is the reference's ReorderLayerNorm, whose CUDA kernel writes its output at
                  the permuted positions) and its scale / bias are permuted; the consuming linears' input rows
                  (Flax kernel ``[in, out]`` axis 0) are permuted.
  linear (R2, R3, R5)  the producing linears' output columns (kernel axis 1) and bias are permuted, the consuming
                  linears' input rows too; per head for R2 / R3 (the same permutation for q and k within a head, so
                  Q K^T is unchanged; for grouped-query attention one permutation per K/V head, used by every query
                  head of its group, and by the o_proj rows of those query heads).
RoPE (LLaMA, Falcon) rotates channel pairs (i, i + D/2) at frequencies fixed by i: a permutation of q/k channels does
not commute with it, so R2 is never folded there; its clusters still define the per-cluster quantizers (which act on
channels in any order: see ``fake_quant``). With grouped-query attention the R2 / R3 points of a K/V head take the
max (min) over the query heads of its group.

Flow: ``model_stats`` (per layer: ``layer_stats`` over ``make_stats_pass``) -> ``plan_layer`` (``point_features``,
``cluster_channels``) -> ``fold_model`` / ``fold_layer`` + the ``reordered_norms`` interceptor -> activation
quantizers: ``make_act_quantizer`` / ``fake_quant`` (per cluster), ``fake_quant_probs``, ``activation_bits``
(which activations each configuration quantizes), ``linear_input_quantizers`` + the ``quantized_linear_inputs``
interceptor (the linear inputs in the jitted forward), ``quantized_attention`` (q, post-RoPE k, v before the KV
cache, probabilities, through the models' ``attention_activation`` seam). Whole model: ``quantize_model_rptq``
(the reference's per-layer order: reorder stats -> clusters -> fold, permutations stored as the norms'
``input_perm`` -> GPTQ on the folded weights -> activation quantizers calibrated on the weight-quantized layer ->
next layer's inputs through the quantized layer) returning params + ``RPTQState``; ``act_quantized`` runs them
(any jitted forward, ``jaxquant.eval.perplexity``, ``models.generate``); ``save_rptq`` / ``checkpoint.load``
(orbax, via ``from_checkpoint``); CLI ``jaxquant quantize --method rptq --wbits 4 --abits 4 [--kv-only]
[--no-reorder]``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from functools import partial
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.kmeans import kmeans
from models.common import as_array

REORDER_POINTS = ("R1", "R2", "R3", "R4", "R5")
DEFAULT_CLUSTERS = {"R1": 32, "R2": 4, "R3": 4, "R4": 32, "R5": 32}
REFERENCE_EMA = 0.99  # weight of the running value in the reference's "ema_minmax" activation calibration


# ------------------------------------------------------------------------------------------- reorder-point tables
@dataclasses.dataclass(frozen=True)
class ReorderPoint:
    """One reorder point of a decoder layer (paths relative to the layer).

    taps: the tensors whose per-channel (max, min) are the clustering points, as ("in" | "out", linear path); several
    taps are concatenated as point coordinates (R2: q and k). Channel layout of every tap and folded tensor:
    ``[groups, repeat, channels]`` flattened, where ``groups`` (1, or the K/V heads for R2 / R3) are clustered
    independently and ``repeat`` copies (query heads sharing a K/V head) share their group's permutation; a tap's
    repeat is reduced (max of max, min of min) before clustering.
    """

    name: str
    taps: Tuple[Tuple[str, str], ...]
    groups: int
    channels: int  # per group
    norm: Optional[str] = None  # norm whose input is read permuted and whose scale/bias are permuted
    producers: Tuple[str, ...] = ()  # linears whose output columns (+ bias) are permuted
    consumers: Tuple[str, ...] = ()  # linears whose input rows are permuted
    foldable: bool = True
    # For fused linears (Falcon's query_key_value): per tap / per producer, the positions of this point's channels in
    # that tensor's last axis, in [groups, repeat, channels] order (None: the whole axis).
    tap_channels: Tuple[Optional[Tuple[int, ...]], ...] = ()
    producer_channels: Tuple[Optional[Tuple[int, ...]], ...] = ()

    def tap_index(self, i: int):
        return self.tap_channels[i] if i < len(self.tap_channels) else None

    def producer_index(self, i: int):
        return self.producer_channels[i] if i < len(self.producer_channels) else None


def reorder_points(config) -> Tuple[ReorderPoint, ...]:
    """The reorder points of a decoder layer of ``config``'s family (LLaMA, pre-LN OPT, Falcon)."""
    family = getattr(config, "family", None)
    if family == "llama":
        kv, d = config.num_kv_heads, config.head_dim
        return (
            ReorderPoint("R1", (("in", "self_attn/q_proj"),), 1, config.hidden_size, norm="input_layernorm",
                         consumers=("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj")),
            ReorderPoint("R2", (("out", "self_attn/q_proj"), ("out", "self_attn/k_proj")), kv, d,
                         producers=("self_attn/q_proj", "self_attn/k_proj"), foldable=False),  # RoPE
            ReorderPoint("R3", (("in", "self_attn/o_proj"),), kv, d, producers=("self_attn/v_proj",),
                         consumers=("self_attn/o_proj",)),
            ReorderPoint("R4", (("in", "mlp/up_proj"),), 1, config.hidden_size, norm="post_attention_layernorm",
                         consumers=("mlp/up_proj", "mlp/gate_proj")),
            ReorderPoint("R5", (("in", "mlp/down_proj"),), 1, config.intermediate_size,
                         producers=("mlp/up_proj", "mlp/gate_proj"), consumers=("mlp/down_proj",)),
        )
    if family == "opt":
        if not config.do_layer_norm_before:
            raise NotImplementedError("RPTQ for post-LN OPT (opt-350m): the norms follow the residual add, so their "
                                      "outputs are not the linears' inputs; only pre-LN OPT is supported")
        h, d = config.num_heads, config.head_dim
        return (
            ReorderPoint("R1", (("in", "self_attn/q_proj"),), 1, config.hidden_size, norm="self_attn_layer_norm",
                         consumers=("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj")),
            ReorderPoint("R2", (("out", "self_attn/q_proj"), ("out", "self_attn/k_proj")), h, d,
                         producers=("self_attn/q_proj", "self_attn/k_proj")),
            ReorderPoint("R3", (("in", "self_attn/out_proj"),), h, d, producers=("self_attn/v_proj",),
                         consumers=("self_attn/out_proj",)),
            ReorderPoint("R4", (("in", "fc1"),), 1, config.hidden_size, norm="final_layer_norm", consumers=("fc1",)),
            ReorderPoint("R5", (("in", "fc2"),), 1, config.ffn_dim, producers=("fc1",), consumers=("fc2",)),
        )
    if family == "falcon":
        return _falcon_points(config)
    raise NotImplementedError(f"RPTQ reorder points are defined for the llama, opt and falcon families, "
                              f"not {family!r}")


def _falcon_points(c) -> Tuple[ReorderPoint, ...]:
    """Falcon: the fused QKV output's q / k / v columns by layout (``models.falcon.split_qkv``); RoPE, so R2 is not
    folded; with one norm feeding attention and MLP in parallel (7B style) R1 is that norm's output, read by both
    query_key_value and dense_h_to_4h, and there is no separate R4."""
    h, kv, d = c.num_heads, c.num_kv_heads, c.head_dim
    g = h // kv
    if c.new_decoder_architecture:
        blk = np.arange(kv * (g + 2) * d).reshape(kv, g + 2, d)
        q, k, v = blk[:, :g], blk[:, g], blk[:, g + 1]
    elif c.multi_query:
        blk = np.arange((h + 2) * d).reshape(h + 2, d)
        q, k, v = blk[:h], blk[h], blk[h + 1]
    else:
        blk = np.arange(3 * h * d).reshape(h, 3, d)
        q, k, v = blk[:, 0], blk[:, 1], blk[:, 2]
    cols = lambda a: tuple(int(i) for i in a.reshape(-1))  # noqa: E731
    qkv, dense = "self_attention/query_key_value", "self_attention/dense"
    up, down = "mlp/dense_h_to_4h", "mlp/dense_4h_to_h"
    if not c.parallel_attn:
        norms = (("input_layernorm", (qkv,)), ("post_attention_layernorm", (up,)))
    elif c.new_decoder_architecture and c.num_ln_in_parallel_attn == 2:
        norms = (("ln_attn", (qkv,)), ("ln_mlp", (up,)))
    else:
        norms = (("input_layernorm", (qkv, up)), None)
    points = [
        ReorderPoint("R1", (("in", qkv),), 1, c.hidden_size, norm=norms[0][0], consumers=norms[0][1]),
        ReorderPoint("R2", (("out", qkv), ("out", qkv)), kv, d, producers=(qkv, qkv), foldable=False,
                     tap_channels=(cols(q), cols(k)), producer_channels=(cols(q), cols(k))),
        ReorderPoint("R3", (("in", dense),), kv, d, producers=(qkv,), consumers=(dense,),
                     producer_channels=(cols(v),)),
    ]
    if norms[1] is not None:
        points.append(ReorderPoint("R4", (("in", up),), 1, c.hidden_size, norm=norms[1][0], consumers=norms[1][1]))
    points.append(ReorderPoint("R5", (("in", down),), 1, c.ffn_hidden_size, producers=(up,), consumers=(down,)))
    return tuple(points)


def all_taps(points: Sequence[ReorderPoint]) -> Tuple[Tuple[str, str], ...]:
    seen = []
    for p in points:
        seen += [t for t in p.taps if t not in seen]
    return tuple(seen)


# ------------------------------------------------------------------------------------------------ statistics
def _path_get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def make_stats_pass(layer: nn.Module, taps: Sequence[Tuple[str, str]]):
    """Jitted ``(layer_params, h [B, T, hidden], positions [B, T]) -> {tap: (max [C], min [C])}``: one forward of
    the decoder layer ``layer`` with the inputs ("in": sown by ``models.common.Linear``) and outputs ("out":
    ``capture_intermediates``) of the tapped linears reduced over every token."""
    taps = tuple(taps)
    for kind, _ in taps:
        if kind not in ("in", "out", "act"):
            raise ValueError(f"tap kind {kind!r}: use 'in' (a linear's input), 'out' (its output) or 'act' "
                             "(an attention activation: 'self_attn/q', '.../k', '.../v')")
    out_paths = {tuple(p.split("/")) for kind, p in taps if kind == "out"}
    act_taps = {tuple(p.rsplit("/", 1)) for kind, p in taps if kind == "act"}

    def capture(mdl, method_name):
        return method_name == "__call__" and tuple(mdl.path) in out_paths

    def sow_attention(next_fun, args, kwargs, context):  # q / k / v as the attention sees them (k after RoPE)
        y = next_fun(*args, **kwargs)
        if context.method_name == "attention_activation" and ("/".join(context.module.path), args[0]) in act_taps:
            context.module.sow("intermediates", f"act_{args[0]}", y)
        return y

    @jax.jit
    def stats_pass(layer_params, h, positions):
        with nn.intercept_methods(sow_attention):
            _, variables = layer.apply({"params": layer_params}, h, positions, mutable=["intermediates"],
                                       capture_intermediates=capture)
        sown = variables["intermediates"]
        result = {}
        for kind, path in taps:
            if kind == "act":
                module, name = path.rsplit("/", 1)
                x = _path_get(sown, module)[f"act_{name}"][0]
                x = x.reshape(-1, x.shape[-2] * x.shape[-1]).astype(jnp.float32)  # channels: heads * D
            else:
                x = _path_get(sown, path)["inputs" if kind == "in" else "__call__"][0]
                x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            result[(kind, path)] = (jnp.max(x, axis=0), jnp.min(x, axis=0))
        return result

    return stats_pass


@partial(jax.jit, static_argnames=("ema",))
def accumulate_stats(running, new, ema: Optional[float] = None):
    """Fold one batch's per-channel (max, min) into the running ones: ``ema=None``: running max / min (the reference's
    reorder statistics); ``ema=a``: ``a * running + (1 - a) * new`` (the reference's "ema_minmax", a = 0.99)."""
    if ema is None:
        return {k: (jnp.maximum(r[0], new[k][0]), jnp.minimum(r[1], new[k][1])) for k, r in running.items()}
    return jax.tree.map(lambda r, n: ema * r + (1 - ema) * n, running, new)


def layer_stats(layer: nn.Module, layer_params, inputs: Sequence[jax.Array], positions, taps,
                ema: Optional[float] = None, stats_pass=None) -> Dict[Tuple[str, str], Tuple[jax.Array, jax.Array]]:
    """Per-channel (max, min) of ``taps`` over the calibration batches ``inputs`` (hidden states entering the layer),
    one jitted pass per batch (pass ``stats_pass`` from ``make_stats_pass`` to reuse a compiled one)."""
    if ema is not None and not 0 <= ema < 1:
        raise ValueError(f"ema={ema} must be in [0, 1) (the weight of the running value), or None for max/min")
    if not len(inputs):
        raise ValueError("layer_stats needs at least one calibration batch")
    stats_pass = stats_pass or make_stats_pass(layer, taps)
    running = None
    for h in inputs:
        new = stats_pass(layer_params, h, positions)
        running = new if running is None else accumulate_stats(running, new, ema=ema)
    return running


def _checked_calibration(calibration, batch_size: int):
    """(calibration as an array, n, seqlen, batch size clipped to n); clear errors for a bad shape or batch."""
    calibration = np.asarray(calibration)
    if calibration.ndim != 2:
        raise ValueError(f"calibration must be token ids of shape [n, seqlen], got {calibration.shape}")
    n, seqlen = calibration.shape
    batch_size = max(1, min(batch_size, n))
    if n % batch_size:
        raise ValueError(f"nsamples={n} is not a multiple of batch_size={batch_size}")
    return calibration, n, seqlen, batch_size


def model_stats(lm, calibration: np.ndarray, points=None, batch_size: int = 4, ema: Optional[float] = None,
                params=None) -> list:
    """Statistics at every reorder point of every decoder layer of ``lm`` (a ``models.LoadedModel``) over the
    calibration windows ``[n, seqlen]``: a list (one per layer) of ``{tap: (max, min)}``. Layer by layer, as the
    quantization pipeline runs: only one layer's activations are live; the next layer's inputs are the outputs of
    this layer with ``params`` (the float weights unless given)."""
    calibration, n, seqlen, batch_size = _checked_calibration(calibration, batch_size)
    params = lm.params if params is None else params
    points = reorder_points(lm.config) if points is None else points
    taps = all_taps(points)
    layer = lm.family.DecoderLayer(lm.config, lm.dtype)
    positions = jnp.broadcast_to(jnp.arange(seqlen), (batch_size, seqlen))
    top = {k: v for k, v in params.items() if not k.startswith("layers_")}
    embed = jax.jit(lambda p, ids: lm.module.apply({"params": p}, ids, positions, method=lm.module.embed))
    inputs = [embed(top, jnp.asarray(calibration[i: i + batch_size])) for i in range(0, n, batch_size)]
    stats_pass = make_stats_pass(layer, taps)
    forward = jax.jit(lambda p, h: layer.apply({"params": p}, h, positions)[0])
    result = []
    for i in range(lm.config.num_layers):
        lp = params[f"layers_{i}"]
        result.append(layer_stats(layer, lp, inputs, positions, taps, ema=ema, stats_pass=stats_pass))
        inputs = [forward(lp, h) for h in inputs]
    return result


def point_features(point: ReorderPoint, stats) -> jax.Array:
    """Clustering points ``[groups, channels, 2 * taps]`` of a reorder point: per channel the max of every tap, then
    the min of every tap (the reference's (qmax, kmax, qmin, kmin) for R2); a tap's repeated heads reduced."""
    maxes, mins = [], []
    for i, tap in enumerate(point.taps):
        if tap not in stats:
            raise KeyError(f"no statistics for tap {tap} of {point.name}")
        mx, mn = (jnp.asarray(a, jnp.float32) for a in stats[tap])
        if point.tap_index(i) is not None:
            mx, mn = mx[..., np.asarray(point.tap_index(i))], mn[..., np.asarray(point.tap_index(i))]
        if mx.shape[-1] % (point.groups * point.channels):
            raise ValueError(f"{point.name}: tap {tap} has {mx.shape[-1]} channels, not a multiple of "
                             f"{point.groups} groups x {point.channels} channels")
        maxes.append(jnp.max(mx.reshape(point.groups, -1, point.channels), axis=1))
        mins.append(jnp.min(mn.reshape(point.groups, -1, point.channels), axis=1))
    return jnp.stack(maxes + mins, axis=-1)


# ------------------------------------------------------------------------------------------------- clustering
@dataclasses.dataclass(frozen=True)
class ChannelClusters:
    """labels ``[groups, channels]`` (cluster of each channel, original order); perm ``[groups, channels]`` (position
    j of group g holds original channel ``perm[g, j]`` of that group: channels grouped by cluster, ascending label,
    original order inside a cluster); counts ``[groups, k]``."""

    labels: np.ndarray
    perm: np.ndarray
    counts: np.ndarray

    @property
    def k(self) -> int:
        return self.counts.shape[1]

    def cluster_ids(self, reordered: bool = False) -> np.ndarray:
        """Global cluster id (group * k + label) of every channel, flattened ``[groups * channels]``, in the
        original order or (``reordered``) in the permuted one (then non-decreasing: contiguous clusters)."""
        labels = np.take_along_axis(self.labels, self.perm, 1) if reordered else self.labels
        return (labels + self.k * np.arange(labels.shape[0])[:, None]).reshape(-1)


def cluster_channels(points, k: int, max_iter: int = 50) -> ChannelClusters:
    """k-means (the shared ``jaxquant.kmeans``, maximin init, unweighted as the reference) of each group's channel
    points ``[groups, channels, d]`` into ``k`` clusters, and the permutation that groups each cluster's channels."""
    points = jnp.asarray(points, jnp.float32)
    if points.ndim != 3:
        raise ValueError(f"points must be [groups, channels, d], got shape {points.shape}")
    if not isinstance(k, int) or not 1 <= k <= points.shape[1]:
        raise ValueError(f"k={k!r} clusters: must be an integer in [1, {points.shape[1]}] (the channels per group)")
    labels = np.asarray(kmeans(points, k=k, max_iter=max_iter).labels)
    perm = np.argsort(labels, axis=1, kind="stable").astype(np.int32)
    counts = np.stack([np.bincount(row, minlength=k) for row in labels])
    return ChannelClusters(labels.astype(np.int32), perm, counts)


def plan_layer(points: Sequence[ReorderPoint], stats, clusters: Optional[Dict[str, int]] = None,
               max_iter: int = 50) -> Dict[str, ChannelClusters]:
    """Clusters of every reorder point of one layer (``clusters``: point name -> k, default the reference's)."""
    clusters = {**DEFAULT_CLUSTERS, **(clusters or {})}
    return {p.name: cluster_channels(point_features(p, stats), clusters[p.name], max_iter) for p in points}


# ---------------------------------------------------------------------------------------------------- folding
def expand_perm(perm: np.ndarray, width: int) -> np.ndarray:
    """Index ``[width]`` permuting a tensor axis laid out ``[groups, repeat, channels]`` with each group's
    permutation ``perm [groups, channels]`` (every repeat of a group shares it)."""
    groups, channels = perm.shape
    if width % (groups * channels):
        raise ValueError(f"axis of {width} channels is not [groups={groups}, repeat, channels={channels}]")
    repeat = width // (groups * channels)
    base = (np.arange(groups * repeat) * channels).reshape(groups, repeat, 1)
    return (base + perm[:, None, :]).reshape(-1)


def _take(tree, path: str, fn):
    key, _, rest = path.partition("/")
    if key not in tree:
        raise KeyError(f"no {key!r} in the parameter tree (path {path!r})")
    new = dict(tree)
    new[key] = fn(tree[key]) if not rest else _take(tree[key], rest, fn)
    return new


def _permute_leaf(array, index, axis: int, what: str):
    if not isinstance(array, (jax.Array, np.ndarray)):
        raise TypeError(f"{what} is a {type(array).__name__}, not a dense array: fold the permutations before "
                        "quantizing the weights")
    return jnp.take(jnp.asarray(array), jnp.asarray(index), axis=axis)


def fold_layer(layer_params, points: Sequence[ReorderPoint], plan: Dict[str, ChannelClusters],
               skip_unfoldable: bool = True, perm_in_params: bool = False):
    """Fold the permutations of ``plan`` into a decoder layer's float parameters. Returns ``(params, norm_perms)``:
    ``norm_perms`` maps each reordered norm's path to the permutation of its input (``reordered_norms``).
    ``perm_in_params``: also store each such permutation as the norm's ``input_perm`` parameter (int32), which the
    models' norms read themselves (``models.common.permuted_input``): the folded tree then runs as it is (jit,
    the quantization pipeline, checkpoints) with no interceptor."""
    params, norm_perms = layer_params, {}
    for p in points:
        if p.name not in plan:
            continue
        if not p.foldable:
            if skip_unfoldable:
                continue
            raise ValueError(f"{p.name} cannot be folded into the weights of this family (RoPE)")
        perm = plan[p.name].perm
        if perm.shape != (p.groups, p.channels):
            raise ValueError(f"{p.name}: permutation of shape {perm.shape}, expected {(p.groups, p.channels)}")
        for i, name in enumerate(p.producers):
            node = _path_get(params, name)
            if p.producer_index(i) is None:
                index = expand_perm(perm, node["kernel"].shape[1])
            else:  # only this point's columns of a fused output move, among themselves
                cols = np.asarray(p.producer_index(i))
                index = np.arange(node["kernel"].shape[1])
                index[cols] = cols[expand_perm(perm, cols.size)]
            params = _take(params, f"{name}/kernel", lambda k: _permute_leaf(k, index, 1, f"{name}/kernel"))
            if "bias" in node:
                params = _take(params, f"{name}/bias", lambda b: _permute_leaf(b, index, 0, f"{name}/bias"))
        for name in p.consumers:
            index = expand_perm(perm, _path_get(params, name)["kernel"].shape[0])
            params = _take(params, f"{name}/kernel", lambda k: _permute_leaf(k, index, 0, f"{name}/kernel"))
        if p.norm is not None:
            index = expand_perm(perm, p.groups * p.channels)
            for leaf in ("scale", "bias"):
                if leaf in params.get(p.norm, {}):
                    params = _take(params, f"{p.norm}/{leaf}", lambda a: _permute_leaf(a, index, 0, leaf))
            norm_perms[p.norm] = index
            if perm_in_params:
                params = dict(params)
                params[p.norm] = dict(params.get(p.norm, {}), input_perm=jnp.asarray(index, jnp.int32))
    return params, norm_perms


def reordered_norms(norm_perms: Dict[str, np.ndarray]):
    """Interceptor context: the norm modules at the given paths ("input_layernorm" inside a layer applied alone,
    "layers_0/input_layernorm" in the whole model) read their input in the permuted order."""
    perms = {k: jnp.asarray(v) for k, v in norm_perms.items()}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            name = "/".join(context.module.path)
            if name in perms:
                return next_fun(jnp.take(args[0], perms[name], axis=-1), *args[1:], **kwargs)
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


def fold_model(params, config, plans: Sequence[Dict[str, ChannelClusters]]):
    """``fold_layer`` on every decoder layer: ``(params, norm_perms)`` with model-level norm paths."""
    points = reorder_points(config)
    if len(plans) != config.num_layers:
        raise ValueError(f"{len(plans)} layer plans for {config.num_layers} layers")
    params, all_perms = dict(params), {}
    for i, plan in enumerate(plans):
        params[f"layers_{i}"], perms = fold_layer(params[f"layers_{i}"], points, plan)
        all_perms.update({f"layers_{i}/{k}": v for k, v in perms.items()})
    return params, all_perms


# ------------------------------------------------------------------------------------ per-cluster activation quantizers
CLIP_SCALE = (1e-4, 1e4)  # the reference's CLIPMIN and upper clamp of a scale
CLIP_ZERO = 1e4


class ActQuantizer(NamedTuple):
    """Static per-cluster asymmetric quantizer of an activation's last axis (a pytree: jit / save it as is).

    scale, zero: ``[clusters]`` (zero an integer-valued float); cluster_ids: ``[channels]`` int32, the cluster of
    every channel in the layout the activation has (original order with the labels, or the folded order, where a
    cluster is a contiguous run). The bit width is a static argument of ``fake_quant``.
    """

    scale: jax.Array
    zero: jax.Array
    cluster_ids: jax.Array


def channel_cluster_ids(clusters: ChannelClusters, width: int, reordered: bool = False) -> np.ndarray:
    """Cluster id of every channel of an axis of ``width`` laid out ``[groups, repeat, channels]``: each (group,
    repeat) block has its own k clusters (the reference clusters every head of the o_proj input separately), ids
    ``(group * repeat + r) * k + label``; in the folded order (``reordered``) or the original one."""
    groups, channels = clusters.labels.shape
    if width % (groups * channels):
        raise ValueError(f"axis of {width} channels is not [groups={groups}, repeat, channels={channels}]")
    repeat = width // (groups * channels)
    labels = np.take_along_axis(clusters.labels, clusters.perm, 1) if reordered else clusters.labels
    block = np.arange(groups * repeat).reshape(groups, repeat, 1)
    return (block * clusters.k + labels[:, None, :]).reshape(-1).astype(np.int32)


def _check_bits(bits):
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r}: activation quantizers take an integer bit width in [2, 16]")


@partial(jax.jit, static_argnames=("bits", "num_clusters"))
def cluster_quant_params(ch_max, ch_min, cluster_ids, *, bits: int, num_clusters: int):
    """Per-cluster (scale, zero) from per-channel calibration (max, min), the reference's ``minmax_calibration``
    (asymmetric): the cluster's range [min over its channels of min, max over them of max];
    ``scale = clip((max - min) / 2**bits, 1e-4, 1e4)``, ``zero = round(clip(-(max + min) / (2 scale), +-1e4))``,
    for the signed code range [-2**(bits-1), 2**(bits-1) - 1] (so, as in the reference, the grid's top code sits one
    step below the calibrated max)."""
    ch_max, ch_min = jnp.asarray(ch_max, jnp.float32), jnp.asarray(ch_min, jnp.float32)
    cmax = jax.ops.segment_max(ch_max, cluster_ids, num_segments=num_clusters)
    cmin = jax.ops.segment_min(ch_min, cluster_ids, num_segments=num_clusters)
    scale = jnp.clip((cmax - cmin) * (2.0 ** -bits), *CLIP_SCALE)
    zero = jnp.round(jnp.clip(-(cmax + cmin) / (2 * scale), -CLIP_ZERO, CLIP_ZERO))
    return scale, zero


def make_act_quantizer(ch_max, ch_min, cluster_ids, bits: int, num_clusters: Optional[int] = None) -> ActQuantizer:
    """An ``ActQuantizer`` from per-channel statistics and cluster ids (one id for all channels: one scale per tensor,
    the no-reorder ablation)."""
    _check_bits(bits)
    ids = np.asarray(cluster_ids)
    if ids.ndim != 1 or ids.shape[0] != np.shape(ch_max)[-1] or np.shape(ch_max) != np.shape(ch_min):
        raise ValueError(f"cluster_ids {ids.shape}, max {np.shape(ch_max)} and min {np.shape(ch_min)} must all be "
                         "[channels]")
    if ids.min() < 0:
        raise ValueError("cluster ids must be >= 0")
    num_clusters = int(ids.max()) + 1 if num_clusters is None else num_clusters
    if np.bincount(ids, minlength=num_clusters).min() == 0:
        raise ValueError(f"every one of the {num_clusters} clusters needs at least one channel")
    ids = jnp.asarray(ids, jnp.int32)
    scale, zero = cluster_quant_params(ch_max, ch_min, ids, bits=bits, num_clusters=num_clusters)
    return ActQuantizer(scale, zero, ids)


@partial(jax.jit, static_argnames=("bits",))
def fake_quant(x, quantizer: ActQuantizer, *, bits: int):
    """Quantize-dequantize ``x [..., channels]`` with its channels' cluster scale / zero (the reference's
    ``fake_quant``: ``(clip(round(x / s) + z, -2**(b-1), 2**(b-1) - 1) - z) * s``); bits >= 16 is the identity."""
    if bits >= 16:
        return x
    s = quantizer.scale[quantizer.cluster_ids]
    z = quantizer.zero[quantizer.cluster_ids]
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / s) + z, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return ((q - z) * s).astype(x.dtype)


# ----------------------------------------------------------------------------------------- configurations
# The activations the reference quantizes (models/int_opt_layer.py, main.py), by the name used here:
#   norm_out  the attention / MLP norm outputs (R1 / R4 clusters): the q/k/v and fc1 (up/gate) inputs
#   q, k      the query (after OPT's 1/sqrt(d) scaling) and key entering Q K^T (R2 clusters, per head)
#   v         the value entering P V (R3 clusters, per head)
#   probs     the softmax probabilities entering P V: fixed grid round(p * 255) / 255 whenever enabled
#   o_in      the attention output projection's input (R3 clusters, per head)
#   fc2_in    the second MLP matrix's input (R5 clusters)
# q/k/v/fc1 linears read the quantized norm output (their own input quantizer is disabled).
ACTIVATIONS = ("norm_out", "q", "k", "v", "probs", "o_in", "fc2_in")
CONFIGURATIONS = {  # name -> (weight bits, activation bits, only the K/V cache)
    "W4A16": (4, 16, False), "W4A8": (4, 8, False), "W4A4": (4, 4, False),
    "W4A4KV": (4, 4, True), "W4A3KV": (4, 3, True), "W3A3KV": (3, 3, True),
}


def activation_bits(abits: int, kv_only: bool = False) -> Dict[str, int]:
    """Bits of every activation in ``ACTIVATIONS`` (16 = not quantized), as the reference's main.py sets them: the
    norm outputs and the probabilities at max(8, abits); the rest at abits; ``kv_only`` (``--only_quant_kv``): only
    k and v (the KV cache) at abits."""
    _check_bits(abits)
    if kv_only:
        return {a: (abits if a in ("k", "v") else 16) for a in ACTIVATIONS}
    wide = max(8, abits)
    return {a: (wide if a in ("norm_out", "probs") else abits) for a in ACTIVATIONS}


def fake_quant_probs(p, bits: int):
    """The reference's "fix0to1" quantizer of the attention probabilities: ``round(p * 255) / 255`` (its grid is
    fixed, whatever the bit width), or the identity for bits >= 16."""
    _check_bits(bits)
    return p if bits >= 16 else (jnp.round(p * 255) / 255).astype(p.dtype)


# ------------------------------------------------------------------------- linear inputs in the jitted forward
_LINEAR_INPUT_ACTIVATION = {"R1": "norm_out", "R3": "o_in", "R4": "norm_out", "R5": "fc2_in"}


def linear_input_quantizers(points: Sequence[ReorderPoint], stats, plan: Dict[str, ChannelClusters], abits: int,
                            kv_only: bool = False, folded: bool = True) -> Dict[str, Tuple[ActQuantizer, int]]:
    """Per-cluster quantizers of the linear inputs of one decoder layer: linear path -> (quantizer, bits), for the
    norm outputs (R1 / R4: every consuming linear gets the one quantizer, as the reference quantizes the norm output
    once), the o_proj input (R3) and the second MLP matrix's input (R5), at the bits of ``activation_bits``.
    ``stats``: per-channel (max, min) at the points' taps in the original channel order (the reference calibrates
    its activation quantizers with ``ema`` 0.99); ``folded``: the quantizers act on the folded layout (after
    ``fold_layer``), else on the original one."""
    bits = activation_bits(abits, kv_only)
    out = {}
    for p in points:
        act = _LINEAR_INPUT_ACTIVATION.get(p.name)
        if act is None or bits[act] >= 16 or p.name not in plan:
            continue
        if folded and not p.foldable:
            raise ValueError(f"{p.name} is not folded in this family; use folded=False")
        mx, mn = (np.asarray(a, np.float32) for a in stats[p.taps[0]])
        width = mx.shape[-1]
        if folded:
            index = expand_perm(plan[p.name].perm, width)
            mx, mn = mx[index], mn[index]
        quantizer = make_act_quantizer(mx, mn, channel_cluster_ids(plan[p.name], width, reordered=folded), bits[act])
        for name in p.consumers:
            out[name] = (quantizer, bits[act])
    return out


def quantized_linear_inputs(quantizers: Dict[str, Tuple[ActQuantizer, int]]):
    """Interceptor context: the linears at the given paths ("self_attn/o_proj" in a layer applied alone,
    "layers_0/self_attn/o_proj" in the whole model) fake-quantize their input first (as ``models.common.Linear``
    sows its input after the interceptor, the sown inputs are the quantized ones)."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and hasattr(context.module, "features"):
            name = "/".join(context.module.path)
            if name in quantizers:
                quantizer, bits = quantizers[name]
                return next_fun(fake_quant(as_array(args[0]), quantizer, bits=bits), *args[1:], **kwargs)
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


# ------------------------------------------------------------------- q / k / v / probabilities inside the attention
def _quant_heads(x, quantizer: ActQuantizer, bits: int):
    """``fake_quant`` of ``x [B, T, heads, D]`` over its flattened ``heads * D`` channels (the clusters' layout)."""
    return fake_quant(x.reshape(*x.shape[:-2], -1), quantizer, bits=bits).reshape(x.shape)


def quantized_attention(quantizers: Dict[str, Dict[str, Tuple[Optional[ActQuantizer], int]]]):
    """Interceptor context: the attention modules at the given paths ("self_attn" in a layer applied alone,
    "layers_0/self_attn" in the whole model) fake-quantize what passes their ``attention_activation`` seam
    (``models.common``): ``{"q" | "k" | "v": (ActQuantizer over heads * D channels, bits), "probs": (None, bits)}``;
    an activation not listed passes unchanged. k and v are quantized before they are written to the KV cache."""
    for path, acts in quantizers.items():
        unknown = set(acts) - {"q", "k", "v", "probs"}
        if unknown:
            raise ValueError(f"{path}: unknown attention activations {sorted(unknown)} (use q, k, v, probs)")

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "attention_activation":
            acts = quantizers.get("/".join(context.module.path))
            name, x = args[0], args[1]
            if acts is not None and name in acts:
                quantizer, bits = acts[name]
                x = fake_quant_probs(x, bits) if name == "probs" else _quant_heads(x, quantizer, bits)
                return next_fun(name, x, *args[2:], **kwargs)
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


# ------------------------------------------------------------------------------------------------ the whole model
ATTENTION_MODULE = {"llama": "self_attn", "opt": "self_attn", "falcon": "self_attention"}


@dataclasses.dataclass(frozen=True)
class RPTQConfig:
    """weight: GPTQ settings of the weights (``QuantConfig``); abits / kv_only: which activations at which bits
    (``activation_bits``); reorder=False: the ablation without reordering (no clusters, nothing folded, one scale
    per activation tensor); clusters: k per reorder point over the reference's defaults; ema: calibration of the
    activation quantizers (the reference's 0.99; None: running max / min); kmeans_iter: k-means iterations."""

    weight: object
    abits: int = 16
    kv_only: bool = False
    reorder: bool = True
    clusters: Tuple[Tuple[str, int], ...] = ()
    ema: Optional[float] = REFERENCE_EMA
    kmeans_iter: int = 50

    @classmethod
    def named(cls, name: str, weight=None, **fields) -> "RPTQConfig":
        """A configuration of ``CONFIGURATIONS`` ("W4A4KV", ...); ``weight`` defaults to asymmetric per-channel
        GPTQ at the configuration's weight bits."""
        if name not in CONFIGURATIONS:
            raise ValueError(f"unknown RPTQ configuration {name!r}; choose one of {sorted(CONFIGURATIONS)}")
        from jaxquant.config import QuantConfig

        wbits, abits, kv_only = CONFIGURATIONS[name]
        weight = QuantConfig(bits=wbits, group_size=-1) if weight is None else weight
        if weight.bits != wbits:
            raise ValueError(f"{name} quantizes weights to {wbits} bits, but the weight config has bits={weight.bits}")
        return cls(weight=weight, abits=abits, kv_only=kv_only, **fields)


@dataclasses.dataclass
class RPTQState:
    """Activation quantization of a model quantized by ``quantize_model_rptq`` (its permutations are in the parameter
    tree: the norms' ``input_perm`` and the permuted kernels).

    bits: ``activation_bits``; linear_bits: linear path in a layer -> bits of its input quantizer; attention: the
    attention module's name in a layer; layers: per layer ``{"linear": {path: ActQuantizer}, "attention": {"q" | "k"
    | "v": ActQuantizer}}`` (the arrays; bits are static); plans: per layer the channel clusters (empty without
    reordering)."""

    bits: Dict[str, int]
    linear_bits: Dict[str, int]
    attention: str
    layers: list
    plans: list

    def attention_bits(self) -> Dict[str, int]:
        return {a: b for a, b in self.bits.items() if a in ("q", "k", "v", "probs") and b < 16}


def _runtime_taps(points, attention: str):
    """Where the activation quantizers are calibrated: the first consumer's input of R1 / R3 / R4 / R5 (the layout
    the quantizer sees: folded), and q / k / v as the attention sees them (k after RoPE)."""
    taps = [("in", p.consumers[0]) for p in points if p.name in _LINEAR_INPUT_ACTIVATION]
    return tuple(taps) + tuple(("act", f"{attention}/{a}") for a in ("q", "k", "v"))


def _compact(ids: np.ndarray) -> np.ndarray:
    return np.unique(ids, return_inverse=True)[1].reshape(-1).astype(np.int32)  # empty k-means clusters dropped


def layer_act_quantizers(points, stats, plan: Dict[str, ChannelClusters], bits: Dict[str, int], attention: str,
                         reorder: bool = True):
    """One layer's activation quantizers from run-time statistics ``stats`` (at ``_runtime_taps``, taken on the
    folded layer): ``({linear path: ActQuantizer}, {"q" | "k" | "v": ActQuantizer})``, per cluster (in the layout the
    activation has at run time: folded points reordered, R2 under RoPE in the original order), or one scale per
    tensor without ``reorder``."""
    by_name = {p.name: p for p in points}

    def ids(point: str, width: int):
        if not reorder:
            return np.zeros(width, np.int32)
        return _compact(channel_cluster_ids(plan[point], width, reordered=by_name[point].foldable))

    linear, attn = {}, {}
    for p in points:
        act = _LINEAR_INPUT_ACTIVATION.get(p.name)
        if act is None or bits[act] >= 16:
            continue
        mx, mn = (np.asarray(a, np.float32) for a in stats[("in", p.consumers[0])])
        quantizer = make_act_quantizer(mx, mn, ids(p.name, mx.shape[-1]), bits[act])
        for name in p.consumers:
            linear[name] = quantizer
    for act, point in (("q", "R2"), ("k", "R2"), ("v", "R3")):
        if bits[act] >= 16:
            continue
        mx, mn = (np.asarray(a, np.float32) for a in stats[("act", f"{attention}/{act}")])
        attn[act] = make_act_quantizer(mx, mn, ids(point, mx.shape[-1]), bits[act])
    return linear, attn


def act_quant_context(layer_quantizers: dict, state: RPTQState, prefix: str = ""):
    """The interceptors that apply one layer's quantizers (``state.layers[i]``, arrays possibly traced) to the
    modules under ``prefix`` ("" for a layer applied alone, "layers_3/" in the model)."""
    stack = contextlib.ExitStack()
    linear = {prefix + path: (q, state.linear_bits[path]) for path, q in layer_quantizers["linear"].items()}
    attn = {name: (layer_quantizers["attention"].get(name), b) for name, b in state.attention_bits().items()}
    if linear:
        stack.enter_context(quantized_linear_inputs(linear))
    if attn:
        stack.enter_context(quantized_attention({prefix + state.attention: attn}))
    return stack


class ActQuantizedLM(nn.Module):
    """A causal LM (``model``) run with RPTQ's activation quantizers, read from the ``act_quant`` entry of its
    parameters (one entry per layer: ``RPTQState.layers``), so that any jitted forward / ``jaxquant.eval`` sees
    them as arrays. Parameters: ``{"model": model params, "act_quant": {"layers_i": ...}}`` (``act_quantized``)."""

    model: nn.Module
    linear_bits: Tuple[Tuple[str, int], ...]
    bits: Tuple[Tuple[str, int], ...]
    attention: str

    @property
    def config(self):  # models.generate reads the KV cache shape and dtype from these
        return self.model.config

    @property
    def dtype(self):
        return self.model.dtype

    def __call__(self, ids, positions=None, cache=None, cache_index=None, kv_mask=None):
        layers = self.get_variable("params", "act_quant")
        state = RPTQState(dict(self.bits), dict(self.linear_bits), self.attention, [], [])
        with contextlib.ExitStack() as stack:
            for name, lq in layers.items():
                stack.enter_context(act_quant_context(lq, state, prefix=f"model/{name}/"))
            return self.model(ids, positions, cache, cache_index, kv_mask)


def act_quantized(module: nn.Module, params, state: RPTQState):
    """``(module, params)`` to run ``module`` (e.g. ``lm.module``) with ``params`` and the activation quantizers of
    ``state``: ``module.apply({"params": params}, ids)`` as usual, e.g. ``jaxquant.eval.perplexity(*act_quantized(
    ...), ids)``."""
    wrapped = ActQuantizedLM(module, tuple(sorted(state.linear_bits.items())), tuple(sorted(state.bits.items())),
                             state.attention)
    return wrapped, {"model": params, "act_quant": {f"layers_{i}": lq for i, lq in enumerate(state.layers)}}


def quantize_model_rptq(lm, calibration: np.ndarray, config: RPTQConfig, batch_size: int = 4,
                        progress: bool = False):
    """RPTQ on ``lm`` (a ``models.LoadedModel``), layer by layer in the reference's order: reorder statistics on the
    layer's inputs -> clusters (``plan_layer``) -> permutations folded into the float weights (norms' ``input_perm``)
    -> GPTQ of the folded linears (true-sequential, as ``jaxquant.pipeline``) -> activation quantizers calibrated on
    the weight-quantized layer -> the next layer's inputs through the weight- and activation-quantized layer.

    Returns ``(params, state, report)``: the parameter tree (permuted, quantized kernels), the ``RPTQState`` and a
    ``pipeline.QuantizeReport``; run them with ``act_quantized``."""
    import time

    from jaxquant import pipeline
    from jaxquant.hessian import hessian_init

    t_start = time.perf_counter()
    calibration, n, seqlen, batch_size = _checked_calibration(calibration, batch_size)
    family = lm.config.family
    points = reorder_points(lm.config)
    attention = ATTENTION_MODULE[family]
    bits = activation_bits(config.abits, config.kv_only)
    linear_bits = {name: bits[_LINEAR_INPUT_ACTIVATION[p.name]] for p in points
                   if p.name in _LINEAR_INPUT_ACTIVATION for name in p.consumers}
    state = RPTQState(bits, {k: b for k, b in linear_bits.items() if b < 16}, attention, [], [])
    quantize_acts = any(b < 16 for b in bits.values())

    layer = lm.family.DecoderLayer(lm.config, lm.dtype)
    groups = lm.family.SEQUENTIAL_GROUPS if config.weight.true_sequential else (sum(lm.family.SEQUENTIAL_GROUPS, ()),)
    host = jax.device_get(lm.params)
    positions = jnp.broadcast_to(jnp.arange(seqlen), (batch_size, seqlen))
    embed = jax.jit(lambda p, ids: lm.module.apply({"params": p}, ids, positions, method=lm.module.embed))
    top = pipeline.non_layer_params(host)
    inps = [embed(top, jnp.asarray(calibration[i: i + batch_size])) for i in range(0, n, batch_size)]
    reorder_taps, runtime_taps = all_taps(points), _runtime_taps(points, attention)
    reorder_pass = make_stats_pass(layer, reorder_taps) if config.reorder else None
    runtime_pass = make_stats_pass(layer, runtime_taps) if quantize_acts else None
    collectors = {g: pipeline._make_collector(layer, g) for g in groups}
    plain_forward = pipeline._make_forward(layer)

    @jax.jit
    def quant_forward(layer_params, h, layer_quantizers):
        with act_quant_context(layer_quantizers, state):
            return layer.apply({"params": layer_params}, h, positions)[0]

    solve = pipeline.METHODS["gptq"].solve
    rows, layer_seconds = [], []
    from tqdm.auto import tqdm

    for lname in tqdm(pipeline.layer_names(lm), desc=f"rptq w{config.weight.bits}a{config.abits}",
                      disable=not progress):
        t_layer = time.perf_counter()
        lp, plan = host[lname], {}
        if config.reorder:
            stats = layer_stats(layer, lp, inps, positions, reorder_taps, stats_pass=reorder_pass)
            plan = plan_layer(points, stats, dict(config.clusters), config.kmeans_iter)
            lp, _ = fold_layer(lp, points, plan, perm_in_params=True)
        work = jax.device_put(lp)
        stored = [{} for _ in inps]
        quantized = {}
        for group in groups:
            states = {name: hessian_init(pipeline._get(work, name)["kernel"].shape[0]) for name in group}
            for b, h in enumerate(inps):
                states, inputs, aliases = collectors[group](work, h, positions, states, stored[b])
                stored[b].update({name: inputs[aliases[name]] for name in group})
            for name in group:
                t0 = time.perf_counter()
                kernel = pipeline._get(work, name)["kernel"]
                qw, err = solve(jnp.asarray(kernel, jnp.float32).T, states[name].H, config.weight)
                work = pipeline._with(work, f"{name}/kernel", qw.dequantize(kernel.dtype))
                quantized[name] = qw
                rows.append({"layer": lname, "name": name, "error": float(err), "seconds": time.perf_counter() - t0})
        layer_q = {"linear": {}, "attention": {}}
        if quantize_acts:
            act_stats = layer_stats(layer, work, inps, positions, runtime_taps, ema=config.ema,
                                    stats_pass=runtime_pass)
            layer_q["linear"], layer_q["attention"] = layer_act_quantizers(points, act_stats, plan, bits, attention,
                                                                           config.reorder)
            inps = [quant_forward(work, h, layer_q) for h in inps]
        else:
            inps = [plain_forward(work, h, positions, stored[b]) for b, h in enumerate(inps)]
        for name, qw in quantized.items():
            lp = pipeline._with(lp, f"{name}/kernel", jax.device_get(qw))
        host = dict(host, **{lname: jax.device_get(lp)})
        state.layers.append(layer_q)
        state.plans.append(plan)
        layer_seconds.append(time.perf_counter() - t_layer)
    report = pipeline.QuantizeReport(method="rptq", config=config.weight, layers=rows,
                                     seconds=time.perf_counter() - t_start, nsamples=int(n), seqlen=int(seqlen),
                                     layer_seconds=layer_seconds)
    return host, state, report


# ------------------------------------------------------------------------------------------------------ checkpoints
def _norm_perms(params) -> Dict[str, Dict[str, np.ndarray]]:
    return {lname: {norm: np.asarray(leaves["input_perm"]) for norm, leaves in layer.items()
                    if isinstance(leaves, dict) and "input_perm" in leaves}
            for lname, layer in params.items() if lname.startswith("layers_")}


def _without_perms(params):
    out = dict(params)
    for lname, norms in _norm_perms(params).items():
        out[lname] = dict(out[lname])
        for norm in norms:
            out[lname][norm] = {k: v for k, v in out[lname][norm].items() if k != "input_perm"}
    return out


def _quantizer_arrays(q: ActQuantizer) -> dict:
    return {"scale": np.asarray(q.scale), "zero": np.asarray(q.zero), "cluster_ids": np.asarray(q.cluster_ids)}


def save_rptq(path: str, params, state: RPTQState, lm, config: RPTQConfig, report=None, extra: Optional[dict] = None,
              overwrite: bool = False) -> str:
    """An orbax checkpoint (``jaxquant.checkpoint``) of an RPTQ model: the model's parameters (quantized kernels,
    permuted), and beside them the norms' permutations and the activation quantizers' arrays; the static part (bits,
    attention module, configuration) in the metadata. ``checkpoint.load`` gives it back ready to run."""
    from jaxquant import checkpoint

    arrays = {"input_perm": {k: v for k, v in _norm_perms(params).items() if v},
              "act_quant": {}}
    for i, lq in enumerate(state.layers):
        entry = {part: {name.replace("/", "."): _quantizer_arrays(q) for name, q in lq[part].items()}
                 for part in ("linear", "attention") if lq[part]}
        if entry:
            arrays["act_quant"][f"layers_{i}"] = entry
    arrays = {k: v for k, v in arrays.items() if v}
    meta = {"abits": config.abits, "kv_only": config.kv_only, "reorder": config.reorder,
            "clusters": {**DEFAULT_CLUSTERS, **dict(config.clusters)}, "ema": config.ema, "bits": state.bits,
            "linear_bits": state.linear_bits, "attention": state.attention, "num_layers": len(state.layers)}
    return checkpoint.save(path, _without_perms(params), lm, "rptq", config.weight, report, overwrite=overwrite,
                           extra={"rptq": meta, **(extra or {})}, arrays=arrays or None)


def from_checkpoint(lm, meta: dict):
    """``checkpoint.load``'s second half for RPTQ: the permutations back into the norms, the ``RPTQState`` rebuilt
    (``lm.rptq_state``), and, when activations are quantized, ``lm.module`` / ``lm.params`` replaced by the
    ``act_quantized`` pair (the bare model stays at ``lm.rptq_model``)."""
    from models.weights import CheckpointError

    info = meta.get("rptq")
    if not info:
        raise CheckpointError(f"{lm.source}: an rptq checkpoint without its 'rptq' metadata")
    arrays = lm.quant_arrays or {}
    params = dict(lm.params)
    for lname, norms in arrays.get("input_perm", {}).items():
        params[lname] = dict(params[lname])
        for norm, perm in norms.items():
            params[lname][norm] = dict(params[lname].get(norm, {}), input_perm=jnp.asarray(perm, jnp.int32))
    layers = []
    for i in range(info["num_layers"]):
        entry = arrays.get("act_quant", {}).get(f"layers_{i}", {})
        layers.append({part: {name.replace(".", "/"): ActQuantizer(jnp.asarray(q["scale"]), jnp.asarray(q["zero"]),
                                                                   jnp.asarray(q["cluster_ids"], jnp.int32))
                              for name, q in entry.get(part, {}).items()} for part in ("linear", "attention")})
    state = RPTQState({k: int(v) for k, v in info["bits"].items()},
                      {k: int(v) for k, v in info["linear_bits"].items()}, info["attention"], layers, [])
    for i, lq in enumerate(layers):
        if set(lq["linear"]) != set(state.linear_bits) or set(lq["attention"]) != set(state.attention_bits()) - {
                "probs"}:
            raise CheckpointError(f"{lm.source}: layer {i}'s activation quantizers do not match the metadata's bits")
    lm.rptq_state, lm.rptq_model = state, (lm.module, params)
    if any(b < 16 for b in state.bits.values()):
        lm.module, lm.params = act_quantized(lm.module, params, state)
    else:
        lm.params = params
    return lm
