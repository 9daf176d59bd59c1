"""Load-time fusion of the linears that read the same input into one wider linear (fewer, larger matmuls).

LLaMA-family layers: ``self_attn/{q,k,v}_proj`` -> ``self_attn/qkv_proj`` (outputs ``[q | k | v]``) and
``mlp/{gate,up}_proj`` -> ``mlp/gate_up_proj`` (outputs ``[gate | up]``); ``models.llama`` runs a layer fused when its
params hold the fused name. At decode time each linear is one memory-bound kernel launch plus its pads and
reductions, so 4 calls per layer instead of 7 save the fixed per-call cost and run the weights at the larger shapes'
bandwidth (bench/decode.py measures it).

The fused weight is the parts concatenated along the output dimension, which is exact (every output column keeps
its own codes / scales / zeros / table / outliers) when the parts share everything indexed by the *input* dimension:

- dense arrays: always;
- ``UniformQuantizedWeight`` (GPTQ / RTN): same bits, group size, symmetry and ``g_idx`` (act-order groups). GPTQ
  solves q/k/v (and gate/up) with the same Hessian, so act-order gives the same permutation and the same ``g_idx``;
- ``LUTQuantizedWeight`` (SqueezeLLM): same bits (tables are per output row; the CSR rows are concatenated);
- ``SpQRWeight``: same bits, group sizes, statistic bits and ``perm`` (the act-order permutation); every part's
  output count a multiple of the second-level group and of the statistic codes' packing unit.

Anything else (different ``g_idx`` / ``perm``, kernel-layout weights, mixed classes) is left unfused for that layer
(reported by ``fuse_projections``). Run it before ``jaxquant.kernel_layout.prepare_for_kernels`` (which then
converts the fused weights), outside jit (the checks read concrete ``g_idx`` / ``perm``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .formats import UniformQuantizedWeight
from .formats_lut import LUTQuantizedWeight
from .formats_spqr import SpQRWeight

# (parent module, fused name, parts in output order)
LLAMA_GROUPS = (
    ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
)


class FusionError(ValueError):
    """The parts cannot be concatenated exactly (the message says why)."""


def _xp(arrays):
    """numpy when every array is a host numpy array (checkpoint loading), jax.numpy otherwise (stays on device)."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def _cat(parts, field, axis):
    arrays = [getattr(p, field) for p in parts]
    return _xp(arrays).concatenate(arrays, axis=axis)


def _same(parts, fields, what):
    first = parts[0]
    for p in parts[1:]:
        for f in fields:
            if getattr(p, f) != getattr(first, f):
                raise FusionError(f"cannot fuse {what} weights: {f} differs ({getattr(first, f)} vs {getattr(p, f)})")


def _same_array(parts, field, what):
    first = np.asarray(getattr(parts[0], field))
    for p in parts[1:]:
        if not np.array_equal(first, np.asarray(getattr(p, field))):
            raise FusionError(f"cannot fuse {what} weights: their {field} differ (not quantized with one Hessian / "
                              "input permutation)")


def _packing_unit(bits: int) -> int:
    """Values per run of whole int32 words when packed along an axis (3 bits: 32 values in 3 words)."""
    return 32 // math.gcd(32, bits)


def _check_units(parts, unit, what, reason):
    bad = [p.out_features for p in parts if p.out_features % unit]
    if bad:
        raise FusionError(f"cannot fuse {what} weights: output counts {bad} are not multiples of {unit} ({reason})")


def _cat_csr(parts):
    """row_ptr / col_idx / values of the CSRs over W[out, in] stacked along the rows (out)."""
    ptrs = [p.row_ptr for p in parts]
    xp = _xp(ptrs + [p.values for p in parts])
    offsets = np.cumsum([0] + [int(p.values.shape[0]) for p in parts[:-1]])
    row_ptr = xp.concatenate([ptrs[0]] + [ptr[1:] + int(off) for ptr, off in zip(ptrs[1:], offsets[1:])])
    dtypes = {jnp.dtype(p.col_idx.dtype) for p in parts}
    if len(dtypes) != 1:
        raise FusionError(f"cannot fuse weights whose outlier column indices have different dtypes {sorted(dtypes)}")
    return row_ptr.astype(ptrs[0].dtype), _cat(parts, "col_idx", 0), _cat(parts, "values", 0)


def _concat_gptq(parts):
    what = "GPTQ"
    _same(parts, ("bits", "group_size", "sym", "in_features"), what)
    _same_array(parts, "g_idx", what)
    _check_units(parts, UniformQuantizedWeight.output_unit(parts[0].bits), what, "zero codes are packed along N")
    if len({jnp.dtype(p.scales.dtype) for p in parts}) != 1:
        raise FusionError("cannot fuse GPTQ weights with scales of different dtypes")
    return dataclasses.replace(parts[0], qweight=_cat(parts, "qweight", 1), qzeros=_cat(parts, "qzeros", 1),
                               scales=_cat(parts, "scales", 1), out_features=sum(p.out_features for p in parts))


def _concat_lut(parts):
    _same(parts, ("bits", "in_features"), "LUT")
    row_ptr, col_idx, values = _cat_csr(parts)
    return dataclasses.replace(parts[0], qweight=_cat(parts, "qweight", 1), lut=_cat(parts, "lut", 0),
                               row_ptr=row_ptr, col_idx=col_idx, values=values,
                               out_features=sum(p.out_features for p in parts))


def _concat_spqr(parts):
    what = "SpQR"
    _same(parts, ("bits", "group_size", "qq_scale_bits", "qq_zero_bits", "qq_groupsize", "in_features"), what)
    _same_array(parts, "perm", what)
    first = parts[0]
    unit = math.lcm(first.qq_groupsize, _packing_unit(first.qq_scale_bits), _packing_unit(first.qq_zero_bits))
    _check_units(parts, unit, what, "second-level groups and packed statistic codes run along N")
    row_ptr, col_idx, values = _cat_csr(parts)
    return dataclasses.replace(
        first, qweight=_cat(parts, "qweight", 1), scale_codes=_cat(parts, "scale_codes", 1),
        zero_codes=_cat(parts, "zero_codes", 1), scale_qq=_cat(parts, "scale_qq", 1),
        zero_qq=_cat(parts, "zero_qq", 1), row_ptr=row_ptr, col_idx=col_idx, values=values,
        out_features=sum(p.out_features for p in parts))


_CONCAT = {UniformQuantizedWeight: _concat_gptq, LUTQuantizedWeight: _concat_lut, SpQRWeight: _concat_spqr}


def concat_outputs(weights):
    """One linear weight [K, sum N_i] whose output columns are the parts' in order, exactly; raises FusionError
    (naming the reason) when the parts cannot be fused (module docstring)."""
    weights = list(weights)
    if not weights:
        raise FusionError("nothing to fuse")
    kinds = {type(w) for w in weights}
    if len(kinds) != 1:
        raise FusionError(f"cannot fuse weights of different kinds {sorted(k.__name__ for k in kinds)}")
    kind = kinds.pop()
    if kind in _CONCAT:
        return _CONCAT[kind](weights)
    if isinstance(weights[0], (jax.Array, np.ndarray)):
        shapes = [w.shape for w in weights]
        if any(len(s) != 2 or s[0] != shapes[0][0] for s in shapes) or len({w.dtype for w in weights}) != 1:
            raise FusionError(f"cannot fuse dense kernels of shapes {shapes} / dtypes {[w.dtype for w in weights]}")
        return _xp(weights).concatenate(weights, axis=1)
    raise FusionError(f"cannot fuse {kind.__name__} weights (fuse the stored format before prepare_for_kernels)")


def _fuse_group(parent: dict, fused: str, names: tuple):
    """The fused sub-dict {"kernel", "bias"?} of ``parent``'s linears ``names``, or raise FusionError."""
    subs = [parent[n] for n in names]
    keys = {frozenset(s) for s in subs}
    if len(keys) != 1 or not keys.pop() <= {"kernel", "bias"}:
        raise FusionError(f"cannot fuse {list(names)}: their parameters differ or are not just kernel / bias")
    out = {"kernel": concat_outputs([s["kernel"] for s in subs])}
    if "bias" in subs[0]:
        out["bias"] = _xp([s["bias"] for s in subs]).concatenate([s["bias"] for s in subs])
    return out


# Families whose model code reads the fused names (models/llama.py); OPT / Falcon modules do not.
FUSION_GROUPS = {"llama": LLAMA_GROUPS}


def fuse_projections(params, family: str = "llama"):
    """(params with every fusable group of every layer fused, {"fused": [...], "skipped": {path: reason}}).

    ``params``: the model's parameter dict (``layers_i/<parent>/<name>/kernel``); ``family``: the model family
    (``config.family``), which must be one whose modules read the fused names. A layer-group that cannot be fused
    exactly (``concat_outputs``) keeps its separate linears; the model runs each layer in whichever form it finds.
    """
    if family not in FUSION_GROUPS:
        raise ValueError(f"fusing projections is supported for {sorted(FUSION_GROUPS)} models, not {family!r} (its "
                         "modules would not read the fused parameters)")
    groups = FUSION_GROUPS[family]
    out = dict(params)
    report = {"fused": [], "skipped": {}}
    for layer in sorted(k for k in params if k.startswith("layers_")):
        new_layer = dict(params[layer])
        for parent, fused, names in groups:
            sub = new_layer.get(parent)
            if not isinstance(sub, Mapping) or not all(n in sub for n in names):
                continue
            path = f"{layer}/{parent}/{fused}"
            try:
                fused_params = _fuse_group(sub, fused, names)
            except FusionError as e:
                report["skipped"][path] = str(e)
                continue
            new_sub = {k: v for k, v in sub.items() if k not in names}
            new_sub[fused] = fused_params
            new_layer[parent] = new_sub
            report["fused"].append(path)
        out[layer] = new_layer
    return out, report
