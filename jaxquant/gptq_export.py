"""Export to, and import from, the GPTQ safetensors format that AutoGPTQ / GPTQModel / transformers / vLLM read.

Directory written by :func:`export`::

    model.safetensors     every quantized linear as <prefix>.qweight / .qzeros / .scales / .g_idx (+ <prefix>.bias),
                          every other parameter (norms, embeddings, an untied lm_head, ...) under its HF name
    config.json           the model's HF config + "quantization_config" (quant_method "gptq", bits, group_size, ...)
    quantize_config.json  the same quantization fields (AutoGPTQ's file)
    tokenizer files       when the model has a tokenizer

``<prefix>`` is the HF module name, e.g. ``model.layers.0.self_attn.q_proj``, found by inverting the family's NAME_MAP
(``Rule.hf_name``) with its optional prefixes written out (``model.decoder.`` for OPT, ``transformer.`` for Falcon:
the names ``*ForCausalLM.save_pretrained`` writes). With K = in_features, N = out_features, G = K / group_size
(1 for group_size -1)::

    qweight  int32   [K*bits/32, N]  codes packed along K (jaxquant.packing: one little-endian bit stream; for
                                     2/4/8 bits code j of a word sits in bits [bits*j, bits*(j+1)))
    qzeros   int32   [G, N*bits/32]  zero points packed along N, in the checkpoint_format's convention (below)
    scales   float16 [G, N]
    g_idx    int32   [K]             group of each input column (arange(K) // group_size, permuted for act-order)

    W[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])      (HF weight [out, in])

Dense weights are written in the HF layout [out, in] (Flax kernels transposed back), in ``dtype`` (float16 by
default, the dtype GPTQ kernels run in; bfloat16 and float32 are possible); ``scales`` are always float16, as AutoGPTQ
writes them. ``config.json`` gets ``dtype`` and ``torch_dtype`` set accordingly.

Zero-point conventions (``checkpoint_format``):

* ``"gptq"`` (v1, the default; what AutoGPTQ writes and what transformers, vLLM and AutoGPTQ read unless told
  otherwise): each packed code of qzeros is ``(zero - 1) mod 2**bits``; readers add 1. A zero point of 0 wraps to
  ``2**bits - 1``. :func:`load` undoes this exactly (``(code + 1) mod 2**bits``), but most other readers cannot:
  AutoGPTQ's and vLLM's kernels compute ``code + 1 = 2**bits`` for it, and GPTQModel's v1->v2 conversion (adding
  0x11111111 to each 4-bit word) carries into the neighbouring code. So v1 cannot represent a zero point of 0; it
  only occurs with ``sym=False`` (a group whose weights are all >= -scale/2). :func:`export` warns with the count when
  that happens; use ``sym=True`` or ``checkpoint_format="gptq_v2"`` for such models.
* ``"gptq_v2"`` (GPTQModel's format): each packed code of qzeros is the zero point itself (jaxquant's in-memory
  convention, :class:`jaxquant.formats.UniformQuantizedWeight`). Exact for every zero point; needs a reader that
  honours ``checkpoint_format: gptq_v2`` (GPTQModel, transformers through GPTQModel).

:func:`load` reads both (and AutoGPTQ checkpoints in general: act-order g_idx, per-channel groups) into a
``models.LoadedModel`` whose quantized kernels are ``UniformQuantizedWeight`` leaves.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxquant.config import SUPPORTED_BITS, num_groups
from jaxquant.formats import UniformQuantizedWeight
from jaxquant.packing import check_packable, pack_qzeros, unpack_qzeros
from models.weights import CheckpointError, Rule

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
WEIGHTS_FILE = "model.safetensors"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
EXPORT_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": jnp.bfloat16}

_OPTIONAL_GROUP = re.compile(r"\(\?:([^()]*)\)\?")


# ------------------------------------------------------------------------------------------------------- names
def _canonical_rule(rule: Rule) -> Rule:
    """The rule with its optional prefixes made mandatory, so that its inverse writes them out."""
    return dataclasses.replace(rule, pattern=_OPTIONAL_GROUP.sub(r"\1", rule.pattern))


def hf_name(rules, path: Tuple[str, ...]) -> Tuple[str, Rule]:
    """(HF name, rule) of the Flax parameter ``path``: the canonical name that ``rule.match`` maps back to ``path``."""
    for rule in rules:
        name = _canonical_rule(rule).hf_name(tuple(path))
        if name is not None and rule.match(name) == tuple(path):
            return name, rule
    raise ValueError(f"parameter {'/'.join(path)} has no Hugging Face name in this family's NAME_MAP")


def _match(rules, name: str) -> Optional[Tuple[Tuple[str, ...], Rule]]:
    for rule in rules:
        path = rule.match(name)
        if path is not None:
            return path, rule
    return None


# ------------------------------------------------------------------------------------------------------ config
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxquant")
    except PackageNotFoundError:
        return "unknown"


def _is_quantized(leaf) -> bool:
    return isinstance(leaf, UniformQuantizedWeight)


def _is_trivial_g_idx(leaf: UniformQuantizedWeight) -> bool:
    K = leaf.in_features
    gs = K if leaf.group_size == -1 else leaf.group_size
    return bool(np.array_equal(np.asarray(leaf.g_idx), np.arange(K) // gs))


def quantization_config(config, leaves, checkpoint_format: str) -> dict:
    """The ``quantization_config`` block (also the content of quantize_config.json)."""
    first = leaves[0]
    for leaf in leaves:
        if (leaf.bits, leaf.group_size, leaf.sym) != (first.bits, first.group_size, first.sym):
            raise ValueError("GPTQ checkpoints have one (bits, group_size, sym) for all layers; found "
                             f"{(first.bits, first.group_size, first.sym)} and "
                             f"{(leaf.bits, leaf.group_size, leaf.sym)}")
    if config is not None and (config.bits, config.group_size, config.sym) != (first.bits, first.group_size, first.sym):
        raise ValueError(f"config says bits={config.bits}, group_size={config.group_size}, sym={config.sym} but the "
                         f"quantized weights have {first.bits}, {first.group_size}, {first.sym}")
    # desc_act tells readers to honour g_idx: required whenever some g_idx is not arange(K) // group_size.
    desc_act = bool(getattr(config, "act_order", False)) or not all(_is_trivial_g_idx(leaf) for leaf in leaves)
    return {
        "quant_method": "gptq",
        "bits": first.bits,
        "group_size": first.group_size,
        "desc_act": desc_act,
        "sym": first.sym,
        "static_groups": bool(getattr(config, "static_groups", False)),
        "true_sequential": bool(getattr(config, "true_sequential", True)),
        "damp_percent": float(getattr(config, "percdamp", 0.01)),
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,  # the newer key of transformers' GPTQConfig / GPTQModel (same value)
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": [f"jaxquant:{_version()}"]},
    }


# ------------------------------------------------------------------------------------------------------ export
def _v1_qzeros(leaf: UniformQuantizedWeight) -> Tuple[np.ndarray, int]:
    """qzeros with (zero - 1) mod 2**bits per code, and how many zero points were 0 (they wrap)."""
    zeros = np.asarray(unpack_qzeros(leaf.qzeros, leaf.bits))
    wrapped = int(np.sum(zeros == 0))
    v1 = (zeros - 1) & (2**leaf.bits - 1)
    return np.asarray(pack_qzeros(jnp.asarray(v1, jnp.int32), leaf.bits)), wrapped


def export(out_dir: str, params: dict, lm, config=None, checkpoint_format: str = "gptq", dtype: str = "float16",
           overwrite: bool = False) -> str:
    """Write ``params`` (a parameter tree of ``lm`` with ``UniformQuantizedWeight`` leaves) as a GPTQ checkpoint.

    config: the ``QuantConfig`` used (act_order, static_groups, true_sequential, percdamp go to the config files).
    checkpoint_format: "gptq" (v1 zero points, zero - 1) or "gptq_v2" (plain zero points); see the module docstring.
    dtype: of the non-quantized tensors and biases ("float16", "bfloat16", "float32"); scales are always float16.
    Refuses an existing non-empty ``out_dir`` unless ``overwrite``; writes into a sibling directory and renames it.
    """
    from safetensors.numpy import save_file

    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r}; use one of {CHECKPOINT_FORMATS}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; use one of {sorted(EXPORT_DTYPES)}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another directory or pass overwrite=True")
    np_dtype = EXPORT_DTYPES[dtype]
    rules = lm.family.NAME_MAP
    flat = flatten_dict(jax.device_get(params), is_leaf=lambda _, v: _is_quantized(v) or hasattr(v, "matmul"))

    tensors: Dict[str, np.ndarray] = {}
    leaves, wrapped = [], 0
    for path, leaf in flat.items():
        name, rule = hf_name(rules, path)
        if hasattr(leaf, "matmul") and not _is_quantized(leaf):
            raise TypeError(f"{'/'.join(path)} is a {type(leaf).__name__}; the GPTQ format holds only "
                            "UniformQuantizedWeight")
        if _is_quantized(leaf):
            if not (rule.linear and name.endswith(".weight")):
                raise ValueError(f"{'/'.join(path)} is quantized but {name} is not a linear weight")
            leaf.check_shapes()
            prefix = name[: -len(".weight")]
            scales = np.asarray(leaf.scales).astype(np.float16)
            if not np.all(np.isfinite(scales)):
                raise ValueError(f"{prefix}.scales overflow float16 (max |scale| = "
                                 f"{float(np.max(np.abs(np.asarray(leaf.scales, np.float32)))):g})")
            if checkpoint_format == "gptq":
                qzeros, n0 = _v1_qzeros(leaf)
                wrapped += n0 if not leaf.sym else 0
            else:
                qzeros = np.asarray(leaf.qzeros)
            tensors[prefix + ".qweight"] = np.asarray(leaf.qweight, np.int32)
            tensors[prefix + ".qzeros"] = np.asarray(qzeros, np.int32)
            tensors[prefix + ".scales"] = scales
            tensors[prefix + ".g_idx"] = np.asarray(leaf.g_idx, np.int32)
            leaves.append(leaf)
        else:
            array = np.asarray(leaf)
            if rule.linear:
                array = array.T  # Flax kernel [in, out] -> HF weight [out, in]
            tensors[name] = np.ascontiguousarray(array.astype(np_dtype))
    if not leaves:
        raise ValueError("params has no quantized (UniformQuantizedWeight) kernels; nothing to export as GPTQ")
    if wrapped:
        warnings.warn(f"{wrapped} zero point(s) are 0: the GPTQ v1 format stores them as {2**leaves[0].bits - 1} "
                      "(zero - 1 wrapped); jaxquant reads them back exactly, but AutoGPTQ/vLLM kernels and GPTQModel "
                      "do not. Prefer checkpoint_format='gptq_v2' or sym=True for this model.")

    qcfg = quantization_config(config, leaves, checkpoint_format)
    hf_config = {k: v for k, v in lm.hf_config.items() if k != "quantization_config"}
    hf_config["dtype"] = dtype  # transformers >= 4.56 reads "dtype", older readers (and vLLM's) "torch_dtype"
    hf_config["torch_dtype"] = dtype
    hf_config["quantization_config"] = qcfg

    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # safetensors.numpy writes a strided (non-contiguous) array's buffer as if it were contiguous: wrong values,
    # no error. Every tensor is made C-contiguous first (e.g. the output slices of a jointly solved q/k/v weight).
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, QUANTIZE_CONFIG_FILE), "w") as f:
        # model_file_base_name lets AutoGPTQ's from_quantized find model.safetensors.
        json.dump({**qcfg, "model_file_base_name": "model"}, f, indent=2, sort_keys=True)
    if getattr(lm, "tokenizer", None) is not None:
        lm.tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


# -------------------------------------------------------------------------------------------------------- load
def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable JSON: {err}") from err


def is_gptq_dir(path: str) -> bool:
    """A directory whose config.json has ``quantization_config.quant_method == "gptq"`` (or an AutoGPTQ
    quantize_config.json beside a config.json)."""
    cfg_file = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(cfg_file)):
        return False
    try:
        with open(cfg_file) as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    if isinstance(qc, dict):
        return str(qc.get("quant_method", "")).lower() == "gptq"
    return os.path.isfile(os.path.join(path, QUANTIZE_CONFIG_FILE))


def read_quantization_config(directory: str, hf_config: dict) -> dict:
    """Normalised GPTQ settings {bits, group_size, sym, desc_act, checkpoint_format, ...}, checked."""
    in_config = hf_config.get("quantization_config")
    qfile = os.path.join(directory, QUANTIZE_CONFIG_FILE)
    in_file = _read_json(qfile) if os.path.isfile(qfile) else None
    if in_config is None and in_file is None:
        raise CheckpointError(f"{directory}: no quantization_config in config.json and no {QUANTIZE_CONFIG_FILE}")
    q = dict(in_config if in_config is not None else in_file)
    if in_file is not None:
        in_file = {**in_file, "quant_method": in_file.get("quant_method", "gptq")}  # older AutoGPTQ files lack it

    def fmt(d):
        return str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()

    method = str(q.get("quant_method", "gptq" if in_config is None else "")).lower()
    if method != "gptq":
        raise CheckpointError(f"{directory}: quant_method={q.get('quant_method')!r} is not supported; only GPTQ "
                              "checkpoints (quant_method 'gptq') can be loaded here")
    if in_config is not None and in_file is not None:
        for key, get in (("quant_method", lambda d: str(d.get("quant_method", "gptq")).lower()),
                         ("bits", lambda d: d.get("bits")), ("group_size", lambda d: d.get("group_size")),
                         ("sym", lambda d: d.get("sym", True)), ("desc_act", lambda d: d.get("desc_act", False)),
                         ("checkpoint_format", fmt)):
            if get(in_config) != get(in_file):
                raise CheckpointError(f"{directory}: config.json's quantization_config has {key}={get(in_config)!r} "
                                      f"but {QUANTIZE_CONFIG_FILE} has {get(in_file)!r}")
    bits = q.get("bits")
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{directory}: GPTQ bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    group_size = q.get("group_size", -1)
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise CheckpointError(f"{directory}: group_size={group_size!r} must be a positive integer or -1")
    checkpoint_format = fmt(q)
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"{directory}: checkpoint_format={checkpoint_format!r} is not supported; use one of "
                              f"{CHECKPOINT_FORMATS}")
    pack_dtype = str(q.get("pack_dtype", "int32")).replace("torch.", "")
    if pack_dtype != "int32":
        raise CheckpointError(f"{directory}: pack_dtype={pack_dtype!r} is not supported (only int32)")
    return {**q, "quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": bool(q.get("sym", True)),
            "desc_act": bool(q.get("desc_act", False)), "checkpoint_format": checkpoint_format}


def _quantized_leaf(prefix: str, parts: dict, shape: Tuple[int, int], q: dict, source: str) -> UniformQuantizedWeight:
    bits, gs = q["bits"], q["group_size"]
    K, N = shape
    try:
        check_packable(K, bits, "in_features")
        check_packable(N, bits, "out_features")
    except ValueError as err:
        raise CheckpointError(f"{source}: {prefix} is {K}x{N}: {err}") from err
    G = num_groups(K, gs)
    want = UniformQuantizedWeight.expected_shapes(K, N, bits, gs)
    if "g_idx" not in parts and not q["desc_act"] and all(s in parts for s in ("qweight", "qzeros", "scales")):
        parts = dict(parts, g_idx=np.arange(K, dtype=np.int32) // (K if gs == -1 else gs))  # pre-act-order files
    for suffix in QUANT_SUFFIXES:
        if suffix not in parts:
            raise CheckpointError(f"{source}: missing tensor {prefix}.{suffix}")
        got = tuple(np.shape(parts[suffix]))
        if got != want[suffix]:
            raise CheckpointError(f"{source}: tensor {prefix}.{suffix} has shape {got}, expected {want[suffix]} for a "
                                  f"{K}x{N} (in x out) {bits}-bit linear with group_size {gs}")
    for suffix in ("qweight", "qzeros"):
        if parts[suffix].dtype != np.int32:
            raise CheckpointError(f"{source}: tensor {prefix}.{suffix} is {parts[suffix].dtype}, expected int32")
    if not np.issubdtype(parts["scales"].dtype, np.floating) and parts["scales"].dtype != jnp.bfloat16:
        raise CheckpointError(f"{source}: tensor {prefix}.scales is {parts['scales'].dtype}, expected float")
    g_idx = np.asarray(parts["g_idx"])
    if not np.issubdtype(g_idx.dtype, np.integer) or g_idx.min() < 0 or g_idx.max() >= G:
        raise CheckpointError(f"{source}: tensor {prefix}.g_idx must hold group indices in [0, {G}), got "
                              f"{g_idx.dtype} values in [{g_idx.min()}, {g_idx.max()}]")
    qzeros = jnp.asarray(parts["qzeros"])
    if q["checkpoint_format"] == "gptq":  # v1: stored zero - 1 (mod 2**bits)
        qzeros = pack_qzeros((unpack_qzeros(qzeros, bits) + 1) & (2**bits - 1), bits)
    return UniformQuantizedWeight(qweight=jnp.asarray(parts["qweight"]), qzeros=qzeros,
                                  scales=jnp.asarray(parts["scales"]), g_idx=jnp.asarray(g_idx, jnp.int32),
                                  bits=bits, group_size=gs, sym=q["sym"], in_features=K, out_features=N)


def load(directory: str, dtype: str = "float32", tokenizer: bool = True):
    """Load a GPTQ checkpoint directory (v1 "gptq" or "gptq_v2") as a ``models.LoadedModel``.

    Quantized linears become ``UniformQuantizedWeight`` leaves (plain zero points; scales kept in their stored
    dtype, float16); every other tensor is cast to ``dtype``. Missing or misshapen tensors raise CheckpointError
    naming them. ``lm.quant_meta`` describes the quantization.
    """
    import models
    from models.weights import convert, iter_state_dict

    from jaxquant.formats import quantized_bits

    hf_full = models.load_hf_config(directory)
    q = read_quantization_config(directory, hf_full)
    hf_config = {k: v for k, v in hf_full.items() if k != "quantization_config"}
    family, config, module = models.build(hf_config, dtype)
    rules = family.NAME_MAP
    expected = flatten_dict(models.abstract_params(module))

    qparts: Dict[str, dict] = {}
    dense = []
    for name, array in iter_state_dict(directory):
        base, _, suffix = name.rpartition(".")
        if suffix in QUANT_SUFFIXES:
            qparts.setdefault(base, {})[suffix] = array
        else:
            dense.append((name, array))

    quantized = {}
    for prefix, parts in qparts.items():
        found = _match(rules, prefix + ".weight")
        if found is None or not found[1].linear or found[0] not in expected:
            raise CheckpointError(f"{directory}: tensor(s) {', '.join(prefix + '.' + s for s in sorted(parts))} have "
                                  "no place in this model (not a linear layer of it)")
        path = found[0]
        quantized[path] = _quantized_leaf(prefix, parts, tuple(expected[path].shape), q, directory)

    dense_paths = {}
    for name, _ in dense:
        found = _match(rules, name)
        if found is not None:
            dense_paths[found[0]] = name
    for path in quantized:
        if path in dense_paths:
            raise CheckpointError(f"{directory}: {dense_paths[path]} is stored both dense and quantized")
    if quantized:
        for path in expected:
            if (path[0].startswith("layers_") and path[-1] == "kernel" and path not in quantized
                    and path not in dense_paths):
                raise CheckpointError(f"{directory}: missing tensor {hf_name(rules, path)[0][:-len('.weight')]}"
                                      ".qweight (and its qzeros, scales, g_idx)")
    rest = unflatten_dict({k: v for k, v in expected.items() if k not in quantized})
    params = flatten_dict(convert(iter(dense), rules, rest, models.resolve_dtype(dtype), source=directory,
                                  ignore=getattr(family, "IGNORED_WEIGHTS", ())))
    params.update(quantized)
    params = unflatten_dict(params)

    tok = models.load_tokenizer(directory) if tokenizer else None
    lm = models.LoadedModel(family=family, config=config, module=module, params=params, tokenizer=tok,
                            hf_config=hf_config, source=directory, dtype=models.resolve_dtype(dtype))
    lm.quant_meta = {"method": "gptq", "checkpoint_format": q["checkpoint_format"],
                     "quant_config": {k: q[k] for k in ("bits", "group_size", "sym", "desc_act") if k in q},
                     "avg_bits": quantized_bits(params)["avg_bits"]}
    return lm
