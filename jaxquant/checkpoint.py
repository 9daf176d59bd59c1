"""Quantized checkpoints: orbax parameter tree + ``jaxquant.json`` metadata + tokenizer files.

Directory layout::

    DIR/jaxquant.json   method, quantization config, HF model config, dtype, jaxquant version, and for every
                        quantized kernel its format name and static fields (bits, group size, ...)
    DIR/params/         orbax StandardCheckpointer tree; a quantized kernel is stored as a dict of its arrays
    DIR/tokenizer/      tokenizer files (``save_pretrained``)

Saving writes into a temporary sibling directory and renames it into place, and refuses to replace an existing
non-empty directory unless asked: nothing already written is lost to a failed or mistaken save.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from models.weights import CheckpointError

METADATA_FILE = "jaxquant.json"
ARRAYS_KEY = "_method_arrays"  # top-level key of the stored tree holding save(arrays=...)
FORMAT_VERSION = 1


def _formats() -> dict:
    from jaxquant.formats import all_formats

    return all_formats()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxquant")
    except PackageNotFoundError:
        return "unknown"


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, METADATA_FILE))


def is_quantized(leaf) -> bool:
    return type(leaf).__name__ in _formats()


def _split(params: dict):
    """Params with quantized leaves -> (plain nested dict of arrays, {path: {format, static fields}})."""
    flat = flatten_dict(params, is_leaf=lambda _, v: is_quantized(v))
    plain, quantized = {}, {}
    for path, leaf in flat.items():
        key = "/".join(path)
        if is_quantized(leaf):
            fields = {f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf)}
            arrays = {k: np.asarray(v) for k, v in fields.items() if isinstance(v, (jax.Array, np.ndarray))}
            static = {k: v for k, v in fields.items() if k not in arrays}
            quantized[key] = {"format": type(leaf).__name__, **static}
            for name, array in arrays.items():
                if array.size == 0:  # orbax refuses zero-size arrays (e.g. a CSR with no outliers): keep the spec
                    quantized[key].setdefault("_empty", {})[name] = [list(array.shape), array.dtype.name]
                else:
                    plain[path + (name,)] = array
        else:
            plain[path] = np.asarray(leaf)
    return unflatten_dict(plain), quantized


def save(path: str, params: dict, lm, method: str, config: Any = None, report: Any = None,
         extra: Optional[dict] = None, overwrite: bool = False, arrays: Optional[dict] = None) -> str:
    """Save a (quantized) parameter tree of ``lm`` (a models.LoadedModel) with everything needed to load it.
    ``arrays``: a method's own nested dict of arrays outside the model's parameters (RPTQ: permutations and
    activation quantizers), stored beside them and handed back by ``load`` as ``lm.quant_arrays``."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose another --out or pass overwrite=True")
    plain, quantized = _split(jax.device_get(params))
    if arrays:
        plain[ARRAYS_KEY] = jax.tree.map(np.asarray, jax.device_get(arrays))
    meta = {
        "format_version": FORMAT_VERSION,
        "jaxquant_version": _version(),
        "method": method,
        "quant_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        "model_type": lm.hf_config.get("model_type"),
        "hf_config": lm.hf_config,
        "dtype": jnp.dtype(lm.dtype).name,
        "source": lm.source,
        "quantized": quantized,
        "report": None if report is None else {
            "seconds": report.seconds, "nsamples": report.nsamples, "seqlen": report.seqlen,
            "total_error": report.total_error(), "layers": report.layers},
        **(extra or {}),
    }
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, "params"), plain)
    checkpointer.wait_until_finished()
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=1, default=str)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load(path: str):
    """Load a checkpoint written by :func:`save`; returns a ``models.LoadedModel`` with ``quant_meta`` set."""
    import orbax.checkpoint as ocp

    import models

    meta_file = os.path.join(path, METADATA_FILE)
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_file}: unreadable checkpoint metadata: {err}") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {meta.get('format_version')} is not "
                              f"{FORMAT_VERSION}")
    family, config, module = models.build(meta["hf_config"], meta["dtype"])
    try:
        plain = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, "params")))
    except Exception as err:  # noqa: BLE001 - orbax raises many types for missing/corrupt files
        raise CheckpointError(f"{path}/params: cannot restore the parameter tree: {err}") from err
    arrays = plain.pop(ARRAYS_KEY, None)
    params = _assemble(plain, meta["quantized"], models.abstract_params(module), path)
    tok_dir = os.path.join(path, "tokenizer")
    tokenizer = models.load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    lm = models.LoadedModel(family=family, config=config, module=module, params=params, tokenizer=tokenizer,
                            hf_config=meta["hf_config"], source=path, dtype=models.resolve_dtype(meta["dtype"]))
    from jaxquant.formats import quantized_bits

    lm.quant_meta = {"method": meta["method"], "quant_config": meta.get("quant_config"), "calib": meta.get("calib"),
                     "quant_wall_s": meta.get("quant_wall_s"), "avg_bits": quantized_bits(params)["avg_bits"]}
    lm.quant_arrays = arrays
    if meta["method"] == "rptq":  # permutations into the norms, the model wrapped with its activation quantizers
        from jaxquant import rptq

        lm = rptq.from_checkpoint(lm, meta)
    return lm


def _assemble(plain: dict, quantized: dict, expected: dict, source: str) -> dict:
    """Rebuild quantized leaves and check every expected parameter is there with the right shape."""
    formats = _formats()
    flat = {"/".join(k): v for k, v in flatten_dict(plain).items()}
    out = {}
    for path, want in flatten_dict(expected).items():
        key = "/".join(path)
        if key in quantized:
            spec = dict(quantized[key])
            empty = spec.pop("_empty", {})
            cls = formats.get(spec.pop("format"))
            if cls is None:
                raise CheckpointError(f"{source}: {key} has unknown quantized format {quantized[key]['format']!r}")
            arrays = {}
            for f in dataclasses.fields(cls):
                if f.name in spec:
                    continue
                if f.name in empty:
                    shape, dtype = empty[f.name]
                    arrays[f.name] = jnp.zeros(shape, dtype)
                    continue
                if f"{key}/{f.name}" not in flat:
                    raise CheckpointError(f"{source}: missing tensor {key}/{f.name}")
                arrays[f.name] = jnp.asarray(flat[f"{key}/{f.name}"])
            try:
                leaf = cls(**arrays, **spec)
            except TypeError as err:  # a static field missing from, or unknown to, the metadata entry
                raise CheckpointError(f"{source}: metadata of quantized {key} does not fit {cls.__name__}: {err}") \
                    from err
            if tuple(leaf.shape) != tuple(want.shape):
                raise CheckpointError(f"{source}: {key} is quantized with shape {tuple(leaf.shape)}, the model "
                                      f"expects {tuple(want.shape)}")
            try:
                leaf.check_shapes()
            except ValueError as err:  # arrays and metadata (bits, group size, ...) disagree: name the tensor
                raise CheckpointError(f"{source}: quantized {key}: {err}") from err
            out[path] = leaf
        else:
            if key not in flat:
                raise CheckpointError(f"{source}: missing tensor {key}")
            value = jnp.asarray(flat[key])
            if tuple(value.shape) != tuple(want.shape):
                raise CheckpointError(f"{source}: tensor {key} has shape {tuple(value.shape)}, the model expects "
                                      f"{tuple(want.shape)}")
            out[path] = value.astype(want.dtype)
    return unflatten_dict(out)
